"""The compiled WKV-7 kernel (`kernels/rwkv7_wkv`, kernel-hub layout), loaded through the `kernels` library.

`load_wkv_kernel` finds it: a local build (``local_path`` or the ``RWKV7_KERNEL_PATH`` environment variable: the
kernel repository, its ``build/`` or a variant directory), else the Hub on CUDA machines. Every failure returns
None with one logged line giving the reason, or raises with `required=True`. The loaded module's `wkv7(r, log_decay,
k, v, a, b, initial_state, reset)` follows the contract of `wkv.py` and is differentiable (the kernel's backward op).
"""

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

KERNEL_PATH_ENV = "RWKV7_KERNEL_PATH"
KERNEL_VERSION = 1
KERNEL_API = ("wkv7", "wkv7_decode_step")

_loaded: dict[tuple[str, Optional[str]], tuple[Optional[ModuleType], Optional[str]]] = {}
_reported: set[str] = set()


def load_wkv_kernel(repo_id: str, local_path: Optional[Path] = None, required: bool = False) -> Optional[ModuleType]:
    """The kernel module, or None (reason logged once) when it cannot be loaded; `required=True` raises a
    RuntimeError naming the reason instead. Results are cached per (repo_id, path)."""
    path = local_path if local_path is not None else os.environ.get(KERNEL_PATH_ENV) or None
    key = (repo_id, None if path is None else str(path))
    if key not in _loaded:
        _loaded[key] = _load(repo_id, None if path is None else Path(path))
    module, reason = _loaded[key]
    if module is None:
        if required:
            raise RuntimeError(f"The RWKV-7 WKV kernel is not available: {reason}")
        if reason not in _reported:
            _reported.add(reason)
            logger.warning(f"RWKV-7 WKV kernel not used: {reason}")
    return module


def _load(repo_id: str, path: Optional[Path]) -> tuple[Optional[ModuleType], Optional[str]]:
    """(module, None) or (None, reason)."""
    try:
        import kernels
    except ImportError as error:
        return None, f"the `kernels` package cannot be imported ({error})"
    if path is not None:
        if not path.exists():
            return None, f"kernel path {path} does not exist"
        try:
            module = kernels.get_local_kernel(path)
        except Exception as error:
            return None, f"loading the kernel from {path} failed: {_one_line(error)}"
        mismatch = _arch_mismatch(module)  # get_kernel checks this itself, get_local_kernel does not
        if mismatch:
            return None, f"the kernel from {path} {mismatch}"
        source = str(path)
    else:
        if not torch.cuda.is_available():
            return None, f"no CUDA device (a local build can be given with {KERNEL_PATH_ENV})"
        if _hub_offline():
            return None, f"HF_HUB_OFFLINE is set, so {repo_id} is not fetched (set {KERNEL_PATH_ENV} for a local build)"
        try:
            module = kernels.get_kernel(repo_id, version=KERNEL_VERSION, trust_remote_code=[repo_id])
        except Exception as error:
            return None, f"loading {repo_id} (version {KERNEL_VERSION}) failed: {_one_line(error)}"
        source = repo_id
    missing = [name for name in KERNEL_API if not hasattr(module, name)]
    if missing:
        return None, f"the kernel from {source} lacks {', '.join(missing)}"
    return module, None


def _arch_mismatch(module: ModuleType) -> Optional[str]:
    """Why a local CUDA build cannot run on this GPU, or None."""
    metadata = json.loads((Path(module.__file__).parent / "metadata.json").read_text())
    archs = metadata["backend"].get("archs")
    if metadata["backend"]["type"] != "cuda" or not archs or not torch.cuda.is_available():
        return None
    capability = torch.cuda.get_device_capability()
    for arch in archs:
        major, minor = (int(part) for part in arch.removesuffix("+PTX").split("."))
        same_family = capability[0] == major and capability[1] >= minor
        if same_family or (arch.endswith("+PTX") and capability >= (major, minor)):  # PTX compiles for newer GPUs
            return None
    return f"is built for compute capabilities {', '.join(archs)}, not {capability[0]}.{capability[1]} (this GPU)"


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _one_line(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"

