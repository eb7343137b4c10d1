"""RWKV-7 checkpoints in, Hub-ready transformers folders out.

Two sources are understood:

- an official `.pth` state dict (BlinkDL RWKV-LM names, `blocks.{i}.att.w1`), renamed and reshaped below;
- a flash-linear-attention (fla-hub) folder (`config.json` + safetensors), whose tensor names and shapes are ours.

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

`blocks.0.att.v0/v1/v2` (unused by the official code: layer 0 has no value residual) are dropped.
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


def open_fla_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """An fla-hub RWKV-7 folder: its `config.json` keys are absorbed by `RWKV7Config`, its safetensors tensor
    names are ours. Its own `auto_map` (pointing at fla's code) is dropped."""
    from safetensors import safe_open

    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{folder} has no config.json: expected an official `.pth` file or an fla-hub folder.")
    config_dict = json.loads(config_file.read_text())
    if config_dict.get("model_type") != "rwkv7":
        raise CheckpointError(f"{config_file} has model_type={config_dict.get('model_type')!r}; expected 'rwkv7'.")
    for key in ("auto_map", "architectures", "_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    config = RWKV7Config.from_dict(config_dict)

    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
    elif (folder / "model.safetensors").is_file():
        with safe_open(folder / "model.safetensors", framework="pt") as handle:
            weight_map = {name: "model.safetensors" for name in handle.keys()}
    else:
        raise CheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json.")
    handles = {file: safe_open(folder / file, framework="pt") for file in sorted(set(weight_map.values()))}

    reference = _reference_tensors(config)
    stored = set(weight_map) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unknown = sorted(set(reference) - stored), sorted(stored - set(reference))
    if missing or unknown:
        raise CheckpointError(
            f"{folder} is not the RWKV-7 model its config.json describes ({config.num_hidden_layers} layers, "
            f"hidden_size={config.hidden_size}): missing tensors {missing}, unknown tensors {unknown}."
        )
    meta = {}
    for name in reference:
        stored_slice = handles[weight_map[name]].get_slice(name)
        dtype = _SAFETENSORS_DTYPES[stored_slice.get_dtype()]
        meta[name] = torch.empty(stored_slice.get_shape(), dtype=dtype, device="meta")
    _check_shapes(config, meta)

    def load(name: str) -> torch.Tensor:
        return handles[weight_map[name]].get_tensor(name)

    return Checkpoint(config, meta, load)


def open_checkpoint(source: str | os.PathLike) -> Checkpoint:
    """An official `.pth` file or an fla-hub folder."""
    source = Path(source)
    if source.is_dir():
        return open_fla_checkpoint(source)
    if not source.is_file():
        raise FileNotFoundError(f"No checkpoint at {source}: expected an official `.pth` file or an fla-hub folder.")
    return open_official_checkpoint(source)


# --- the output folder -----------------------------------------------------------------------------------------


def convert_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    dtype: str = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    repo_id: Optional[str] = None,
    license: str = "apache-2.0",
    base_model: Optional[str] = None,
    card_template: Optional[str | os.PathLike] = None,
) -> Path:
    """Convert an official `.pth` or an fla-hub folder into a self-contained transformers folder.

    dtype: "float32", "bfloat16", "float16", or "auto" (the dtype of the source's embedding table).
    max_shard_size: largest safetensors file (bytes or "2GB"-style); memory use stays around one shard.
    overwrite: replace a non-empty `output_dir` (refused otherwise).
    repo_id, license, base_model: what the model card shows (`repo_id` defaults to the folder's name).
    The folder is written under a temporary name next to `output_dir` and renamed at the end, so an interrupted
    run leaves no `output_dir` behind.
    """
    source, output_dir = Path(source), Path(output_dir)
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
        num_parameters = _write_weights(checkpoint, torch_dtype, staging, max_shard_size)
        _write_config_and_code(checkpoint.config, torch_dtype, staging)
        if checkpoint.config.vocab_size == WORLD_VOCAB_SIZE:
            _write_tokenizer(staging)
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
        description="Convert an official RWKV-7 .pth or an fla-hub RWKV-7 folder into a Hub-ready transformers folder.",
    )
    parser.add_argument("source", help="official RWKV-7 .pth file, or fla-hub folder (config.json + safetensors)")
    parser.add_argument("output_dir", help="folder to create")
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
    "hf_to_official",
    "official_to_hf",
    "official_tensor_to_hf",
    "open_checkpoint",
    "render_model_card",
]


if __name__ == "__main__":
    main()
