"""Checks and times the built rwkv7_wkv kernel on a GPU (run by scripts/gpu_check.sh after the CUDA build).

0. `--sanitize`: the kernel's forward (with checkpoints), backward and decode step once on tiny shapes, every dtype
   and head size, with resets and an initial state, and nothing else: the workload scripts/gpu_check.sh runs under
   compute-sanitizer (memcheck, racecheck, synccheck, initcheck).
1. Correctness on fresh random inputs against the reference `wkv7_recurrent` (relative error = max |diff| / max
   |reference|): forward (y, final state) and backward (all input gradients, initial state included) for float32,
   bfloat16 and float16, every head size, ragged lengths, reset masks; the decode step against one reference step
   and token-by-token decoding against the sequence op; the forward against BlinkDL's official CUDA kernel (the
   `rwkv` package's, when installed). Outputs come from a NaN-poisoned CUDA allocator, so an element the kernel
   never writes shows up as NaN.
2. Timing, bfloat16, at B=8 T=4096 C=4096 (64 heads of 64) and B=8 T=4096 H=32 N=64: the kernel's forward and
   forward+backward against the PyTorch chunked path (`modeling_rwkv7.wkv_chunked`), BlinkDL's official kernel
   (`rwkv` package, RWKV_CUDA_ON=1 build; forward only, one sequence per call) and fla's `chunk_rwkv7` (keyword
   arguments), each when available (a missing one is named and skipped). Every row has its memory-bandwidth floor:
   the bytes that implementation really reads and writes (this kernel's log_decay is float32, the others' decay
   bfloat16; the backward reads the forward's state checkpoints) at the bandwidth of a large device copy.

Needs only torch (the reference and chunked operators are loaded from their files in modeling_rwkv7/, which import
nothing else); the `kernels` library, `rwkv` and fla are used when installed. Exit status 1 if a check fails.

    python kernels/rwkv7_wkv/benchmarks/gpu_check.py [--device cuda] [--sanitize] [--reps 10] [--json out.json]
                                                     [--bench-shapes 8,4096,64,64 8,4096,32,64]
"""

import argparse
import importlib
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch

KERNEL_DIR = Path(__file__).resolve().parents[1]
OPS_DIR = KERNEL_DIR.parents[1] / "modeling_rwkv7"  # the package's operator files
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
GRAD_NAMES = ("r", "log_decay", "k", "v", "a", "b", "initial_state")


def ops_module(name: str) -> types.ModuleType:
    """modeling_rwkv7/<name>.py loaded from its file. The reference (`wkv_reference`) and the chunked operator
    (`wkv_chunked`) import torch and the standard library only, so they load where torch is all there is."""
    spec = importlib.util.spec_from_file_location(f"rwkv7_{name}", OPS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = ops_module("wkv_reference")


def random_inputs(batch, seq_len, heads, head_dim, dtype, device, seed, reset_rate=0.0) -> tuple:
    """`wkv_reference.random_wkv_inputs` on `device`, as a tuple in the ops' order."""
    inputs = reference.random_wkv_inputs(
        batch, seq_len, heads, head_dim, seed, dtype=dtype, device=device, reset_rate=reset_rate
    )
    return tuple(inputs.values())


def load_kernel(device: str) -> tuple[types.ModuleType, str]:
    """The built variant for `device`, through kernels.get_local_kernel when `kernels` is installed."""
    backend = "cuda" if device == "cuda" else "cpu"
    try:
        import kernels
    except ImportError:
        kernels = None
    if kernels is not None:
        module = kernels.get_local_kernel(KERNEL_DIR, backend=backend)
        return module, f"kernels.get_local_kernel -> {Path(module.__file__).parent.name} ({module.__name__})"
    torch_tag = "torch{}{}".format(*torch.__version__.split(".")[:2])
    marker = "-cu" if backend == "cuda" else "-cpu-"
    variants = [d for d in (KERNEL_DIR / "build").iterdir() if d.name.startswith(torch_tag) and marker in d.name]
    if len(variants) != 1:
        raise SystemExit(f"error: expected one {torch_tag} {backend} variant in {KERNEL_DIR / 'build'}: {variants}")
    variant = variants[0]
    ops_id = json.loads((variant / "metadata.json").read_text())["id"]
    spec = importlib.util.spec_from_file_location(
        ops_id, variant / "__init__.py", submodule_search_locations=[str(variant)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[ops_id] = module
    spec.loader.exec_module(module)
    return module, f"importlib (kernels not installed) -> {variant.name} ({ops_id})"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    if not torch.isfinite(actual).all():
        return float("nan")
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-12)).item()


def poison_allocator(device: str, shapes_and_dtypes) -> bool:
    """Leaves NaN-filled blocks of the given sizes in the CUDA caching allocator, which the next allocations of
    these sizes reuse. Returns whether a fresh torch.empty of the first size indeed comes back NaN."""
    if device != "cuda":
        return False
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=device) for shape, dtype in shapes_and_dtypes * 2]
    del blocks
    shape, dtype = shapes_and_dtypes[0]
    probe = torch.empty(shape, dtype=dtype, device=device)
    effective = bool(probe.isnan().all())
    del probe
    return effective


class Report:
    def __init__(self):
        self.failures = 0
        self.rows = []

    def check(self, name: str, errors: dict, tolerance: float):
        worst = max(errors.values()) if errors else 0.0
        ok = worst == worst and worst <= tolerance  # NaN fails
        self.failures += not ok
        detail = "  ".join(f"{k} {v:.1e}" for k, v in errors.items())
        print(f"{'PASS' if ok else 'FAIL'}  {name:<44} max rel err {worst:.2e} (tol {tolerance:.0e})  {detail}")
        self.rows.append({"check": name, "ok": ok, "errors": errors, "tolerance": tolerance})


def check_sequence(report, kernel, reference, device, batch, seq_len, heads, head_dim, dtype, reset_rate, seed):
    inputs = random_inputs(batch, seq_len, heads, head_dim, dtype, device, seed, reset_rate)
    reset = inputs[-1]
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    dy = torch.randn(batch, seq_len, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    dstate = torch.randn(batch, heads, head_dim, head_dim, generator=g).to(device)

    ref_leaves = [x.detach().float().clone().requires_grad_() for x in inputs[:-1]]
    ref_y, ref_state = reference(*ref_leaves, reset)
    ((ref_y * dy.float()).sum() + (ref_state * dstate).sum()).backward()

    token_shape = (batch, seq_len, heads, head_dim)
    state_shape = (batch, heads, head_dim, head_dim)
    poisoned = poison_allocator(device, [(token_shape, dtype), (state_shape, torch.float32)])
    leaves = [x.detach().clone().requires_grad_() for x in inputs[:-1]]
    y, final_state = kernel.wkv7(*leaves, reset)
    errors = {"y": relative_error(y, ref_y), "state": relative_error(final_state, ref_state)}
    poison_allocator(device, [(token_shape, dtype)] * 5 + [(token_shape, torch.float32), (state_shape, torch.float32)])
    ((y * dy).float().sum() + (final_state * dstate).sum()).backward()
    for name, leaf, ref_leaf in zip(GRAD_NAMES, leaves, ref_leaves):
        errors[f"d{name}"] = relative_error(leaf.grad, ref_leaf.grad)
    reset_note = f" reset {reset_rate:.0%}" if reset_rate else ""
    name = f"seq {str(dtype)[6:]} B{batch} T{seq_len} H{heads} N{head_dim}{reset_note}"
    report.check(name + (" (NaN-poisoned)" if poisoned else ""), errors, TOLERANCE[dtype])


def check_decode(report, kernel, reference, device, dtype, seed):
    batch, heads, head_dim, steps = 3, 4, 64, 20
    r, log_decay, k, v, a, b, state, _ = random_inputs(batch, steps, heads, head_dim, dtype, device, seed)
    one_token = [x[:, :1].float() for x in (r, log_decay, k, v, a, b)]
    expected_y, expected_state = reference.wkv7_recurrent(*one_token, state)
    expected_y = expected_y[:, 0]
    poison_allocator(device, [((batch, heads, head_dim), dtype)])
    live = state.clone()
    y = kernel.wkv7_decode_step(*(x[:, 0] for x in (r, log_decay, k, v, a, b)), live)
    report.check(
        f"decode step {str(dtype)[6:]} B{batch} H{heads} N{head_dim}",
        {"y": relative_error(y, expected_y), "state": relative_error(live, expected_state)},
        TOLERANCE[dtype],
    )

    sequence_y, sequence_state = kernel.wkv7(r, log_decay, k, v, a, b, state)
    live = state.clone()
    step_y = torch.stack(
        [kernel.wkv7_decode_step(*(x[:, t] for x in (r, log_decay, k, v, a, b)), live) for t in range(steps)], dim=1
    )
    report.check(
        f"decode x{steps} == sequence op {str(dtype)[6:]}",
        {"y": relative_error(step_y, sequence_y), "state": relative_error(live, sequence_state)},
        TOLERANCE[dtype],
    )


def measure(fn, device, reps) -> float:
    """Median milliseconds of fn() over `reps` runs after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, reps) -> float:
    """Bytes per second of a large device copy (read + write)."""
    source = torch.empty(1 << 28, dtype=torch.float32, device=device)  # 1 GiB
    target = torch.empty_like(source)
    ms = measure(lambda: target.copy_(source), device, reps)
    bandwidth = 2 * source.numel() * source.element_size() / (ms * 1e-3)
    source = target = None  # freed before the next measurement
    return bandwidth


def forward_and_backward(fn, inputs, dy):
    leaves = [x.detach().requires_grad_() for x in inputs]

    def run():
        for leaf in leaves:
            leaf.grad = None
        y, _ = fn(*leaves)
        y.backward(dy)

    return run


def nbytes(*tensors) -> int:
    return sum(x.numel() * x.element_size() for x in tensors if x is not None)


def official_kernel(device: str, head_dim: int = 64):
    """BlinkDL's inference WKV-7 kernel as the `rwkv` package builds it with RWKV_CUDA_ON=1 (its sources and flags),
    wrapped as ``forward(r, w, k, v, a, b, state) -> y`` for ``[seq_len, channels]`` inputs of one sequence, w such
    that decay = exp(-exp(w)), state ``[heads, value, key]`` float32 updated in place. Raises when unavailable."""
    if device != "cuda":
        raise RuntimeError("needs CUDA")
    spec = importlib.util.find_spec("rwkv")
    if spec is None:
        raise RuntimeError("the `rwkv` package is not installed")
    cuda_dir = Path(spec.origin).parent / "cuda"
    from torch.utils.cpp_extension import load

    load(
        name="wkv7s",
        sources=[str(cuda_dir / "rwkv7_op.cpp"), str(cuda_dir / "rwkv7.cu")],
        is_python_module=False,
        verbose=False,
        extra_cuda_cflags=[
            "-res-usage",
            "--use_fast_math",
            "-O3",
            "-Xptxas -O3",
            "--extra-device-vectorization",
            f"-D_N_={head_dim}",
        ],
    )
    ops = {
        torch.bfloat16: torch.ops.wkv7s.forward_bf16,
        torch.float16: torch.ops.wkv7s.forward_fp16,
        torch.float32: torch.ops.wkv7s.forward_fp32,
    }

    def forward(r, w, k, v, a, b, state):
        seq_len, channels = r.shape
        y = torch.empty_like(r)
        ops[r.dtype](1, seq_len, channels, channels // head_dim, state, r, w, k, v, a, b, y)
        return y

    return forward


def official_inputs(r, log_decay, k, v, a, b):
    """Our [batch, seq_len, heads, head_dim] inputs as the official kernel's per-sequence [seq_len, channels] ones."""
    batch, seq_len = r.shape[:2]
    w = (-log_decay).log().to(r.dtype)  # exp(-exp(w)) == exp(log_decay)
    return [tuple(x[i].reshape(seq_len, -1).contiguous() for x in (r, w, k, v, a, b)) for i in range(batch)]


def check_official(report, kernel, device, seed):
    """Our forward against BlinkDL's official kernel on the same inputs (bfloat16, from a random state)."""
    try:
        official = official_kernel(device)
    except Exception as error:
        print(f"SKIP  official kernel comparison: {type(error).__name__}: {' '.join(str(error).split())[:200]}")
        return None
    r, log_decay, k, v, a, b, state, _ = random_inputs(2, 300, 4, 64, torch.bfloat16, device, seed)
    y, final_state = kernel.wkv7(r, log_decay, k, v, a, b, state)
    errors = {}
    for i, inputs in enumerate(official_inputs(r, log_decay, k, v, a, b)):
        live = state[i].clone()
        official_y = official(*inputs, live).view_as(y[i])
        errors[f"y[{i}]"] = relative_error(y[i], official_y)
        errors[f"state[{i}]"] = relative_error(final_state[i], live)
    report.check("forward vs official rwkv kernel bfloat16 B2 T300 H4 N64", errors, TOLERANCE[torch.bfloat16])
    return official


def bench(kernel, official, device, shape, reps, bandwidth) -> list[dict]:
    batch, seq_len, heads, head_dim = shape
    dtype = torch.bfloat16
    r, log_decay, k, v, a, b, _, _ = random_inputs(batch, seq_len, heads, head_dim, dtype, device, seed=1234)
    dy = torch.randn_like(r)
    tokens = batch * seq_len
    print(
        f"\nTiming: B={batch} T={seq_len} H={heads} N={head_dim} (C={heads * head_dim}) bfloat16, median of {reps}; "
        f"floors at the copy bandwidth {bandwidth / 1e9:.0f} GB/s"
    )
    rows = []

    def add(impl, what, fn, moved_bytes):
        try:
            ms = measure(fn, device, reps)
        except Exception as error:  # an optional implementation that cannot run this case
            print(f"  {impl:<22} {what:<24} skipped: {type(error).__name__}: {' '.join(str(error).split())[:150]}")
            return
        floor_ms = moved_bytes / bandwidth * 1e3
        rows.append(
            {
                "impl": impl,
                "what": what,
                "ms": ms,
                "tokens_per_s": tokens / (ms * 1e-3),
                "bytes": moved_bytes,
                "floor_ms": floor_ms,
                "x_floor": ms / floor_ms,
            }
        )

    state_bytes = batch * heads * head_dim * head_dim * 4
    inputs = (r, log_decay, k, v, a, b)  # log_decay float32: what this kernel reads
    with torch.no_grad():
        _, _, checkpoints = kernel.ops.forward(r, log_decay, k, v, a, b, None, None, True)
        forward_bytes = nbytes(*inputs, r) + state_bytes  # inputs in, y and the final state out
        add(
            "kernel", "forward", lambda: kernel.ops.forward(r, log_decay, k, v, a, b, None, None, False), forward_bytes
        )
        add(
            "kernel",
            "forward (+checkpoints)",
            lambda: kernel.ops.forward(r, log_decay, k, v, a, b, None, None, True),
            forward_bytes + nbytes(checkpoints),
        )
        backward_bytes = 2 * nbytes(*inputs) + nbytes(dy, checkpoints) + state_bytes  # inputs and dy in, grads out
        add(
            "kernel",
            "backward",
            lambda: kernel.ops.backward(r, log_decay, k, v, a, b, None, checkpoints, dy, None),
            backward_bytes,
        )
    add(
        "kernel",
        "forward+backward",
        forward_and_backward(kernel.wkv7, inputs, dy),
        forward_bytes + nbytes(checkpoints) + backward_bytes,
    )
    checkpoints = None  # freed before the next measurement
    if device == "cuda":
        torch.cuda.empty_cache()

    try:
        chunked = ops_module("wkv_chunked").wkv7_chunked
    except Exception as error:
        print(f"  chunked (PyTorch)      skipped: no wkv_chunked.wkv7_chunked ({type(error).__name__}: {error})")
    else:
        with torch.no_grad():
            add("chunked (PyTorch)", "forward", lambda: chunked(*inputs), forward_bytes)
        add(
            "chunked (PyTorch)",
            "forward+backward",
            forward_and_backward(chunked, inputs, dy),
            forward_bytes + backward_bytes,
        )
        if device == "cuda":
            torch.cuda.empty_cache()

    if official is None:
        print("  official (rwkv pkg)    skipped: BlinkDL's kernel unavailable (see the correctness section)")
    else:
        sequences = official_inputs(*inputs)
        states = [torch.zeros(heads, head_dim, head_dim, device=device) for _ in sequences]

        def run_official():
            for sequence, state in zip(sequences, states):
                official(*sequence, state)

        add(
            "official (rwkv pkg)",
            "forward (B calls of 1)",
            run_official,
            nbytes(*(x for sequence in sequences for x in sequence), r) + state_bytes,
        )
        print("  official (rwkv pkg)    forward+backward: none (the rwkv package's kernel is inference-only)")
        del sequences, states

    try:
        from fla.ops.rwkv7 import chunk_rwkv7
    except Exception as error:
        print(f"  fla chunk_rwkv7        skipped: cannot import fla ({type(error).__name__}: {error})")
    else:
        w = log_decay.to(dtype)  # fla takes the log decay in the inputs' dtype

        def fla(r_, w_, k_, v_, a_, b_):
            return chunk_rwkv7(
                r=r_, w=w_, k=k_, v=v_, a=a_, b=b_, scale=1.0, initial_state=None, output_final_state=True
            )

        fla_inputs = (r, w, k, v, a, b)
        with torch.no_grad():
            add("fla chunk_rwkv7", "forward", lambda: fla(*fla_inputs), nbytes(*fla_inputs, r) + state_bytes)
        add(
            "fla chunk_rwkv7",
            "forward+backward",
            forward_and_backward(fla, fla_inputs, dy),
            3 * nbytes(*fla_inputs) + nbytes(r, dy) + state_bytes,
        )

    print(
        f"  {'implementation':<22} {'pass':<24} {'ms':>9} {'Mtok/s':>8} {'GB moved':>9} {'floor ms':>9} {'x floor':>8}"
    )
    for row in rows:
        print(
            f"  {row['impl']:<22} {row['what']:<24} {row['ms']:>9.3f} {row['tokens_per_s'] / 1e6:>8.2f} "
            f"{row['bytes'] / 1e9:>9.2f} {row['floor_ms']:>9.3f} {row['x_floor']:>8.1f}"
        )
    return [dict(row, bandwidth_gbs=bandwidth / 1e9, shape=list(shape)) for row in rows]


def sanitize_workload(kernel, device):
    """Every op once on tiny shapes (the compute-sanitizer workload); no reference, no timing."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for head_dim in (16, 32, 64):
            r, log_decay, k, v, a, b, state, reset = random_inputs(
                2, 37, 2, head_dim, dtype, device, seed=head_dim, reset_rate=0.1
            )
            y, final_state, checkpoints = kernel.ops.forward(r, log_decay, k, v, a, b, state, reset, True)
            kernel.ops.backward(
                r, log_decay, k, v, a, b, reset, checkpoints, torch.ones_like(y), torch.ones_like(final_state)
            )
            kernel.ops.forward(r, log_decay, k, v, a, b, None, None, False)
            kernel.wkv7_decode_step(*(x[:, 0] for x in (r, log_decay, k, v, a, b)), state.clone())
    if device == "cuda":
        torch.cuda.synchronize()
    print(
        "sanitize workload done: forward (with and without checkpoints), backward, decode step; float32, "
        "bfloat16, float16; head sizes 16, 32, 64"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a dry run of this script")
    parser.add_argument("--sanitize", action="store_true", help="only the tiny compute-sanitizer workload")
    parser.add_argument(
        "--bench-shapes",
        nargs="*",
        default=["8,4096,64,64", "8,4096,32,64"],
        help="B,T,H,N of each timing case (none: no timing)",
    )
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device (use --device cpu for a dry run)")

    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device {name}; torch {torch.__version__} (CUDA {torch.version.cuda})")
    kernel, how = load_kernel(device)
    print(f"kernel: {how}")
    if args.sanitize:
        sanitize_workload(kernel, device)
        return

    report = Report()
    started = time.time()
    dtypes = (torch.float32, torch.bfloat16, torch.float16) if device == "cuda" else (torch.float32, torch.bfloat16)
    for index, dtype in enumerate(dtypes):
        check_sequence(report, kernel, reference.wkv7_recurrent, device, 2, 100, 4, 64, dtype, 0.03, seed=10 + index)
    check_sequence(report, kernel, reference.wkv7_recurrent, device, 3, 37, 2, 32, torch.float32, 0.2, seed=20)
    check_sequence(report, kernel, reference.wkv7_recurrent, device, 1, 16, 3, 16, torch.bfloat16, 0.0, seed=21)
    check_sequence(report, kernel, reference.wkv7_recurrent, device, 2, 1, 2, 64, torch.float32, 0.0, seed=22)
    for index, dtype in enumerate(dtypes):
        check_decode(report, kernel, reference, device, dtype, seed=30 + index)
    official = check_official(report, kernel, device, seed=40)
    print(f"{len(report.rows) - report.failures}/{len(report.rows)} checks passed in {time.time() - started:.0f} s")

    bandwidth = copy_bandwidth(device, args.reps)
    timings = [
        row
        for shape in args.bench_shapes
        for row in bench(kernel, official, device, tuple(int(x) for x in shape.split(",")), args.reps, bandwidth)
    ]
    if args.json:
        args.json.write_text(
            json.dumps(
                {"device": name, "torch": torch.__version__, "kernel": how, "checks": report.rows, "timings": timings},
                indent=2,
            )
        )
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
