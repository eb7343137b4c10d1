"""A compiled decoding step: the eager model's own forward, traced once by torch.compile, so that a token costs a few
fused kernels instead of ~400 module calls. The eager model stays the reference (tests/test_decode_compiled.py)."""

import torch

from .linear_rwkv7 import GEMV_MAX_ROWS, measuring_compiled_products


def compile_decode_step(model, batch_size: int = 1, **compile_options):
    """`torch.compile(model, **compile_options)` (a model with token embeddings) for decoding `batch_size` rows one token at a time with an
    `RWKV7Cache` (`step(input_ids[:, t : t + 1], past_key_values=cache)`; any other call runs too, compiled again).

    Before compiling, one eager step on a scratch state makes `RWKV7Linear`'s few-row product decisions for this
    batch size, eager and compiled (each candidate compiled alone and timed; nothing is timed inside the trace,
    which reads them). The model's state is not touched. Call it again after changing the thread count. A PEFT
    model compiles the same way (its adapters are plain modules; switching or disabling them retraces).
    """
    if not 0 < batch_size <= GEMV_MAX_ROWS:
        raise ValueError(f"batch_size must be in [1, {GEMV_MAX_ROWS}] for a decoding step, got {batch_size}.")
    was_training = model.training
    model.eval()
    with torch.no_grad(), measuring_compiled_products():
        scratch = model.init_cache(batch_size=batch_size)
        token = torch.zeros(batch_size, 1, dtype=torch.long, device=model.device)
        model(token, past_key_values=scratch)
    model.train(was_training)
    return torch.compile(model, **compile_options)


__all__ = ["compile_decode_step"]
