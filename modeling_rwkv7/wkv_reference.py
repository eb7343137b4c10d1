"""The RWKV-7 WKV operator: the generalized delta rule with a per-channel decay. Its contract, its reference
recurrence, and random inputs at RWKV-7's scales.

Per head, with the state ``S`` laid out ``[value, key]`` as in the official code:

    S_t = S_{t-1} @ (diag(exp(log_decay_t)) + a_t b_t^T) + v_t k_t^T
    y_t = S_t @ r_t

RWKV-7 calls it with ``a = -kappa_hat`` and ``b = kappa_hat * iclr`` (see ``RWKV7Attention``).
Every implementation in this package takes the same arguments:

    r, log_decay, k, v, a, b: [batch, seq_len, num_heads, head_dim]
    initial_state:            [batch, num_heads, head_dim (value), head_dim (key)], float32, or None (zeros)
    reset:                    [batch, seq_len] bool, or None. True where a new document starts: the state
                              is zeroed before that token is written (packed sequences).

and returns ``(y [batch, seq_len, num_heads, head_dim] in r's dtype, final_state float32)``.
The state and all accumulation are float32 whatever the input dtype.

This module imports torch and the standard library only, like `wkv_chunked`, so that the kernel's GPU check
(`kernels/rwkv7_wkv/benchmarks/gpu_check.py`) loads the two files from their paths where torch is all there is.
"""

import math
from typing import Optional

import torch

# RWKV-7's decay is exp(log_decay) with log_decay = -DECAY_SCALE * sigmoid(w): it lies in (0.5452, 1)
DECAY_SCALE = math.exp(-0.5)


def wkv7_recurrent(
    r: torch.Tensor,
    log_decay: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    reset: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference WKV-7: a plain loop over time, batched over batch and heads, float32 state."""
    batch_size, seq_len, num_heads, head_dim = r.shape
    output_dtype = r.dtype
    if initial_state is None:
        state = r.new_zeros(batch_size, num_heads, head_dim, head_dim, dtype=torch.float32)
    else:
        state = initial_state.float()
    r, decay, k, v, a, b = (t.float() for t in (r, log_decay.exp(), k, v, a, b))
    keep = None if reset is None else (~reset).to(torch.float32)
    outputs = []
    for t in range(seq_len):
        if keep is not None:
            state = state * keep[:, t, None, None, None]
        state = wkv7_step(decay[:, t], k[:, t], v[:, t], a[:, t], b[:, t], state)
        outputs.append(torch.linalg.vecdot(state, r[:, t, :, None, :]))
    y = torch.stack(outputs, dim=1) if outputs else r.new_zeros(r.shape)
    return y.to(output_dtype), state


def wkv7_step(
    decay: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """One token's state update: inputs ``[batch, num_heads, head_dim]`` float32 (``decay``, not its log), ``state``
    ``[batch, num_heads, value, key]``. Returns the new state (not in place); the output is ``state @ r``."""
    if torch.compiler.is_compiling():
        # a matmul, which inductor does not fuse: a state that only fused loop nests read, in a loop of several
        # tokens whose final state is written in place to the cache, crashes inductor's CPU code generation
        # (KeyError 'bufN', pytorch/pytorch#196570). Eager, the reduction is the faster of the two.
        state_a = (state @ a[..., None]).squeeze(-1)
    else:
        state_a = torch.linalg.vecdot(state, a[:, :, None, :])
    new_state = state * decay[:, :, None, :]
    return new_state.addcmul_(state_a[..., :, None], b[..., None, :]).addcmul_(v[..., :, None], k[..., None, :])


def random_wkv_inputs(
    batch_size: int,
    seq_len: int,
    num_heads: int,
    head_dim: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    reset_rate: float = 0.0,
) -> dict[str, Optional[torch.Tensor]]:
    """The arguments of a WKV-7 call at RWKV-7's scales, from a generator seeded with `seed` (the global RNG is left
    alone), in the contract's order: r, log_decay, k, v, a, b, initial_state, reset.

    log_decay is the model's ``-DECAY_SCALE * sigmoid(w)``, float32, with one value in ten eight times faster (a
    decay down to e^-4.9); ``a = -kappa_hat``, ``b = kappa_hat * iclr`` with iclr in (0, 1); r, k, v, a, b in
    `dtype`; a random float32 initial state; `reset` True with probability `reset_rate` (None when 0)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, seq_len, num_heads, head_dim)

    def randn(*size):
        return torch.randn(size or shape, generator=generator)

    r, k, v = randn(), 0.5 * randn(), randn()
    log_decay = -DECAY_SCALE * torch.sigmoid(2 * randn())
    log_decay = torch.where(torch.rand(shape, generator=generator) < 0.1, 8 * log_decay, log_decay)
    kappa = torch.nn.functional.normalize(randn(), dim=-1)
    a, b = -kappa, kappa * torch.rand(shape, generator=generator)
    initial_state = 0.3 * randn(batch_size, num_heads, head_dim, head_dim)
    reset = torch.rand(batch_size, seq_len, generator=generator) < reset_rate if reset_rate else None
    inputs = dict(r=r, log_decay=log_decay, k=k, v=v, a=a, b=b, initial_state=initial_state, reset=reset)
    return {
        name: None if x is None else x.to(device, dtype if name in ("r", "k", "v", "a", "b") else x.dtype)
        for name, x in inputs.items()
    }


__all__ = ["DECAY_SCALE", "random_wkv_inputs", "wkv7_recurrent", "wkv7_step"]
