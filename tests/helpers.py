"""What several test files share: a small model at a trained model's scale, token-by-token decoding, and the
closeness measures of logits and states (in the manner of fla's tests/ops/utils.py)."""

import torch

from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM
from modeling_rwkv7.cache_rwkv7 import STATE_NAMES, RWKV7Cache

__all__ = ["STATE_NAMES", "VOCAB", "decode", "random_model", "relative_error", "state_errors", "trained_scale_"]

VOCAB = 1000


def trained_scale_(model: RWKV7ForCausalLM) -> RWKV7ForCausalLM:
    """Random weights at a trained model's scale, in place (the official init leaves the output projections and
    the LoRAs' first layers at zero, which would hide the recurrence): every matrix ~ 1/sqrt(in), mixes in (0, 1),
    decay biases across their range. Returns the model in eval mode."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embeddings" not in name:
                param.normal_(0, param.shape[1] ** -0.5)
            elif "x_" in name:
                param.uniform_(0, 1)
            elif name.endswith("w_lora.lora.2.bias"):
                param.uniform_(-4, 2)
    return model.eval()


def random_model(seed: int) -> RWKV7ForCausalLM:
    """A 2-layer model (hidden 128, 2 heads of 64, vocabulary VOCAB) at a trained model's scale."""
    config = RWKV7Config(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, head_dim=64, intermediate_size=512)
    torch.manual_seed(seed)
    return trained_scale_(RWKV7ForCausalLM(config))


def decode(step, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Feed `tokens` [batch, n] one at a time through `step` with `cache`; returns the logits [batch, n, VOCAB]."""
    logits = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            output = step(tokens[:, t : t + 1], cache=cache)
            assert output.logits.shape == (tokens.shape[0], 1, VOCAB)
            assert output.cache is cache
            logits.append(output.logits)
    return torch.cat(logits, dim=1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max abs error over the largest expected magnitude (shapes must agree, values finite)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all()
    scale = expected.float().abs().max().clamp_min(1e-6)
    return ((actual.float() - expected.float()).abs().max() / scale).item()


def state_errors(actual: RWKV7Cache, expected: RWKV7Cache) -> dict:
    """{(layer, name): relative error} for every state tensor, after checking shapes and dtypes."""
    assert len(actual.layers) == len(expected.layers)
    errors = {}
    for layer_idx, (actual_layer, expected_layer) in enumerate(zip(actual.layers, expected.layers)):
        for name in STATE_NAMES:
            a, e = getattr(actual_layer, name), getattr(expected_layer, name)
            what = f"layer {layer_idx} {name}: {tuple(a.shape)} {a.dtype} vs {tuple(e.shape)} {e.dtype}"
            assert a.shape == e.shape and a.dtype == e.dtype, what
            errors[layer_idx, name] = relative_error(a, e)
    return errors
