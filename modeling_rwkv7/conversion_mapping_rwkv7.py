"""RWKV-7 tensor names in three layouts, and the transforms between them (no file reading or writing here: see
`convert_rwkv7_checkpoint_to_hf`).

- official: BlinkDL's RWKV-LM `.pth` names and shapes (`blocks.{i}.att.w1`);
- ours: `RWKV7ForCausalLM`'s (`model.layers.{i}.attn.w_lora.lora.0.weight`), also fla-hub's;
- native: the layout of transformers' own RWKV-7 (`Rwkv7ForCausalLM`, model_type "rwkv7" too): the official names
  and shapes under an `rwkv7.` prefix (`rwkv7.emb.weight`, `rwkv7.blocks.{i}.att.w1`), a top-level `head.weight`,
  layer 0's unused `att.v0/v1/v2` kept, and its config keys (`num_heads`, `norm_bias`, `use_deep_embed`,
  `wkv_state_dtype`, `wkv_implementation`). `from_pretrained` of our classes reads it directly through
  `native_weight_conversions` (registered on import).

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

import re
from typing import Mapping

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming

from .configuration_rwkv7 import RWKV7Config
from .modeling_rwkv7 import RWKV7ForCausalLM

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
    layers = {m.group(1) for name in state_dict if (m := _BLOCK_NAME.match(name)) and m.group(2) == "ffn.key.weight"}
    num_layers = len(layers)

    def matrix_shape(name: str) -> tuple[int, int]:  # the sizes are read off these tensors: they must be matrices
        shape = tuple(getattr(state_dict[name], "shape", ()))
        if len(shape) != 2:
            raise CheckpointError(f"Not an RWKV-7 (x070) checkpoint: {name} has shape {shape}, expected a matrix.")
        return shape

    num_heads, head_dim = matrix_shape("blocks.0.att.r_k")
    intermediate_size, hidden_size = matrix_shape("blocks.0.ffn.key.weight")
    v_low_rank = matrix_shape("blocks.1.att.v1")[1] if "blocks.1.att.v1" in state_dict else 32
    return RWKV7Config(
        vocab_size=matrix_shape("emb.weight")[0],
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        decay_low_rank_dim=matrix_shape("blocks.0.att.w1")[1],
        a_low_rank_dim=matrix_shape("blocks.0.att.a1")[1],
        v_low_rank_dim=v_low_rank,
        gate_low_rank_dim=matrix_shape("blocks.0.att.g1")[1],
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


def checked_official_config(state_dict: Mapping[str, torch.Tensor], **config_overrides) -> RWKV7Config:
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
    config = checked_official_config(state_dict, **config_overrides)
    converted = {}
    for name, tensor in state_dict.items():
        mapped = official_tensor_to_hf(name, tensor)
        if mapped is not None:
            converted[mapped[0]] = mapped[1]
    check_shapes(config, converted)
    return config, converted


def reference_tensors(config: RWKV7Config) -> dict[str, torch.Tensor]:
    """Our `RWKV7ForCausalLM` state dict for `config` as meta tensors (names and shapes, no memory), in module
    order; `lm_head.weight` is left out when it is tied to the embeddings."""
    try:
        with torch.device("meta"):
            reference = RWKV7ForCausalLM(config).state_dict()
    except RuntimeError as error:  # sizes whose products overflow int64 ("Storage size calculation overflowed")
        raise CheckpointError(f"No RWKV-7 model has the sizes of this config: {error}") from None
    if config.tie_word_embeddings:
        reference.pop("lm_head.weight")
    return reference


def check_shapes(config: RWKV7Config, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise CheckpointError naming every tensor of `state_dict` (our names) whose shape is not the one `config`
    gives it."""
    reference = reference_tensors(config)
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


def official_to_native_name(name: str) -> str:
    """`blocks.3.att.w1` -> `rwkv7.blocks.3.att.w1`; `head.weight` stays at the top."""
    return name if name == NATIVE_HEAD else NATIVE_PREFIX + name


def native_tensor_to_hf(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """Map one tensor of the native layout to `(our name, our tensor)`; None for layer 0's unused v0/v1/v2;
    KeyError if unknown."""
    return official_tensor_to_hf(_native_to_official_name(name), tensor)


def expected_native_names(config: RWKV7Config) -> set[str]:
    """Every tensor name a native-layout checkpoint of this config must hold (layer 0's v0/v1/v2 are optional,
    `head.weight` is absent when tied)."""
    names = {official_to_native_name(name) for name in expected_official_names(config)}
    if config.tie_word_embeddings:
        names.discard(NATIVE_HEAD)
    return names


def hf_to_native(state_dict: Mapping[str, torch.Tensor], config: RWKV7Config) -> dict:
    """Our `RWKV7ForCausalLM` state dict -> the native layout, with layer 0's (never read) v0/v1/v2 as zeros, as
    transformers' model registers them."""
    native = {official_to_native_name(name): t for name, t in hf_to_official(state_dict).items()}
    if config.tie_word_embeddings:
        native.pop(NATIVE_HEAD, None)
    native.update(native_layer0_value_residual(config, dtype=native[NATIVE_PREFIX + "emb.weight"].dtype))
    return native


def native_layer0_value_residual(config: RWKV7Config, dtype: torch.dtype, device=None) -> dict:
    """Layer 0's `att.v0` `[1, 1, C]`, `att.v1` `[C, D]` and `att.v2` `[D, C]` in native names, as zeros: the
    native model registers them, nothing reads them."""
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
        _NativeRenaming(rf"^{re.escape(official_to_native_name(official))}$", ours)
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


__all__ = [
    "CheckpointError",
    "config_from_official",
    "expected_native_names",
    "expected_official_names",
    "hf_tensor_to_official",
    "hf_to_native",
    "hf_to_official",
    "native_config_dict",
    "native_tensor_to_hf",
    "native_weight_conversions",
    "official_tensor_to_hf",
    "official_to_hf",
]
