"""Which implementation runs each RWKV-7 op: the package's one dispatch point.

    op            implementations (besides "auto")
    "wkv"         "recurrent" (the per-token loop, the reference), "chunked" (the chunked parallel form), "kernel"
                  (the compiled kernel of a source the user chose: `wkv_kernel`)
    "projection"  "linear" (`F.linear`), "row_blocks", "int8_rows": the few-row products of `RWKV7Linear` on CPU
    "decode"      "eager" (the model's modules), "native" (the package's native CPU decoding ops: one op per block)

`config.implementation` (a dict op -> name, every op "auto" by default) is the one switch:
`from_pretrained(path, implementation={"decode": "eager"})`, or `model.set_implementation(decode="eager")` at run
time. "auto" is the fastest correct path on the machine at hand: on CPU a decoding step (one token per row, a
cache, no gradient) runs the native ops, which the package builds from its own sources once per machine
(`kernel_build`, in the background at the first decoding step unless the README's install built them; until then,
and where no compiler is found, the eager model decodes and says why once); the WKV's chunk size and the few-row
products are measured once per machine (`measured_rwkv7`). Every implementation computes the same values up to
float32 rounding; the eager modules stay the readable reference. Nothing here replaces `forward`.
"""

import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

IMPLEMENTATIONS = {
    "wkv": ("auto", "recurrent", "chunked", "kernel"),
    "projection": ("auto", "linear", "row_blocks", "int8_rows"),
    "decode": ("auto", "eager", "native"),
}


def resolve_implementation(value: Optional[dict]) -> dict[str, str]:
    """`value` (None or a dict op -> implementation) completed with "auto" for every op it does not name;
    raises ValueError naming an unknown op or implementation."""
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"implementation must be a dict op -> name (ops {list(IMPLEMENTATIONS)}), got {value!r}.")
    for op, name in value.items():
        if op not in IMPLEMENTATIONS:
            raise ValueError(f"implementation names an unknown op {op!r}; the ops are {list(IMPLEMENTATIONS)}.")
        if name not in IMPLEMENTATIONS[op]:
            raise ValueError(f"implementation[{op!r}]={name!r} is not one of {IMPLEMENTATIONS[op]}.")
    return {op: value.get(op, "auto") for op in IMPLEMENTATIONS}


# ---------------------------------------------------------------------------------------------------------------
# The native CPU decoding ops, built from the package's own kernel sources once per machine.

_native = {"module": None, "build": None, "unavailable": None}


def native_ops(wait: bool = False) -> Optional[ModuleType]:
    """The package's native CPU decoding ops (the CPU build of its kernel, `block_decode_step` and `gemv`), or None
    while they are not available.

    Found in the per-user build cache (`kernel_build.native_cache_dir()`) when built from the current sources and
    toolchain; otherwise a build is started once per process in a background compiler process (about a minute)
    and None is returned until it is done (`wait=True` waits for it). Where they cannot be had (no compiler, or a
    folder loaded with `trust_remote_code` without the package, which has no kernel sources), None, said once.
    """
    if _native["module"] is not None or _native["unavailable"] is not None:
        return _native["module"]
    from .kernel_build import KERNEL_DIR, native_cache_dir, up_to_date_variant

    if not (KERNEL_DIR / "build.toml").exists():
        return _unavailable(
            "this copy of modeling_rwkv7 has no kernel sources (a folder loaded with trust_remote_code=True carries "
            "only the Python files); `pip install modeling_rwkv7` (the package) builds its native CPU decoding ops"
        )
    build = _native["build"]
    if build is None:
        variant = up_to_date_variant(native_cache_dir())
        if variant is not None:
            return _load_native(variant)
        command = [sys.executable, "-m", "modeling_rwkv7.kernel_build", "--native"]
        logger.warning(
            "modeling_rwkv7: building the native CPU decoding ops for this machine in the background (about a "
            f"minute, once; `python {' '.join(command[1:])}` builds them ahead); the eager model decodes until then."
        )
        log = native_cache_dir() / f"build-{os.getpid()}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as output:  # a file, not a pipe: the build finishes even if this process ends first
            package_root = KERNEL_DIR.parents[1]
            build = _native["build"] = subprocess.Popen(command, cwd=package_root, stdout=output, stderr=output)
        build.log = log
    if wait:
        build.wait()
    if build.poll() is None:
        return None
    variant = up_to_date_variant(native_cache_dir())
    if build.returncode != 0 or variant is None:
        last_lines = " | ".join(build.log.read_text().strip().splitlines()[-3:])
        return _unavailable(f"building the native CPU decoding ops failed (exit {build.returncode}): {last_lines}")
    build.log.unlink(missing_ok=True)
    return _load_native(variant)


def _load_native(variant: Path) -> Optional[ModuleType]:
    from .wkv_kernel import load_wkv_kernel

    try:
        module = load_wkv_kernel(None, variant, required=True)
    except RuntimeError as error:
        return _unavailable(str(error))
    _native["module"] = module
    logger.info(f"modeling_rwkv7: native CPU decoding ops loaded from {variant}")
    return module


def _unavailable(reason: str) -> None:
    _native["unavailable"] = reason
    logger.warning(f"modeling_rwkv7: {reason}. Decoding runs the eager model.")
    return None


# ---------------------------------------------------------------------------------------------------------------
# The decoding step


def decode_implementation(model, input_ids, cache, attention_mask, logits_to_keep, other_inputs: bool) -> str:
    """ "native" or "eager" for a call `model(input_ids, cache=cache, attention_mask=..., logits_to_keep=...)` of an
    `RWKV7ForCausalLM`; `other_inputs`: whether the call passes anything else that changes the result (embeddings,
    labels, hidden states wanted). Native is a decoding step: one token per row, an `RWKV7Cache` with a float32
    state, nothing padded in the step, no gradient, on CPU, outside a traced graph; "auto" takes it when the ops
    are available, and forcing "native" raises where it cannot run."""
    from .cache_rwkv7 import RWKV7Cache

    forced = model.config.implementation["decode"]
    if forced == "eager" or torch.compiler.is_compiling():
        return "eager"
    is_step = (
        not other_inputs
        and torch.is_tensor(input_ids)
        and input_ids.dim() == 2
        and input_ids.shape[1] == 1
        and input_ids.device.type == "cpu"
        and isinstance(cache, RWKV7Cache)
        and cache.layers[0].recurrent_state.dtype == torch.float32
        and isinstance(logits_to_keep, int)
        and logits_to_keep in (0, 1)
        and not torch.is_grad_enabled()
        and not (model.training and model.config.dropout > 0)
        and (attention_mask is None or bool(attention_mask[:, -1].all()))
    )
    if not is_step:
        return "eager"
    if forced == "native":
        if native_ops(wait=True) is None:
            raise RuntimeError(f"implementation['decode']='native' cannot run: {_native['unavailable']}")
        return "native"
    return "native" if native_ops() is not None else "eager"


__all__ = ["IMPLEMENTATIONS", "decode_implementation", "native_ops", "resolve_implementation"]
