"""Export an RWKV-7 model to GGUF for llama.cpp (architecture "rwkv7"), with the `gguf` package.

    python scripts/export_gguf.py SOURCE OUT.gguf [--outtype f32|f16|bf16]

SOURCE: anything `rwkv7-convert` reads (a folder of ours, written by the converter or by a plain
`model.save_pretrained`; an fla-hub or native-layout folder; an official `.pth`). The file holds the tensors under
the names and shapes llama.cpp's `convert_hf_to_gguf.py` gives RWKV-7 (its `Rwkv7Model`) and its loader requires
(`src/models/rwkv7.cpp`), the hyperparameters it reads, and the RWKV World vocabulary from the copy packaged with
`modeling_rwkv7` (so a folder needs no tokenizer files), with token 0 named as our tokenizer names it
(`<|endoftext|>`).

What llama.cpp cannot hold is refused before anything is written (an interrupted export leaves no file):
- a feature encoder (no token vocabulary, or `input_size` projection);
- a vocabulary smaller than the RWKV World tokenizer's 65530 ids (llama.cpp's RWKV tokenizer is that vocabulary);
- a per-head GroupNorm epsilon other than 64e-5: llama.cpp hardcodes it, ours is `head_dim * norm_eps` (equal for
  every released model, different for e.g. head_dim 32 with norm_eps 1e-5).
Tied embeddings are written as a separate `output.weight` (llama.cpp's loader requires one). Big matrices are
written in `--outtype`; vectors, token-shift mixes and LoRA factors stay float32, as llama.cpp's converter keeps them.
"""

import argparse
import math
import os
import sys
import uuid
from pathlib import Path
from typing import Callable, Mapping

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM  # noqa: E402
from modeling_rwkv7.conversion_mapping_rwkv7 import hf_tensor_to_official  # noqa: E402
from modeling_rwkv7.convert_rwkv7_checkpoint_to_hf import open_checkpoint  # noqa: E402
from modeling_rwkv7.tokenization_rwkv7 import END_OF_TEXT, VOCAB_FILES_NAMES, load_rwkv_vocab  # noqa: E402

ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.RWKV7]
LLAMA_CPP_GROUP_NORM_EPS = 64e-5  # llama.cpp's RWKV-7 time-mix GroupNorm epsilon (hardcoded there)
VOCAB_FILE = Path(__file__).resolve().parent.parent / "modeling_rwkv7" / VOCAB_FILES_NAMES["vocab_file"]
EOT_TOKEN_ID = 261  # "\n\n", the turn separator; llama.cpp's converter marks it as end of turn
OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
}
# official block suffix -> llama.cpp tensor; the token-shift mixes att.x_{r,w,k,v,a,g} go into one fused tensor
_BLOCK_TENSORS = {
    "ln1.weight": "attn_norm.weight",
    "ln1.bias": "attn_norm.bias",
    "ln2.weight": "attn_norm_2.weight",
    "ln2.bias": "attn_norm_2.bias",
    **{f"att.{lora}{i}": f"time_mix_{lora}{i}.weight" for lora in "wavg" for i in "012" if f"{lora}{i}" != "g0"},
    "att.k_k": "time_mix_k_k.weight",
    "att.k_a": "time_mix_k_a.weight",
    "att.r_k": "time_mix_r_k.weight",
    "att.key.weight": "time_mix_key.weight",
    "att.value.weight": "time_mix_value.weight",
    "att.receptance.weight": "time_mix_receptance.weight",
    "att.output.weight": "time_mix_output.weight",
    "att.ln_x.weight": "time_mix_ln.weight",
    "att.ln_x.bias": "time_mix_ln.bias",
    "ffn.x_k": "channel_mix_lerp_k.weight",
    "ffn.key.weight": "channel_mix_key.weight",
    "ffn.value.weight": "channel_mix_value.weight",
}
_TOP_TENSORS = {
    "emb.weight": "token_embd.weight",
    "blocks.0.ln0.weight": "token_embd_norm.weight",
    "blocks.0.ln0.bias": "token_embd_norm.bias",
    "ln_out.weight": "output_norm.weight",
    "ln_out.bias": "output_norm.bias",
    "head.weight": "output.weight",
}
_LERP_ORDER = "rwkvag"  # llama.cpp's order of the six mixes in time_mix_lerp_fused
_MATRICES = {
    "token_embd",
    "output",
    "time_mix_key",
    "time_mix_value",
    "time_mix_receptance",
    "time_mix_output",
    "channel_mix_key",
    "channel_mix_value",
}  # written in --outtype; everything else float32


def check_llama_cpp_can_hold(config: RWKV7Config) -> None:
    """Raise ValueError naming what llama.cpp's RWKV-7 cannot compute for this config."""
    if config.vocab_size is None or config.input_size is not None:
        raise ValueError(
            "llama.cpp's RWKV-7 is a token language model; this config is a feature encoder "
            f"(vocab_size={config.vocab_size}, input_size={config.input_size})."
        )
    world_ids = len(load_rwkv_vocab(VOCAB_FILE))
    if config.vocab_size < world_ids:
        raise ValueError(
            f"vocab_size={config.vocab_size} is smaller than the RWKV World vocabulary ({world_ids} ids), the only "
            "tokenizer llama.cpp has for RWKV-7."
        )
    group_norm_eps = config.head_dim * config.norm_eps
    if not math.isclose(group_norm_eps, LLAMA_CPP_GROUP_NORM_EPS, rel_tol=1e-6):
        raise ValueError(
            f"The time-mix GroupNorm epsilon of this model is head_dim * norm_eps = {config.head_dim} * "
            f"{config.norm_eps} = {group_norm_eps:g}; llama.cpp hardcodes {LLAMA_CPP_GROUP_NORM_EPS:g}, so it "
            "would compute another model."
        )


def llama_cpp_tensors(config: RWKV7Config, official: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The GGUF tensors (llama.cpp names, PyTorch shapes, float32) of an official-layout state dict."""
    tensors = {}
    for name, gguf_name in _TOP_TENSORS.items():
        tensors[gguf_name] = official[name]
    for layer in range(config.num_hidden_layers):
        prefix = f"blocks.{layer}."
        for suffix, gguf_name in _BLOCK_TENSORS.items():
            # layer 0 has no value residual: llama.cpp wants its (unused) v0/v1/v2 shaped like a0/a1/a2
            source = f"att.a{suffix[-1]}" if layer == 0 and suffix in ("att.v0", "att.v1", "att.v2") else suffix
            tensor = official[prefix + source]
            if suffix[-2:] in {"w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"}:
                tensor = tensor.t()  # official [C, D] -> llama.cpp's [D, C] (its ne {C, D})
            elif tensor.dim() != 2 or suffix == "att.r_k":
                tensor = tensor.reshape(-1)
            tensors[f"blk.{layer}.{gguf_name}"] = tensor
        tensors[f"blk.{layer}.time_mix_lerp_fused.weight"] = torch.stack(
            [official[f"{prefix}att.x_{mix}"].reshape(1, 1, -1) for mix in _LERP_ORDER]
        )
    return {name: t.float().contiguous() for name, t in tensors.items()}


def world_vocab(vocab_size: int) -> tuple[list[bytes], list[int]]:
    """Token texts and types as llama.cpp's RWKV tokenizer reads them: each token's bytes written as Python escapes
    (`repr(bytes)[2:-1]`), id 0 a control token, ids past the vocabulary file unused padding."""
    tokens, types = [END_OF_TEXT.encode()], [gguf.TokenType.CONTROL]
    for token in load_rwkv_vocab(VOCAB_FILE)[1:]:
        tokens.append(repr(token)[2:-1].encode("utf-8"))
        types.append(gguf.TokenType.NORMAL)
    for token_id in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{token_id}]".encode())
        types.append(gguf.TokenType.UNUSED)
    return tokens, types


def export_gguf(source: str | os.PathLike | RWKV7ForCausalLM, output: str | os.PathLike, outtype: str = "f32") -> Path:
    """Write `output` (a .gguf file llama.cpp loads) from a checkpoint path or an `RWKV7ForCausalLM`. The file is
    written under a temporary name and renamed at the end."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {sorted(OUTTYPES)}, got {outtype!r}.")
    config, names, load = _open(source)
    check_llama_cpp_can_hold(config)
    official = dict(hf_tensor_to_official(name, load(name)) for name in names)
    tensors = llama_cpp_tensors(config, official)
    tensor_type, file_type = OUTTYPES[outtype]

    output = Path(output)
    partial = output.parent / f".{output.name}.{uuid.uuid4().hex[:12]}.partial"
    try:
        writer = gguf.GGUFWriter(partial, arch=ARCH)
        _write_metadata(writer, config, file_type, name=output.stem)
        for name, tensor in tensors.items():
            array = tensor.numpy()
            if (
                name.removesuffix(".weight").split(".")[-1] not in _MATRICES
                or tensor_type == gguf.GGMLQuantizationType.F32
            ):
                writer.add_tensor(name, array)
            elif tensor_type == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(name, array.astype(np.float16))
            else:
                writer.add_tensor(name, gguf.quants.quantize(array, tensor_type), raw_dtype=tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return output


def _open(source) -> tuple[RWKV7Config, list[str], Callable[[str], torch.Tensor]]:
    """The config, our tensor names (the head included when tied: llama.cpp needs its own output matrix) and a
    loader, for a checkpoint path or a model."""
    if isinstance(source, RWKV7ForCausalLM):
        state_dict = {name: t.detach().cpu() for name, t in source.state_dict().items()}
        return source.config, list(state_dict), state_dict.__getitem__
    checkpoint = open_checkpoint(source)

    def load(name: str) -> torch.Tensor:
        return checkpoint.load("model.embeddings.weight" if name not in checkpoint.tensors else name)

    return checkpoint.config, [*checkpoint.tensors, *({"lm_head.weight"} - set(checkpoint.tensors))], load


def _write_metadata(writer: gguf.GGUFWriter, config: RWKV7Config, file_type, name: str) -> None:
    """The hyperparameters llama.cpp's RWKV-7 loader reads, and the RWKV World tokenizer."""
    writer.add_name(name)
    writer.add_context_length(1048576)  # a recurrence: no context limit
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_layer_norm_eps(config.norm_eps)
    writer.add_wkv_head_size(config.head_dim)
    writer.add_decay_lora_rank(config.decay_low_rank_dim)
    writer.add_iclr_lora_rank(config.a_low_rank_dim)
    writer.add_value_residual_mix_lora_rank(config.v_low_rank_dim)
    writer.add_gate_lora_rank(config.gate_low_rank_dim)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_token_shift_count(2)  # one for the time mix, one for the channel mix
    writer.add_head_count(0)  # required by llama.cpp, unused by RWKV
    writer.add_file_type(file_type)

    tokens, types = world_vocab(config.vocab_size)
    writer.add_tokenizer_model("rwkv")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for add, token_id in (
        (writer.add_bos_token_id, config.bos_token_id),
        (writer.add_eos_token_id, config.eos_token_id),
        (writer.add_pad_token_id, config.pad_token_id),
    ):
        if isinstance(token_id, int):
            add(token_id)
    writer.add_eot_token_id(EOT_TOKEN_ID)
    writer.add_chat_template("rwkv-world")  # llama.cpp's built-in RWKV World chat format


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Export an RWKV-7 checkpoint to GGUF for llama.cpp.")
    parser.add_argument("source", help="a folder of ours, an fla-hub or native-layout folder, or an official .pth")
    parser.add_argument("output", help="the .gguf file to write")
    parser.add_argument("--outtype", default="f32", choices=sorted(OUTTYPES), help="dtype of the big matrices")
    args = parser.parse_args(argv)
    try:
        output = export_gguf(args.source, args.output, args.outtype)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(f"Wrote {output} ({output.stat().st_size:,d} bytes)")


if __name__ == "__main__":
    main()
