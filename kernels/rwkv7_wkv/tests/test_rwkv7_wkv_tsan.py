"""Issue 13: the CUDA block programs of csrc/wkv7_core.h race-checked without a GPU.

tests/tsan/wkv7_tsan.cpp runs every block on one std::thread per CUDA thread with a real barrier for sync() and
NaN-filled shared memory, built with -fsanitize=thread; its float16 and bfloat16 paths use CUDA's own conversions
on the host. Here: the threaded forward, backward and decoding equal the serial run bitwise (the harness checks),
match the reference recurrence and its autograd gradients, and equal the built CPU variant bitwise; leaving out
one required barrier makes TSAN report a race. Also torch.library.opcheck on the three ops of the CPU variant.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import assert_close

from modeling_rwkv7.wkv_reference import random_wkv_inputs, wkv7_recurrent

KERNEL_DIR = Path(__file__).resolve().parents[1]
HARNESS = Path(__file__).resolve().parent / "tsan" / "wkv7_tsan.cpp"
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TSAN_OPTIONS = "halt_on_error=0 exitcode=66 report_signal_unsafe=0"


def cuda_include_dir() -> Path:
    """The CUDA toolkit's include directory (cuda_fp16.h, cuda_bf16.h), from CUDA_HOME or the nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
        candidates += re.findall(r"(/\S+)/bin/nvcc", Path(nvcc).read_bytes()[:4096].decode(errors="ignore"))
    candidates.append("/usr/local/cuda")
    for candidate in filter(None, candidates):
        if (Path(candidate) / "include" / "cuda_bf16.h").exists():
            return Path(candidate) / "include"
    raise AssertionError(f"no CUDA toolkit headers (cuda_bf16.h) under {[c for c in candidates if c]}; set CUDA_HOME")


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    """tests/tsan/wkv7_tsan.cpp built with g++ -fsanitize=thread."""
    binary = tmp_path_factory.mktemp("tsan") / "wkv7_tsan"
    command = [
        "g++",
        "-std=c++20",
        "-O1",
        "-g",
        "-fsanitize=thread",
        "-pthread",
        "-Wall",
        "-Werror",
        "-DWKV7_HOST_HALF_TYPES",
        f"-I{KERNEL_DIR / 'csrc'}",
        f"-I{cuda_include_dir()}",
        str(HARNESS),
        "-o",
        str(binary),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    return binary


def make_problem(head_dim, dtype, batch, seq_len, heads, seed, reset_rate, with_state, with_dfinal):
    """RWKV-7-scale inputs (`random_wkv_inputs`) rounded to `dtype`, dy and d(final state)."""
    r, log_decay, k, v, a, b, state, reset = random_wkv_inputs(
        batch, seq_len, heads, head_dim, seed, dtype=DTYPES[dtype], reset_rate=reset_rate
    ).values()
    g = torch.Generator().manual_seed(seed + 1)
    dy = torch.randn(r.shape, generator=g).to(DTYPES[dtype])
    dfinal = torch.randn(state.shape, generator=g) * 0.1
    return dict(
        head_dim=head_dim,
        dtype=dtype,
        inputs=(r, log_decay, k, v, a, b),
        dy=dy,
        state=state if with_state else None,
        reset=reset,
        dfinal=dfinal if with_dfinal else None,
    )


def run_harness(harness, tmp_path, problem, skip_sync=None):
    """Runs the harness on `problem`; returns (process, outputs by name or None)."""
    r, log_decay, k, v, a, b = problem["inputs"]
    batch, seq_len, heads, n = r.shape
    state_shape = (batch, heads, n, n)
    reset = problem["reset"]
    parts = [x.float() for x in (r, log_decay, k, v, a, b, problem["dy"])]
    parts += [torch.zeros(state_shape) if x is None else x for x in (problem["state"], problem["dfinal"])]
    parts.append(torch.zeros(batch, seq_len) if reset is None else reset.float())
    (tmp_path / "in.bin").write_bytes(b"".join(x.contiguous().numpy().tobytes() for x in parts))
    flags = (problem["state"] is not None) | (reset is not None) << 1 | (problem["dfinal"] is not None) << 2
    env = {**os.environ, "TSAN_OPTIONS": TSAN_OPTIONS}
    if skip_sync is not None:
        env["WKV7_SKIP_SYNC"] = str(skip_sync)
    args = [
        str(harness),
        str(n),
        problem["dtype"],
        str(batch),
        str(seq_len),
        str(heads),
        str(flags),
        str(tmp_path / "in.bin"),
        str(tmp_path / "out.bin"),
    ]
    process = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    if process.returncode != 0:
        return process, None
    values = torch.frombuffer(bytearray((tmp_path / "out.bin").read_bytes()), dtype=torch.float32)
    token_shape, chunks = tuple(r.shape), (seq_len + 15) // 16
    shapes = {
        "y": token_shape,
        "final_state": state_shape,
        "checkpoints": (batch, heads, chunks, n, n),
        "dr": token_shape,
        "dlog_decay": token_shape,
        "dk": token_shape,
        "dv": token_shape,
        "da": token_shape,
        "db": token_shape,
        "dinitial_state": state_shape,
        "decode_y": token_shape,
        "decode_state": state_shape,
    }
    outputs, offset = {}, 0
    for name, shape in shapes.items():
        size = torch.Size(shape).numel()
        outputs[name] = values[offset : offset + size].reshape(shape)
        offset += size
    assert offset == values.numel(), f"harness wrote {values.numel()} floats, expected {offset}"
    return process, outputs


def assert_no_race(process):
    assert "ThreadSanitizer" not in process.stderr, process.stderr[-6000:]
    assert process.returncode == 0, f"harness exited {process.returncode}:\n{process.stdout}\n{process.stderr[-6000:]}"
    equal = [line for line in process.stdout.splitlines() if line.startswith("equal:")]
    assert len(equal) == 14 and "DIFFERENT" not in process.stdout, process.stdout


CASES = {
    # head_dim, dtype, batch, seq_len, heads, seed, reset_rate, with_state, with_dfinal
    "n16-f32-ragged-resets-state": (16, "f32", 2, 37, 2, 1, 0.2, True, True),
    "n32-bf16-resets-state": (32, "bf16", 1, 21, 1, 2, 0.25, True, False),
    "n64-f16-no-state": (64, "f16", 1, 18, 1, 3, 0.0, False, True),
    "n16-f32-one-token": (16, "f32", 1, 1, 3, 4, 0.0, True, True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_threaded_blocks_equal_serial_and_match_the_reference(harness, tmp_path, case):
    problem = make_problem(*case)
    process, out = run_harness(harness, tmp_path, problem)
    assert_no_race(process)

    r, log_decay, k, v, a, b = (x.float().requires_grad_() for x in problem["inputs"])
    initial = problem["state"] if problem["state"] is not None else torch.zeros_like(out["final_state"])
    state = initial.clone().requires_grad_()  # zeros stand for "no initial state"
    y, final_state = wkv7_recurrent(r, log_decay, k, v, a, b, state, problem["reset"])
    rtol = 1e-4 if problem["dtype"] == "f32" else 1e-2  # outputs rounded to the input dtype
    assert_close(out["y"], y, rtol, "y")
    assert_close(out["final_state"], final_state, 1e-4, "final_state")
    loss = (y * problem["dy"].float()).sum()
    if problem["dfinal"] is not None:
        loss = loss + (final_state * problem["dfinal"]).sum()
    grads = torch.autograd.grad(loss, [r, log_decay, k, v, a, b, state])
    for name, grad in zip(("dr", "dlog_decay", "dk", "dv", "da", "db", "dinitial_state"), grads):
        assert_close(out[name], grad, 1e-4 if name in ("dlog_decay", "dinitial_state") else rtol, name)
    # the checkpoints hold the state entering each chunk of 16 tokens (before that token's reset), key-major
    for chunk in range(out["checkpoints"].shape[2]):
        start = 16 * chunk
        inputs = [x[:, :start].detach() for x in (r, log_decay, k, v, a, b)]
        reset = None if problem["reset"] is None else problem["reset"][:, :start]
        entering = wkv7_recurrent(*inputs, initial, reset)[1]
        assert_close(out["checkpoints"][:, :, chunk].transpose(-1, -2), entering, 1e-4, f"checkpoint {chunk}")


# Each entry leaves out one barrier, named by program and the index of the sync() call in a run of it (seq_len 20:
# chunks of 16 and 4 tokens, an initial state; the backward walks the last chunk first, each chunk in spans of 8
# steps). Every barrier of the programs is needed (but the backward's very last one: only register-to-global stores
# follow it).
REQUIRED_BARRIERS = {
    "forward:0": "after the initial state's columns are in shared memory",
    "forward:1": "after the initial state's rows are read, before staging the first chunk",
    "forward:2": "after staging the first chunk",
    "forward:3": "after the first chunk's steps (the second chunk is staged in the other buffer)",
    # forward:4, after the last chunk, is needed when the last chunk uses the first buffer (an odd chunk count)
    "forward:5": "after the final state's rows are in shared memory",
    "decode:0": "after the state's columns are in shared memory",
    "decode:1": "after the state's rows are read, before staging the token",
    "decode:2": "after staging the token",
    "decode:3": "after the token's step, before the new state's rows go to shared memory",
    "decode:4": "after the new state's rows are in shared memory",
    "backward:0": "after staging the last chunk",
    "backward:1": "after the row pass and the first output gradient (dsb_buf) of the chunk",
    "backward:2": "after the chunk's last step (its G b in dsb_buf)",
    "backward:5": "after the chunk's first step, before staging the previous chunk",
    "backward:6": "after staging the first chunk",
    "backward:7": "after the row pass of the first chunk's second span",
    "backward:15": "after the second span's first step (the next row pass overwrites the kept states)",
    "backward:16": "after the row pass of the first chunk's first span",
}


@pytest.mark.parametrize("skip", REQUIRED_BARRIERS, ids=REQUIRED_BARRIERS.keys())
@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_leaving_out_a_required_barrier_is_reported_as_a_race(harness, tmp_path, skip):
    problem = make_problem(16, "f32", 1, 20, 1, 5, 0.0, True, True)
    process, _ = run_harness(harness, tmp_path, problem, skip_sync=skip)
    assert "WARNING: ThreadSanitizer: data race" in process.stderr, (skip, process.stdout, process.stderr[-3000:])
    assert process.returncode == 66, (skip, process.returncode)


# --- the harness against the built CPU variant, and opcheck of its ops -------------------------------------------


@pytest.mark.parametrize("case", ["n16-f32-ragged-resets-state", "n32-bf16-resets-state"])
@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_threaded_blocks_equal_the_cpu_variant_bitwise(harness, kernel, tmp_path, case):
    problem = make_problem(*CASES[case])
    process, out = run_harness(harness, tmp_path, problem)
    assert_no_race(process)
    inputs, state, reset = problem["inputs"], problem["state"], problem["reset"]
    y, final_state, checkpoints = kernel.ops.forward(*inputs, state, reset, True)
    grads = kernel.ops.backward(*inputs, reset, checkpoints, problem["dy"], problem["dfinal"])
    decode_state = state.clone()
    decode_y = []
    for t in range(y.shape[1]):
        if reset is not None:
            decode_state[reset[:, t]] = 0.0
        decode_y.append(kernel.ops.decode_step(*(x[:, t] for x in inputs), decode_state))
    expected = {
        "y": y,
        "final_state": final_state,
        "checkpoints": checkpoints,
        "decode_y": torch.stack(decode_y, 1),
        "decode_state": decode_state,
    }
    expected.update(zip(("dr", "dlog_decay", "dk", "dv", "da", "db", "dinitial_state"), grads))
    for name, value in expected.items():
        assert torch.equal(out[name], value.float()), f"{name}: the harness and the CPU variant differ"


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_opcheck_forward_backward_decode(kernel):
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) on the three ops, with
    inputs that are not contiguous; the fake outputs are contiguous like the real ones."""
    r, log_decay, k, v, a, b, state, reset = random_wkv_inputs(2, 19, 3, 16, seed=7, reset_rate=0.2).values()
    # [batch, heads, seq_len, head_dim] storage seen as [batch, seq_len, heads, head_dim]
    r, log_decay, k, v, a, b = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (r, log_decay, k, v, a, b))
    assert not r.is_contiguous()
    torch.library.opcheck(kernel.ops.forward, (r, log_decay, k, v, a, b, state, reset, True))
    torch.library.opcheck(kernel.ops.forward, (r, log_decay, k, v, a, b, None, None, False))
    _, _, checkpoints = kernel.ops.forward(r, log_decay, k, v, a, b, state, reset, True)
    dy, dfinal = torch.randn_like(r), torch.randn_like(state)
    torch.library.opcheck(kernel.ops.backward, (r, log_decay, k, v, a, b, reset, checkpoints, dy, dfinal))
    torch.library.opcheck(kernel.ops.backward, (r, log_decay, k, v, a, b, None, checkpoints, dy, None))
    token = [x[:, 0] for x in (r, log_decay, k, v, a, b)]
    torch.library.opcheck(kernel.ops.decode_step, (*token, state.clone()))

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(x) for x in (r, log_decay, k, v, a, b, state, reset, checkpoints, dy, dfinal)]
        forward_out = kernel.ops.forward(*fake[:8], True)
        backward_out = kernel.ops.backward(*fake[:6], fake[7], fake[8], fake[9], fake[10])
        decode_out = kernel.ops.decode_step(*(x[:, 0] for x in fake[:6]), fake[6])
    for name, x in (
        [("forward", t) for t in forward_out] + [("backward", t) for t in backward_out] + [("decode_step", decode_out)]
    ):
        assert x.is_contiguous(), f"{name}: fake output of shape {tuple(x.shape)} has strides {x.stride()}"
