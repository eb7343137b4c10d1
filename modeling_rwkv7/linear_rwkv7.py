"""`RWKV7Linear`: the projection layer of every RWKV-7 block, with the CPU's few-row (decoding) products."""

import math

import torch
from torch import nn


# Up to this many rows, a CPU projection is a matrix-vector product: see `RWKV7Linear`.
GEMV_MAX_ROWS = 16


class RWKV7Linear(nn.Linear):
    """`nn.Linear` whose few-row products on CPU (decoding, short prompts) read the weight at the memory bandwidth.

    A plain `F.linear` on one row streams the `[out, in]` weight through a single core at about half the machine's
    bandwidth. Viewing the weight as `blocks` row blocks `[blocks, out / blocks, in]` makes it a batched product
    that every thread streams its own share of: 2x faster for float32 decoding on a 2-core CPU (bfloat16 is
    faster through `F.linear`). Same parameters, same results up to float32 summation order; any other case is
    `nn.Linear`'s.
    """

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = hidden_states.numel() // self.in_features
        blocks = math.gcd(self.out_features, 64)
        few_rows_on_cpu = hidden_states.device.type == "cpu" and 0 < rows <= GEMV_MAX_ROWS
        if not few_rows_on_cpu or blocks == 1 or self.weight.dtype != torch.float32 or not self.weight.is_contiguous():
            return super().forward(hidden_states)
        weight_blocks = self.weight.view(blocks, self.out_features // blocks, self.in_features)
        columns = hidden_states.reshape(rows, self.in_features).t().expand(blocks, -1, -1)
        output = torch.bmm(weight_blocks, columns)  # [blocks, out / blocks, rows]
        output = output.view(self.out_features, rows).t().reshape(*hidden_states.shape[:-1], self.out_features)
        return output if self.bias is None else output + self.bias


__all__ = ["RWKV7Linear"]
