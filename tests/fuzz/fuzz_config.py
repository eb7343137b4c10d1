"""Fuzz config loading: `RWKV7Config.from_json_file` on arbitrary bytes (mutations of valid config.json files), and
`RWKV7Config.from_dict` on dictionaries of our, fla-hub and transformers' keys with fuzzed values of every JSON type.

Invariant: a config that loads passes through `to_dict` / `from_dict` and `to_json_string` / `from_json_file` again.

    python tests/fuzz/fuzz_config.py -max_total_time=60
"""

import json
import math
import os
import sys
import tempfile

import atheris
from _common import InvariantError, fuzz, run_file

with atheris.instrument_imports(include=["modeling_rwkv7"]):
    from modeling_rwkv7.configuration_rwkv7 import RWKV7Config

WORK = tempfile.mkdtemp(prefix="fuzz-config-")
PATH = os.path.join(WORK, "config.json")
KEYS = sorted(
    RWKV7Config._own_fields()
    | {"model_type", "num_labels", "hidden_ratio", "num_heads", "value_dim", "use_deep_embed", "wkv_implementation"}
    | {"wkv_backend", "hidden_act", "norm_first", "norm_bias", "attn_mode", "fuse_norm", "max_position_embeddings"}
    | {"torch_dtype", "dtype", "auto_map", "tokenizer_class", "id2label", "label2id", "max_length", "unknown_key"}
)
SPECIAL = [0, 1, -1, 2, 4, 8, 64, 65536, 2**31, 2**63, 10**30, 10**400, 0.5, 2.5, -0.0, 1e308]
SPECIAL += [math.inf, -math.inf, math.nan]
SPECIAL += [True, False, None, "", "auto", "float32", "bfloat16", "rwkv7", "sqrelu", "recurrent", "x"]


def _value(provider: atheris.FuzzedDataProvider, depth: int = 0):
    kind = provider.ConsumeIntInRange(0, 9)
    if kind <= 3:
        return SPECIAL[provider.ConsumeIntInRange(0, len(SPECIAL) - 1)]
    if kind == 4:
        return provider.ConsumeInt(provider.ConsumeIntInRange(1, 9))
    if kind == 5:
        return provider.ConsumeRegularFloat()
    if kind == 6:
        return provider.ConsumeUnicodeNoSurrogates(provider.ConsumeIntInRange(0, 8))
    if kind == 7 and depth < 3:
        return [_value(provider, depth + 1) for _ in range(provider.ConsumeIntInRange(0, 3))]
    if kind == 8 and depth < 3:
        keys = ["wkv", "projection", "decode", "0", "x"]
        return {keys[provider.ConsumeIntInRange(0, 4)]: _value(provider, depth + 1) for _ in range(2)}
    return provider.ConsumeIntInRange(1, 64)


def _small_valid() -> dict:
    return {"model_type": "rwkv7", "vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 2, "head_dim": 4}


def check_roundtrip(config: RWKV7Config) -> None:
    again = RWKV7Config.from_dict(config.to_dict())
    if again.to_dict() != config.to_dict() and not _has_nan(config.to_dict()):
        raise InvariantError(f"to_dict/from_dict changed the config: {config.to_dict()} -> {again.to_dict()}")
    path = os.path.join(WORK, "again.json")
    config.to_json_file(path)
    RWKV7Config.from_json_file(path)


def _has_nan(value) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    return False


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] % 2 == 0:
        with open(PATH, "wb") as handle:
            handle.write(data[1:])
        config = RWKV7Config.from_json_file(PATH)
    else:
        provider = atheris.FuzzedDataProvider(data[1:])
        config_dict = _small_valid() if provider.ConsumeBool() else {}
        for _ in range(provider.ConsumeIntInRange(0, 6)):
            config_dict[KEYS[provider.ConsumeIntInRange(0, len(KEYS) - 1)]] = _value(provider)
        config = RWKV7Config.from_dict(config_dict)
    check_roundtrip(config)


SEEDS = {
    "default": b"\0" + RWKV7Config().to_json_string().encode(),
    "small": b"\0" + json.dumps(_small_valid()).encode(),
    "fla": b"\0"
    + json.dumps(
        {**_small_valid(), "num_heads": 2, "hidden_ratio": 4.0, "attn_mode": "chunk", "value_dim": [8, 8]}
    ).encode(),
    "native": b"\0" + json.dumps({**_small_valid(), "use_deep_embed": False, "wkv_implementation": "eager"}).encode(),
    "structured": b"\1" + bytes(range(128)),
}

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replay":
        run_file(test_one_input, sys.argv[2])
    else:
        fuzz("config", test_one_input, SEEDS)
