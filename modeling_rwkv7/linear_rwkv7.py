"""`RWKV7Linear`: the projection layer of every RWKV-7 block, with a measured choice of the CPU's few-row product.

Decoding multiplies one to a few rows by every weight matrix, so its speed is the rate at which the weights stream
from memory. Which product streams fastest depends on the CPU, the weight's shape and dtype and the thread count: a
one-row `F.linear` reads an `[out, in]` float32 weight through a single core on an AMD EPYC (half the bandwidth),
while a batched product over row blocks of the same weight, which every thread streams its own share of, is 2x
faster there and 2-2.5x slower on an Intel Xeon. So nothing is assumed: the first eager call of each
(shape, dtype, rows, threads) times the candidates in `FEW_ROW_PRODUCTS` on weights streamed from memory (a few ms)
and keeps the fastest for the rest of the process (`few_row_choices`, logged once per decision). All candidates
compute the same values up to float32 summation order, so a wrong decision can only cost speed.
"""

import itertools
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Up to this many rows, a CPU projection is a matrix-vector product whose speed is the weight's streaming rate.
GEMV_MAX_ROWS = 16
# Weights smaller than this are timed over enough zero-filled copies to stream at least this many bytes from memory,
# not from cache (more than the L3 of the CPUs met so far: 32 MiB on the AMD EPYC); larger ones are timed in place.
_STREAM_BYTES = 64 << 20
_TIMED_PASSES = 3
_PASS_SECONDS = 0.004  # a pass ends after the product that exceeds this (or after every copy once)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def linear_product(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`rows @ weight.T` through `F.linear`. rows: [n, in]; weight: [out, in]. Returns [n, out]."""
    return F.linear(rows, weight)


def row_block_product(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`rows @ weight.T` as one batched product over `gcd(out, 64)` row blocks `[blocks, out / blocks, in]` of the
    (contiguous) weight, so that every thread streams its own blocks. rows: [n, in]; weight: [out, in] -> [n, out]."""
    out_features, in_features = weight.shape
    blocks = math.gcd(out_features, 64)
    weight_blocks = weight.view(blocks, out_features // blocks, in_features)
    output = torch.bmm(weight_blocks, rows.t().expand(blocks, -1, -1))  # [blocks, out / blocks, n]
    return output.view(out_features, rows.shape[0]).t()


FEW_ROW_PRODUCTS = {"linear": linear_product, "row_blocks": row_block_product}
# Only these weights are reshaped; tensor subclasses (torchao's quantized tensors...) keep their own F.linear.
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


@dataclass(frozen=True)
class FewRowChoice:
    """The product chosen for one (out, in, dtype, rows bucket) at `threads` threads, with the measured seconds per
    weight of every candidate and the CPU seconds other processes used while measuring (a busy machine skews it)."""

    product: str
    seconds: dict
    threads: int
    other_cpu_seconds: float


# (out_features, in_features, dtype, rows bucket) -> FewRowChoice, for the thread count of `_choices_threads`
few_row_choices: dict[tuple, FewRowChoice] = {}
_choices_threads = [0]


def _rows_bucket(rows: int) -> int:
    """Row counts decided together: 1, 2, 4, 8, 16 (the next power of two)."""
    return 1 << (rows - 1).bit_length()


def _busy_cpu_seconds() -> float:
    """CPU seconds all processes have used (from /proc/stat), or nan where there is no /proc."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(value) for value in stat.readline().split()[1:9]]
    except OSError:
        return float("nan")
    return (sum(ticks) - ticks[3] - ticks[4]) / _CLOCK_TICKS  # all but idle and iowait


def measure_few_row_products(weight: torch.Tensor, rows: int) -> FewRowChoice:
    """Time every `FEW_ROW_PRODUCTS` candidate on `rows` rows against weights of `weight`'s shape and dtype streamed
    from memory (a ring of copies larger than the cache, or the weight itself when it is that large). Each
    candidate gets a warm-up and `_TIMED_PASSES` passes of about `_PASS_SECONDS`, interleaved; the fastest (min
    over passes) is the choice. A measurement during which other processes kept a core busy half the time is taken
    again, once: on a 2-core machine such load slows threaded products tens of times."""
    out_features, in_features = weight.shape
    weight_bytes = weight.numel() * weight.element_size()
    if weight_bytes >= _STREAM_BYTES:
        weights = [weight.detach()]
    else:
        copies = torch.zeros(-(-_STREAM_BYTES // weight_bytes), out_features, in_features, dtype=weight.dtype)
        weights = list(copies.unbind(0))
    ring = itertools.cycle(weights)  # each product reads the next copy, so none is still in cache
    inputs = torch.full((rows, in_features), 0.5, dtype=weight.dtype)  # values do not matter; no global RNG draw

    def seconds_per_product(product) -> float:
        count, start = 0, time.perf_counter()
        while True:
            product(inputs, next(ring))
            count, elapsed = count + 1, time.perf_counter() - start
            if elapsed > _PASS_SECONDS or count == len(weights):
                return elapsed / count

    choice = None
    for _attempt in range(2):
        seconds = dict.fromkeys(FEW_ROW_PRODUCTS, math.inf)
        busy_before, own_before, start = _busy_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
        with torch.no_grad():
            for timed_pass in range(_TIMED_PASSES + 1):  # pass 0 warms up
                for name, product in FEW_ROW_PRODUCTS.items():
                    elapsed = seconds_per_product(product)
                    if timed_pass:
                        seconds[name] = min(seconds[name], elapsed)
        wall = time.perf_counter() - start
        other_cpu = max((_busy_cpu_seconds() - busy_before) - (sum(os.times()[:2]) - own_before), 0.0)
        if choice is None or other_cpu < choice.other_cpu_seconds:
            choice = FewRowChoice(min(seconds, key=seconds.get), seconds, torch.get_num_threads(), other_cpu)
        if not other_cpu > 0.5 * wall:  # idle enough (or no /proc: nan)
            break
    return choice


def few_row_product(weight: torch.Tensor, rows: int) -> str:
    """The name of the `FEW_ROW_PRODUCTS` entry to use for `rows` rows against this plain, contiguous CPU weight:
    measured at the first eager call for its shape, dtype, rows bucket and thread count, then read from
    `few_row_choices`. Nothing is timed while torch.compile traces: without a decision it is "linear"."""
    key = (*weight.shape, weight.dtype, _rows_bucket(rows))
    if torch.compiler.is_compiling():
        choice = few_row_choices.get(key)
        return "linear" if choice is None else choice.product
    threads = torch.get_num_threads()
    if threads != _choices_threads[0]:  # decisions hold for one thread count
        few_row_choices.clear()
        _choices_threads[0] = threads
    choice = few_row_choices.get(key)
    if choice is None:
        choice = few_row_choices[key] = measure_few_row_products(weight, key[-1])
        timings = ", ".join(f"{name} {seconds * 1e6:.0f} us" for name, seconds in choice.seconds.items())
        logger.info(
            f"RWKV7Linear: {key[-1]} row(s) x [{key[0]}, {key[1]}] {weight.dtype} at {threads} threads: "
            f"{choice.product} ({timings}; other processes used {choice.other_cpu_seconds:.2f} CPU s meanwhile)"
        )
    return choice.product


class RWKV7Linear(nn.Linear):
    """`nn.Linear` whose few-row products on CPU (decoding, short prompts) take the product measured fastest for
    the weight's shape and dtype on this machine (see the module docstring). Same parameters, same results up to
    float32 summation order. Anything else (more rows, other devices, weights that are tensor subclasses, such as
    torchao's quantized tensors, or not contiguous) is `nn.Linear`'s."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = hidden_states.numel() // self.in_features
        weight = self.weight
        if (
            hidden_states.device.type != "cpu"
            or not 0 < rows <= GEMV_MAX_ROWS
            or type(weight) not in _PLAIN_TENSOR_TYPES
            or not weight.is_contiguous()
            or hidden_states.dtype != weight.dtype
        ):
            return super().forward(hidden_states)
        product = FEW_ROW_PRODUCTS[few_row_product(weight, rows)]
        output = product(hidden_states.reshape(rows, self.in_features), weight)
        output = output.reshape(*hidden_states.shape[:-1], self.out_features)
        return output if self.bias is None else output + self.bias


__all__ = ["RWKV7Linear"]
