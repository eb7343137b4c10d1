"""The RWKV-7 WKV operator: the generalized delta rule with a per-channel decay.

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
"""

from typing import Optional

import torch


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
        state = wkv7_step(r[:, t], decay[:, t], k[:, t], v[:, t], a[:, t], b[:, t], state)
        outputs.append(torch.einsum("bhij,bhj->bhi", state, r[:, t]))
    y = torch.stack(outputs, dim=1) if outputs else r.new_zeros(r.shape)
    return y.to(output_dtype), state


def wkv7_step(
    r: torch.Tensor,
    decay: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """One token of WKV-7: all inputs ``[batch, num_heads, head_dim]`` float32 (``decay``, not its log);
    ``state`` is ``[batch, num_heads, value, key]``. Returns the new state (not in place)."""
    state_a = torch.einsum("bhij,bhj->bhi", state, a)
    return state * decay[:, :, None, :] + state_a[..., :, None] * b[..., None, :] + v[..., :, None] * k[..., None, :]


def wkv7(
    r: torch.Tensor,
    log_decay: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    reset: Optional[torch.Tensor] = None,
    backend: str = "auto",
    kernel_repo: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 through the implementation `backend` selects (see `RWKV7Config.wkv_backend`)."""
    return wkv7_recurrent(r, log_decay, k, v, a, b, initial_state, reset)
