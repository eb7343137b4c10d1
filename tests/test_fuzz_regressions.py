"""The findings of the fuzz harnesses (`tests/fuzz/`), each now a clear error: inputs that used to end in an
OverflowError, IndexError, RecursionError, a huge allocation or a hang."""

import json
import os
import re
import sys

import oracle
import pytest
import torch
from safetensors.torch import save_file

from modeling_rwkv7.cache_rwkv7 import RWKV7Cache
from modeling_rwkv7.configuration_rwkv7 import RWKV7Config
from modeling_rwkv7.convert_rwkv7_checkpoint_to_hf import CheckpointError, open_checkpoint

# --- tokenizer ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("token_id", [2**64, 2**70, -(2**70)])
def test_decode_of_an_id_past_int64_is_a_value_error_in_both_tokenizers(token_id):
    from modeling_rwkv7.tokenization_rwkv7 import RWKV7Tokenizer, RWKV7TokenizerFast

    for tokenizer in (RWKV7Tokenizer(), RWKV7TokenizerFast()):  # the fast one raised OverflowError
        with pytest.raises(ValueError, match=f"Token id {token_id} is out of range"):
            tokenizer.decode([5, token_id])


# --- RWKV7Cache.load ------------------------------------------------------------------------------------------


def _state_file(path, num_layers: int = 1, **metadata) -> str:
    tensors = {}
    for i in range(num_layers):
        tensors[f"layers.{i}.recurrent_state"] = torch.zeros(1, 2, 4, 4)
        tensors[f"layers.{i}.attn_shift_state"] = torch.zeros(1, 8)
        tensors[f"layers.{i}.ffn_shift_state"] = torch.zeros(1, 8)
    base = {"format": "rwkv7-state", "num_hidden_layers": str(num_layers), "num_heads": "2", "head_dim": "4"}
    save_file(tensors, str(path), metadata={**base, "hidden_size": "8", "seen_tokens": "0", **metadata})
    return str(path)


def test_state_metadata_with_more_layers_than_tensors_is_refused_at_once(tmp_path):
    path = _state_file(tmp_path / "s.safetensors", num_hidden_layers="100000000")  # was a hang (a set of 3e8 names)
    with pytest.raises(ValueError, match=r"num_hidden_layers=100000000 needs 300000000 tensors; the file holds 3"):
        RWKV7Cache.load(path)


@pytest.mark.parametrize(
    "metadata",
    [
        {"num_heads": "100000", "head_dim": "100000"},  # was a RuntimeError allocating 4e15 bytes
        {"hidden_size": "9"},  # was silently ignored
        {"num_heads": "1", "head_dim": "8"},
    ],
)
def test_state_metadata_that_does_not_match_layer_0_is_refused_before_allocating(tmp_path, metadata):
    path = _state_file(tmp_path / "s.safetensors", **metadata)
    with pytest.raises(ValueError, match=r"does not match layer 0's recurrent_state \(1, 2, 4, 4\)"):
        RWKV7Cache.load(path)


def test_state_seen_tokens_past_int64_is_a_value_error(tmp_path):
    path = _state_file(tmp_path / "s.safetensors", seen_tokens="9" * 30)  # was an OverflowError
    with pytest.raises(ValueError, match=r"metadata seen_tokens='9+' is not an integer >= 0 \(and < 2\*\*63\)"):
        RWKV7Cache.load(path)
    largest = _state_file(tmp_path / "ok.safetensors", seen_tokens=str(2**63 - 1))
    assert RWKV7Cache.load(largest).seen_tokens == 2**63 - 1


# --- config loading -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config_dict, message",
    [
        ({"hidden_ratio": 1e308}, r"hidden_ratio=1e\+308 \* hidden_size is too large"),  # was an OverflowError
        ({"hidden_ratio": 2.0, "hidden_size": 10**400}, r"hidden_ratio=2.0 \* hidden_size is too large"),
        ({"hidden_ratio": float("nan")}, "hidden_ratio must be a positive finite number, got nan"),
        ({"hidden_ratio": "4"}, "hidden_ratio must be a positive finite number, got '4'"),
        ({"hidden_size": 10**400, "head_dim": 1}, r"hidden_size must be a positive integer < 2\*\*63"),
        ({"num_heads": "x", "head_dim": 10**12}, "num_heads=x with head_dim=1000000000000 does not"),  # no x*1e12
        ({"num_heads": 12, "head_dim": "64"}, "head_dim must be a positive integer, got '64'"),
    ],
)
def test_fuzzed_config_values_are_value_errors(config_dict, message):
    with pytest.raises(ValueError, match=message):
        RWKV7Config.from_dict(config_dict)


@pytest.fixture(params=[1000, 20000], ids=["default_limit", "inductor_raised_limit"])
def recursion_limit(request):
    """Runs the test under Python's default recursion limit and under a raised one (importing inductor raises it)."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(request.param)
    yield request.param
    sys.setrecursionlimit(before)


@pytest.mark.parametrize("nested", ["[" * 3000 + "]" * 3000, '{"a": ' * 600 + "1" + "}" * 600, "[" * 33 + "]" * 33])
def test_config_json_nested_past_the_depth_limit_is_a_value_error(tmp_path, recursion_limit, nested):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "rwkv7", "x": ' + nested + "}")
    with pytest.raises(ValueError, match="nests its JSON more than 32 levels deep: too deeply to be a config"):
        RWKV7Config.from_json_file(path)  # was a RecursionError, or no error at all under a raised limit


def test_config_json_nested_as_deep_as_the_limit_reaches_the_field_check(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "rwkv7", "x": ' + "[" * 31 + "]" * 31 + "}")
    with pytest.raises(ValueError, match=r"Unknown RWKV7Config field\(s\) \['x'\]"):
        RWKV7Config.from_json_file(path)


@pytest.mark.parametrize("num_labels", [2**20 + 1, 10**12, 0, -3, 2.0, True])
def test_config_num_labels_out_of_range_is_refused_before_building_labels(num_labels):
    message = f"RWKV7Config.num_labels must be an integer in [1, 1048576], got {num_labels!r}"
    with pytest.raises(ValueError, match=re.escape(message)):  # 10**12 ran out of memory building id2label
        RWKV7Config.from_dict({"num_labels": num_labels})


def test_config_num_labels_at_the_limit_is_taken():
    assert RWKV7Config.from_dict({"num_labels": 2**20}).num_labels == 2**20


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("value", ["x", "torch.float32", 5, 1.5, [1]])
def test_config_dtype_that_names_no_torch_dtype_is_a_value_error(key, value):
    # was an AttributeError (transformers' getattr(torch, name)) or an IndexError in to_dict()
    with pytest.raises(ValueError, match=r"RWKV7Config.dtype must be a torch dtype or its name \('bfloat16'\)"):
        RWKV7Config.from_dict({key: value})
    assert RWKV7Config.from_dict({key: "bfloat16"}).to_dict()["dtype"] == "bfloat16"


@pytest.mark.parametrize("id2label", [5, [1, 2], "ab"])
def test_config_id2label_that_is_no_dict_is_a_value_error(id2label):
    with pytest.raises(ValueError, match="RWKV7Config.id2label must be a dict"):  # was an AttributeError
        RWKV7Config.from_dict({"id2label": id2label})


def test_fla_config_keys_still_load():
    config = RWKV7Config.from_dict({"hidden_size": 8, "head_dim": 4, "num_heads": 2, "hidden_ratio": 2.5})
    assert config.intermediate_size == 20


# --- converter readers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_official():
    return oracle.random_official_state_dict(vocab_size=16, hidden_size=8, num_layers=2, head_dim=4, ranks=(4,) * 4)


@pytest.mark.parametrize(
    "name, tensor",
    [
        ("blocks.0.att.w1", torch.zeros(8)),  # each was an IndexError reading the sizes off the tensors
        ("blocks.1.att.v1", torch.zeros(8)),
        ("emb.weight", torch.zeros(())),
        ("blocks.0.att.r_k", torch.zeros(2, 2, 2)),  # was "too many values to unpack"
    ],
)
def test_official_checkpoint_with_a_non_matrix_size_tensor_is_refused(tiny_official, tmp_path, name, tensor):
    path = tmp_path / "model.pth"
    torch.save({**tiny_official, name: tensor}, path)
    message = f"{name} has shape {tuple(tensor.shape)}, expected a matrix"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        open_checkpoint(path)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_official_checkpoint_with_integer_weights_is_refused(tiny_official, tmp_path, dtype):
    path = tmp_path / "model.pth"
    torch.save({**tiny_official, "blocks.1.att.x_r": tiny_official["blocks.1.att.x_r"].to(dtype)}, path)
    message = f"holds 1 tensor(s) that are not floating point, e.g. blocks.1.att.x_r ({dtype})"
    with pytest.raises(CheckpointError, match=re.escape(message)):  # was cast to the output dtype without a word
        open_checkpoint(path)


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_official_reader_never_unpickles_code(tiny_official, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({**tiny_official, "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(CheckpointError, match="Cannot read .*evil.pth as a PyTorch state dict"):
        open_checkpoint(path)
    assert not marker.exists()


def test_index_json_nested_past_the_recursion_limit_is_a_checkpoint_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "rwkv7"}')
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 3000 + "]" * 3000 + "}")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json is not valid JSON: maximum recursion"):
        open_checkpoint(tmp_path)  # was a RecursionError


@pytest.fixture
def fla_folder(tiny_official, tmp_path):
    from modeling_rwkv7.conversion_mapping_rwkv7 import official_to_hf

    config, tensors = official_to_hf(tiny_official)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, config.to_dict()


@pytest.mark.parametrize("shard", ["../model.safetensors", "/etc/passwd", "sub/model.safetensors", ".."])
def test_index_json_naming_a_shard_outside_the_folder_is_refused(fla_folder, shard):
    folder, _ = fla_folder
    weight_map = {"model.embeddings.weight": "model.safetensors", "lm_head.weight": shard}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = f"names shard files outside {folder}: {[shard]!r}; expected plain file names beside it"
    with pytest.raises(CheckpointError, match=re.escape(message)):  # was read wherever it pointed
        open_checkpoint(folder)


def test_index_json_placing_a_tensor_in_a_shard_without_it_is_refused(fla_folder):
    folder, config = fla_folder
    (folder / "config.json").write_text(json.dumps(config))
    weight_map = {
        "model.embeddings.weight": "model.safetensors",
        "model.layers.9.ffn.value.weight": "model.safetensors",
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = "places 1 tensor(s) in model.safetensors, which does not hold them, e.g. model.layers.9.ffn.value.weight"
    with pytest.raises(CheckpointError, match=re.escape(message)):  # was safetensors' "does not contain tensor"
        open_checkpoint(folder)


def test_folder_config_with_absurd_layer_count_is_refused_before_building_a_model(fla_folder):
    folder, config = fla_folder
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**6}))  # was a hang (hours)
    with pytest.raises(CheckpointError, match=r"describes 1000000 layers, but the folder holds only \d+ tensors"):
        open_checkpoint(folder)


def test_folder_config_with_overflowing_sizes_is_a_checkpoint_error(fla_folder):
    folder, config = fla_folder
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 2**40, "head_dim": 4}))
    with pytest.raises(CheckpointError, match="No RWKV-7 model has the sizes of this config"):  # was a RuntimeError
        open_checkpoint(folder)
