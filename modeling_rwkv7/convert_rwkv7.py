"""Conversion between official RWKV-7 `.pth` state dicts (BlinkDL RWKV-LM names, `blocks.{i}.att.w1`) and ours.

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

`blocks.0.att.v0/v1/v2` (unused by the official code: layer 0 has no value residual) are dropped.
"""

import re
from typing import Mapping

import torch

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


class CheckpointError(ValueError):
    """An official checkpoint that is not a complete RWKV-7 (x070) state dict."""


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
    required = ["emb.weight", "blocks.0.att.r_k", "blocks.0.ffn.key.weight", "blocks.0.att.w1"]
    missing = [name for name in required if name not in state_dict]
    if missing:
        raise CheckpointError(f"Not an RWKV-7 (x070) checkpoint: missing {missing}.")
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


def official_to_hf(state_dict: Mapping[str, torch.Tensor], **config_overrides) -> tuple[RWKV7Config, dict]:
    """Official `.pth` state dict -> (RWKV7Config, state dict for `RWKV7ForCausalLM`). Raises CheckpointError
    listing every missing or unknown tensor."""
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
    converted = {}
    for name, tensor in state_dict.items():
        mapped = official_tensor_to_hf(name, tensor)
        if mapped is not None:
            converted[mapped[0]] = mapped[1]
    _check_shapes(config, converted)
    return config, converted


def _check_shapes(config: RWKV7Config, state_dict: Mapping[str, torch.Tensor]) -> None:
    from .modeling_rwkv7 import RWKV7ForCausalLM

    with torch.device("meta"):
        reference = RWKV7ForCausalLM(config).state_dict()
    wrong = [
        f"{name}: {tuple(state_dict[name].shape)} (expected {tuple(t.shape)})"
        for name, t in reference.items()
        if name in state_dict and state_dict[name].shape != t.shape
    ]
    if wrong:
        raise CheckpointError(f"Tensors with unexpected shapes: {wrong}.")


def hf_to_official(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Our `RWKV7ForCausalLM` state dict -> official `.pth` names and shapes (the inverse of `official_to_hf`)."""
    reverse_top = {ours: official for official, ours in _TOP_LEVEL.items()}
    reverse_block = {ours: official for official, ours in _BLOCK_LEVEL.items()}
    ours_name = re.compile(r"model\.layers\.(\d+)\.(.+)$")
    converted = {}
    for name, tensor in state_dict.items():
        if name in reverse_top:
            converted[reverse_top[name]] = tensor
            continue
        match = ours_name.match(name)
        if match is None or match.group(2) not in reverse_block:
            raise CheckpointError(f"Unknown tensor {name!r} in an RWKV7ForCausalLM state dict.")
        suffix = reverse_block[match.group(2)]
        if suffix in _FLAT_VECTORS:
            tensor = tensor.reshape(1, 1, -1)
        elif _TRANSPOSED.search(suffix):
            tensor = tensor.t().contiguous()
        converted[f"blocks.{match.group(1)}.{suffix}"] = tensor
    return converted


def load_official_state_dict(path: str) -> dict:
    """Read an official `.pth` (memory-mapped, on CPU)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


__all__ = ["CheckpointError", "config_from_official", "hf_to_official", "official_to_hf", "official_tensor_to_hf"]
