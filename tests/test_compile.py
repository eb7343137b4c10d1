"""Issues 12 and 22: one graph per forward pass. The model traces without a graph break (torch.compile fullgraph);
compiled with inductor, the backend users get, a forward pass of any length with and without a cache, in float32
and bfloat16, a compiled decoding step and generate() with a compiled forward give what the eager model gives."""

import copy

import pytest
import torch
from helpers import random_model
from transformers import CompileConfig

from modeling_rwkv7 import RWKV7ForCausalLM

VOCAB = 256


def tiny_model(dtype=torch.float32, seed=0) -> RWKV7ForCausalLM:
    """2 layers, hidden 64, 2 heads of 32 (`helpers.random_model`), in `dtype`."""
    return random_model(seed, vocab_size=VOCAB, hidden_size=64, head_dim=32, intermediate_size=None).to(dtype)


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def state_addresses(cache) -> list[int]:
    return [t.data_ptr() for layer in cache.layers for t in layer.tensors().values()] + [cache._seen_tokens.data_ptr()]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq_len", [1, 77])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.slow
@pytest.mark.compile
def test_forward_traces_as_one_graph(dtype, seq_len, padded):
    """Decoding step and a 77-token prefill (the chunked WKV form), with and without padding, from a warm cache."""
    model = tiny_model(dtype)
    cache = model.init_cache(2)
    with torch.no_grad():
        model(tokens(2, 5, seed=1), cache=cache)
    kwargs = {}
    if padded:
        mask = torch.ones(2, 5 + seq_len, dtype=torch.long)
        mask[1, -1] = 0  # pad the last position of row 1 (the only one when decoding)
        kwargs["attention_mask"] = mask
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(tokens(2, seq_len, seed=2), cache=cache, **kwargs)
    reasons = [reason.reason.splitlines()[0] for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons
    assert cache.get_seq_length() == 5 + seq_len


@pytest.mark.compile
def test_compiled_decoding_matches_eager_and_keeps_the_state_in_place():
    model = tiny_model()
    compiled = torch.compile(model, fullgraph=True)
    prompt = tokens(2, 7, seed=3)
    with torch.no_grad():
        eager_cache, compiled_cache = model.init_cache(2), model.init_cache(2)
        model(prompt, cache=eager_cache)
        model(prompt, cache=compiled_cache)
        addresses = state_addresses(compiled_cache)
        token = prompt[:, -1:].contiguous()
        for step in range(32):
            expected = model(token, cache=eager_cache).logits
            logits = compiled(token, cache=compiled_cache).logits
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5, msg=f"step {step}")
            assert state_addresses(compiled_cache) == addresses, f"step {step}: a state tensor moved"
            token = expected[:, -1].argmax(-1, keepdim=True)
    assert compiled_cache.get_seq_length() == eager_cache.get_seq_length() == 7 + 32
    for compiled_state, eager_state in zip(compiled_cache.layers, eager_cache.layers):
        for name, tensor in compiled_state.tensors().items():
            torch.testing.assert_close(tensor, eager_state.tensors()[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.compile
def test_compiled_prefill_with_dynamic_length_does_not_recompile_per_length():
    """One graph for every length with the same number of WKV chunks (the chunked form runs its chunk-to-chunk
    recurrence as a Python loop, so the graph holds one step per chunk). The eager call comes first, so that the
    graph is traced with the chunk size measured on this CPU; 66, 69 and 71 tokens make as many chunks of 8, 16 or
    32 tokens each, the last one ragged (at least 2 tokens: a size-1 slice would be specialized)."""
    model = tiny_model()
    frames = []

    def counting_backend(graph_module, example_inputs):
        frames.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counting_backend)
    with torch.no_grad():
        for length in (66, 69, 71):
            ids = tokens(1, length, seed=length)
            expected = model(ids).logits
            torch.testing.assert_close(compiled(ids).logits, expected, rtol=0, atol=1e-5)
    assert len(frames) == 1


def state_tensors(cache) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": t for i, layer in enumerate(cache.layers) for name, t in layer.tensors().items()}


def assert_matches_eager(compiled: torch.Tensor, eager: torch.Tensor, truth: torch.Tensor, what: str) -> None:
    """A float32 model (`truth` is None): the compiled values equal the eager ones up to float32 summation order
    (1e-5 on values of order 1: inductor fuses and reorders the reductions). A bfloat16 model: no further from
    `truth` (the float32 model with the same weights) than the eager values are, within a factor 2 plus 1e-2 (eager
    rounds every op's output to bfloat16, inductor keeps a fused kernel's intermediates in float32, so neither is
    the reference of the other; a wrong compiled graph is off by the size of the values)."""
    if truth is None:
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5, msg=what)
        return
    truth = truth.float()
    compiled_error, eager_error = (compiled.float() - truth).abs().max(), (eager.float() - truth).abs().max()
    assert compiled_error <= 2 * eager_error + 1e-2, f"{what}: {compiled_error} vs eager bfloat16 {eager_error}"


# (dtype, with a cache): the lengths compiled, one graph each (a few, to keep the compile time in the suite's
# budget; a float32 decoding step with a cache: `test_compiled_decoding_matches_eager_and_keeps_the_state_in_place`).
# 1 token is the decoding step; 2-31 tokens run the per-token WKV loop (the lengths that crashed inductor with a
# cache, issue 22); 40 and 77 the chunked WKV form.
LENGTHS = {
    (torch.float32, True): (2, 7, 40),
    (torch.float32, False): (2, 77),
    (torch.bfloat16, True): (7, 77),
    (torch.bfloat16, False): (1, 40),
}


@pytest.mark.slow
@pytest.mark.compile
@pytest.mark.parametrize("dtype, with_cache", list(LENGTHS))
def test_inductor_forward_matches_eager(dtype, with_cache):
    """One `torch.compile(model, fullgraph=True)` (inductor) fed the lengths of LENGTHS in turn, each continuing the
    cache of the call before (warmed eagerly by 3 tokens); logits and every state tensor checked against the eager
    model's (in bfloat16, as `assert_matches_eager` says)."""
    model = tiny_model(dtype)
    compiled = torch.compile(model, fullgraph=True)
    runs = {"compiled": compiled, "eager": model}
    if dtype != torch.float32:
        runs["truth"] = copy.deepcopy(model).float()
    caches = {name: run.init_cache(2) if with_cache else None for name, run in runs.items()}
    with torch.no_grad():
        if with_cache:
            for name, cache in caches.items():
                runs[name if name == "truth" else "eager"](tokens(2, 3, seed=1), cache=cache)
        for length in LENGTHS[dtype, with_cache]:
            ids = tokens(2, length, seed=length)
            outputs = {name: run(ids, cache=caches[name]) for name, run in runs.items()}
            logits = {name: output.logits for name, output in outputs.items()}
            assert_matches_eager(logits["compiled"], logits["eager"], logits.get("truth"), f"{length} tokens: logits")
            states = {name: state_tensors(output.cache) for name, output in outputs.items()}
            for key, eager_tensor in states["eager"].items():
                truth_tensor = states["truth"][key] if "truth" in states else None
                assert_matches_eager(states["compiled"][key], eager_tensor, truth_tensor, f"{length} tokens: {key}")
            assert outputs["compiled"].cache.get_seq_length() == outputs["eager"].cache.get_seq_length()


@pytest.mark.compile
def test_generate_with_a_compiled_forward_equals_eager():
    """The issue 22 case: `model.forward` compiled with inductor, then generate() on a 6-token left-padded prompt
    (a 6-token prefill with a cache, then decoding steps): the eager tokens, and the eager logits at every step."""
    model = tiny_model()
    prompt = tokens(2, 6, seed=4)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding
    settings = dict(
        attention_mask=mask,
        max_new_tokens=8,
        min_new_tokens=8,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    expected = model.generate(prompt, **settings)
    model.forward = torch.compile(model.forward, fullgraph=True)
    generated = model.generate(prompt, **settings)
    assert torch.equal(generated.sequences, expected.sequences)
    for step, (logits, eager_logits) in enumerate(zip(generated.logits, expected.logits)):
        torch.testing.assert_close(logits, eager_logits, rtol=0, atol=1e-5, msg=f"step {step}")


def test_compile_config_on_cpu_says_it_is_skipped(caplog):
    """transformers compiles generate()'s decoding step for `compile_config` on accelerators only (on CPU only with
    a private flag of `CompileConfig`): the model says so once, and generates the eager tokens."""
    model = tiny_model()
    prompt = tokens(2, 6, seed=4)
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    expected = model.generate(prompt, **settings)
    with caplog.at_level("WARNING"):
        generated = model.generate(prompt, compile_config=CompileConfig(fullgraph=True), **settings)
        model.generate(prompt, compile_config=CompileConfig(fullgraph=True), **settings)
    assert torch.equal(generated, expected)
    ours = [record for record in caplog.records if "compile_config is not used on CPU" in record.getMessage()]
    assert len(ours) == 1
    assert "torch.compile(model.forward" in ours[0].getMessage()
    assert not hasattr(model, "_compiled_call")
