"""Fuzz `RWKV7Cache.load`: arbitrary bytes and mutations of valid state files written to a temporary file, and state
files built from fuzzed metadata, tensor names, dtypes and shapes. Each is loaded without and with a config.

Invariant: a state that loads saves and loads again to the same tensors.

    python tests/fuzz/fuzz_cache_load.py -max_total_time=60
"""

import json
import os
import struct
import sys
import tempfile

import atheris
from _common import InvariantError, fuzz, run_file

with atheris.instrument_imports(include=["modeling_rwkv7"]):
    import torch

    from modeling_rwkv7.cache_rwkv7 import STATE_NAMES, RWKV7Cache
    from modeling_rwkv7.configuration_rwkv7 import RWKV7Config

CONFIG = RWKV7Config(vocab_size=16, hidden_size=8, num_hidden_layers=2, head_dim=4)
WORK = tempfile.mkdtemp(prefix="fuzz-cache-")
PATH = os.path.join(WORK, "state.safetensors")
DTYPES = ["F32", "BF16", "F16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "XX"]
SIZES = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
METADATA_KEYS = ["format", "num_hidden_layers", "num_heads", "head_dim", "hidden_size", "seen_tokens", "other"]


def _value(provider: atheris.FuzzedDataProvider) -> str:
    choice = provider.ConsumeIntInRange(0, 4)
    if choice == 0:
        return str(provider.ConsumeIntInRange(0, 9))
    if choice == 1:
        return str(provider.ConsumeInt(8))
    if choice == 2:
        return "rwkv7-state"
    return provider.ConsumeUnicodeNoSurrogates(provider.ConsumeIntInRange(0, 12))


def structured_file(provider: atheris.FuzzedDataProvider) -> bytes:
    """A safetensors file (its header written by hand, so any dtype, shape and metadata) from fuzzed choices."""
    metadata = {"format": "rwkv7-state", "num_hidden_layers": "2", "num_heads": "2", "head_dim": "4"}
    metadata.update({"hidden_size": "8", "seen_tokens": "3"})
    for _ in range(provider.ConsumeIntInRange(0, 4)):
        key = METADATA_KEYS[provider.ConsumeIntInRange(0, len(METADATA_KEYS) - 1)]
        if provider.ConsumeIntInRange(0, 5) == 0:
            metadata.pop(key, None)
        else:
            metadata[key] = _value(provider)
    header, offset, data = {"__metadata__": metadata}, 0, b""
    for _ in range(provider.ConsumeIntInRange(0, 8)):
        layer = provider.ConsumeIntInRange(0, 3)
        name = STATE_NAMES[provider.ConsumeIntInRange(0, 2)] if provider.ConsumeIntInRange(0, 7) else "x"
        dtype = DTYPES[provider.ConsumeIntInRange(0, len(DTYPES) - 1)] if provider.ConsumeBool() else "F32"
        shape = [provider.ConsumeIntInRange(0, 4) for _ in range(provider.ConsumeIntInRange(0, 4))]
        numel = 1
        for size in shape:
            numel *= size
        nbytes = numel * SIZES.get(dtype, 1)
        header[f"layers.{layer}.{name}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        data += provider.ConsumeBytes(nbytes).ljust(nbytes, b"\0")
        offset += nbytes
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def check(path: str) -> None:
    for config in (None, CONFIG):
        cache = RWKV7Cache.load(path, config=config)
        copy = os.path.join(WORK, "copy.safetensors")
        cache.save(copy)
        again = RWKV7Cache.load(copy, config=config)
        for layer, other in zip(cache.layers, again.layers, strict=True):
            for name, tensor in layer.tensors().items():
                if not torch.equal(tensor.view(torch.uint8), getattr(other, name).view(torch.uint8)):  # NaN too
                    raise InvariantError(f"{name} differs after save and load")
        if again.seen_tokens != cache.seen_tokens:
            raise InvariantError("seen_tokens differs after save and load")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] % 2 == 0:
        content = data[1:]  # raw bytes, or a mutated valid file (the seeds)
    else:
        content = structured_file(atheris.FuzzedDataProvider(data[1:]))
    with open(PATH, "wb") as handle:
        handle.write(content)
    check(PATH)


def _seeds() -> dict[str, bytes]:
    seeds = {}
    for dtype in (torch.float32, torch.bfloat16):
        cache = RWKV7Cache(CONFIG, batch_size=2, dtype=dtype)
        for layer in cache.layers:
            for tensor in layer.tensors().values():
                tensor.normal_()
        cache.seen_tokens = 5
        cache.save(PATH)
        with open(PATH, "rb") as handle:
            seeds[f"valid-{str(dtype)[6:]}"] = b"\0" + handle.read()
    seeds["structured"] = b"\1" + bytes(range(256))
    return seeds


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replay":
        run_file(test_one_input, sys.argv[2])
    else:
        fuzz("cache_load", test_one_input, _seeds())
