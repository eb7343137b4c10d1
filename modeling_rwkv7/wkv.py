"""The WKV-7 layer and the choice of its implementation (the contract and the reference loop: `wkv_reference`).

On CPU nothing about speed is assumed: the first eager call of each (batch x heads bucket, head_dim, dtype, grad or
not) times the chunked form at every candidate chunk size and the per-token loop on small synthetic inputs (tens of
ms, once per machine: stored by `measured_rwkv7`, logged; never inside a traced graph) and keeps the fastest chunk
size and the length from which the chunked form beats the loop (`wkv_choices`). Every path computes the same values
up to float32 rounding, so a wrong decision can only cost speed.
"""

import dataclasses
import functools
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers.utils import logging

from .dispatch_rwkv7 import IMPLEMENTATIONS
from .measured_rwkv7 import store_decision, stored_decision, timed_while_quiet
from .wkv_chunked import DEFAULT_CHUNK_SIZE, wkv7_chunked
from .wkv_reference import random_wkv_inputs, wkv7_recurrent

try:
    from kernels import use_kernel_forward_from_hub
except ImportError:  # without `kernels` the WKV layer is simply not kernelizable

    def use_kernel_forward_from_hub(layer_name: str):
        return lambda layer_class: layer_class


logger = logging.get_logger(__name__)

# Until measured (and off CPU): the chunked form from this many tokens, in chunks of DEFAULT_CHUNK_SIZE.
CHUNKED_MIN_SEQ_LEN = 32
# The chunk sizes the CPU measurement compares: legal ones (at most 8, or whole 8-row decay blocks, so the numerics
# are the same) around the balance of intra-chunk work and state carry.
CHUNK_SIZES = (8, 16, 32)
# From this many batch x heads problems on, both forms are bound by their arithmetic and the decision stays the same
# (measured up to 64 on a Zen 5): larger batches share the measurement at this size.
_MAX_MEASURED_HEADS = 16
# The chunk sizes are compared on about this many batch x heads x tokens (half as many with backward), from 64 to
# 512 tokens: enough chunks to show each size's cost per token, in a few ms.
_MEASURED_WORK = 2048
_LOOP_TOKENS = 8  # the per-token loop is timed on this many
_PASSES = 3  # interleaved passes over the timed runs, the min kept (so the first warms up)
_CHUNK_SIZE_MARGIN = 0.15  # another chunk size than DEFAULT_CHUNK_SIZE must be this much faster to be chosen


@dataclass(frozen=True)
class WKVChoice:
    """How `wkv7` runs on CPU for one key of `wkv_choices`: the chunk size of the chunked form and the sequence
    length from which it runs instead of the per-token loop, measured at `threads` threads, with the seconds of each
    timed run and the CPU seconds other processes used while measuring (a busy machine skews it)."""

    chunk_size: int
    chunked_min_seq_len: int
    seconds: dict
    threads: int
    other_cpu_seconds: float


_DEFAULT_CHOICE = WKVChoice(DEFAULT_CHUNK_SIZE, CHUNKED_MIN_SEQ_LEN, {}, 0, 0.0)
# (batch x heads bucket, head_dim, dtype, with grad) -> WKVChoice
wkv_choices: dict[tuple, WKVChoice] = {}


def wkv_choice_key(r: torch.Tensor, *others: Optional[torch.Tensor]) -> tuple:
    """The `wkv_choices` key of a call: batch x heads (the next power of two, at most `_MAX_MEASURED_HEADS`),
    head_dim, r's dtype, and whether gradients will flow (grad mode on and `r` or any of `others` requiring them)."""
    batch_size, _, num_heads, head_dim = r.shape
    bucket = 1
    while bucket < min(batch_size * num_heads, _MAX_MEASURED_HEADS):  # (no bit_length: batch may be symbolic)
        bucket *= 2
    with_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (r, *others))
    return bucket, head_dim, r.dtype, with_grad


def wkv_choice(key: tuple) -> WKVChoice:
    """The CPU decision for `key` (see `wkv_choice_key`): measured at the first eager call for it and its thread
    count, then read from `wkv_choices`. Nothing is timed while torch.compile traces: without a decision it is
    DEFAULT_CHUNK_SIZE and CHUNKED_MIN_SEQ_LEN."""
    choice = wkv_choices.get(key)
    if torch.compiler.is_compiling():
        return _DEFAULT_CHOICE if choice is None else choice
    if choice is not None and choice.threads == torch.get_num_threads():
        return choice
    stored = stored_decision("wkv", key)  # measured on this machine before (at this thread count)
    if stored is not None:
        choice = wkv_choices[key] = WKVChoice(**stored)
    else:
        choice = wkv_choices[key] = measure_wkv_choice(*key)
        store_decision("wkv", key, dataclasses.asdict(choice))
        timings = ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in choice.seconds.items())
        logger.info(
            f"RWKV-7 WKV: {key[0]} batch x heads of {key[1]}, {key[2]}, {'with' if key[3] else 'no'} grad, "
            f"{choice.threads} threads: chunks of {choice.chunk_size}, chunked from {choice.chunked_min_seq_len} "
            f"tokens ({timings}; other processes used {choice.other_cpu_seconds:.2f} CPU s meanwhile)"
        )
    return choice


@torch.autocast("cpu", enabled=False)  # as the chunked form runs; its backward, timed here, needs float32 too
def measure_wkv_choice(heads: int, head_dim: int, dtype: torch.dtype, with_grad: bool) -> WKVChoice:
    """Time the chunked form at every `CHUNK_SIZES` entry, on one chunk and on `long` tokens (see `_MEASURED_WORK`),
    and the per-token loop on `_LOOP_TOKENS` tokens, for `heads` problems of `head_dim` (synthetic inputs at RWKV-7's
    scales; forward, and backward `with_grad`), min over `_PASSES` interleaved passes. The fastest chunk size on
    `long` tokens is the choice; the threshold is where the loop's time (a line through 0) crosses the chunked
    one's (flat over the first chunk, then a line through its two times). A measurement during which other
    processes kept a core busy half the time is taken again, once."""
    long = min(512, max(64, _MEASURED_WORK // (heads * (2 if with_grad else 1))))
    inputs = list(random_wkv_inputs(1, long, heads, head_dim, seed=0, dtype=dtype).values())[:6]  # no state
    runs = {f"loop {_LOOP_TOKENS}": _timed_call(wkv7_recurrent, inputs, _LOOP_TOKENS, with_grad)}
    for chunk_size in CHUNK_SIZES:
        for tokens in (chunk_size, long):
            chunked = functools.partial(wkv7_chunked, chunk_size=chunk_size)
            runs[f"chunk {chunk_size} x {tokens}"] = _timed_call(chunked, inputs, tokens, with_grad)

    def time_once() -> dict:
        seconds = dict.fromkeys(runs, math.inf)
        for _ in range(_PASSES):
            for name, run in runs.items():
                run_start = time.perf_counter()
                run()
                seconds[name] = min(seconds[name], time.perf_counter() - run_start)
        return seconds

    seconds, other_cpu = timed_while_quiet(time_once)
    chunk_size = _chosen_chunk_size({size: seconds[f"chunk {size} x {long}"] for size in CHUNK_SIZES})
    one_chunk = seconds[f"chunk {chunk_size} x {chunk_size}"]
    threshold = _crossover(
        loop_per_token=seconds[f"loop {_LOOP_TOKENS}"] / _LOOP_TOKENS,
        one_chunk=one_chunk,
        per_token_after=(seconds[f"chunk {chunk_size} x {long}"] - one_chunk) / (long - chunk_size),
        chunk_size=chunk_size,
    )
    return WKVChoice(chunk_size, threshold, seconds, torch.get_num_threads(), other_cpu)


def _chosen_chunk_size(seconds_per_size: dict[int, float]) -> int:
    """The fastest chunk size, unless it beats DEFAULT_CHUNK_SIZE by less than `_CHUNK_SIZE_MARGIN`: each size
    rounds differently, so a near-tie decided by noise would make processes (ranks of one training job, reruns of
    one script) differ in their float32 results."""
    fastest = min(seconds_per_size, key=seconds_per_size.get)
    if seconds_per_size[fastest] < (1 - _CHUNK_SIZE_MARGIN) * seconds_per_size[DEFAULT_CHUNK_SIZE]:
        return fastest
    return DEFAULT_CHUNK_SIZE


def _crossover(loop_per_token: float, one_chunk: float, per_token_after: float, chunk_size: int) -> int:
    """The shortest sequence (at least 2 tokens) on which the chunked form, `one_chunk` seconds up to `chunk_size`
    tokens and `per_token_after` for each further token, beats the loop; `sys.maxsize` if it never does."""
    if loop_per_token * chunk_size > one_chunk:
        crossing = one_chunk / loop_per_token
    elif loop_per_token > per_token_after:
        crossing = (one_chunk - per_token_after * chunk_size) / (loop_per_token - per_token_after)
    else:
        return sys.maxsize
    return max(2, math.floor(crossing) + 1)


def _timed_call(op, inputs, tokens: int, with_grad: bool):
    """A function running `op` on the first `tokens` tokens of `inputs`: forward without grad, or forward and the
    gradients of every input."""
    inputs = [x[:, :tokens].contiguous() for x in inputs]
    if not with_grad:
        return lambda: _no_grad_call(op, inputs)
    leaves = [x.requires_grad_() for x in inputs]

    def forward_backward():
        # identity hooks on top of the stack: an enclosing activation checkpoint (whose first forward may be where
        # this is measured) must not count or pack the measurement's saved tensors
        with torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor):
            y, state = op(*leaves)
            torch.autograd.grad([y, state], leaves, [torch.ones_like(y), torch.ones_like(state)])

    return forward_backward


@torch.no_grad()
def _no_grad_call(op, inputs):
    op(*inputs)


def select_wkv_backend(
    backend: str,
    seq_len: int,
    device: torch.device,
    kernel_repo: Optional[str],
    choice_key: Optional[tuple] = None,
):
    """The implementation `wkv7` runs: ("kernel", module), ("chunked", None), ("step", None) or
    ("recurrent", None). `backend="auto"` takes the kernel-hub kernel when it loads (on CUDA, or anywhere with a
    local build in $RWKV7_KERNEL_PATH), else the chunked form from the length measured on CPU for `choice_key` (see
    `wkv_choice_key`, `wkv_choice`; CHUNKED_MIN_SEQ_LEN without a key or off CPU), else the per-token recurrence
    (one fused step for decoding). Forcing "kernel" raises when it cannot load."""
    from .wkv_kernel import KERNEL_PATH_ENV, load_wkv_kernel

    if backend == "kernel":
        return "kernel", load_wkv_kernel(kernel_repo, required=True)
    if backend == "auto" and (device.type == "cuda" or os.environ.get(KERNEL_PATH_ENV)):
        module = load_wkv_kernel(kernel_repo)
        if module is not None:
            return "kernel", module
    if backend == "chunked" or (backend == "auto" and seq_len > 1 and seq_len >= _min_seq_len(device, choice_key)):
        return "chunked", None
    if backend not in IMPLEMENTATIONS["wkv"]:
        raise ValueError(f"Unknown WKV implementation {backend!r}; expected one of {IMPLEMENTATIONS['wkv']}.")
    return ("step" if seq_len == 1 else "recurrent"), None


def _min_seq_len(device: torch.device, choice_key: Optional[tuple]) -> int:
    if device.type != "cpu" or choice_key is None:
        return CHUNKED_MIN_SEQ_LEN
    return wkv_choice(choice_key).chunked_min_seq_len


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
    """WKV-7 through the implementation `backend` selects (see `select_wkv_backend`; the choice is logged once).
    On CPU the chunked form's chunk size and the length from which "auto" takes it are measured (`wkv_choice`)."""
    # a symbolic batch (a dynamic-shape export) takes the defaults: looking up its decision would pin its size
    measured = r.device.type == "cpu" and not isinstance(r.shape[0], torch.SymInt)
    key = wkv_choice_key(r, log_decay, k, v, a, b, initial_state) if measured else None
    name, kernel = select_wkv_backend(backend, r.shape[1], r.device, kernel_repo, key)
    if not torch.compiler.is_compiling():  # logging would break a traced graph
        logger.info_once(f"RWKV-7 WKV: {name} implementation (wkv_backend={backend!r}, device {r.device.type})")
    if name == "kernel":
        return kernel.wkv7(r, log_decay, k, v, a, b, initial_state, reset)
    if name == "chunked":
        chunk_size = DEFAULT_CHUNK_SIZE if key is None else wkv_choice(key).chunk_size
        return wkv7_chunked(r, log_decay, k, v, a, b, initial_state, reset, chunk_size=chunk_size)
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
        return wkv7(
            r,
            log_decay,
            k,
            v,
            a,
            b,
            initial_state,
            reset,
            backend=self.config.wkv_backend,
            kernel_repo=self.config.kernel_repo,
        )
