"""What the project's tests (tests/) and the kernel's own (kernels/rwkv7_wkv/tests/) share: the test helpers on the
import path (tests/helpers.py), and the kernel's CPU variant, built once per session."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))


@pytest.fixture(scope="session")
def kernel_variant(tmp_path_factory) -> Path:
    """The kernel's CPU variant, built (or found up to date) into kernels/rwkv7_wkv/build/ by
    `modeling_rwkv7.kernel_build.build_variant`, by one xdist worker at a time: its directory."""
    from helpers import run_lock

    from modeling_rwkv7.kernel_build import build_variant

    with run_lock(tmp_path_factory, "kernel_variant"):
        return build_variant("cpu")


@pytest.fixture(scope="session")
def kernel(kernel_variant):
    """The CPU variant loaded through `kernels.get_local_kernel`, as a user of the kernel folder loads it."""
    import kernels

    return kernels.get_local_kernel(kernel_variant.parent.parent, backend="cpu")
