"""Issues 5 and 13: the compiled WKV-7 kernel (kernels/rwkv7_wkv) in kernel-hub layout, built here as its CPU variant
and loaded through the `kernels` library; its ops against the reference recurrence; the loader's fallbacks;
kernel-builder conformance checked by the tools (every source compiled with exactly the include directories
build.toml declares, nvcc for every declared CUDA capability, metadata.json read and its digest validated by
kernels-data, the library checked by kernel-abi-check)."""

import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

try:
    import tomllib
except ImportError:  # Python < 3.11
    from pip._vendor import tomli as tomllib

from modeling_rwkv7 import wkv_kernel
from modeling_rwkv7.wkv import wkv7_recurrent
from modeling_rwkv7.wkv_kernel import load_wkv_kernel

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "kernels" / "rwkv7_wkv"
BUILD_SCRIPT = REPO / "scripts" / "build_kernel.py"
REPO_ID = "modeling-rwkv7/rwkv7-wkv"


def run_build_script(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BUILD_SCRIPT), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2")},
    )
    assert result.returncode == 0, f"build_kernel.py {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="session")
def cpu_variant() -> Path:
    """Builds (or finds up to date) the CPU variant; returns its directory."""
    from kernels._internals import variants  # private since kernels 0.19

    output = run_build_script()
    variant = re.search(r"rwkv7_wkv/build/(torch\S+-cpu-\S+?)[:\s]", output).group(1)
    # the name is the one kernels picks on this machine
    resolved, _ = variants.resolve_variant([variants.parse_variant(variant)], "cpu")
    assert resolved is not None and resolved.variant_str == variant
    return KERNEL_DIR / "build" / variant


@pytest.fixture(scope="session")
def kernel(cpu_variant):
    import kernels

    return kernels.get_local_kernel(KERNEL_DIR, backend="cpu")


def _load_gpu_check():
    spec = importlib.util.spec_from_file_location("rwkv7_gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load_gpu_check()


def wkv_inputs(batch, seq_len, heads, head_dim, seed, dtype=torch.float32, reset_rate=0.0, with_state=True):
    """`scripts/gpu_check.py`'s random inputs at RWKV-7's scale, on CPU; the initial state dropped unless
    `with_state`."""
    *inputs, state, reset = gpu_check.random_inputs(batch, seq_len, heads, head_dim, dtype, "cpu", seed, reset_rate)
    return (*inputs, state if with_state else None, reset)


def assert_close(actual, expected, rtol, name=""):
    """Max abs error within rtol of the largest expected magnitude."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if actual.numel() == 0:
        return
    error = (actual.float() - expected.float()).abs().max().item()
    scale = expected.float().abs().max().item()
    assert error <= rtol * max(scale, 1e-6), f"{name}: max error {error:.3g} vs scale {scale:.3g}"


# --- layout and loading --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_variant_layout_and_metadata(cpu_variant, kernel):
    metadata = json.loads((cpu_variant / "metadata.json").read_text())
    assert metadata["name"] == "rwkv7-wkv" and metadata["version"] == 1 and metadata["backend"] == {"type": "cpu"}
    assert metadata["python-depends"] == [] and metadata["license"] == "Apache-2.0"
    assert metadata["id"].startswith("_rwkv7_wkv_cpu_")
    files = {
        str(p.relative_to(cpu_variant)) for p in cpu_variant.rglob("*") if p.is_file() and "__pycache__" not in p.parts
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
def test_build_is_idempotent(cpu_variant):
    so_file = next(cpu_variant.glob("*.abi3.so"))
    before = so_file.stat().st_mtime_ns
    assert "up to date" in run_build_script()
    assert so_file.stat().st_mtime_ns == before


@pytest.mark.kernel_build
def test_a_second_build_place_copies_the_same_binary(cpu_variant, native_decoding_ops, tmp_path, capsys):
    """The native cache and any other build place hold one binary per id: a process that loaded the native build
    refuses a different build under the same id (kernels' same-build check), so a build elsewhere copies it."""
    import kernels
    from modeling_rwkv7.kernel_build import build_variant

    variant = build_variant("cpu", build_dir=tmp_path / "build")
    assert "copying" in capsys.readouterr().out
    so_file = next(variant.glob("*.abi3.so"))
    assert so_file.read_bytes() == (cpu_variant / so_file.name).read_bytes()
    # kernels loads it beside the build already loaded in this process (it raised "a different build" before)
    assert kernels.get_local_kernel(tmp_path, backend="cpu").ops is native_decoding_ops.ops
    # and a build elsewhere gives the same bytes: the binary names no folder of this machine
    binary = so_file.read_bytes()
    for folder in (KERNEL_DIR.resolve(), Path(torch.__file__).resolve().parent):
        assert str(folder).encode() not in binary, folder


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_compat_directory_loads_alone(cpu_variant, kernel):
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
    result = subprocess.run([sys.executable, "-c", script, str(cpu_variant)], capture_output=True, text=True)
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


# --- the loader ------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_loader(monkeypatch):
    monkeypatch.setattr(wkv_kernel, "_loaded", {})
    monkeypatch.setattr(wkv_kernel, "_reported", set())
    monkeypatch.delenv(wkv_kernel.KERNEL_PATH_ENV, raising=False)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_loader_local_path_and_env_var(kernel, fresh_loader, monkeypatch):
    assert load_wkv_kernel(REPO_ID, local_path=KERNEL_DIR) is kernel
    assert load_wkv_kernel(REPO_ID, local_path=KERNEL_DIR) is kernel  # cached
    monkeypatch.setenv(wkv_kernel.KERNEL_PATH_ENV, str(KERNEL_DIR / "build"))
    assert load_wkv_kernel(REPO_ID) is kernel


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_wkv7_kernel_follows_the_reference_contract(kernel, fresh_loader):
    module = load_wkv_kernel(REPO_ID, local_path=KERNEL_DIR, required=True)
    r, log_decay, k, v, a, b, state, reset = wkv_inputs(2, 23, 2, 32, seed=51, reset_rate=0.2)
    for initial_state in (state, None):
        expected = wkv7_recurrent(r, log_decay, k, v, a, b, initial_state, reset)
        actual = module.wkv7(r, log_decay, k, v, a, b, initial_state, reset)
        assert_close(actual[0], expected[0], 1e-5, "y")
        assert_close(actual[1], expected[1], 1e-5, "final_state")


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.name == wkv_kernel.__name__ and r.levelno == logging.WARNING]


def test_loader_without_the_kernels_package(fresh_loader, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "kernels", None)  # `import kernels` raises ImportError
    with caplog.at_level(logging.WARNING):
        assert load_wkv_kernel(REPO_ID, local_path=KERNEL_DIR) is None
        assert load_wkv_kernel(REPO_ID, local_path=KERNEL_DIR) is None
    messages = warnings_of(caplog)
    assert len(messages) == 1 and "the `kernels` package cannot be imported" in messages[0]
    with pytest.raises(RuntimeError, match="the `kernels` package cannot be imported"):
        load_wkv_kernel(REPO_ID, local_path=KERNEL_DIR, required=True)


@pytest.mark.parametrize(
    "make_path, reason",
    [
        (lambda tmp: tmp / "missing", "does not exist"),
        (lambda tmp: tmp, "Cannot find a build variant"),
    ],
)
def test_loader_bad_path(fresh_loader, tmp_path, caplog, make_path, reason):
    with caplog.at_level(logging.WARNING):
        assert load_wkv_kernel(REPO_ID, local_path=make_path(tmp_path)) is None
    messages = warnings_of(caplog)
    assert len(messages) == 1 and reason in messages[0] and "\n" not in messages[0]
    with pytest.raises(RuntimeError, match=reason):
        load_wkv_kernel(REPO_ID, local_path=make_path(tmp_path), required=True)


def test_loader_without_path_on_a_cpu_machine(fresh_loader, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(wkv_kernel, "_trusted", wkv_kernel.HubKernel(REPO_ID, "0" * 40))
    with caplog.at_level(logging.WARNING):
        assert load_wkv_kernel(REPO_ID) is None
    assert any("no CUDA device" in m for m in warnings_of(caplog))
    with pytest.raises(RuntimeError, match="no CUDA device"):
        load_wkv_kernel(REPO_ID, required=True)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_a_build_for_other_gpus_is_refused_by_kernels_arch_check(monkeypatch, tmp_path):
    """A CUDA build of our declared archs loads only on the GPUs they cover (kernels' own rule, which its loaders
    apply to local and Hub builds alike: same major, newer minor; any newer GPU through +PTX)."""
    from kernels._internals.validate import ArchValidator  # what get_local_kernel / get_kernel run (kernels 0.19)

    from kernels import Metadata

    metadata = {
        "name": "rwkv7-wkv",
        "id": "_rwkv7_wkv_cuda_0",
        "version": 1,
        "license": "Apache-2.0",
        "python-depends": [],
        "backend": {"type": "cuda", "archs": ["8.0", "9.0", "10.0", "12.0+PTX"]},
    }
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, runs in [
        ((8, 0), True),
        ((8, 6), True),
        ((9, 0), True),
        ((10, 3), True),
        ((12, 0), True),
        ((12, 1), True),
        ((13, 0), True),
        ((7, 5), False),
        ((11, 0), False),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda capability=capability: capability)
        try:
            ArchValidator().validate_metadata(
                metadata=Metadata.read_from_file(tmp_path / "metadata.json"),
                variant="torch213-cxx11-cu130-x86_64-linux",
            )
            refusal = None
        except RuntimeError as error:
            refusal = str(error)
        if runs:
            assert refusal is None, (capability, refusal)
        else:
            assert f"CUDA capability {capability[0]}.{capability[1]} of the current device is not supported" in refusal


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
    output = run_build_script("--check-cpu")
    assert "cpu compile check passed" in output
    assert "ok: c++ -fsyntax-only -DCPU_KERNEL torch-ext/torch_binding.cpp (includes: none)" in output
    assert "ok: c++ -fsyntax-only -DCPU_KERNEL csrc/wkv7_cpu.cpp (includes: csrc)" in output


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_metadata_read_and_digest_validated_by_kernels_data(cpu_variant, tmp_path):
    from kernels_data import Backend, Digest, DigestValidationError, DigestViolation, Metadata

    metadata = Metadata.read_from_file(cpu_variant / "metadata.json")
    assert str(metadata.name) == "rwkv7-wkv" and metadata.version == 1 and metadata.license == "Apache-2.0"
    assert metadata.backend.backend_type == Backend.CPU and metadata.id.startswith("_rwkv7_wkv_cpu_")
    metadata.digest.validate(Digest.hash_variant(metadata.digest.algorithm, cpu_variant))  # raises on a mismatch

    # a copy with one byte of the library changed fails the same check, naming the file
    tampered = tmp_path / cpu_variant.name
    shutil.copytree(cpu_variant, tampered, ignore=shutil.ignore_patterns("__pycache__"))
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
def test_cpu_library_passes_kernel_abi_check(cpu_variant):
    from kernel_abi_check import ObjectFile

    library = ObjectFile(next(cpu_variant.glob("*.abi3.so")))
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
    output = run_build_script("--check-cuda", "--quick", "--archs", "8.0,12.0+PTX")
    assert "cuda compile check passed" in output
    assert "ok: nvcc csrc/wkv7_cuda.cu for 8.0, 12.0+PTX (includes: csrc)" in output
    for arch in ("sm_80", "sm_120"):
        for kernel_name in ("forward", "backward"):
            for dtype in ("float32", "float16", "bfloat16"):
                assert f"{arch} {kernel_name} N=64 {dtype}" in output, output
    assert "ok: c++ -fsyntax-only -DCUDA_KERNEL csrc/wkv7_cuda_ops.cpp (includes: csrc)" in output
    assert "ok: c++ -fsyntax-only -DCUDA_KERNEL torch-ext/torch_binding.cpp (includes: none)" in output


def test_gpu_check_feeds_the_official_kernel_the_same_decay():
    """scripts/gpu_check.py times BlinkDL's kernel, which takes w with decay = exp(-exp(w)) and one [seq_len,
    channels] sequence per call: the converted inputs carry the same decay and values."""
    r, log_decay, k, v, a, b, _, _ = wkv_inputs(2, 9, 3, 16, seed=61)
    sequences = gpu_check.official_inputs(r, log_decay, k, v, a, b)
    assert len(sequences) == 2
    for index, sequence in enumerate(sequences):
        assert all(x.shape == (9, 48) and x.is_contiguous() for x in sequence)
        for converted, original in zip(sequence[:1] + sequence[2:], (r, k, v, a, b)):
            assert torch.equal(converted, original[index].reshape(9, 48))
        assert_close(torch.exp(-torch.exp(sequence[1])), log_decay[index].reshape(9, 48).exp(), 1e-6, "decay")
