"""Issues 5 and 13, the package's side of the kernel (kernels/rwkv7_wkv tests its own ops): `load_wkv_kernel` and
its fallbacks, the kernel through the package's reference contract, and a second build place of the same sources.
The `kernel_variant` and `kernel` fixtures are the repository's (conftest.py)."""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close

from modeling_rwkv7 import wkv_kernel
from modeling_rwkv7.wkv_kernel import load_wkv_kernel
from modeling_rwkv7.wkv_reference import random_wkv_inputs, wkv7_recurrent

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "kernels" / "rwkv7_wkv"
REPO_ID = "modeling-rwkv7/rwkv7-wkv"


# --- a second build place ----------------------------------------------------------------------------------


@pytest.mark.kernel_build
def test_a_second_build_place_copies_the_same_binary(kernel_variant, native_decoding_ops, tmp_path, capsys):
    """The native cache and any other build place hold one binary per id: a process that loaded the native build
    refuses a different build under the same id (kernels' same-build check), so a build elsewhere copies it."""
    import kernels
    from modeling_rwkv7.kernel_build import build_variant

    variant = build_variant("cpu", build_dir=tmp_path / "build")
    assert "copying" in capsys.readouterr().out
    so_file = next(variant.glob("*.abi3.so"))
    assert so_file.read_bytes() == (kernel_variant / so_file.name).read_bytes()
    # kernels loads it beside the build already loaded in this process (it raised "a different build" before)
    assert kernels.get_local_kernel(tmp_path, backend="cpu").ops is native_decoding_ops.ops
    # and a build elsewhere gives the same bytes: the binary names no folder of this machine
    binary = so_file.read_bytes()
    for folder in (KERNEL_DIR.resolve(), Path(torch.__file__).resolve().parent):
        assert str(folder).encode() not in binary, folder


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
    r, log_decay, k, v, a, b, state, reset = random_wkv_inputs(2, 23, 2, 32, seed=51, reset_rate=0.2).values()
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
