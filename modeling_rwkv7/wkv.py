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

import os
from typing import Optional

import torch
from torch import nn
from transformers.utils import logging

from .configuration_rwkv7 import WKV_BACKENDS

try:
    from kernels import use_kernel_forward_from_hub
except ImportError:  # without `kernels` the WKV layer is simply not kernelizable

    def use_kernel_forward_from_hub(layer_name: str):
        return lambda layer_class: layer_class


logger = logging.get_logger(__name__)


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
    state_a = torch.linalg.vecdot(state, a[:, :, None, :])
    new_state = state * decay[:, :, None, :]
    return new_state.addcmul_(state_a[..., :, None], b[..., None, :]).addcmul_(v[..., :, None], k[..., None, :])


# Below this length the per-token loop beats the chunked form's fixed cost (measured with scripts/bench_wkv_op.py).
CHUNKED_MIN_SEQ_LEN = 32


def select_wkv_backend(backend: str, seq_len: int, device: torch.device, kernel_repo: Optional[str]):
    """The implementation `wkv7` runs: ("kernel", module), ("chunked", None), ("step", None) or
    ("recurrent", None). `backend="auto"` takes the kernel-hub kernel when it loads (on CUDA, or anywhere with a
    local build in $RWKV7_KERNEL_PATH), else the chunked form from CHUNKED_MIN_SEQ_LEN tokens, else the per-token
    recurrence (one fused step for decoding). Forcing "kernel" raises when it cannot load."""
    from .wkv_kernel import KERNEL_PATH_ENV, load_wkv_kernel

    if backend == "kernel":
        return "kernel", load_wkv_kernel(kernel_repo, required=True)
    if backend == "auto" and (device.type == "cuda" or os.environ.get(KERNEL_PATH_ENV)):
        module = load_wkv_kernel(kernel_repo)
        if module is not None:
            return "kernel", module
    if backend == "chunked" or (backend == "auto" and seq_len >= CHUNKED_MIN_SEQ_LEN):
        return "chunked", None
    if backend not in WKV_BACKENDS:
        raise ValueError(f"Unknown WKV backend {backend!r}; expected one of {WKV_BACKENDS}.")
    return ("step" if seq_len == 1 else "recurrent"), None


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
    """WKV-7 through the implementation `backend` selects (see `select_wkv_backend`; the choice is logged once)."""
    name, kernel = select_wkv_backend(backend, r.shape[1], r.device, kernel_repo)
    if not torch.compiler.is_compiling():  # logging would break a traced graph
        logger.info_once(f"RWKV-7 WKV: {name} implementation (wkv_backend={backend!r}, device {r.device.type})")
    if name == "kernel":
        return kernel.wkv7(r, log_decay, k, v, a, b, initial_state, reset)
    if name == "chunked":
        from .wkv_chunked import wkv7_chunked

        return wkv7_chunked(r, log_decay, k, v, a, b, initial_state, reset)
    return wkv7_recurrent(r, log_decay, k, v, a, b, initial_state, reset)  # "step" is one `wkv7_step`


@use_kernel_forward_from_hub("RWKV7WKV")
class RWKV7WKV(nn.Module):
    """The WKV operator as a layer, so that `kernels.kernelize(model, mode=...)` can replace its forward with a hub
    kernel's `layers.RWKV7WKV` (layer name "RWKV7WKV"). Unkernelized, it is `wkv7` with the config's `wkv_backend`
    and `kernel_repo`. No parameters; the arguments and outputs are those of `wkv7` (module docstring)."""

    def __init__(self, config):
        super().__init__()
        self.config = config

    def forward(
        self,
        r: torch.Tensor,
        log_decay: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        initial_state: Optional[torch.Tensor] = None,
        reset: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return wkv7(r, log_decay, k, v, a, b, initial_state, reset,
                    backend=self.config.wkv_backend, kernel_repo=self.config.kernel_repo)
