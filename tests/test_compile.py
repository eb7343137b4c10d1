"""Issue 12: one graph per forward pass. The model traces without a graph break (torch.compile fullgraph), a compiled
decoding step gives the eager logits and writes the state in place, and generate() with a compiled forward gives
the eager tokens."""

import oracle
import pytest
import torch
from transformers import CompileConfig

from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM

VOCAB = 256


def tiny_model(dtype=torch.float32, seed=0) -> RWKV7ForCausalLM:
    """2 layers, hidden 64, 2 heads of 32, with the zero-initialised output projections filled in (so every layer
    contributes to the logits)."""
    torch.manual_seed(seed)
    config = RWKV7Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, head_dim=32)
    model = RWKV7ForCausalLM(config).eval()
    oracle.fill_zero_matrices(model)
    return model.to(dtype)


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
def test_forward_traces_as_one_graph(dtype, seq_len, padded):
    """Decoding step and a 77-token prefill (the chunked WKV form), with and without padding, from a warm cache."""
    model = tiny_model(dtype)
    cache = model.init_cache(2)
    with torch.no_grad():
        model(tokens(2, 5, seed=1), past_key_values=cache)
    kwargs = {}
    if padded:
        mask = torch.ones(2, 5 + seq_len, dtype=torch.long)
        mask[1, -1] = 0  # pad the last position of row 1 (the only one when decoding)
        kwargs["attention_mask"] = mask
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(tokens(2, seq_len, seed=2), past_key_values=cache, **kwargs)
    reasons = [reason.reason.splitlines()[0] for reason in explanation.break_reasons]
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, reasons
    assert cache.get_seq_length() == 5 + seq_len


def test_compiled_decoding_matches_eager_and_keeps_the_state_in_place():
    model = tiny_model()
    compiled = torch.compile(model, fullgraph=True)
    prompt = tokens(2, 7, seed=3)
    with torch.no_grad():
        eager_cache, compiled_cache = model.init_cache(2), model.init_cache(2)
        model(prompt, past_key_values=eager_cache)
        model(prompt, past_key_values=compiled_cache)
        addresses = state_addresses(compiled_cache)
        token = prompt[:, -1:].contiguous()
        for step in range(32):
            expected = model(token, past_key_values=eager_cache).logits
            logits = compiled(token, past_key_values=compiled_cache).logits
            torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5, msg=f"step {step}")
            assert state_addresses(compiled_cache) == addresses, f"step {step}: a state tensor moved"
            token = expected[:, -1].argmax(-1, keepdim=True)
    assert compiled_cache.get_seq_length() == eager_cache.get_seq_length() == 7 + 32
    for compiled_state, eager_state in zip(compiled_cache.layers, eager_cache.layers):
        for name, tensor in compiled_state.tensors().items():
            torch.testing.assert_close(tensor, eager_state.tensors()[name], rtol=0, atol=1e-5, msg=name)


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


@pytest.mark.parametrize("route", ["compiled_forward", "compile_config"])
def test_generate_with_a_compiled_forward_equals_eager(route):
    model = tiny_model()
    prompt = tokens(2, 6, seed=4)
    mask = torch.ones_like(prompt)
    mask[1, :2] = 0  # left padding
    settings = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    expected = model.generate(prompt, **settings)
    if route == "compiled_forward":
        model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
        generated = model.generate(prompt, **settings)
    else:  # transformers compiles the decoding step itself (on CPU only when asked for every device)
        compile_config = CompileConfig(fullgraph=True, backend="aot_eager", dynamic=False)
        compile_config._compile_all_devices = True
        generated = model.generate(prompt, compile_config=compile_config, **settings)
        assert hasattr(model, "_compiled_call")  # the compiled step was used
    assert torch.equal(generated, expected)
