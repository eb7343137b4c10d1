"""The compiled WKV-7 kernel (`kernels/rwkv7_wkv`, kernel-hub layout), loaded through the `kernels` library.

Native code runs only from a source the user chose in their own code or environment, never because a downloaded
config.json names one:

- a local build: ``local_path``, or the ``RWKV7_KERNEL_PATH`` environment variable (the kernel repository, its
  ``build/`` or a variant directory);
- a Hub repository pinned to one commit: `trust_hub_kernel(repo_id, revision)`, or the ``RWKV7_HUB_KERNEL``
  environment variable ``"<repo_id>@<commit>"``. The variant for this machine is downloaded at that commit
  (`kernels.install_kernel`), its files are checked against the SHA-256 digest of its metadata.json (kernels-data's
  `Digest`; a mismatch refuses it) and only then imported. `FlaWKVRepository` fetches kernels-community/fla the
  same way, for `kernels.kernelize`.

A checkpoint's `config.kernel_repo` is a hint and nothing more: it is ignored, with a warning, unless it is the
repository the user trusted. Without a chosen source, CUDA users get the chunked PyTorch form.

`load_wkv_kernel` returns None with one logged line giving the reason for every failure, or raises with
`required=True`. The loaded module's `wkv7(r, log_decay, k, v, a, b, initial_state, reset)` follows the contract of
`wkv.py` and is differentiable (the kernel's backward op).
"""

import os
import re
from pathlib import Path
from types import ModuleType
from typing import NamedTuple, Optional

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

KERNEL_PATH_ENV = "RWKV7_KERNEL_PATH"
HUB_KERNEL_ENV = "RWKV7_HUB_KERNEL"
KERNEL_API = ("wkv7", "wkv7_decode_step")
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class HubKernel(NamedTuple):
    """A kernel-hub repository pinned to a full commit hash."""

    repo_id: str
    revision: str


_trusted: Optional[HubKernel] = None
_loaded: dict[tuple, tuple[Optional[ModuleType], Optional[str]]] = {}
_reported: set[str] = set()


def trust_hub_kernel(repo_id: str, revision: str) -> HubKernel:
    """Opt in to running the compiled WKV kernel of `repo_id` at commit `revision` (40 hexadecimal digits) from the
    Hugging Face Hub, for this process; it is fetched on the first CUDA forward pass that wants it."""
    global _trusted
    _trusted = _hub_kernel(repo_id, revision, source="trust_hub_kernel")
    _loaded.clear()
    return _trusted


def trusted_hub_kernel() -> Optional[HubKernel]:
    """The Hub kernel the user opted in to (`trust_hub_kernel`, else ``$RWKV7_HUB_KERNEL``), or None."""
    if _trusted is not None:
        return _trusted
    value = os.environ.get(HUB_KERNEL_ENV)
    if not value:
        return None
    repo_id, separator, revision = value.rpartition("@")
    if not separator:
        raise ValueError(f"{HUB_KERNEL_ENV}={value!r} is not of the form '<repo_id>@<40-digit commit hash>'.")
    return _hub_kernel(repo_id, revision, source=HUB_KERNEL_ENV)


def _hub_kernel(repo_id: str, revision: str, source: str) -> HubKernel:
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id):
        raise ValueError(f"{source}: repo_id {repo_id!r} is not a Hub repository id '<owner>/<name>'.")
    if not isinstance(revision, str) or not _COMMIT.fullmatch(revision.lower()):
        raise ValueError(
            f"{source}: revision {revision!r} of {repo_id} is not a full commit hash (40 hexadecimal digits); a branch "
            "or tag can move, so the Hub kernel is pinned to a commit."
        )
    return HubKernel(repo_id, revision.lower())


def load_wkv_kernel(
    repo_id: Optional[str], local_path: Optional[Path] = None, required: bool = False
) -> Optional[ModuleType]:
    """The kernel module, or None (reason logged once) when it cannot be loaded; `required=True` raises a
    RuntimeError naming the reason instead. `repo_id` is the checkpoint's `config.kernel_repo` (a hint, see the
    module docstring). Results are cached per (repo_id, local path, trusted Hub kernel)."""
    path = local_path if local_path is not None else os.environ.get(KERNEL_PATH_ENV) or None
    hub = trusted_hub_kernel() if path is None else None
    key = (repo_id, None if path is None else str(path), hub)
    if key not in _loaded:
        _loaded[key] = _load(repo_id, None if path is None else Path(path), hub)
    module, reason = _loaded[key]
    if module is None:
        if required:
            raise RuntimeError(f"The RWKV-7 WKV kernel is not available: {reason}")
        _report(f"RWKV-7 WKV kernel not used: {reason}")
    return module


def _report(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        logger.warning(message)


def _load(repo_id: Optional[str], path: Optional[Path], hub: Optional[HubKernel]):
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
        return _with_api(module, str(path))

    if hub is None:
        hint = f"; the checkpoint's kernel_repo {repo_id!r} is not fetched without that opt-in" if repo_id else ""
        return None, (
            f"no kernel source chosen (a local build via {KERNEL_PATH_ENV}, or a pinned Hub build via "
            f"modeling_rwkv7.wkv_kernel.trust_hub_kernel(repo_id, revision) or {HUB_KERNEL_ENV}='<repo_id>@<commit>')"
            f"{hint}"
        )
    if repo_id and repo_id != hub.repo_id:
        _report(f"RWKV-7 WKV: the checkpoint's kernel_repo {repo_id!r} is ignored; the trusted Hub kernel is "
                f"{hub.repo_id}@{hub.revision}")
    if not torch.cuda.is_available():
        return None, f"no CUDA device for the Hub kernel {hub.repo_id} (a local build: {KERNEL_PATH_ENV})"
    try:
        module = fetch_pinned_kernel(hub)
    except RuntimeError as error:
        return None, str(error)
    mismatch = _arch_mismatch(module)
    if mismatch:
        return None, f"the kernel {hub.repo_id}@{hub.revision} {mismatch}"
    return _with_api(module, f"{hub.repo_id}@{hub.revision}")


def fetch_pinned_kernel(hub: HubKernel) -> ModuleType:
    """Downloads the variant of `hub` for this machine at its pinned commit (`kernels.install_kernel`), checks its
    files against metadata.json's digest, then imports it. Raises RuntimeError naming what failed."""
    import kernels

    source = f"{hub.repo_id}@{hub.revision}"
    try:
        variant = Path(kernels.install_kernel(hub.repo_id, revision=hub.revision, trust_remote_code=[hub.repo_id],
                                              local_files_only=_hub_offline()))
    except Exception as error:
        raise RuntimeError(f"fetching {source} failed: {_one_line(error)}") from error
    problem = _digest_problem(variant)
    if problem:
        raise RuntimeError(f"the variant {variant.name} of {source} is not loaded: {problem}")
    try:
        return kernels.get_local_kernel(variant)
    except Exception as error:
        raise RuntimeError(f"loading {source} failed: {_one_line(error)}") from error


def _with_api(module: ModuleType, source: str):
    missing = [name for name in KERNEL_API if not hasattr(module, name)]
    if missing:
        return None, f"the kernel from {source} lacks {', '.join(missing)}"
    return module, None


def _digest_problem(variant_dir: Path) -> Optional[str]:
    """Why the files of a downloaded variant do not match the digest in its metadata.json, or None."""
    try:
        from kernels_data import Digest, DigestValidationError, Metadata
    except ImportError:
        return "kernels-data, which checks the files against metadata.json's digest, is not installed"
    try:
        metadata = Metadata.read_from_file(variant_dir / "metadata.json")
    except ValueError as error:
        return f"its metadata.json cannot be read ({_one_line(error)})"
    if metadata.digest is None:  # builds of older kernel-builder releases: the commit pin alone holds
        _report(f"RWKV-7 WKV: {variant_dir.name} has no digest in its metadata.json; its files are not checked")
        return None
    try:
        metadata.digest.validate(Digest.hash_variant(metadata.digest.algorithm, variant_dir))
    except DigestValidationError as error:
        return f"its files do not match metadata.json's digest: {'; '.join(map(str, error.violations))}"
    return None


def _arch_mismatch(module: ModuleType) -> Optional[str]:
    """Why a CUDA build cannot run on this GPU, or None (`kernels`' own check of metadata.json's archs, +PTX
    included)."""
    from kernels import Metadata
    from kernels.validate import ArchValidator

    variant_dir = Path(module.__file__).parent
    try:
        ArchValidator().validate_metadata(metadata=Metadata.read_from_file(variant_dir / "metadata.json"),
                                          variant=variant_dir.name)
    except RuntimeError as error:
        return f"does not support this GPU: {_one_line(error)}"
    return None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _one_line(error: Exception) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


class FlaWKVRepository:
    """The RWKV-7 op of kernels-community/fla (Triton `chunk_rwkv7`) as the "RWKV7WKV" hub layer: a `kernels`
    layer repository for `kernels.use_kernel_mapping`, fetched at a pinned commit like `trust_hub_kernel`.

        mapping = {"RWKV7WKV": {"cuda": FlaWKVRepository(revision="<40-digit commit>")}}
        with kernels.use_kernel_mapping(mapping):
            model = kernels.kernelize(model, mode=kernels.Mode.TRAINING)

    fla keeps the state ``[key, value]`` (ours is ``[value, key]``) and its decay in the inputs' dtype; it has no
    reset mask, so packed sequences (`reset`) are refused."""

    layer_name = "RWKV7WKV"

    def __init__(self, revision: str, repo_id: str = "kernels-community/fla"):
        self.kernel = _hub_kernel(repo_id, revision, source="FlaWKVRepository")

    def load(self) -> type:
        import importlib

        fla = fetch_pinned_kernel(self.kernel)
        return fla_wkv_layer(importlib.import_module(f"{fla.__name__}.ops.rwkv7").chunk_rwkv7)

    def __eq__(self, other) -> bool:
        return isinstance(other, FlaWKVRepository) and self.kernel == other.kernel

    def __hash__(self) -> int:
        return hash((FlaWKVRepository, self.kernel))

    def __str__(self) -> str:
        return f"`{self.kernel.repo_id}` (revision: {self.kernel.revision}), layer `{self.layer_name}` (chunk_rwkv7)"


def fla_wkv_layer(chunk_rwkv7) -> type:
    """A stateless layer class whose forward is the wkv7 contract computed by fla's `chunk_rwkv7(r, w, k, v, a, b,
    scale, initial_state, output_final_state)` (inputs ``[batch, seq_len, heads, head_dim]``, state ``[batch, heads,
    key, value]``)."""

    class RWKV7WKV(nn.Module):
        has_backward = True
        can_torch_compile = False

        def forward(self, r, log_decay, k, v, a, b, initial_state=None, reset=None):
            if reset is not None:
                raise ValueError("fla's chunk_rwkv7 takes no reset mask; run packed sequences (reset) through this "
                                 "package's own WKV (kernelize without the fla mapping).")
            if initial_state is not None:
                initial_state = initial_state.float().transpose(-1, -2)  # [batch, heads, key, value]
            y, final_state = chunk_rwkv7(r, log_decay.to(r.dtype), k, v, a, b, scale=1.0, initial_state=initial_state,
                                         output_final_state=True)
            return y, final_state.float().transpose(-1, -2).contiguous()

    return RWKV7WKV
