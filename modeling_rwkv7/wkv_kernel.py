"""The compiled WKV-7 kernel (`kernels/rwkv7_wkv`, kernel-hub layout), loaded through the `kernels` library.

Native code runs only from a source the user chose in their own code or environment, never because a downloaded
config.json names one:

- a local build: ``local_path``, or the ``RWKV7_KERNEL_PATH`` environment variable (the kernel repository, its
  ``build/`` or a variant directory);
- a Hub repository pinned to one commit: `trust_hub_kernel(repo_id, revision)`, or the ``RWKV7_HUB_KERNEL``
  environment variable ``"<repo_id>@<commit>"``. The variant for this machine is downloaded at that commit
  (`kernels.install_kernel`), its files are checked against the SHA-256 digest of its metadata.json (kernels-data's
  `Digest`, which must be installed before anything is downloaded; a mismatch refuses it) and only then imported. A
  build whose metadata.json has no digest is refused unless the user passes `allow_unverified=True`.
  `FlaWKVRepository` fetches kernels-community/fla the same way, for `kernels.kernelize`.

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
    """A kernel-hub repository pinned to a full commit hash; `allow_unverified`: also import a build whose
    metadata.json has no digest (the commit pin alone vouches for its files)."""

    repo_id: str
    revision: str
    allow_unverified: bool = False


_trusted: Optional[HubKernel] = None
_loaded: dict[tuple, tuple[Optional[ModuleType], Optional[str]]] = {}
_reported: set[str] = set()


def trust_hub_kernel(repo_id: str, revision: str, allow_unverified: bool = False) -> HubKernel:
    """Opt in to running the compiled WKV kernel of `repo_id` at commit `revision` (40 hexadecimal digits) from the
    Hugging Face Hub, for this process; it is fetched on the first CUDA forward pass that wants it. A build whose
    metadata.json has no digest is refused unless `allow_unverified=True`."""
    global _trusted
    _trusted = _hub_kernel(repo_id, revision, source="trust_hub_kernel", allow_unverified=allow_unverified)
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


def _hub_kernel(repo_id: str, revision: str, source: str, allow_unverified: bool = False) -> HubKernel:
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id):
        raise ValueError(f"{source}: repo_id {repo_id!r} is not a Hub repository id '<owner>/<name>'.")
    if not isinstance(revision, str) or not _COMMIT.fullmatch(revision.lower()):
        raise ValueError(
            f"{source}: revision {revision!r} of {repo_id} is not a full commit hash (40 hexadecimal digits); "
            "a branch "
            "or tag can move, so the Hub kernel is pinned to a commit."
        )
    if not isinstance(allow_unverified, bool):
        raise ValueError(f"{source}: allow_unverified must be True or False, got {allow_unverified!r}.")
    return HubKernel(repo_id, revision.lower(), allow_unverified)


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
            module = kernels.get_local_kernel(path)  # which also checks that the build supports this device
        except Exception as error:
            return None, f"loading the kernel from {path} failed: {_one_line(error)}"
        return _with_api(module, str(path))

    if hub is None:
        hint = f"; the checkpoint's kernel_repo {repo_id!r} is not fetched without that opt-in" if repo_id else ""
        return None, (
            f"no kernel source chosen (a local build via {KERNEL_PATH_ENV}, or a pinned Hub build via "
            f"modeling_rwkv7.wkv_kernel.trust_hub_kernel(repo_id, revision) or {HUB_KERNEL_ENV}='<repo_id>@<commit>')"
            f"{hint}"
        )
    if repo_id and repo_id != hub.repo_id:
        _report(
            f"RWKV-7 WKV: the checkpoint's kernel_repo {repo_id!r} is ignored; the trusted Hub kernel is "
            f"{hub.repo_id}@{hub.revision}"
        )
    if not torch.cuda.is_available():
        return None, f"no CUDA device for the Hub kernel {hub.repo_id} (a local build: {KERNEL_PATH_ENV})"
    try:
        module = fetch_pinned_kernel(hub)
    except RuntimeError as error:
        return None, str(error)
    return _with_api(module, f"{hub.repo_id}@{hub.revision}")


def fetch_pinned_kernel(hub: HubKernel) -> ModuleType:
    """Downloads the variant of `hub` for this machine at its pinned commit (`kernels.install_kernel`), checks its
    files against metadata.json's digest, then imports it. Raises RuntimeError naming what failed."""
    import kernels

    source = f"{hub.repo_id}@{hub.revision}"
    try:
        import kernels_data  # noqa: F401  (checks the download; without it nothing is fetched)
    except ImportError as error:
        raise RuntimeError(
            f"{source} is not fetched: kernels-data, which checks a Hub kernel's files against the digest in its "
            f"metadata.json, cannot be imported ({error}). Install it with `pip install kernels-data`."
        ) from error
    try:
        variant = Path(
            kernels.install_kernel(
                hub.repo_id, revision=hub.revision, trust_remote_code=[hub.repo_id], local_files_only=_hub_offline()
            )
        )
    except Exception as error:
        raise RuntimeError(f"fetching {source} failed: {_one_line(error)}") from error
    problem = _digest_problem(variant, hub.allow_unverified)
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


def _digest_problem(variant_dir: Path, allow_unverified: bool) -> Optional[str]:
    """Why the files of a downloaded variant do not match the digest in its metadata.json, or None. A variant
    without a digest is refused unless `allow_unverified`."""
    from kernels_data import Digest, DigestValidationError, Metadata

    try:
        metadata = Metadata.read_from_file(variant_dir / "metadata.json")
    except ValueError as error:
        return f"its metadata.json cannot be read ({_one_line(error)})"
    if metadata.digest is None:  # builds of older kernel-builder releases
        if not allow_unverified:
            return (
                "its metadata.json has no digest to check its files against; to run it on the commit pin alone, "
                "opt in with trust_hub_kernel(repo_id, revision, allow_unverified=True)"
            )
        _report(
            f"RWKV-7 WKV: {variant_dir.name} has no digest in its metadata.json; its files are not checked "
            "(allow_unverified=True)"
        )
        return None
    try:
        metadata.digest.validate(Digest.hash_variant(metadata.digest.algorithm, variant_dir))
    except DigestValidationError as error:
        return f"its files do not match metadata.json's digest: {'; '.join(map(str, error.violations))}"
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

    def __init__(self, revision: str, repo_id: str = "kernels-community/fla", allow_unverified: bool = False):
        self.kernel = _hub_kernel(repo_id, revision, source="FlaWKVRepository", allow_unverified=allow_unverified)

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
                raise ValueError(
                    "fla's chunk_rwkv7 takes no reset mask; run packed sequences (reset) through this "
                    "package's own WKV (kernelize without the fla mapping)."
                )
            if initial_state is not None:
                initial_state = initial_state.float().transpose(-1, -2)  # [batch, heads, key, value]
            y, final_state = chunk_rwkv7(
                r, log_decay.to(r.dtype), k, v, a, b, scale=1.0, initial_state=initial_state, output_final_state=True
            )
            return y, final_state.float().transpose(-1, -2).contiguous()

    return RWKV7WKV


LAYER_NAME = "RWKV7WKV"  # the WKV operator's hub layer (`wkv.RWKV7WKV`), the model's only one
_KERNEL_CONFIG_FORMS = (
    f'KernelConfig({{"{LAYER_NAME}": "/path/to/rwkv7_wkv:{LAYER_NAME}"}}, use_local_kernel=True) for a local build, '
    f'or KernelConfig({{"{LAYER_NAME}": ("<owner>/<name>:{LAYER_NAME}", {{"revision": "<40-digit commit>", '
    '"trust_remote_code": True})}) for a Hub repository'
)


def kernel_config_repository(kernel_config):
    """The `kernels` layer repository that transformers' `KernelConfig` maps the WKV layer to: a `LocalLayerRepository`
    for a local build (``use_local_kernel=True``), or a `LayerRepository` pinned to a full commit hash. Creating it
    fetches nothing. Raises ValueError for another layer name, a Hub entry without a commit `revision` (a bare string
    or a `version` resolves to whatever is newest), or an entry of another form; transformers' own form of a checked
    mapping (an entry with its metadata, after `from_pretrained` read it) is accepted too."""
    from transformers import KernelConfig

    import kernels

    if not isinstance(kernel_config, KernelConfig):
        raise ValueError(f"kernel_config must be a transformers KernelConfig, got {type(kernel_config).__name__}.")
    mapping = kernel_config.kernel_mapping
    if not isinstance(mapping, dict) or list(mapping) != [LAYER_NAME]:
        raise ValueError(
            f"kernel_config maps {list(mapping) if isinstance(mapping, dict) else mapping!r}; RWKV-7 has "
            f"one hub layer, {LAYER_NAME!r}: map only it, e.g. {_KERNEL_CONFIG_FORMS}."
        )
    entry = mapping[LAYER_NAME]
    if isinstance(entry, dict) and len(entry) == 1:  # {device: entry}
        (entry,) = entry.values()
    source, metadata = entry if isinstance(entry, tuple) and len(entry) == 2 else (entry, {})
    if not isinstance(source, str) or not isinstance(metadata, dict) or source.rpartition(":")[2] != LAYER_NAME:
        raise ValueError(
            f"kernel_config[{LAYER_NAME!r}] = {entry!r} is not one source of the layer {LAYER_NAME!r}; "
            f"use {_KERNEL_CONFIG_FORMS}."
        )
    location = source.rpartition(":")[0]
    if kernel_config.use_local_kernel:
        return kernels.LocalLayerRepository(Path(location), layer_name=LAYER_NAME)
    if not _REPO_ID.fullmatch(location):
        raise ValueError(
            f"kernel_config[{LAYER_NAME!r}]: {location!r} is not a Hub repository id '<owner>/<name>'; "
            "a local build needs KernelConfig(..., use_local_kernel=True)."
        )
    if metadata.get("version") is not None or not isinstance(metadata.get("revision"), str):
        raise ValueError(
            f"kernel_config[{LAYER_NAME!r}] = {entry!r} does not pin {location} to a commit: a bare repository or a "
            f"`version` is resolved to its newest build when loading. Pin it: ('{source}', {{\"revision\": "
            '"<40-digit commit>", "trust_remote_code": True}).'
        )
    hub = _hub_kernel(location, metadata["revision"], source=f"kernel_config[{LAYER_NAME!r}]")
    return kernels.LayerRepository(
        hub.repo_id,
        layer_name=LAYER_NAME,
        revision=hub.revision,
        trust_remote_code=metadata.get("trust_remote_code", False),
    )
