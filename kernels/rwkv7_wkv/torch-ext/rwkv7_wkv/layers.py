"""Hub layers for `kernels.kernelize`: each replaces the `forward` of the model layer of the same name."""

import torch
from torch import nn

from . import wkv7


class RWKV7WKV(nn.Module):
    """The forward of `modeling_rwkv7.wkv.RWKV7WKV` through this kernel's ops: inputs ``[batch, seq_len, heads,
    head_dim]``, ``initial_state [batch, heads, head_dim (value), head_dim (key)]`` float32 or None, ``reset
    [batch, seq_len]`` bool or None; returns ``(y in r's dtype, final_state float32)``."""

    has_backward = True
    can_torch_compile = True  # the ops have fake implementations

    def forward(
        self,
        r: torch.Tensor,
        log_decay: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        initial_state=None,
        reset=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return wkv7(r, log_decay, k, v, a, b, initial_state, reset)


__all__ = ["RWKV7WKV"]
