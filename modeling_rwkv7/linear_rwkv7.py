"""`RWKV7Linear`: the projection layer of every RWKV-7 block, with a measured choice of the CPU's few-row product.

Decoding multiplies one to a few rows by every weight matrix, so its speed is the rate at which the weights stream
from memory. Which product streams fastest depends on the CPU, the weight's shape and format, the thread count and
whether the step runs eagerly or compiled: a one-row `F.linear` reads an `[out, in]` float32 weight through a single
core on an AMD EPYC (half the bandwidth), while a batched product over row blocks of the same weight, which every
thread streams its own share of, is 2x faster there and 2-2.5x slower on an Intel Xeon; compiled by inductor, the
same row-block product becomes a vectorized reduction that reads bfloat16 weights 2-3x faster than oneDNN does.
So nothing is assumed: the first eager call of each (shape, format, rows, threads) times the candidates of its
weight's kind (`CANDIDATES`) on weights streamed from memory (a few ms) and keeps the fastest (`few_row_choices`,
logged once per decision; stored per machine by `measured_rwkv7`, so a later process reads it). Inside
`measuring_compiled_products()` (what `compile_decode_step` runs its warm-up step in) the candidates are also timed
compiled, and traced graphs read those decisions. All candidates compute the same values up to float32 summation
order, so a wrong decision can only cost speed.
"""

import contextlib
import dataclasses
import itertools
import math
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import logging

from .measured_rwkv7 import store_decision, stored_decision, timed_while_quiet

logger = logging.get_logger(__name__)

# Up to this many rows, a CPU projection is a matrix-vector product whose speed is the weight's streaming rate.
GEMV_MAX_ROWS = 16
# Weights smaller than this are timed over enough zero-filled copies to stream at least this many bytes from memory,
# not from cache (more than the L3 of the CPUs met so far: 32 MiB on the AMD EPYC); larger ones are timed in place.
_STREAM_BYTES = 64 << 20
# A timed call of a compiled candidate multiplies this many weight bytes (several weights for small ones), so that
# the compiled function's call overhead, which a whole compiled step pays once, is not charged to every product.
_COMPILED_CALL_BYTES = 4 << 20
_TIMED_PASSES = 3
_PASS_SECONDS = 0.004  # a pass ends after the call that exceeds this (or after every copy once)


def linear_product(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`rows @ weight.T` through `F.linear` (a quantized weight's own implementation). rows: [n, in]; weight:
    [out, in]. Returns [n, out]."""
    return F.linear(rows, weight)


def row_block_product(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`rows @ weight.T` as one batched product over `gcd(out, 64)` row blocks `[blocks, out / blocks, in]` of the
    (contiguous) weight, so that every thread streams its own blocks. rows: [n, in]; weight: [out, in] -> [n, out]."""
    out_features, in_features = weight.shape
    blocks = math.gcd(out_features, 64)
    weight_blocks = weight.view(blocks, out_features // blocks, in_features)
    output = torch.bmm(weight_blocks, rows.t().expand(blocks, -1, -1))  # [blocks, out / blocks, n]
    return output.view(out_features, rows.shape[0]).t()


def int8_row_product(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`rows @ weight.T` for a torchao int8 weight-only tensor with one scale per row (int8 `qdata` [out, in],
    `scale` [out, 1]), through ATen's int8 matrix-vector kernel, which reads the int8 values without materialising
    the float weight (torchao's eager product does). Scales in the rows' dtype, as torchao's own. rows: [n, in]."""
    return torch._weight_int8pack_mm(rows, weight.qdata, weight.scale.to(rows.dtype).view(-1))


FEW_ROW_PRODUCTS = {"linear": linear_product, "row_blocks": row_block_product, "int8_rows": int8_row_product}
# The candidates timed for each kind of weight (`weight_kind`).
CANDIDATES = {"dense": ("linear", "row_blocks"), "int8_rows": ("linear", "int8_rows")}
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)


def _int8_weight_only_type() -> Optional[type]:
    """torchao's `Int8Tensor`, if torchao is in use (it is never imported for this)."""
    return getattr(sys.modules.get("torchao.quantization"), "Int8Tensor", None)


def weight_kind(weight: torch.Tensor, input_dtype: torch.dtype) -> Optional[str]:
    """ "dense" for a plain contiguous weight of the input's dtype, "int8_rows" for a torchao int8 weight-only
    tensor with per-row scales, None for anything else (other tensor subclasses...: only F.linear is used)."""
    if type(weight) in _PLAIN_TENSOR_TYPES:
        return "dense" if weight.is_contiguous() and weight.dtype == input_dtype else None
    int8_type = _int8_weight_only_type()
    if (
        int8_type is not None
        and isinstance(weight, int8_type)
        and weight.act_quant_kwargs is None
        and weight.act_pre_scale is None
        and weight.qdata.is_contiguous()
        and tuple(weight.scale.shape) == (weight.shape[0], 1)
        and input_dtype in (torch.float32, torch.bfloat16, torch.float16)
    ):
        return "int8_rows"
    return None


@dataclass(frozen=True)
class FewRowChoice:
    """The product chosen for one decision key at `threads` threads, with the measured seconds per weight of every
    candidate and the CPU seconds other processes used while measuring (a busy machine skews it)."""

    product: str
    seconds: dict
    threads: int
    other_cpu_seconds: float


# (out_features, in_features, storage dtype, rows bucket, compiled) -> FewRowChoice, for `_choices_threads` threads;
# the storage dtype is torch.int8 for int8 weights.
few_row_choices: dict[tuple, FewRowChoice] = {}
_choices_threads = [0]
_measuring_compiled = [False]


@contextlib.contextmanager
def measuring_compiled_products():
    """Inside, every eager few-row decision is also measured with the candidates compiled by torch.compile: the
    decisions a traced graph then reads (`compile_decode_step` runs its warm-up step in here)."""
    _measuring_compiled[0] = True
    try:
        yield
    finally:
        _measuring_compiled[0] = False


def _rows_bucket(rows: int) -> int:
    """Row counts decided together: 1, 2, 4, 8, 16 (the next power of two)."""
    return 1 << (rows - 1).bit_length()


def _zero_copies(weight: torch.Tensor, count: int) -> list[torch.Tensor]:
    """`count` zero-filled weights of `weight`'s shape and format (a tensor subclass is rebuilt from zero-filled
    inner tensors through its `__tensor_flatten__` protocol)."""
    if type(weight) in _PLAIN_TENSOR_TYPES:
        return list(torch.zeros(count, *weight.shape, dtype=weight.dtype).unbind(0))
    names, context = weight.__tensor_flatten__()
    return [
        type(weight).__tensor_unflatten__(
            {name: torch.zeros_like(getattr(weight, name)) for name in names}, context, weight.shape, weight.stride()
        )
        for _ in range(count)
    ]


def _stored_bytes(weight: torch.Tensor) -> int:
    if type(weight) in _PLAIN_TENSOR_TYPES:
        return weight.numel() * weight.element_size()
    names, _ = weight.__tensor_flatten__()
    return sum(getattr(weight, name).numel() * getattr(weight, name).element_size() for name in names)


def measure_few_row_products(
    weight: torch.Tensor, rows: int, input_dtype: torch.dtype, candidates, compiled: bool = False
) -> FewRowChoice:
    """Time `candidates` (names in FEW_ROW_PRODUCTS) on `rows` rows against weights of `weight`'s shape and format
    streamed from memory (a ring of copies larger than the cache, or the weight itself when it is that large);
    `compiled`: each candidate compiled by torch.compile, several weights per call for small weights. Each gets a
    warm-up and `_TIMED_PASSES` passes of about `_PASS_SECONDS`, interleaved; the fastest (min over passes) is the
    choice. A measurement during which other processes kept a core busy half the time is taken again, once: on a
    2-core machine such load slows threaded products tens of times."""
    weight_bytes = _stored_bytes(weight)
    weights = [weight] if weight_bytes >= _STREAM_BYTES else _zero_copies(weight, -(-_STREAM_BYTES // weight_bytes))
    per_call = max(1, min(len(weights), _COMPILED_CALL_BYTES // weight_bytes)) if compiled else 1
    ring = itertools.cycle(weights)  # each product reads the next copy, so none is still in cache
    inputs = torch.full((rows, weight.shape[1]), 0.5, dtype=input_dtype)  # values do not matter; no global RNG

    def batched(product):
        def products(inputs, *weights):
            return [product(inputs, weight) for weight in weights]

        return torch.compile(products, dynamic=False, fullgraph=True) if compiled else products

    calls = {name: batched(FEW_ROW_PRODUCTS[name]) for name in candidates}
    # every (shape, format, candidate) is one more graph of `products`: more than dynamo's default 8 per function
    recompiles = torch._dynamo.config.patch(recompile_limit=256) if compiled else contextlib.nullcontext()

    def seconds_per_product(call) -> float:
        count, start = 0, time.perf_counter()
        while True:
            call(inputs, *(next(ring) for _ in range(per_call)))
            count, elapsed = count + per_call, time.perf_counter() - start
            if elapsed > _PASS_SECONDS or count >= len(weights):
                return elapsed / count

    def time_once() -> dict:
        seconds = dict.fromkeys(candidates, math.inf)
        for timed_pass in range(_TIMED_PASSES + 1):  # pass 0 warms up
            for name, call in calls.items():
                elapsed = seconds_per_product(call)
                if timed_pass:
                    seconds[name] = min(seconds[name], elapsed)
        return seconds

    with torch.no_grad(), recompiles:
        for call in calls.values():  # compiles, outside the timed passes
            call(inputs, *weights[:per_call])
        seconds, other_cpu = timed_while_quiet(time_once)
    return FewRowChoice(min(seconds, key=seconds.get), seconds, torch.get_num_threads(), other_cpu)


def few_row_product(weight: torch.Tensor, rows: int, kind: str, input_dtype: torch.dtype) -> str:
    """The name of the FEW_ROW_PRODUCTS entry to use for `rows` rows against this CPU weight of `weight_kind`
    `kind`: measured at the first eager call for its shape, format, rows bucket and thread count (compiled too
    inside `measuring_compiled_products()`), then read from `few_row_choices`. Nothing is timed while torch.compile
    traces: it reads the compiled decision, else the eager one, else "linear"."""
    storage_dtype = torch.int8 if kind == "int8_rows" else weight.dtype
    key = (*weight.shape, storage_dtype, _rows_bucket(rows))
    if torch.compiler.is_compiling():
        choice = few_row_choices.get((*key, True)) or few_row_choices.get((*key, False))
        return "linear" if choice is None else choice.product
    threads = torch.get_num_threads()
    if threads != _choices_threads[0]:  # decisions hold for one thread count
        few_row_choices.clear()
        _choices_threads[0] = threads
    for compiled in (False, True) if _measuring_compiled[0] else (False,):
        if (*key, compiled) in few_row_choices:
            continue
        stored = stored_decision("few_row", (*key, compiled))
        if stored is not None:  # measured on this machine before
            few_row_choices[(*key, compiled)] = FewRowChoice(**stored)
        else:
            choice = measure_few_row_products(weight, key[-1], input_dtype, CANDIDATES[kind], compiled)
            few_row_choices[(*key, compiled)] = choice
            store_decision("few_row", (*key, compiled), dataclasses.asdict(choice))
            timings = ", ".join(f"{name} {seconds * 1e6:.0f} us" for name, seconds in choice.seconds.items())
            logger.info(
                f"RWKV7Linear: {key[-1]} row(s) x [{key[0]}, {key[1]}] {storage_dtype} at {threads} threads"
                f"{', compiled' if compiled else ''}: {choice.product} ({timings}; other processes used "
                f"{choice.other_cpu_seconds:.2f} CPU s meanwhile)"
            )
    return few_row_choices[(*key, False)].product


class RWKV7Linear(nn.Linear):
    """`nn.Linear` whose few-row products on CPU (decoding, short prompts) take the product measured fastest for
    the weight's shape and format on this machine (see the module docstring). Same parameters, same results up to
    float32 summation order. Anything else (more rows, other devices, weights that are neither plain contiguous
    tensors of the input's dtype nor torchao per-row int8 weight-only tensors) is `nn.Linear`'s."""

    # a FEW_ROW_PRODUCTS name forced by `config.implementation["projection"]` (set by the model), else measured
    forced_product: Optional[str] = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = hidden_states.numel() // self.in_features
        kind = weight_kind(self.weight, hidden_states.dtype)
        # a symbolic row count (a dynamic-shape trace) has no measured product, and a test of it would pin the size
        symbolic = isinstance(rows, torch.SymInt)
        if symbolic or hidden_states.device.type != "cpu" or not 0 < rows <= GEMV_MAX_ROWS or kind is None:
            return super().forward(hidden_states)
        name = self.forced_product
        if name is None:
            name = few_row_product(self.weight, rows, kind, hidden_states.dtype)
        elif name not in CANDIDATES[kind]:
            raise ValueError(
                f"implementation['projection']={name!r} cannot multiply a {kind} weight; it takes {CANDIDATES[kind]}."
            )
        product = FEW_ROW_PRODUCTS[name]
        output = product(hidden_states.reshape(rows, self.in_features), self.weight)
        output = output.reshape(*hidden_states.shape[:-1], self.out_features)
        return output if self.bias is None else output + self.bias


__all__ = ["RWKV7Linear"]
