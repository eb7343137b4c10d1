"""The rwkv7_wkv kernel's own tests, on its CPU variant (which runs the CUDA block programs of csrc/wkv7_core.h as
loops over the threads): the ops against the reference recurrence (`modeling_rwkv7.wkv_reference`) on fresh random
inputs, forward, checkpoints, gradients, half precision, the decode step, fake tensors and bad inputs; the variant's
layout and metadata; kernel-builder conformance checked by the tools (every source compiled with exactly the include
directories build.toml declares, nvcc for the lowest and highest declared CUDA capability, metadata.json read and its
digest validated by kernels-data, the library checked by kernel-abi-check); and the inputs the GPU check gives
BlinkDL's kernel. The `kernel_variant` and `kernel` fixtures are the repository's (conftest.py)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, load_script

from modeling_rwkv7.kernel_build import check_sources
from modeling_rwkv7.wkv_reference import random_wkv_inputs, wkv7_recurrent

try:
    import tomllib
except ImportError:  # Python < 3.11
    from pip._vendor import tomli as tomllib

KERNEL_DIR = Path(__file__).resolve().parents[1]
REPO = KERNEL_DIR.parents[1]


def run_build_script(*args: str) -> str:
    """`scripts/build_kernel.py ARGS`, checked; its standard output (the compile checks report per source)."""
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "build_kernel.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")},
    )
    assert result.returncode == 0, f"build_kernel.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def wkv_inputs(batch, seq_len, heads, head_dim, seed, dtype=torch.float32, reset_rate=0.0, with_state=True):
    """`random_wkv_inputs` as a tuple in the ops' order, the initial state dropped unless `with_state`."""
    inputs = random_wkv_inputs(batch, seq_len, heads, head_dim, seed, dtype=dtype, reset_rate=reset_rate)
    if not with_state:
        inputs["initial_state"] = None
    return tuple(inputs.values())


# --- layout and loading --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_variant_layout_and_metadata(kernel_variant, kernel):
    from kernels._internals import variants  # private since kernels 0.19

    # the variant's name is the one kernels picks on this machine
    resolved, _ = variants.resolve_variant([variants.parse_variant(kernel_variant.name)], "cpu")
    assert resolved is not None and resolved.variant_str == kernel_variant.name
    metadata = json.loads((kernel_variant / "metadata.json").read_text())
    assert metadata["name"] == "rwkv7-wkv" and metadata["version"] == 1 and metadata["backend"] == {"type": "cpu"}
    assert metadata["python-depends"] == [] and metadata["license"] == "Apache-2.0"
    assert metadata["id"].startswith("_rwkv7_wkv_cpu_")
    files = {
        str(p.relative_to(kernel_variant))
        for p in kernel_variant.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    expected_files = {"__init__.py", "_ops.py", "layers.py", f"{metadata['id']}.abi3.so", "rwkv7_wkv/__init__.py"}
    assert files == expected_files | {"metadata.json"}
    assert set(metadata["digest"]["files"]) == expected_files and metadata["digest"]["algorithm"] == "sha256"
    # kernels imports the variant as the module named by the id, and the ops live in that namespace
    assert kernel.__name__ == metadata["id"]
    assert kernel.ops is getattr(torch.ops, metadata["id"])
    assert kernel.ops.forward.default._schema.name == f"{metadata['id']}::forward"


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_build_is_idempotent(kernel_variant):
    so_file = next(kernel_variant.glob("*.abi3.so"))
    before = so_file.stat().st_mtime_ns
    assert "up to date" in run_build_script()
    assert so_file.stat().st_mtime_ns == before


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_compat_directory_loads_alone(kernel_variant, kernel):
    """Older `kernels` releases import build/<variant>/rwkv7_wkv/ as the package: it exposes the same API (in its own
    process, since the ops namespace can be registered once per process)."""
    script = (
        "import importlib.util, sys, torch\n"
        "spec = importlib.util.spec_from_file_location('old_style', sys.argv[1] + '/rwkv7_wkv/__init__.py',\n"
        "    submodule_search_locations=[sys.argv[1] + '/rwkv7_wkv'])\n"
        "module = importlib.util.module_from_spec(spec); sys.modules['old_style'] = module\n"
        "spec.loader.exec_module(module)\n"
        "x = torch.randn(1, 3, 1, 16)\n"
        "y, state = module.wkv7(x, -torch.ones_like(x), x, x, 0 * x, 0 * x)\n"
        "print(sorted(module.__all__), tuple(y.shape), tuple(state.shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(kernel_variant)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{sorted(kernel.__all__)} (1, 3, 1, 16) (1, 1, 16, 16)"


# --- the ops against the reference ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head_dim, seq_len, reset_rate, with_state",
    [(16, 1, 0.0, True), (32, 16, 0.0, False), (64, 37, 0.15, True), (32, 53, 0.3, True), (16, 0, 0.0, True)],
)
@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_forward_matches_reference(kernel, head_dim, seq_len, reset_rate, with_state):
    r, log_decay, k, v, a, b, state, reset = wkv_inputs(
        2, seq_len, 3, head_dim, seed=seq_len + head_dim, reset_rate=reset_rate, with_state=with_state
    )
    expected_y, expected_state = wkv7_recurrent(r, log_decay, k, v, a, b, state, reset)
    y, final_state = kernel.wkv7(r, log_decay, k, v, a, b, state, reset)
    assert y.dtype == torch.float32 and final_state.dtype == torch.float32
    assert_close(y, expected_y, 1e-5, "y")
    assert_close(final_state, expected_state, 1e-5, "final_state")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_checkpoints_hold_the_state_entering_each_chunk(kernel):
    r, log_decay, k, v, a, b, state, reset = wkv_inputs(1, 40, 2, 16, seed=3, reset_rate=0.1)
    _, _, checkpoints = kernel.ops.forward(r, log_decay, k, v, a, b, state, reset, True)
    assert checkpoints.shape == (1, 2, 3, 16, 16)  # ceil(40 / 16) chunks, [key, value]
    for chunk, start in enumerate((0, 16, 32)):
        expected = (
            state
            if start == 0
            else wkv7_recurrent(*(x[:, :start] for x in (r, log_decay, k, v, a, b)), state, reset[:, :start])[1]
        )
        assert_close(checkpoints[:, :, chunk].transpose(-1, -2), expected, 1e-5, f"checkpoint {chunk}")


@pytest.mark.parametrize("head_dim, seq_len, reset_rate", [(32, 37, 0.15), (64, 21, 0.0), (16, 33, 0.4)])
@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_gradients_match_reference(kernel, head_dim, seq_len, reset_rate):
    inputs = wkv_inputs(2, seq_len, 2, head_dim, seed=100 + seq_len, reset_rate=reset_rate)
    reset = inputs[-1]
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(2, seq_len, 2, head_dim, generator=g)
    dstate = torch.randn(2, 2, head_dim, head_dim, generator=g)

    def gradients(fn):
        leaves = [x.clone().requires_grad_() for x in inputs[:-1]]
        y, final_state = fn(*leaves, reset)
        ((y * dy).sum() + (final_state * dstate).sum()).backward()
        return [x.grad for x in leaves]

    names = ("r", "log_decay", "k", "v", "a", "b", "initial_state")
    for name, actual, expected in zip(names, gradients(kernel.wkv7), gradients(wkv7_recurrent)):
        assert_close(actual, expected, 2e-5, f"d{name}")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_gradients_through_y_only_and_without_initial_state(kernel):
    r, log_decay, k, v, a, b, _, reset = wkv_inputs(1, 19, 2, 32, seed=11, reset_rate=0.2, with_state=False)
    grads = []
    for fn in (kernel.wkv7, wkv7_recurrent):
        leaves = [x.clone().requires_grad_() for x in (r, log_decay, k, v, a, b)]
        y, _ = fn(*leaves, None, reset)
        y.square().sum().backward()
        grads.append([x.grad for x in leaves])
    for name, actual, expected in zip(("r", "log_decay", "k", "v", "a", "b"), *grads):
        assert_close(actual, expected, 2e-5, f"d{name}")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_half_precision_inputs(kernel):
    r, log_decay, k, v, a, b, state, reset = wkv_inputs(2, 29, 2, 32, seed=5, dtype=torch.bfloat16, reset_rate=0.1)
    expected_y, expected_state = wkv7_recurrent(r, log_decay, k, v, a, b, state, reset)
    leaves = [x.clone().requires_grad_() for x in (r, log_decay, k, v, a, b, state)]
    y, final_state = kernel.wkv7(*leaves, reset)
    assert y.dtype == torch.bfloat16 and final_state.dtype == torch.float32
    assert_close(y, expected_y, 1e-2, "y")  # both round the float32 result to bfloat16
    assert_close(final_state, expected_state, 1e-5, "final_state")
    y.float().sum().backward()
    assert [x.grad.dtype for x in leaves] == [torch.bfloat16, torch.float32] + [torch.bfloat16] * 4 + [torch.float32]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_decode_step_matches_one_reference_step(kernel):
    r, log_decay, k, v, a, b, state, _ = wkv_inputs(3, 1, 2, 64, seed=21)
    expected_y, expected_state = wkv7_recurrent(r, log_decay, k, v, a, b, state)
    live_state = state.clone()
    y = kernel.wkv7_decode_step(*(x[:, 0] for x in (r, log_decay, k, v, a, b)), live_state)
    assert y.shape == (3, 2, 64)
    assert_close(y, expected_y[:, 0], 1e-5, "y")
    assert_close(live_state, expected_state, 1e-5, "state (updated in place)")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_decoding_token_by_token_equals_the_sequence_op(kernel):
    r, log_decay, k, v, a, b, state, _ = wkv_inputs(2, 20, 2, 16, seed=22)
    y_sequence, final_state = kernel.wkv7(r, log_decay, k, v, a, b, state)
    live_state = state.clone()
    y_steps = torch.stack(
        [kernel.wkv7_decode_step(*(x[:, t] for x in (r, log_decay, k, v, a, b)), live_state) for t in range(20)], dim=1
    )
    assert_close(y_steps, y_sequence, 1e-6, "y")
    assert_close(live_state, final_state, 1e-6, "state")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_fake_tensor_registrations(kernel):
    r, log_decay, k, v, a, b, state, reset = wkv_inputs(1, 18, 2, 16, seed=31, reset_rate=0.2)
    torch.library.opcheck(kernel.ops.forward, (r, log_decay, k, v, a, b, state, reset, True))
    torch.library.opcheck(kernel.ops.decode_step, tuple(x[:, 0] for x in (r, log_decay, k, v, a, b)) + (state,))


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_bad_inputs_raise_clear_errors(kernel):
    r, log_decay, k, v, a, b, state, reset = wkv_inputs(1, 5, 2, 16, seed=41, reset_rate=0.5)
    assert kernel.HEAD_SIZES == (16, 32, 64)
    with pytest.raises(RuntimeError, match=r"head_dim 48 is not supported; supported head sizes: 16, 32, 64"):
        x = torch.randn(1, 5, 2, 48)
        kernel.wkv7(x, x, x, x, x, x)
    with pytest.raises(RuntimeError, match=r"k has shape \[1, 4, 2, 16\], expected \[1, 5, 2, 16\]"):
        kernel.wkv7(r, log_decay, k[:, :4], v, a, b)
    with pytest.raises(RuntimeError, match=r"v has dtype BFloat16, expected Float"):
        kernel.wkv7(r, log_decay, k, v.bfloat16(), a, b)
    with pytest.raises(RuntimeError, match=r"initial_state has shape \[1, 2, 16, 8\], expected \[1, 2, 16, 16\]"):
        kernel.wkv7(r, log_decay, k, v, a, b, state[..., :8])
    with pytest.raises(RuntimeError, match=r"reset has dtype Float, expected Bool"):
        kernel.wkv7(r, log_decay, k, v, a, b, state, reset.float())


# --- kernel-builder conformance ------------------------------------------------------------------------------


def kernel_config() -> dict:
    with open(KERNEL_DIR / "build.toml", "rb") as f:
        return tomllib.load(f)


def test_build_toml_covers_ampere_to_blackwell_with_ptx():
    config = kernel_config()
    (cuda_kernel,) = [kernel for kernel in config["kernel"].values() if kernel["backend"] == "cuda"]
    capabilities = cuda_kernel["cuda-capabilities"]
    assert {c.removesuffix("+PTX") for c in capabilities} >= {"8.0", "9.0", "10.0", "12.0"}
    newest = max(capabilities, key=lambda c: tuple(int(x) for x in c.removesuffix("+PTX").split(".")))
    assert newest.endswith("+PTX")  # PTX of the newest, so later GPUs JIT-compile instead of failing to launch
    # every file a source includes with quotes is in its kernel's src list or under a declared include directory
    for kernel in config["kernel"].values():
        listed = set(kernel["src"])
        for source in [s for s in kernel["src"] if s.endswith((".cpp", ".cu", ".h"))]:
            for included in re.findall(r'#include "([^"]+)"', (KERNEL_DIR / source).read_text()):
                assert any(f"{entry}/{included}" in listed for entry in kernel["include"]), (source, included)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_cpu_sources_compile_with_exactly_the_declared_includes():
    checked = check_sources("cpu")
    assert {record["source"]: (record["compiler"], record["includes"]) for record in checked} == {
        "torch-ext/torch_binding.cpp": ("c++", []),
        "csrc/cpu/wkv7_cpu.cpp": ("c++", ["csrc"]),
        "csrc/cpu/rwkv7_decode_cpu.cpp": ("c++", ["csrc"]),
    }


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_metadata_read_and_digest_validated_by_kernels_data(kernel_variant, tmp_path):
    from kernels_data import Backend, Digest, DigestValidationError, DigestViolation, Metadata

    metadata = Metadata.read_from_file(kernel_variant / "metadata.json")
    assert str(metadata.name) == "rwkv7-wkv" and metadata.version == 1 and metadata.license == "Apache-2.0"
    assert metadata.backend.backend_type == Backend.CPU and metadata.id.startswith("_rwkv7_wkv_cpu_")
    metadata.digest.validate(Digest.hash_variant(metadata.digest.algorithm, kernel_variant))  # raises on a mismatch

    # a copy with one byte of the library changed fails the same check, naming the file
    tampered = tmp_path / kernel_variant.name
    shutil.copytree(kernel_variant, tampered, ignore=shutil.ignore_patterns("__pycache__"))
    library = tampered / f"{metadata.id}.abi3.so"
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 1
    library.write_bytes(bytes(data))
    with pytest.raises(DigestValidationError) as error:
        metadata.digest.validate(Digest.hash_variant(metadata.digest.algorithm, tampered))
    assert [type(v) for v in error.value.violations] == [DigestViolation.HashMismatch]
    assert error.value.violations[0].path == library.name


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_cpu_library_passes_kernel_abi_check(kernel_variant):
    from kernel_abi_check import ObjectFile

    library = ObjectFile(next(kernel_variant.glob("*.abi3.so")))
    assert library.check_python_abi("3.9") == []  # stable ABI: one build for every Python >= 3.9
    # The manylinux level depends on the glibc of the machine that builds (kernel-builder targets manylinux_2_28);
    # whatever it needs must be present here, since the library was just loaded.
    glibc = tuple(int(x) for x in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split("."))
    assert library.check_manylinux(f"manylinux_{glibc[0]}_{glibc[1]}") == []


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_cuda_sources_compile_for_the_lowest_and_highest_declared_capability():
    """nvcc for build.toml's lowest and highest cuda-capability (with its PTX), device code at -O1 (`--quick`: every
    template compiles for both; the release -O3 takes ten times as long); the capabilities between compile the same
    templates (`kernel_build --check-cuda` checks them all at -O3)."""
    checked = {record["source"]: record for record in check_sources("cuda", ["8.0", "12.0+PTX"], quick=True)}
    assert {source: (record["compiler"], record["includes"]) for source, record in checked.items()} == {
        "torch-ext/torch_binding.cpp": ("c++", []),
        "csrc/cuda/wkv7_cuda.cu": ("nvcc", ["csrc"]),
        "csrc/cuda/wkv7_cuda_ops.cpp": ("c++", ["csrc"]),
    }
    kernel = checked["csrc/cuda/wkv7_cuda.cu"]
    assert kernel["archs"] == ["8.0", "12.0+PTX"]
    for arch in ("sm_80", "sm_120"):
        for kernel_name in ("forward", "backward"):
            for dtype in ("float32", "float16", "bfloat16"):
                assert any(line.startswith(f"{arch} {kernel_name} N=64 {dtype} ") for line in kernel["kernels"])


def test_gpu_check_feeds_the_official_kernel_the_same_decay():
    """benchmarks/gpu_check.py times BlinkDL's kernel, which takes w with decay = exp(-exp(w)) and one [seq_len,
    channels] sequence per call: the converted inputs carry the same decay and values."""
    r, log_decay, k, v, a, b, _, _ = wkv_inputs(2, 9, 3, 16, seed=61)
    sequences = load_script(KERNEL_DIR / "benchmarks" / "gpu_check.py").official_inputs(r, log_decay, k, v, a, b)
    assert len(sequences) == 2
    for index, sequence in enumerate(sequences):
        assert all(x.shape == (9, 48) and x.is_contiguous() for x in sequence)
        for converted, original in zip(sequence[:1] + sequence[2:], (r, k, v, a, b)):
            assert torch.equal(converted, original[index].reshape(9, 48))
        assert_close(torch.exp(-torch.exp(sequence[1])), log_decay[index].reshape(9, 48).exp(), 1e-6, "decay")
