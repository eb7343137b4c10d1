"""Micro-benchmark of the WKV-7 operator alone: the reference loop `wkv7_recurrent` vs the chunked `wkv7_chunked`.

One layer of the RWKV-7 0.1B shape (12 heads of 64), float32, seq_len 512, batch 1 and 4, forward (no grad) and
forward+backward (gradients of every input). One warm-up, then `--reps` timed runs; the table gives the median
wall-clock time and, as a guide when the machine is shared, the median CPU time of the process (all threads).

    python scripts/bench_wkv_op.py [--threads 2] [--reps 5] [--chunk-sizes 16,32,64] [--batch-sizes 1,4]
"""

import argparse

import torch

from modeling_rwkv7.measured_rwkv7 import median_seconds
from modeling_rwkv7.wkv_chunked import wkv7_chunked
from modeling_rwkv7.wkv_reference import random_wkv_inputs, wkv7_recurrent

NUM_HEADS, HEAD_DIM, SEQ_LEN = 12, 64, 512


def forward(op, inputs):
    def run():
        with torch.no_grad():
            op(*inputs)

    return run


def forward_backward(op, inputs):
    leaves = [x.clone().requires_grad_() for x in inputs]
    generator = torch.Generator().manual_seed(0)
    grad_y = torch.randn(leaves[0].shape, generator=generator)
    grad_state = torch.randn(leaves[0].shape[0], NUM_HEADS, HEAD_DIM, HEAD_DIM, generator=generator)

    def run():
        y, state = op(*leaves)
        torch.autograd.backward([y, state], [grad_y, grad_state])

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--chunk-sizes", default="16,32,64")
    parser.add_argument("--batch-sizes", default="1,4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    ops = [("reference loop", wkv7_recurrent)]
    for chunk_size in map(int, args.chunk_sizes.split(",")):
        ops.append((f"chunked, chunk {chunk_size}", lambda *x, c=chunk_size: wkv7_chunked(*x, chunk_size=c)))

    print(
        f"WKV-7 op, {NUM_HEADS} heads x {HEAD_DIM}, seq_len {SEQ_LEN}, float32, {args.threads} threads, "
        f"median of {args.reps} (ms; CPU ms of all threads in brackets)"
    )
    print(f"{'op':<20} {'batch':>5} {'forward':>18} {'forward+backward':>20} {'speedup fwd / f+b':>19}")
    for batch_size in map(int, args.batch_sizes.split(",")):
        inputs = list(random_wkv_inputs(batch_size, SEQ_LEN, NUM_HEADS, HEAD_DIM, seed=batch_size).values())[:6]
        reference = None
        for name, op in ops:
            fwd = [1e3 * t for t in median_seconds(forward(op, inputs), args.reps)]
            fwd_bwd = [1e3 * t for t in median_seconds(forward_backward(op, inputs), args.reps)]
            reference = reference or (fwd[0], fwd_bwd[0])
            print(
                f"{name:<20} {batch_size:>5} {fwd[0]:>8.1f} [{fwd[1]:>7.1f}] {fwd_bwd[0]:>9.1f} [{fwd_bwd[1]:>8.1f}]"
                f" {reference[0] / fwd[0]:>9.1f}x {reference[1] / fwd_bwd[0]:>7.1f}x"
            )


if __name__ == "__main__":
    main()
