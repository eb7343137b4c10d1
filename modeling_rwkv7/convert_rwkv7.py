"""RWKV-7 checkpoints in, Hub-ready transformers folders out.

Three sources are understood:

- an official `.pth` state dict (BlinkDL RWKV-LM names, `blocks.{i}.att.w1`), renamed and reshaped below;
- a flash-linear-attention (fla-hub) folder (`config.json` + safetensors), whose tensor names and shapes are ours;
- a folder in the layout of transformers' own RWKV-7 (`Rwkv7ForCausalLM`, model_type "rwkv7" too): the official
  names and shapes under an `rwkv7.` prefix (`rwkv7.emb.weight`, `rwkv7.blocks.{i}.att.w1`, `rwkv7.ln_out.*`), a
  top-level `head.weight`, layer 0's unused `att.v0/v1/v2` kept, and its config keys (`num_heads`, `norm_bias`,
  `use_deep_embed`, `wkv_state_dtype`, `wkv_implementation`). `from_pretrained` of our classes reads it directly
  (`native_weight_conversions`); `layout="native"` writes it.

`convert_checkpoint` (CLI: `python -m modeling_rwkv7.convert_rwkv7 SOURCE OUTPUT_DIR`) streams either into a folder
that loads with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` anywhere: config with
`auto_map`, the modeling code, safetensors shards in the chosen dtype, generation config, the RWKV World tokenizer
(for 65536-token vocabularies) and a model card.

Official layout (C = hidden, D = a LoRA rank, H x N = heads x head_dim):

    official                       ours                                        change
    emb.weight [V,C]               model.embeddings.weight                     -
    blocks.0.ln0.*                 model.layers.0.pre_norm.*                   -
    blocks.i.ln1.* / ln2.*         model.layers.i.attn_norm.* / ffn_norm.*     -
    att.x_{r,w,k,v,a,g} [1,1,C]    attn.x_*                                    -
    att.{w,a,v}0 [1,1,C]           attn.{w,a,v}_lora.lora.2.bias [C]           reshape
    att.{w,a,v,g}1 [C,D]           attn.{w,a,v,g}_lora.lora.0.weight [D,C]     transpose
    att.{w,a,v,g}2 [D,C]           attn.{w,a,v,g}_lora.lora.2.weight [C,D]     transpose
    att.k_k, att.k_a [1,1,C]       attn.k_k, attn.k_a [C]                      reshape
    att.r_k [H,N]                  attn.r_k                                    -
    att.receptance/key/value/output.weight   attn.r_proj/k_proj/v_proj/o_proj.weight
    att.ln_x.*                     attn.g_norm.*                               -
    ffn.x_k [1,1,C]                ffn.x_k [C]                                 reshape
    ffn.key/value.weight           ffn.key/value.weight                        -
    ln_out.*, head.weight          model.norm.*, lm_head.weight                -

`blocks.0.att.v0/v1/v2` (unused by the official code: layer 0 has no value residual) are dropped, and written as
zeros in the native layout, whose model registers them.
"""

import argparse
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming

from .configuration_rwkv7 import RWKV7Config

_TOP_LEVEL = {
    "emb.weight": "model.embeddings.weight",
    "ln_out.weight": "model.norm.weight",
    "ln_out.bias": "model.norm.bias",
    "head.weight": "lm_head.weight",
}
_BLOCK_LEVEL = {
    "ln0.weight": "pre_norm.weight",
    "ln0.bias": "pre_norm.bias",
    "ln1.weight": "attn_norm.weight",
    "ln1.bias": "attn_norm.bias",
    "ln2.weight": "ffn_norm.weight",
    "ln2.bias": "ffn_norm.bias",
    **{f"att.x_{m}": f"attn.x_{m}" for m in "rwkvag"},
    "att.k_k": "attn.k_k",
    "att.k_a": "attn.k_a",
    "att.r_k": "attn.r_k",
    "att.receptance.weight": "attn.r_proj.weight",
    "att.key.weight": "attn.k_proj.weight",
    "att.value.weight": "attn.v_proj.weight",
    "att.output.weight": "attn.o_proj.weight",
    "att.ln_x.weight": "attn.g_norm.weight",
    "att.ln_x.bias": "attn.g_norm.bias",
    "ffn.x_k": "ffn.x_k",
    "ffn.key.weight": "ffn.key.weight",
    "ffn.value.weight": "ffn.value.weight",
    **{f"att.{lora}0": f"attn.{lora}_lora.lora.2.bias" for lora in "wav"},
    **{f"att.{lora}1": f"attn.{lora}_lora.lora.0.weight" for lora in "wavg"},
    **{f"att.{lora}2": f"attn.{lora}_lora.lora.2.weight" for lora in "wavg"},
}
_FLAT_VECTORS = {"att.k_k", "att.k_a", "ffn.x_k", "att.w0", "att.a0", "att.v0"}  # [1,1,C] officially, [C] here
_TRANSPOSED = re.compile(r"att\.[wavg][12]$")
_BLOCK_NAME = re.compile(r"blocks\.(\d+)\.(.+)$")
_UNUSED_LAYER0 = {"att.v0", "att.v1", "att.v2"}
# the tensors that identify an x070 checkpoint and give its sizes
_REQUIRED_OFFICIAL = [
    "emb.weight",
    "blocks.0.att.r_k",
    "blocks.0.ffn.key.weight",
    "blocks.0.att.w1",
    "blocks.0.att.a1",
    "blocks.0.att.g1",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = ("ours", "native")
DEFAULT_MAX_SHARD_SIZE = "2GB"
WORLD_VOCAB_SIZE = 65536  # the RWKV World tokenizer's id space; other vocabularies get no tokenizer
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_card.md"
CARD_TAGS = ["rwkv", "rwkv7", "linear-attention", "custom_code"]
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that is not a complete RWKV-7 (x070) model."""


# --- official .pth <-> ours, tensor by tensor ------------------------------------------------------------------


def official_tensor_to_hf(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """Map one official tensor to `(our name, our tensor)`; None for tensors we drop; KeyError if unknown."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name], tensor
    match = _BLOCK_NAME.match(name)
    if match is None or match.group(2) not in _BLOCK_LEVEL:
        raise KeyError(name)
    layer, suffix = int(match.group(1)), match.group(2)
    if layer == 0 and suffix in _UNUSED_LAYER0:
        return None
    if suffix.startswith("ln0.") and layer != 0:
        raise KeyError(name)
    if suffix in _FLAT_VECTORS:
        tensor = tensor.reshape(-1)
    elif _TRANSPOSED.search(suffix):
        tensor = tensor.t().contiguous()
    return f"model.layers.{layer}.{_BLOCK_LEVEL[suffix]}", tensor


def config_from_official(state_dict: Mapping[str, torch.Tensor], **overrides) -> RWKV7Config:
    """Infer every size of an official checkpoint from its tensors (nothing is assumed)."""
    missing = [name for name in _REQUIRED_OFFICIAL if name not in state_dict]
    if missing:
        raise CheckpointError(
            f"Not an RWKV-7 (x070) checkpoint: missing tensors {missing} "
            f"(an x070 checkpoint has all of {_REQUIRED_OFFICIAL})."
        )
    num_layers = len({m.group(1) for name in state_dict if (m := _BLOCK_NAME.match(name)) and m.group(2) == "ffn.key.weight"})
    num_heads, head_dim = state_dict["blocks.0.att.r_k"].shape
    intermediate_size, hidden_size = state_dict["blocks.0.ffn.key.weight"].shape
    v_low_rank = state_dict["blocks.1.att.v1"].shape[1] if "blocks.1.att.v1" in state_dict else 32
    return RWKV7Config(
        vocab_size=state_dict["emb.weight"].shape[0],
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        decay_low_rank_dim=state_dict["blocks.0.att.w1"].shape[1],
        a_low_rank_dim=state_dict["blocks.0.att.a1"].shape[1],
        v_low_rank_dim=v_low_rank,
        gate_low_rank_dim=state_dict["blocks.0.att.g1"].shape[1],
        **overrides,
    )


def expected_official_names(config: RWKV7Config) -> set[str]:
    """Every tensor name an official checkpoint of this config holds (layer 0's unused v0/v1/v2 excluded)."""
    names = set(_TOP_LEVEL) | {"blocks.0.ln0.weight", "blocks.0.ln0.bias"}
    for layer in range(config.num_hidden_layers):
        for suffix in _BLOCK_LEVEL:
            if suffix.startswith("ln0.") or (layer == 0 and suffix in _UNUSED_LAYER0):
                continue
            names.add(f"blocks.{layer}.{suffix}")
    return names


def _checked_official_config(state_dict: Mapping[str, torch.Tensor], **config_overrides) -> RWKV7Config:
    """The config of an official state dict, after checking it holds exactly the tensors that config needs."""
    config = config_from_official(state_dict, **config_overrides)
    expected = expected_official_names(config)
    optional = {f"blocks.0.{suffix}" for suffix in _UNUSED_LAYER0}
    missing = sorted(expected - set(state_dict))
    unknown = sorted(set(state_dict) - expected - optional)
    if missing or unknown:
        raise CheckpointError(
            f"Not a plain RWKV-7 (x070) checkpoint of {config.num_hidden_layers} layers: "
            f"missing tensors {missing}, unknown tensors {unknown}."
        )
    return config


def official_to_hf(state_dict: Mapping[str, torch.Tensor], **config_overrides) -> tuple[RWKV7Config, dict]:
    """Official `.pth` state dict -> (RWKV7Config, state dict for `RWKV7ForCausalLM`). Raises CheckpointError
    listing every missing or unknown tensor."""
    config = _checked_official_config(state_dict, **config_overrides)
    converted = {}
    for name, tensor in state_dict.items():
        mapped = official_tensor_to_hf(name, tensor)
        if mapped is not None:
            converted[mapped[0]] = mapped[1]
    _check_shapes(config, converted)
    return config, converted


def _reference_tensors(config: RWKV7Config) -> dict[str, torch.Tensor]:
    """Our `RWKV7ForCausalLM` state dict for `config` as meta tensors (names and shapes, no memory), in module
    order; `lm_head.weight` is left out when it is tied to the embeddings."""
    from .modeling_rwkv7 import RWKV7ForCausalLM

    with torch.device("meta"):
        reference = RWKV7ForCausalLM(config).state_dict()
    if config.tie_word_embeddings:
        reference.pop("lm_head.weight")
    return reference


def _check_shapes(config: RWKV7Config, state_dict: Mapping[str, torch.Tensor]) -> None:
    reference = _reference_tensors(config)
    wrong = [
        f"{name}: {tuple(state_dict[name].shape)} (expected {tuple(t.shape)})"
        for name, t in reference.items()
        if name in state_dict and state_dict[name].shape != t.shape
    ]
    if wrong:
        raise CheckpointError(f"Tensors with unexpected shapes: {wrong}.")


_REVERSE_TOP_LEVEL = {ours: official for official, ours in _TOP_LEVEL.items()}
_REVERSE_BLOCK_LEVEL = {ours: official for official, ours in _BLOCK_LEVEL.items()}
_OUR_BLOCK_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)$")


def hf_tensor_to_official(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """Map one of our tensors to `(official name, official tensor)`; CheckpointError if unknown."""
    if name in _REVERSE_TOP_LEVEL:
        return _REVERSE_TOP_LEVEL[name], tensor
    match = _OUR_BLOCK_NAME.match(name)
    if match is None or match.group(2) not in _REVERSE_BLOCK_LEVEL:
        raise CheckpointError(f"Unknown tensor {name!r} in an RWKV7ForCausalLM state dict.")
    suffix = _REVERSE_BLOCK_LEVEL[match.group(2)]
    if suffix in _FLAT_VECTORS:
        tensor = tensor.reshape(1, 1, -1)
    elif _TRANSPOSED.search(suffix):
        tensor = tensor.t().contiguous()
    return f"blocks.{match.group(1)}.{suffix}", tensor


def hf_to_official(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Our `RWKV7ForCausalLM` state dict -> official `.pth` names and shapes (the inverse of `official_to_hf`)."""
    return dict(hf_tensor_to_official(name, tensor) for name, tensor in state_dict.items())


# --- transformers' own RWKV-7 layout ("native") <-> ours ------------------------------------------------------

NATIVE_PREFIX = "rwkv7."
NATIVE_ARCHITECTURE = "Rwkv7ForCausalLM"
NATIVE_HEAD = "head.weight"


def _native_to_official_name(name: str) -> str:
    """`rwkv7.blocks.3.att.w1` -> `blocks.3.att.w1`, `head.weight` -> `head.weight`; KeyError for any other name."""
    if name == NATIVE_HEAD:
        return name
    official = name.removeprefix(NATIVE_PREFIX)
    if official == name or official == NATIVE_HEAD:
        raise KeyError(name)
    return official


def _official_to_native_name(name: str) -> str:
    return name if name == NATIVE_HEAD else NATIVE_PREFIX + name


def native_tensor_to_hf(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """Map one tensor of the native layout to `(our name, our tensor)`; None for layer 0's unused v0/v1/v2;
    KeyError if unknown."""
    return official_tensor_to_hf(_native_to_official_name(name), tensor)


def expected_native_names(config: RWKV7Config) -> set[str]:
    """Every tensor name a native-layout checkpoint of this config must hold (layer 0's v0/v1/v2 are optional,
    `head.weight` is absent when tied)."""
    names = {_official_to_native_name(name) for name in expected_official_names(config)}
    if config.tie_word_embeddings:
        names.discard(NATIVE_HEAD)
    return names


def hf_to_native(state_dict: Mapping[str, torch.Tensor], config: RWKV7Config) -> dict:
    """Our `RWKV7ForCausalLM` state dict -> the native layout, with layer 0's (never read) v0/v1/v2 as zeros, as
    transformers' model registers them."""
    native = {_official_to_native_name(name): t for name, t in hf_to_official(state_dict).items()}
    if config.tie_word_embeddings:
        native.pop(NATIVE_HEAD, None)
    native.update(_native_layer0_value_residual(config, dtype=native[NATIVE_PREFIX + "emb.weight"].dtype))
    return native


def _native_layer0_value_residual(config: RWKV7Config, dtype: torch.dtype, device=None) -> dict:
    C, D = config.hidden_size, config.v_low_rank_dim
    prefix = f"{NATIVE_PREFIX}blocks.0.att."
    shapes = {"v0": (1, 1, C), "v1": (C, D), "v2": (D, C)}
    return {prefix + name: torch.zeros(shape, dtype=dtype, device=device) for name, shape in shapes.items()}


def native_config_dict(config: RWKV7Config, dtype: torch.dtype) -> dict:
    """`config.json` of the native layout (transformers' `Rwkv7Config` keys) for the model `config` describes."""
    if config.vocab_size is None or config.input_size is not None:
        raise ValueError(
            "The native layout holds token language models only; this config is a feature encoder "
            f"(vocab_size={config.vocab_size}, input_size={config.input_size})."
        )
    return {
        "architectures": [NATIVE_ARCHITECTURE],
        "model_type": "rwkv7",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "head_dim": config.head_dim,
        "num_heads": config.num_heads,
        "decay_low_rank_dim": config.decay_low_rank_dim,
        "a_low_rank_dim": config.a_low_rank_dim,
        "v_low_rank_dim": config.v_low_rank_dim,
        "gate_low_rank_dim": config.gate_low_rank_dim,
        "intermediate_size": config.intermediate_size,
        "norm_eps": config.norm_eps,
        "norm_bias": True,
        "tie_word_embeddings": config.tie_word_embeddings,
        "use_cache": config.use_cache,
        "use_deep_embed": False,
        "wkv_state_dtype": config.wkv_state_dtype,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "dtype": str(dtype).removeprefix("torch."),
    }


class _KeepOurLayout(WeightRenaming):
    """The reverse of a native-layout transform, applied by `save_pretrained`: our names stay as they are."""

    __slots__ = ()

    def __init__(self):
        super().__init__(source_patterns="^$", target_patterns="^$")

    def rename_source_key(self, source_key: str) -> tuple[str, None]:
        return source_key, None


class _NativeRenaming(WeightRenaming):
    """A native tensor that only changes name (load-only)."""

    __slots__ = ()

    def reverse_transform(self) -> WeightRenaming:
        return _KeepOurLayout()


class _NativeConverter(WeightConverter):
    """A native tensor that changes name and shape (load-only)."""

    __slots__ = ()

    def reverse_transform(self) -> WeightRenaming:
        return _KeepOurLayout()


class _NativeTensorToOurs(ConversionOps):
    """One native tensor in our shape: transposed (LoRA factors `[C, D]` -> `[D, C]`) or flattened (`[1, 1, C]`)."""

    def __init__(self, transpose: bool):
        self.transpose = transpose

    def convert(self, input_dict, source_patterns, target_patterns, full_layer_name, **kwargs):
        (tensors,) = input_dict.values()
        tensor = tensors[0] if isinstance(tensors, list) else tensors
        tensor = tensor.t().contiguous() if self.transpose else tensor.reshape(-1)
        return {full_layer_name: tensor}


def native_weight_conversions() -> list[WeightRenaming | WeightConverter]:
    """The transforms with which transformers' `from_pretrained` reads a native-layout checkpoint into our classes
    (registered for them on import): each native tensor is renamed to ours, and flattened or transposed as
    `official_tensor_to_hf` does. They match native names only (`rwkv7.*`, a top-level `head.weight`), so our own
    folders load untouched. Load-only: a model loaded from a native folder saves in our layout."""
    conversions = [
        _NativeRenaming(rf"^{re.escape(_official_to_native_name(official))}$", ours)
        for official, ours in _TOP_LEVEL.items()
    ]
    for suffix, ours in _BLOCK_LEVEL.items():
        source = rf"^{re.escape(NATIVE_PREFIX)}blocks\.(\d+)\.{re.escape(suffix)}$"
        target = rf"model.layers.\1.{ours}"
        if suffix in _FLAT_VECTORS or _TRANSPOSED.search(suffix):
            operation = _NativeTensorToOurs(transpose=suffix not in _FLAT_VECTORS)
            conversions.append(_NativeConverter(source, target, operations=[operation]))
        else:
            conversions.append(_NativeRenaming(source, target))
    return conversions


def load_official_state_dict(path: str) -> dict:
    """Read an official `.pth` (memory-mapped, on CPU)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


# --- sources: a config plus our tensors, read one at a time ----------------------------------------------------


@dataclass
class Checkpoint:
    """A validated source checkpoint. `tensors` maps each of our names, in writing order, to a meta tensor of the
    stored shape and dtype; `load(name)` reads that one tensor in our layout."""

    config: RWKV7Config
    tensors: dict[str, torch.Tensor]
    load: Callable[[str], torch.Tensor]


def open_official_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """An official `.pth`, memory-mapped: nothing is read until `load`."""
    try:
        state_dict = load_official_state_dict(str(path))
    except Exception as error:
        raise CheckpointError(f"Cannot read {path} as a PyTorch state dict: {error}") from error
    if not isinstance(state_dict, Mapping) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise CheckpointError(f"{path} does not hold a state dict (name -> tensor); got {type(state_dict).__name__}.")
    config = _checked_official_config(state_dict)
    official_name = {}
    meta = {}
    for name, tensor in state_dict.items():
        mapped = official_tensor_to_hf(name, torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"))
        if mapped is not None:
            official_name[mapped[0]] = name
            meta[mapped[0]] = mapped[1]
    _check_shapes(config, meta)
    order = [name for name in _reference_tensors(config) if name in meta]

    def load(name: str) -> torch.Tensor:
        return official_tensor_to_hf(official_name[name], state_dict[official_name[name]])[1]

    return Checkpoint(config, {name: meta[name] for name in order}, load)


def _folder_config(folder: Path) -> RWKV7Config:
    """The `RWKV7Config` of a folder's `config.json` (fla-hub and native keys are absorbed; `auto_map` dropped)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(
            f"{folder} has no config.json: expected an official `.pth` file, an fla-hub or a native-layout folder."
        )
    config_dict = json.loads(config_file.read_text())
    if config_dict.get("model_type") != "rwkv7":
        raise CheckpointError(f"{config_file} has model_type={config_dict.get('model_type')!r}; expected 'rwkv7'.")
    for key in ("auto_map", "architectures", "_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    return RWKV7Config.from_dict(config_dict)


def _safetensors_weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> safetensors file of a folder (sharded or not)."""
    from safetensors import safe_open

    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        return json.loads(index_file.read_text())["weight_map"]
    if (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", framework="pt") as handle:
            return {name: "model.safetensors" for name in handle.keys()}
    raise CheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json.")


def _stored_meta(handles: dict, weight_map: dict[str, str], name: str) -> torch.Tensor:
    stored_slice = handles[weight_map[name]].get_slice(name)
    return torch.empty(stored_slice.get_shape(), dtype=_SAFETENSORS_DTYPES[stored_slice.get_dtype()], device="meta")


def _is_native_layout(weight_map: Mapping[str, str]) -> bool:
    return NATIVE_PREFIX + "emb.weight" in weight_map


def open_fla_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """An fla-hub RWKV-7 folder (or one of ours): its `config.json` keys are absorbed by `RWKV7Config`, its
    safetensors tensor names are ours. Its own `auto_map` (pointing at fla's code) is dropped."""
    from safetensors import safe_open

    folder = Path(folder)
    config = _folder_config(folder)
    weight_map = _safetensors_weight_map(folder)
    handles = {file: safe_open(folder / file, framework="pt") for file in sorted(set(weight_map.values()))}

    reference = _reference_tensors(config)
    stored = set(weight_map) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unknown = sorted(set(reference) - stored), sorted(stored - set(reference))
    if missing or unknown:
        raise CheckpointError(
            f"{folder} is not the RWKV-7 model its config.json describes ({config.num_hidden_layers} layers, "
            f"hidden_size={config.hidden_size}): missing tensors {missing}, unknown tensors {unknown}."
        )
    meta = {name: _stored_meta(handles, weight_map, name) for name in reference}
    _check_shapes(config, meta)

    def load(name: str) -> torch.Tensor:
        return handles[weight_map[name]].get_tensor(name)

    return Checkpoint(config, meta, load)


def open_native_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """A folder in the layout of transformers' own RWKV-7: `rwkv7.`-prefixed official tensor names, `head.weight`,
    its config keys. Raises CheckpointError naming every missing or unknown tensor (in the native names)."""
    from safetensors import safe_open

    folder = Path(folder)
    config = _folder_config(folder)
    weight_map = _safetensors_weight_map(folder)
    handles = {file: safe_open(folder / file, framework="pt") for file in sorted(set(weight_map.values()))}

    expected = expected_native_names(config)
    optional = set(_native_layer0_value_residual(config, torch.float32, device="meta"))
    if config.tie_word_embeddings:
        optional.add(NATIVE_HEAD)  # a tied head may be stored anyway; ours is the embedding
    missing = sorted(expected - set(weight_map))
    unknown = sorted(set(weight_map) - expected - optional)
    if missing or unknown:
        raise CheckpointError(
            f"{folder} is not the native-layout RWKV-7 model its config.json describes ({config.num_hidden_layers} "
            f"layers, hidden_size={config.hidden_size}): missing tensors {missing}, unknown tensors {unknown}."
        )
    native_name, meta = {}, {}
    for name in sorted(expected):
        mapped = native_tensor_to_hf(name, _stored_meta(handles, weight_map, name))
        native_name[mapped[0]] = name
        meta[mapped[0]] = mapped[1]
    _check_shapes(config, meta)
    order = [name for name in _reference_tensors(config) if name in meta]

    def load(name: str) -> torch.Tensor:
        source = native_name[name]
        return native_tensor_to_hf(source, handles[weight_map[source]].get_tensor(source))[1]

    return Checkpoint(config, {name: meta[name] for name in order}, load)


def open_checkpoint(source: str | os.PathLike) -> Checkpoint:
    """An official `.pth` file, an fla-hub folder (or one of ours), or a native-layout folder (told apart by its
    tensor names)."""
    source = Path(source)
    if source.is_dir():
        if _is_native_layout(_safetensors_weight_map(source)):
            return open_native_checkpoint(source)
        return open_fla_checkpoint(source)
    if not source.is_file():
        raise FileNotFoundError(
            f"No checkpoint at {source}: expected an official `.pth` file, an fla-hub or a native-layout folder."
        )
    return open_official_checkpoint(source)


def native_view(checkpoint: Checkpoint) -> Checkpoint:
    """The same weights, named and shaped in the native layout (what `layout="native"` writes), with layer 0's
    zero v0/v1/v2 added."""
    config = checkpoint.config
    ours_of, tensors = {}, {}
    for name, meta in checkpoint.tensors.items():
        official, native_meta = hf_tensor_to_official(name, meta)
        ours_of[_official_to_native_name(official)] = name
        tensors[_official_to_native_name(official)] = native_meta
    zeros = _native_layer0_value_residual(config, checkpoint.tensors["model.embeddings.weight"].dtype, device="meta")
    tensors.update(zeros)

    def load(native_name: str) -> torch.Tensor:
        if native_name in zeros:
            return torch.zeros(zeros[native_name].shape, dtype=zeros[native_name].dtype)
        name = ours_of[native_name]
        return hf_tensor_to_official(name, checkpoint.load(name))[1]

    return Checkpoint(config, tensors, load)


# --- the output folder -----------------------------------------------------------------------------------------


def convert_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    layout: str = "ours",
    dtype: str = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    repo_id: Optional[str] = None,
    license: str = "apache-2.0",
    base_model: Optional[str] = None,
    card_template: Optional[str | os.PathLike] = None,
) -> Path:
    """Convert an official `.pth`, an fla-hub folder or a native-layout folder into a transformers folder.

    layout: "ours" (our tensor names, the modeling code and `auto_map`, a model card: loads anywhere with
        `trust_remote_code=True`) or "native" (the layout of transformers' own RWKV-7, `Rwkv7ForCausalLM`: its tensor
        names and config keys, no code; our classes load it too).
    dtype: "float32", "bfloat16", "float16", or "auto" (the dtype of the source's embedding table).
    max_shard_size: largest safetensors file (bytes or "2GB"-style); memory use stays around one shard.
    overwrite: replace a non-empty `output_dir` (refused otherwise).
    repo_id, license, base_model: what the model card shows (`repo_id` defaults to the folder's name).
    The folder is written under a temporary name next to `output_dir` and renamed at the end, so an interrupted
    run leaves no `output_dir` behind.
    """
    source, output_dir = Path(source), Path(output_dir)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    if output_dir.exists() and not overwrite and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    if output_dir.resolve() in source.resolve().parents or output_dir.resolve() == source.resolve():
        raise ValueError(f"The output folder {output_dir} must not contain the source checkpoint {source}.")
    checkpoint = open_checkpoint(source)
    torch_dtype = _resolve_dtype(dtype, checkpoint)
    template = Path(card_template) if card_template is not None else MODEL_CARD_TEMPLATE

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = output_dir.parent / f".{output_dir.name}.{uuid.uuid4().hex[:12]}.partial"
    staging.mkdir()
    try:
        if layout == "native":
            _write_weights(native_view(checkpoint), torch_dtype, staging, max_shard_size)
            _write_native_config(checkpoint.config, torch_dtype, staging)
        else:
            num_parameters = _write_weights(checkpoint, torch_dtype, staging, max_shard_size)
            _write_config_and_code(checkpoint.config, torch_dtype, staging)
        if checkpoint.config.vocab_size == WORLD_VOCAB_SIZE:
            _write_tokenizer(staging)
        if layout == "ours":
            card = render_model_card(
                checkpoint.config,
                repo_id=repo_id or output_dir.name,
                num_parameters=num_parameters,
                license=license,
                base_model=base_model,
                template=template,
            )
            (staging / "README.md").write_text(card, encoding="utf-8")
        _move_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _resolve_dtype(dtype: str, checkpoint: Checkpoint) -> torch.dtype:
    if dtype == "auto":
        return checkpoint.tensors["model.embeddings.weight"].dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}.")
    return DTYPES[dtype]


def _write_weights(checkpoint: Checkpoint, dtype: torch.dtype, folder: Path, max_shard_size: int | str) -> int:
    """Write the tensors shard by shard (only one shard's tensors are in memory at a time); returns the number of
    parameters."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file
    from transformers.utils import logging

    planned = {name: torch.empty(t.shape, dtype=dtype, device="meta") for name, t in checkpoint.tensors.items()}
    split = split_torch_state_dict_into_shards(planned, max_shard_size=max_shard_size)
    for filename, names in logging.tqdm(split.filename_to_tensors.items(), desc="Writing shards"):
        shard = {name: checkpoint.load(name).to(dtype).contiguous() for name in names}
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        del shard
    num_parameters = sum(t.numel() for t in planned.values())
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": num_parameters, **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return num_parameters


def _write_config_and_code(config: RWKV7Config, dtype: torch.dtype, folder: Path) -> None:
    """config.json with an `auto_map`, the modeling code it names (and everything that code imports), and
    generation_config.json."""
    from transformers import GenerationConfig
    from transformers.dynamic_module_utils import custom_object_save

    from .modeling_rwkv7 import RWKV7ForCausalLM, RWKV7Model

    config.architectures = [RWKV7ForCausalLM.__name__]
    config.dtype = dtype
    with torch.device("meta"):
        model = RWKV7ForCausalLM(config)
    custom_object_save(model, folder, config=config)  # copies modeling_rwkv7.py and its relative imports
    config.auto_map["AutoModel"] = f"{RWKV7Model.__module__.rsplit('.', 1)[-1]}.{RWKV7Model.__name__}"
    config.save_pretrained(folder)  # adds AutoConfig and copies configuration_rwkv7.py
    GenerationConfig.from_model_config(config).save_pretrained(folder)


def _write_native_config(config: RWKV7Config, dtype: torch.dtype, folder: Path) -> None:
    """config.json in transformers' own `Rwkv7Config` keys (no `auto_map`, no code) and generation_config.json."""
    from transformers import GenerationConfig

    (folder / "config.json").write_text(json.dumps(native_config_dict(config, dtype), indent=2) + "\n")
    GenerationConfig.from_model_config(config).save_pretrained(folder)


def _write_tokenizer(folder: Path) -> None:
    """The RWKV World tokenizer, with `auto_map` in tokenizer_config.json and its code next to it."""
    from .tokenization_rwkv7 import RWKV7Tokenizer

    RWKV7Tokenizer.register_for_auto_class("AutoTokenizer")
    RWKV7Tokenizer().save_pretrained(folder)


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename the finished `staging` folder to `output_dir`, replacing what is there."""
    if not output_dir.exists():
        os.replace(staging, output_dir)
        return
    replaced = output_dir.parent / f".{output_dir.name}.{uuid.uuid4().hex[:12]}.replaced"
    os.replace(output_dir, replaced)
    os.replace(staging, output_dir)
    if replaced.is_dir():
        shutil.rmtree(replaced)
    else:
        replaced.unlink()


# --- model card ------------------------------------------------------------------------------------------------


def count_parameters(folder: str | os.PathLike) -> int:
    """Number of parameters stored in a folder's safetensors files (read from the headers only)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No .safetensors file in {folder}.")
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                total += int(torch.Size(shape).numel())
    return total


def render_model_card(
    config: RWKV7Config,
    *,
    repo_id: str,
    num_parameters: int,
    license: str = "apache-2.0",
    base_model: Optional[str] = None,
    benchmarks: Sequence[Mapping] = (),
    template: str | os.PathLike = MODEL_CARD_TEMPLATE,
) -> str:
    """The README.md of a converted model: YAML metadata (library, pipeline, tags, license, base model,
    parameter count, `model-index` from `benchmarks`) and the body from the Jinja `template`.

    benchmarks: rows `{"task": ..., "metric": ..., "value": ...}` (optional "dataset", "split"), shown as a table.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    template = Path(template)
    if not template.is_file():
        raise FileNotFoundError(f"Model card template {template} not found (pass card_template / --card-template).")
    rows = [_benchmark_row(row) for row in benchmarks]
    eval_results = [
        EvalResult(
            task_type="text-generation",
            dataset_type=row["dataset"],
            dataset_name=row["task"],
            dataset_split=row.get("split"),
            metric_type=row["metric"],
            metric_value=row["value"],
        )
        for row in rows
    ]
    card_data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=list(CARD_TAGS),
        model_name=repo_id.rsplit("/", 1)[-1],
        eval_results=eval_results or None,
        num_parameters=num_parameters,
    )
    dtype = config.dtype if isinstance(config.dtype, str) else str(config.dtype).removeprefix("torch.")
    card = ModelCard.from_template(
        card_data,
        template_path=str(template),
        repo_id=repo_id,
        model_name=repo_id.rsplit("/", 1)[-1],
        base_model=base_model,
        num_parameters=num_parameters,
        parameters_human=_human_count(num_parameters),
        config=config,
        dtype=dtype,
        benchmarks=rows,
    )
    return str(card)


def _benchmark_row(row: Mapping) -> dict:
    missing = [key for key in ("task", "metric", "value") if key not in row]
    if missing:
        raise ValueError(f"Benchmark row {dict(row)} lacks {missing}; each row needs task, metric and value.")
    return {"dataset": row.get("dataset", row["task"]), **row}


def _human_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


# --- command line ----------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_rwkv7.convert_rwkv7",
        description="Convert an official RWKV-7 .pth, an fla-hub or a native-layout RWKV-7 folder into a transformers folder.",
    )
    parser.add_argument(
        "source", help="official RWKV-7 .pth file, or an fla-hub, native-layout or converted folder (config.json + safetensors)"
    )
    parser.add_argument("output_dir", help="folder to create")
    parser.add_argument(
        "--layout",
        default="ours",
        choices=LAYOUTS,
        help="ours: our names + code + auto_map (default); native: transformers' own RWKV-7 layout (Rwkv7ForCausalLM)",
    )
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights dtype (auto: as stored)")
    parser.add_argument(
        "--max-shard-size",
        default=DEFAULT_MAX_SHARD_SIZE,
        type=lambda size: int(size) if size.isdigit() else size,
        help='bytes, or e.g. "2GB" (default), "500MB"',
    )
    parser.add_argument("--overwrite", action="store_true", help="replace output_dir if it exists and is not empty")
    parser.add_argument("--repo-id", help="Hub repository the model card's examples load from (default: folder name)")
    parser.add_argument("--license", default="apache-2.0", help="model card license (default: apache-2.0)")
    parser.add_argument("--base-model", help="Hub id of the original weights, e.g. BlinkDL/rwkv7-g1")
    parser.add_argument("--card-template", help=f"Jinja model card template (default: {MODEL_CARD_TEMPLATE})")
    args = parser.parse_args(argv)
    try:
        output_dir = convert_checkpoint(
            args.source,
            args.output_dir,
            layout=args.layout,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            repo_id=args.repo_id,
            license=args.license,
            base_model=args.base_model,
            card_template=args.card_template,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as error:  # CheckpointError is a ValueError
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(f"Wrote {output_dir}:")
    for path in sorted(output_dir.iterdir()):
        print(f"  {path.name:40s} {path.stat().st_size:>14,d} bytes")


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "config_from_official",
    "convert_checkpoint",
    "count_parameters",
    "hf_to_native",
    "hf_to_official",
    "native_tensor_to_hf",
    "native_weight_conversions",
    "official_to_hf",
    "official_tensor_to_hf",
    "open_checkpoint",
    "render_model_card",
]


if __name__ == "__main__":
    main()
