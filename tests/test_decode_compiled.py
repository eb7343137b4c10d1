"""Issue 11: the compiled decoding step computes what the eager model computes, token after token."""

import torch

from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM
from modeling_rwkv7 import linear_rwkv7
from modeling_rwkv7.decode_rwkv7 import compile_decode_step


VOCAB = 1000  # random_model's vocabulary


def random_model(seed: int) -> RWKV7ForCausalLM:
    """A small model at a trained model's scale: every matrix ~ 1/sqrt(in) (the official init leaves some at
    zero), mixes in (0, 1), decay biases across their range."""
    config = RWKV7Config(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, head_dim=64, intermediate_size=512)
    torch.manual_seed(seed)
    model = RWKV7ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embeddings" not in name:
                param.normal_(0, param.shape[1] ** -0.5)
            elif "x_" in name:
                param.uniform_(0, 1)
            elif name.endswith("w_lora.lora.2.bias"):
                param.uniform_(-4, 2)
    return model


def decode(step, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Feed `tokens` [batch, n] one at a time through `step` with `cache`; returns the logits [batch, n, VOCAB]."""
    logits = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            output = step(tokens[:, t : t + 1], past_key_values=cache)
            assert output.logits.shape == (tokens.shape[0], 1, VOCAB)
            assert output.past_key_values is cache
            logits.append(output.logits)
    return torch.cat(logits, dim=1)


def test_compiled_step_matches_the_eager_step_over_64_tokens():
    """Batch 2, a 5-token eager prompt, then 64 tokens through both: logits and every state tensor agree."""
    model = random_model(seed=21)
    tokens = torch.randint(0, 1000, (2, 69), generator=torch.Generator().manual_seed(22))
    step = compile_decode_step(model, batch_size=2)
    # the decisions were made eagerly, before tracing, and for the compiled products too
    assert {key[-1] for key in linear_rwkv7.few_row_choices} == {False, True}
    with torch.no_grad():
        eager_cache = model(tokens[:, :5], use_cache=True).past_key_values
        compiled_cache = eager_cache.copy()
        for t in range(5, 69):
            eager = model(tokens[:, t : t + 1], past_key_values=eager_cache).logits
            compiled = step(tokens[:, t : t + 1], past_key_values=compiled_cache).logits
            assert compiled.shape == eager.shape == (2, 1, 1000)
            scale = eager.abs().max()
            assert (compiled - eager).abs().max() <= 1e-4 * scale, f"token {t}"
    for eager_layer, compiled_layer in zip(eager_cache.layers, compiled_cache.layers):
        for name in ("recurrent_state", "attn_shift_state", "ffn_shift_state"):
            expected, actual = getattr(eager_layer, name), getattr(compiled_layer, name)
            assert actual.shape == expected.shape and actual.dtype == expected.dtype
            assert (actual - expected).abs().max() <= 1e-4 * expected.abs().max().clamp_min(1), name
    assert int(compiled_cache.seen_tokens) == int(eager_cache.seen_tokens) == 69
