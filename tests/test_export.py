"""Issue 12: torch.export of the decoding step and of a prefill (the state as explicit inputs and outputs), and an
ONNX export that runs in onnxruntime with the eager model's logits."""

import onnxruntime
import oracle
import pytest
import torch

from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM
from modeling_rwkv7.export_rwkv7 import RWKV7StateFunction, export_onnx

VOCAB = 256


@pytest.fixture(scope="module")
def model() -> RWKV7ForCausalLM:
    """2 layers, hidden 64, 2 heads of 32, the zero-initialised output projections filled in."""
    torch.manual_seed(0)
    model = RWKV7ForCausalLM(RWKV7Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, head_dim=32)).eval()
    oracle.fill_zero_matrices(model)
    return model


def tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def cache_tensors(cache) -> list[torch.Tensor]:
    return [layer.tensors()[name] for layer in cache.layers for name in ("recurrent_state", "attn_shift_state", "ffn_shift_state")]


@pytest.mark.parametrize("seq_len", [1, 40])  # the decoding step; a prefill through the chunked WKV form
def test_torch_export_takes_and_returns_the_state(model, seq_len):
    function = RWKV7StateFunction(model).eval()
    with torch.no_grad():
        warm = model.init_cache(2)
        model(tokens(2, 9, seed=1), past_key_values=warm)
        state = tuple(t.clone() for t in cache_tensors(warm))
        exported = torch.export.export(function, (tokens(2, seq_len, seed=2), torch.ones(2, seq_len, dtype=torch.long), *state))

        ids, mask = tokens(2, seq_len, seed=3), torch.ones(2, seq_len, dtype=torch.long)
        mask[0, 0] = 0  # a padded position: the mask is a real input of the graph
        logits, *new_state = exported.module()(ids, mask, *state)
        # the truth: the eager model continuing the cache (after the export, which must leave it unaffected)
        expected = model(ids, attention_mask=mask, past_key_values=warm).logits
    assert logits.shape == (2, seq_len, VOCAB)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    for name, got, want in zip(function.state_names(), new_state, cache_tensors(warm)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=name)


def test_onnx_export_runs_in_onnxruntime_with_the_eager_logits(model, tmp_path):
    """A 16-token prefill then 8 decoding steps, the state fed back from onnxruntime's own outputs."""
    prefill_path, decode_path = tmp_path / "prefill.onnx", tmp_path / "decode.onnx"
    names = export_onnx(model, prefill_path, seq_len=16, batch_size=2)
    assert export_onnx(model, decode_path, seq_len=1, batch_size=2) == names
    sessions = {path: onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (prefill_path, decode_path)}

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
            expected = model(ids, past_key_values=cache).logits
            assert logits.shape == expected.shape
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4, msg=f"step {step}")
            ids = expected[:, -1:].argmax(-1)
    for got, want in zip(state, cache_tensors(cache)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_export_refuses_a_bad_length(model, tmp_path):
    with pytest.raises(ValueError, match="seq_len and batch_size must be positive integers, got 0 and 1"):
        export_onnx(model, tmp_path / "x.onnx", seq_len=0)
    with pytest.raises(TypeError, match="wraps an RWKV7ForCausalLM, got Linear"):
        RWKV7StateFunction(torch.nn.Linear(2, 2))
