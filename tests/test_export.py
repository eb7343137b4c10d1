"""Issues 12 and 22: torch.export of the model itself (its `RWKV7Cache` in and out, as transformers' caches; a
dynamic batch), through transformers' exporter (prefill, decode, a generation loop), of the decoding step and of a
prefill with the state as explicit tensors, and an ONNX export that runs in onnxruntime with the eager logits."""

import inspect

import onnxruntime
import pytest
import torch
from helpers import STATE_NAMES, random_model
from torch.export import Dim
from transformers.exporters.configs import DynamoConfig
from transformers.exporters.exporter_dynamo import DynamoExporter

from modeling_rwkv7 import RWKV7Cache, RWKV7ForCausalLM
from modeling_rwkv7.export_rwkv7 import (
    RWKV7ExportableModule,
    RWKV7StateFunction,
    export_onnx,
    export_with_state,
)

VOCAB = 256


@pytest.fixture(scope="module")
def model() -> RWKV7ForCausalLM:
    """2 layers, hidden 64, 2 heads of 32."""
    return random_model(0, vocab_size=VOCAB, hidden_size=64, head_dim=32, intermediate_size=None)


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def cache_tensors(cache) -> list[torch.Tensor]:
    return [layer.tensors()[name] for layer in cache.layers for name in STATE_NAMES]


def assert_same_state(cache, expected_cache, what: str) -> None:
    assert type(cache) is RWKV7Cache, what
    for index, (got, want) in enumerate(zip(cache_tensors(cache), cache_tensors(expected_cache), strict=True)):
        name = f"layer {index // len(STATE_NAMES)} {STATE_NAMES[index % len(STATE_NAMES)]}"
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=f"{what}: {name}")
    assert cache.get_seq_length() == expected_cache.get_seq_length(), what


@pytest.mark.compile
def test_torch_export_of_the_model_returns_its_state(model):
    """`torch.export.export(model, (ids,))`: the output holds the new `RWKV7Cache` (a registered pytree node)."""
    ids = tokens(2, 5, seed=5)
    with torch.no_grad():
        exported = torch.export.export(model, (ids,))
        output, expected = exported.module()(ids), model(ids)
    torch.testing.assert_close(output.logits, expected.logits, rtol=0, atol=1e-5)
    assert_same_state(output.cache, expected.cache, "returned state")


@pytest.mark.compile
def test_torch_export_with_a_dynamic_batch_takes_and_continues_a_cache(model):
    """One export, batch a `Dim`, an `RWKV7Cache` passed in (updated in place, as the eager model updates it), run at
    batch sizes 2 and 3."""
    ids, cache = tokens(2, 5, seed=6), model.init_cache(2)
    batch = Dim("batch")
    state_shapes = [{0: batch}] * len(cache_tensors(cache)) + [None]  # the state tensors, then seen_tokens
    with torch.no_grad():
        exported = torch.export.export(
            model, (ids,), {"cache": cache}, dynamic_shapes={"input_ids": {0: batch}, "cache": state_shapes}
        )
        for batch_size in (2, 3):
            cache, expected_cache = model.init_cache(batch_size), model.init_cache(batch_size)
            model(tokens(batch_size, 4, seed=7), cache=cache)
            model(tokens(batch_size, 4, seed=7), cache=expected_cache)
            ids = tokens(batch_size, 5, seed=8)
            output = exported.module()(ids, cache=cache)
            expected = model(ids, cache=expected_cache)
            torch.testing.assert_close(output.logits, expected.logits, rtol=0, atol=1e-5, msg=f"batch {batch_size}")
            assert_same_state(cache, expected_cache, f"batch {batch_size}")


@pytest.mark.slow
@pytest.mark.compile
@pytest.mark.parametrize("multi_token_decode", [False, True])
def test_transformers_exporter_prefill_decode_and_generation(model, multi_token_decode):
    """transformers' `DynamoExporter.export_for_generation`: the exported prefill gives the eager logits and state;
    a greedy loop over the exported single-token decode gives generate()'s tokens; the multi-token decode (two
    decoding steps merged into one call, with the mask of the second) gives the eager two-token continuation. An
    exported graph holds one length (the WKV loop is unrolled), so that decode takes exactly two tokens."""
    prompt = tokens(2, 6, seed=9)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding
    exported = DynamoExporter().export_for_generation(
        model, {"input_ids": prompt, "attention_mask": mask}, DynamoConfig(), multi_token_decode=multi_token_decode
    )
    prefill, decode = exported.runners["prefill"], exported.runners["decode"]
    # the inputs generate() passes: position_ids from the mask (1 at padding), then counting on
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache, eager_cache = model.init_cache(2), model.init_cache(2)
    with torch.no_grad():
        logits = prefill(input_ids=prompt, attention_mask=mask, position_ids=positions, cache=cache).logits
        eager_logits = model(prompt, attention_mask=mask, position_ids=positions, cache=eager_cache).logits
        torch.testing.assert_close(logits, eager_logits, rtol=0, atol=1e-5, msg="prefill")
        assert_same_state(cache, eager_cache, "prefill")
        generated, position = [logits[:, -1:].argmax(-1)], positions[:, -1:]
        for step in range(3):
            if multi_token_decode:
                ids, step_positions = tokens(2, 2, seed=10 + step), position + torch.arange(1, 3)
            else:
                ids, step_positions = generated[-1], position + 1
            logits = decode(input_ids=ids, position_ids=step_positions, cache=cache).logits
            eager_logits = model(ids, position_ids=step_positions, cache=eager_cache).logits
            torch.testing.assert_close(logits, eager_logits, rtol=0, atol=1e-5, msg=f"decode {step}")
            assert_same_state(cache, eager_cache, f"decode {step}")
            generated.append(logits[:, -1:].argmax(-1))
            position = step_positions[:, -1:]
    if not multi_token_decode:
        expected = model.generate(prompt, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.equal(torch.cat([prompt, *generated], 1), expected)


@pytest.mark.compile
def test_exported_module_with_its_state_in_buffers_generates_the_eager_tokens(model):
    """`export_with_state` (transformers' ExecuTorch recipe, for a recurrent state): one exported decoding step
    generates what generate() does, twice in a row (cache_position 0 starts a new sequence), and its logits are the
    eager model's."""
    exported = export_with_state(model, batch_size=2)
    for seed in (11, 12):
        prompt = tokens(2, 5, seed=seed)
        expected = model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert torch.equal(RWKV7ExportableModule.generate(exported, prompt, max_new_tokens=4), expected)
    module, cache = exported.module(), model.init_cache(2)
    with torch.no_grad():
        for position, token in enumerate(expected.unbind(1)):
            logits = module(input_ids=token[:, None], cache_position=torch.tensor([position]))
            torch.testing.assert_close(logits, model(token[:, None], cache=cache).logits, rtol=0, atol=1e-5)


def test_generate_from_inputs_embeds_equals_generate_from_ids(model):
    """`prepare_inputs_for_generation` names `inputs_embeds` (transformers' generation tests look for it there),
    and generate() from a left-padded prompt's embeddings gives the tokens generate() gives from its ids."""
    assert "inputs_embeds" in inspect.signature(model.prepare_inputs_for_generation).parameters
    prompt = tokens(2, 6, seed=13)
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0  # left padding
    settings = dict(attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    expected = model.generate(prompt, **settings)
    with torch.no_grad():
        embeddings = model.get_input_embeddings()(prompt)
    assert torch.equal(model.generate(inputs_embeds=embeddings, **settings), expected[:, prompt.shape[1] :])


def test_decoding_steps_take_no_mask(model):
    """generate()'s decoding steps feed no attention mask (their tokens are never padding), so their inputs keep
    one shape, and two steps merged into one call (transformers' exporter) read no stale one-column mask."""
    cache = model.init_cache(2)
    with torch.no_grad():
        model(tokens(2, 4, seed=14), cache=cache)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 0] = 0
    prompt_inputs = model.prepare_inputs_for_generation(
        tokens(2, 5, seed=15), cache=cache, attention_mask=mask, next_sequence_length=1, is_first_iteration=True
    )
    step_inputs = model.prepare_inputs_for_generation(
        tokens(2, 5, seed=15), cache=cache, attention_mask=mask, next_sequence_length=1, is_first_iteration=False
    )
    assert torch.equal(prompt_inputs["attention_mask"], mask)
    assert "attention_mask" not in step_inputs and step_inputs["input_ids"].shape == (2, 1)


@pytest.mark.parametrize("seq_len", [1, 40])  # the decoding step; a prefill through the chunked WKV form
@pytest.mark.compile
def test_torch_export_takes_and_returns_the_state(model, seq_len):
    function = RWKV7StateFunction(model).eval()
    with torch.no_grad():
        warm = model.init_cache(2)
        model(tokens(2, 9, seed=1), cache=warm)
        state = tuple(t.clone() for t in cache_tensors(warm))
        exported = torch.export.export(
            function, (tokens(2, seq_len, seed=2), torch.ones(2, seq_len, dtype=torch.long), *state)
        )

        ids, mask = tokens(2, seq_len, seed=3), torch.ones(2, seq_len, dtype=torch.long)
        mask[0, 0] = 0  # a padded position: the mask is a real input of the graph
        logits, *new_state = exported.module()(ids, mask, *state)
        # the truth: the eager model continuing the cache (after the export, which must leave it unaffected)
        expected = model(ids, attention_mask=mask, cache=warm).logits
    assert logits.shape == (2, seq_len, VOCAB)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    for name, got, want in zip(function.state_names(), new_state, cache_tensors(warm)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.compile
def test_onnx_export_runs_in_onnxruntime_with_the_eager_logits(model, tmp_path):
    """A 16-token prefill then 8 decoding steps, the state fed back from onnxruntime's own outputs."""
    prefill_path, decode_path = tmp_path / "prefill.onnx", tmp_path / "decode.onnx"
    names = export_onnx(model, prefill_path, seq_len=16, batch_size=2)
    assert export_onnx(model, decode_path, seq_len=1, batch_size=2) == names
    sessions = {
        path: onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for path in (prefill_path, decode_path)
    }

    def run(path, ids, state):
        session = sessions[path]
        feeds = dict(zip(names, (ids, torch.ones_like(ids), *state)))
        wanted = {i.name for i in session.get_inputs()}
        outputs = session.run(None, {name: t.numpy() for name, t in feeds.items() if name in wanted})
        return torch.from_numpy(outputs[0]), [torch.from_numpy(o) for o in outputs[1:]]

    cache = model.init_cache(2)
    ids = tokens(2, 16, seed=4)
    state = RWKV7StateFunction(model).initial_state(2)
    with torch.no_grad():
        for step in range(9):
            path = prefill_path if step == 0 else decode_path
            logits, state = run(path, ids, state)
            expected = model(ids, cache=cache).logits
            assert logits.shape == expected.shape
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4, msg=f"step {step}")
            ids = expected[:, -1:].argmax(-1)
    for got, want in zip(state, cache_tensors(cache)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.compile
def test_export_refuses_a_bad_length(model, tmp_path):
    with pytest.raises(ValueError, match="seq_len and batch_size must be positive integers, got 0 and 1"):
        export_onnx(model, tmp_path / "x.onnx", seq_len=0)
    with pytest.raises(TypeError, match="wraps an RWKV7ForCausalLM, got Linear"):
        RWKV7StateFunction(torch.nn.Linear(2, 2))
