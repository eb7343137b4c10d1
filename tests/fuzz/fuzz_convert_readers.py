"""Fuzz the converter's readers (`open_checkpoint`): an official `.pth` (mutated bytes of a valid one, and state
dicts with fuzzed names, shapes, dtypes and values), an fla-hub folder's `model.safetensors` (mutated bytes, and
fuzzed tensors), a sharded folder's `model.safetensors.index.json` and a folder's `config.json` (mutated bytes).

Invariant: a checkpoint that opens loads every tensor in the shape and dtype it announced. The `.pth` reader must
never unpickle code: it reads with `torch.load(weights_only=True)`, checked before fuzzing starts.

    python tests/fuzz/fuzz_convert_readers.py -max_total_time=60
"""

import inspect
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import atheris
from _common import InvariantError, fuzz, run_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for oracle

with atheris.instrument_imports(include=["modeling_rwkv7"]):
    import torch
    from safetensors.torch import save_file

    from modeling_rwkv7 import convert_rwkv7_checkpoint_to_hf as convert
    from modeling_rwkv7.conversion_mapping_rwkv7 import official_to_hf

import oracle  # noqa: E402

WORK = Path(tempfile.mkdtemp(prefix="fuzz-convert-"))
PTH = WORK / "model.pth"
FLA = WORK / "fla"
SHARDED = WORK / "sharded"
CONFIG_FOLDER = WORK / "config"
STATE_DICT = oracle.random_official_state_dict(vocab_size=16, hidden_size=8, num_layers=2, head_dim=4, ranks=(4,) * 4)
CONFIG, OURS = official_to_hf(STATE_DICT)
NAMES = sorted(STATE_DICT)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool]


def _write_folder(folder: Path, shards: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = CONFIG.to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"))
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map.update({key: name for key in shard})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _fuzzed_tensor(provider: atheris.FuzzedDataProvider, tensor: torch.Tensor) -> object:
    choice = provider.ConsumeIntInRange(0, 7)
    if choice == 0:  # another shape
        shape = [provider.ConsumeIntInRange(0, 9) for _ in range(provider.ConsumeIntInRange(0, 4))]
        return torch.zeros(shape, dtype=tensor.dtype)
    if choice == 1:
        return tensor.to(DTYPES[provider.ConsumeIntInRange(0, len(DTYPES) - 1)])
    if choice == 2:
        return tensor.reshape(-1)
    if choice == 3:
        return tensor.unsqueeze(0)
    return tensor


def check_checkpoint(source: Path) -> None:
    checkpoint = convert.open_checkpoint(source)
    for name, meta in checkpoint.tensors.items():
        tensor = checkpoint.load(name)
        if tensor.shape != meta.shape or tensor.dtype != meta.dtype:
            raise InvariantError(f"{name}: announced {meta.shape} {meta.dtype}, loaded {tensor.shape} {tensor.dtype}")


def fuzz_pth_structure(provider: atheris.FuzzedDataProvider) -> None:
    state_dict = dict(STATE_DICT)
    for _ in range(provider.ConsumeIntInRange(0, 4)):
        name = NAMES[provider.ConsumeIntInRange(0, len(NAMES) - 1)]
        action = provider.ConsumeIntInRange(0, 5)
        if not isinstance(state_dict.get(name), torch.Tensor):  # removed or replaced by an earlier action
            continue
        if action == 0:
            del state_dict[name]
        elif action == 1:
            state_dict[name.replace("blocks.1.", f"blocks.{provider.ConsumeIntInRange(0, 9)}.")] = state_dict[name]
        elif action == 2:
            state_dict[name] = [1, 2] if provider.ConsumeBool() else provider.ConsumeUnicodeNoSurrogates(4)
        elif action == 3:
            state_dict[provider.ConsumeUnicodeNoSurrogates(12)] = torch.zeros(2)
        else:
            state_dict[name] = _fuzzed_tensor(provider, state_dict[name])
    payload = state_dict if provider.ConsumeIntInRange(0, 15) else list(state_dict.values())
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    PTH.write_bytes(buffer.getvalue())
    check_checkpoint(PTH)


def fuzz_safetensors_structure(provider: atheris.FuzzedDataProvider) -> None:
    tensors = dict(OURS)
    names = sorted(tensors)
    for _ in range(provider.ConsumeIntInRange(0, 4)):
        name = names[provider.ConsumeIntInRange(0, len(names) - 1)]
        if provider.ConsumeIntInRange(0, 4) == 0:
            tensors.pop(name, None)
        elif name in tensors:
            fuzzed = _fuzzed_tensor(provider, tensors[name])
            tensors[name] = fuzzed.contiguous()
    save_file(tensors, str(FLA / "model.safetensors"))
    check_checkpoint(FLA)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 6, data[1:]
    if mode == 0:  # a .pth file's bytes
        PTH.write_bytes(rest)
        check_checkpoint(PTH)
    elif mode == 1:
        fuzz_pth_structure(atheris.FuzzedDataProvider(rest))
    elif mode == 2:  # an fla-hub folder's model.safetensors
        (FLA / "model.safetensors").write_bytes(rest)
        check_checkpoint(FLA)
    elif mode == 3:
        fuzz_safetensors_structure(atheris.FuzzedDataProvider(rest))
    elif mode == 4:  # a sharded folder's model.safetensors.index.json
        (SHARDED / "model.safetensors.index.json").write_bytes(rest)
        check_checkpoint(SHARDED)
    else:  # a folder's config.json, its weights valid
        (CONFIG_FOLDER / "config.json").write_bytes(rest)
        check_checkpoint(CONFIG_FOLDER)


def _check_pth_reader_is_safe() -> None:
    source = inspect.getsource(convert.load_official_state_dict)
    if "weights_only=True" not in source:
        raise SystemExit("load_official_state_dict does not read with torch.load(weights_only=True)")


def _seeds() -> dict[str, bytes]:
    buffer = io.BytesIO()
    torch.save(STATE_DICT, buffer)
    names = sorted(OURS)
    half = len(names) // 2
    _write_folder(FLA, [OURS])
    _write_folder(SHARDED, [{n: OURS[n] for n in names[:half]}, {n: OURS[n] for n in names[half:]}])
    _write_folder(CONFIG_FOLDER, [OURS])
    check_checkpoint(FLA)
    check_checkpoint(SHARDED)
    return {
        "pth": b"\0" + buffer.getvalue(),
        "pth-structure": b"\1" + bytes(range(64)),
        "safetensors": b"\2" + (FLA / "model.safetensors").read_bytes(),
        "safetensors-structure": b"\3" + bytes(range(64)),
        "index": b"\4" + (SHARDED / "model.safetensors.index.json").read_bytes(),
        "config": b"\5" + (CONFIG_FOLDER / "config.json").read_bytes(),
    }


if __name__ == "__main__":
    _check_pth_reader_is_safe()
    seeds = _seeds()
    if len(sys.argv) == 3 and sys.argv[1] == "--replay":
        run_file(test_one_input, sys.argv[2])
    else:
        os.environ.setdefault("TQDM_DISABLE", "1")
        fuzz("convert_readers", test_one_input, seeds)
