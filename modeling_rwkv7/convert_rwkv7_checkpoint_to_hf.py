"""Convert RWKV-7 checkpoints into Hub-ready transformers folders: the readers, the writer and the command line
(`rwkv7-convert SOURCE OUTPUT_DIR`, or `python -m modeling_rwkv7.convert_rwkv7_checkpoint_to_hf SOURCE OUTPUT_DIR`).
The tensor names and shapes of each layout are in `conversion_mapping_rwkv7`.

Three sources are understood:

- an official `.pth` state dict (BlinkDL RWKV-LM names), renamed and reshaped;
- a flash-linear-attention (fla-hub) folder (`config.json` + safetensors), whose tensor names and shapes are ours;
- a folder in the layout of transformers' own RWKV-7 (`Rwkv7ForCausalLM`): `layout="native"` writes it too.

`convert_checkpoint` streams either into a folder that loads with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` anywhere: config with `auto_map`, the modeling
code, safetensors shards in the chosen dtype, generation config, the RWKV World tokenizer (for 65536-token
vocabularies) and a model card.
"""

import argparse
import json
import os
import re
import shutil
import signal
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from .configuration_rwkv7 import RWKV7Config, default_generation_config
from .conversion_mapping_rwkv7 import (
    NATIVE_HEAD,
    NATIVE_PREFIX,
    CheckpointError,
    check_shapes,
    checked_official_config,
    expected_native_names,
    hf_tensor_to_official,
    native_config_dict,
    native_layer0_value_residual,
    native_tensor_to_hf,
    official_tensor_to_hf,
    official_to_native_name,
    reference_tensors,
)
from .model_card_rwkv7 import MODEL_CARD_TEMPLATE, render_model_card

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LAYOUTS = ("ours", "native")
DEFAULT_MAX_SHARD_SIZE = "2GB"
WORLD_VOCAB_SIZE = 65536  # the RWKV World tokenizer's id space; other vocabularies get no tokenizer
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def load_official_state_dict(path: str | os.PathLike) -> dict:
    """Read an official `.pth` (memory-mapped, on CPU, tensors only: no pickled code runs)."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a complete PyTorch checkpoint (a `torch.save` zip archive): it is truncated or in another "
            "format. Expected an official RWKV-7 `.pth` file, or an fla-hub or native-layout folder."
        )
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"Cannot read {path} as a PyTorch state dict: {error}") from error


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
    state_dict = load_official_state_dict(path)
    if not isinstance(state_dict, Mapping) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise CheckpointError(f"{path} does not hold a state dict (name -> tensor); got {type(state_dict).__name__}.")
    not_float = {name: tensor.dtype for name, tensor in state_dict.items() if not tensor.is_floating_point()}
    if not_float:
        first = next(iter(not_float))
        raise CheckpointError(
            f"{path} holds {len(not_float)} tensor(s) that are not floating point, e.g. {first} ({not_float[first]}): "
            "an official RWKV-7 checkpoint holds float32, bfloat16 or float16 weights."
        )
    config = checked_official_config(state_dict)
    official_name = {}
    meta = {}
    for name, tensor in state_dict.items():
        mapped = official_tensor_to_hf(name, torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"))
        if mapped is not None:
            official_name[mapped[0]] = name
            meta[mapped[0]] = mapped[1]
    check_shapes(config, meta)
    order = [name for name in reference_tensors(config) if name in meta]

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
    config_dict = _read_json(config_file)
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"{config_file} holds a JSON {type(config_dict).__name__}; expected an object.")
    if config_dict.get("model_type") != "rwkv7":
        raise CheckpointError(f"{config_file} has model_type={config_dict.get('model_type')!r}; expected 'rwkv7'.")
    for key in ("auto_map", "architectures", "_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    return RWKV7Config.from_dict(config_dict)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:  # (nested past the limit)
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error


def _open_safetensors(path: Path):
    """`safe_open(path)`, with a CheckpointError naming the file when it is missing, truncated or not safetensors."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise CheckpointError(f"{path} is missing (named by model.safetensors.index.json).")
    try:
        return safe_open(path, framework="pt")
    except SafetensorError as error:
        raise CheckpointError(f"Cannot read {path} as safetensors (truncated or another format): {error}") from error


def _safetensors_weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> safetensors file of a folder (sharded or not)."""
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        index = _read_json(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
            raise CheckpointError(f"{index_file} has no `weight_map` object (tensor name -> file name).")
        outside = sorted({file for file in weight_map.values() if Path(file).name != file or file in ("", ".", "..")})
        if outside:
            raise CheckpointError(
                f"{index_file} names shard files outside {folder}: {outside[:3]}; expected plain file names beside it."
            )
        return weight_map
    if (folder / "model.safetensors").is_file():
        with _open_safetensors(folder / "model.safetensors") as handle:
            return {name: "model.safetensors" for name in handle.keys()}
    raise CheckpointError(f"{folder} has neither model.safetensors nor model.safetensors.index.json.")


def _check_layer_count(folder: Path, config: RWKV7Config, weight_map: Mapping[str, str]) -> None:
    """Refuse a config.json with more layers than the folder has tensors, before a model of that size is built."""
    if config.num_hidden_layers > len(weight_map):
        raise CheckpointError(
            f"{folder / 'config.json'} describes {config.num_hidden_layers} layers, but the folder holds only "
            f"{len(weight_map)} tensors."
        )


def _open_shards(folder: Path, weight_map: Mapping[str, str]) -> dict:
    """File name -> open safetensors handle, for every file `weight_map` names."""
    return {file: _open_safetensors(folder / file) for file in sorted(set(weight_map.values()))}


def _stored_meta(handles: dict, weight_map: dict[str, str], name: str) -> torch.Tensor:
    stored_slice = handles[weight_map[name]].get_slice(name)
    dtype = stored_slice.get_dtype()
    if dtype not in _SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"Tensor {name} in {weight_map[name]} is {dtype}; expected one of {sorted(_SAFETENSORS_DTYPES)}."
        )
    return torch.empty(stored_slice.get_shape(), dtype=_SAFETENSORS_DTYPES[dtype], device="meta")


def _is_native_layout(weight_map: Mapping[str, str]) -> bool:
    return NATIVE_PREFIX + "emb.weight" in weight_map


def _open_folder(folder: Path) -> tuple[RWKV7Config, dict[str, str], dict]:
    """A safetensors folder's config, weight map (tensor name -> shard file) and open shard handles, after checking
    that the weights hold the config's number of layers."""
    config = _folder_config(folder)
    weight_map = _safetensors_weight_map(folder)
    handles = _open_shards(folder, weight_map)
    for file, handle in handles.items():
        held = set(handle.keys())
        absent = sorted(name for name, named_file in weight_map.items() if named_file == file and name not in held)
        if absent:
            raise CheckpointError(
                f"{folder / 'model.safetensors.index.json'} places {len(absent)} tensor(s) in {file}, which does "
                f"not hold them, e.g. {absent[0]}."
            )
    _check_layer_count(folder, config, weight_map)
    return config, weight_map, handles


def open_fla_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """An fla-hub RWKV-7 folder (or one of ours): its `config.json` keys are absorbed by `RWKV7Config`, its
    safetensors tensor names are ours. Its own `auto_map` (pointing at fla's code) is dropped."""
    folder = Path(folder)
    config, weight_map, handles = _open_folder(folder)

    reference = reference_tensors(config)
    stored = set(weight_map) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    missing, unknown = sorted(set(reference) - stored), sorted(stored - set(reference))
    if missing or unknown:
        raise CheckpointError(
            f"{folder} is not the RWKV-7 model its config.json describes ({config.num_hidden_layers} layers, "
            f"hidden_size={config.hidden_size}): missing tensors {missing}, unknown tensors {unknown}."
        )
    meta = {name: _stored_meta(handles, weight_map, name) for name in reference}
    check_shapes(config, meta)

    def load(name: str) -> torch.Tensor:
        return handles[weight_map[name]].get_tensor(name)

    return Checkpoint(config, meta, load)


def open_native_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """A folder in the layout of transformers' own RWKV-7: `rwkv7.`-prefixed official tensor names, `head.weight`,
    its config keys. Raises CheckpointError naming every missing or unknown tensor (in the native names)."""
    folder = Path(folder)
    config, weight_map, handles = _open_folder(folder)

    expected = expected_native_names(config)
    optional = set(native_layer0_value_residual(config, torch.float32, device="meta"))
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
    check_shapes(config, meta)
    order = [name for name in reference_tensors(config) if name in meta]

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
    if source.suffix in (".json", ".safetensors"):
        raise CheckpointError(
            f"{source} is one file of a checkpoint folder; pass the folder ({source.parent}) as the source."
        )
    return open_official_checkpoint(source)


def native_view(checkpoint: Checkpoint) -> Checkpoint:
    """The same weights, named and shaped in the native layout (what `layout="native"` writes), with layer 0's
    zero v0/v1/v2 added."""
    config = checkpoint.config
    ours_of, tensors = {}, {}
    for name, meta in checkpoint.tensors.items():
        official, native_meta = hf_tensor_to_official(name, meta)
        ours_of[official_to_native_name(official)] = name
        tensors[official_to_native_name(official)] = native_meta
    zeros = native_layer0_value_residual(config, checkpoint.tensors["model.embeddings.weight"].dtype, device="meta")
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
    card_template: Jinja model card template (default: the one shipped with the package).

    The folder is written under a hidden staging name next to `output_dir` (`.NAME.PID-RANDOM.partial`) and renamed
    at the end, so an interrupted run leaves no `output_dir` behind; the staging folder of a run that was killed
    outright is removed by the next conversion into the same parent folder, once that process is gone.
    """
    source, output_dir = Path(source), Path(output_dir)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    _check_output_dir(source, output_dir)
    if output_dir.exists() and not overwrite and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(
            f"{output_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it."
        )
    template = Path(card_template) if card_template is not None else MODEL_CARD_TEMPLATE
    if layout == "ours" and not template.is_file():
        raise FileNotFoundError(f"Model card template {template} not found (pass card_template / --card-template).")
    checkpoint = open_checkpoint(source)
    torch_dtype = _resolve_dtype(dtype, checkpoint)

    target = Path(os.path.abspath(output_dir))  # `out/..`-style paths get a real name for the staging folder
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target.parent)
    staging = _staging_path(target, "partial")
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
                repo_id=repo_id or target.name,
                num_parameters=num_parameters,
                license=license,
                base_model=base_model,
                template=template,
            )
            (staging / "README.md").write_text(card, encoding="utf-8")
        _move_into_place(staging, target)
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
    from transformers.dynamic_module_utils import custom_object_save

    from .modeling_rwkv7 import RWKV7ForCausalLM, RWKV7Model

    config.architectures = [RWKV7ForCausalLM.__name__]
    config.dtype = dtype
    with torch.device("meta"):
        model = RWKV7ForCausalLM(config)
    custom_object_save(model, folder, config=config)  # copies modeling_rwkv7.py and its relative imports
    config.auto_map["AutoModel"] = f"{RWKV7Model.__module__.rsplit('.', 1)[-1]}.{RWKV7Model.__name__}"
    config.save_pretrained(folder)  # adds AutoConfig and copies configuration_rwkv7.py
    default_generation_config(config).save_pretrained(folder)


def _write_native_config(config: RWKV7Config, dtype: torch.dtype, folder: Path) -> None:
    """config.json in transformers' own `Rwkv7Config` keys (no `auto_map`, no code) and generation_config.json."""
    (folder / "config.json").write_text(json.dumps(native_config_dict(config, dtype), indent=2) + "\n")
    default_generation_config(config).save_pretrained(folder)


def _write_tokenizer(folder: Path) -> None:
    """The RWKV World tokenizer (tokenizer.json and the vocabulary file), with `auto_map` in tokenizer_config.json and
    its code next to it."""
    from .tokenization_rwkv7 import RWKV7TokenizerFast

    RWKV7TokenizerFast.register_for_auto_class("AutoTokenizer")
    RWKV7TokenizerFast().save_pretrained(folder)


def _check_output_dir(source: Path, output_dir: Path) -> None:
    """Refuse, before anything is read or written, an output folder that the final rename cannot replace safely."""
    if output_dir.is_symlink():
        raise ValueError(
            f"The output folder {output_dir} is a symbolic link (to {os.readlink(output_dir)}); the converter "
            "replaces folders, not links: pass the folder it points to, or a new path."
        )
    output, checkpoint, cwd = output_dir.resolve(), source.resolve(), Path.cwd().resolve()
    if output == cwd or output in cwd.parents:
        raise ValueError(
            f"The output folder {output_dir} is the current directory or holds it ({cwd}); pass a new folder for the "
            f"converted model, e.g. {output_dir / 'converted'}."
        )
    if output == checkpoint or output in checkpoint.parents:
        raise ValueError(f"The output folder {output_dir} must not contain the source checkpoint {source}.")
    if checkpoint in output.parents:
        raise ValueError(f"The output folder {output_dir} must not lie inside the source folder {source}.")


_STAGING_NAME = re.compile(r"\..+\.(?P<pid>\d+)-[0-9a-f]{12}\.(partial|replaced)")


def _staging_path(output_dir: Path, kind: str) -> Path:
    """A hidden sibling of `output_dir` named with this process's id (`.NAME.PID-RANDOM.partial`), so that a later
    run knows when its owner is gone."""
    return output_dir.parent / f".{output_dir.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.{kind}"


def _process_is_running(pid: int) -> bool:
    if os.name != "posix":  # no harmless liveness probe (os.kill terminates on Windows): assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return True


def _remove_stale_staging(folder: Path) -> None:
    """Remove the staging folders in `folder` left by conversions that were killed (SIGKILL, power loss) and whose
    process is gone; those of running conversions stay."""
    for path in folder.iterdir():
        match = _STAGING_NAME.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink() and not _process_is_running(int(match["pid"])):
            shutil.rmtree(path, ignore_errors=True)


def _move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename the finished `staging` folder to `output_dir`, replacing what is there."""
    if not output_dir.exists():
        os.replace(staging, output_dir)
        return
    replaced = _staging_path(output_dir, "replaced")
    os.replace(output_dir, replaced)
    os.replace(staging, output_dir)
    if replaced.is_dir():
        shutil.rmtree(replaced)
    else:
        replaced.unlink()


# --- command line ----------------------------------------------------------------------------------------------


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through convert_checkpoint, which removes its staging folder


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The `rwkv7-convert` command. Bad input ends it with one `error:` line and exit status 1."""
    parser = argparse.ArgumentParser(
        prog="rwkv7-convert",
        description="Convert an official RWKV-7 .pth, an fla-hub or a native-layout RWKV-7 folder into a transformers "
        "folder (also run as `python -m modeling_rwkv7.convert_rwkv7_checkpoint_to_hf`).",
    )
    parser.add_argument(
        "source",
        help="official RWKV-7 .pth file, or an fla-hub, native-layout or converted folder (config.json + safetensors)",
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
    previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
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
    except (OSError, ValueError) as error:  # CheckpointError is a ValueError
        parser.exit(1, f"{parser.prog}: error: {' '.join(str(error).split())}\n")
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    print(f"Wrote {output_dir}:")
    for path in sorted(output_dir.iterdir()):
        print(f"  {path.name:40s} {path.stat().st_size:>14,d} bytes")


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "convert_checkpoint",
    "main",
    "native_view",
    "open_checkpoint",
]


if __name__ == "__main__":
    main()
