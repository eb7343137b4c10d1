"""Official `.pth` and fla-hub folders -> transformers folders: parity with the `rwkv` package, sharding, dtypes,
atomic output, bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import oracle
import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import modeling_rwkv7  # noqa: F401  (registers rwkv7 with the Auto classes)
from modeling_rwkv7 import RWKV7ForCausalLM
from modeling_rwkv7 import convert_rwkv7_checkpoint_to_hf as converter
from modeling_rwkv7.conversion_mapping_rwkv7 import CheckpointError, official_to_hf
from modeling_rwkv7.convert_rwkv7_checkpoint_to_hf import convert_checkpoint, main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_FILES = {"configuration_rwkv7.py", "modeling_rwkv7.py", "cache_rwkv7.py", "wkv.py"}


def random_tokens(vocab_size: int, length: int = 24, seed: int = 0) -> list[int]:
    """Fresh random tokens, the same whatever ran before (the bf16 tolerance below is a measured bound)."""
    return torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def logits_of(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def assert_matches_oracle(model, official_checkpoint, atol=1e-4):
    state_dict, _, rwkv_model = official_checkpoint
    tokens = random_tokens(state_dict["emb.weight"].shape[0])
    expected, _ = oracle.oracle_logits(rwkv_model, tokens)
    torch.testing.assert_close(logits_of(model, tokens), expected, rtol=0, atol=atol)


def write_fla_folder(state_dict: dict, folder, **config_changes) -> str:
    """An fla-hub style copy of official weights: fla's config.json keys (with its auto_map pointing at fla's code,
    which is not in the folder) and safetensors with fla's tensor names."""
    config, tensors = official_to_hf(state_dict)
    os.makedirs(folder, exist_ok=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, os.path.join(folder, "model.safetensors"))
    fla_config = {
        "model_type": "rwkv7",
        "architectures": ["RWKV7ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_rwkv7.RWKV7Config",
            "AutoModel": "modeling_rwkv7.RWKV7Model",
            "AutoModelForCausalLM": "modeling_rwkv7.RWKV7ForCausalLM",
        },
        "attn": None,
        "attn_mode": "chunk",
        "hidden_size": config.hidden_size,
        "hidden_ratio": 4.0,
        "intermediate_size": None,
        "num_hidden_layers": config.num_hidden_layers,
        "head_dim": config.head_dim,
        "num_heads": config.num_heads,
        "decay_low_rank_dim": config.decay_low_rank_dim,
        "a_low_rank_dim": config.a_low_rank_dim,
        "v_low_rank_dim": config.v_low_rank_dim,
        "gate_low_rank_dim": config.gate_low_rank_dim,
        "hidden_act": "sqrelu",
        "max_position_embeddings": 2048,
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": 1e-5,
        "fuse_norm": False,
        "fuse_cross_entropy": True,
        "fuse_linear_cross_entropy": False,
        "use_l2warp": True,
        "initializer_range": 0.006,
        "use_cache": True,
        "pad_token_id": None,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "value_dim": [config.hidden_size] * config.num_hidden_layers,
        "vocab_size": config.vocab_size,
        "torch_dtype": "float32",
        "transformers_version": "4.48.0",
        **config_changes,
    }
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(fla_config, handle, indent=2)
    return str(folder)


def test_official_checkpoint_converts_to_oracle_logits(official_checkpoint, tmp_path):
    state_dict, path, _ = official_checkpoint
    folder = convert_checkpoint(path + ".pth", tmp_path / "converted", dtype="float32", base_model="BlinkDL/rwkv7-g1")

    files = set(os.listdir(folder))
    assert CODE_FILES | {"config.json", "generation_config.json", "model.safetensors", "README.md"} <= files
    assert not any(name.startswith(".") for name in os.listdir(tmp_path)), "staging folder left behind"
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_rwkv7.RWKV7Config",
        "AutoModel": "modeling_rwkv7.RWKV7Model",
        "AutoModelForCausalLM": "modeling_rwkv7.RWKV7ForCausalLM",
    }
    assert config["dtype"] == "float32" and config["architectures"] == ["RWKV7ForCausalLM"]
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 0 and generation["pad_token_id"] == 0

    stored = oracle.folder_tensors(folder)
    _, expected = official_to_hf(state_dict)
    assert stored.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(stored[name], tensor), name

    for model in (
        AutoModelForCausalLM.from_pretrained(folder),
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True),
    ):
        assert isinstance(model, RWKV7ForCausalLM)
        assert_matches_oracle(model.eval(), official_checkpoint)


def test_cli_writes_bf16_shards_within_the_size_limit(official_checkpoint, tmp_path, capsys):
    state_dict, path, rwkv_model = official_checkpoint
    max_shard_bytes = 400_000
    main([path + ".pth", str(tmp_path / "sharded"), "--dtype", "bfloat16", "--max-shard-size", str(max_shard_bytes)])
    folder = tmp_path / "sharded"
    assert "model.safetensors.index.json" in capsys.readouterr().out

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
    assert len(shards) > 3 and sorted(set(index["weight_map"].values())) == shards
    assert "model.safetensors" not in shards
    for shard in shards:
        with safe_open(folder / shard, framework="pt") as handle:
            sizes = [handle.get_tensor(key).nbytes for key in handle.keys()]
        assert len(sizes) == 1 or sum(sizes) <= max_shard_bytes, (shard, sizes)

    _, expected = official_to_hf(state_dict)
    stored = oracle.folder_tensors(folder)
    assert index["weight_map"].keys() == expected.keys() == stored.keys()
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in stored.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in expected.values())
    for name, tensor in expected.items():
        assert stored[name].dtype == torch.bfloat16
        assert torch.equal(stored[name], tensor.to(torch.bfloat16)), name

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert model.dtype == torch.bfloat16
    tokens = random_tokens(state_dict["emb.weight"].shape[0])
    expected_logits, _ = oracle.oracle_logits(rwkv_model, tokens)
    error = (logits_of(model, tokens) - expected_logits).norm() / expected_logits.norm()
    assert error < 0.03, f"bf16 logits deviate by {error:.4f} (relative) from the fp32 oracle"


def test_fla_folder_loads_to_the_official_logits(official_checkpoint, tmp_path):
    state_dict, _, _ = official_checkpoint
    fla_folder = write_fla_folder(state_dict, tmp_path / "fla")

    for model in (
        AutoModelForCausalLM.from_pretrained(fla_folder),
        AutoModelForCausalLM.from_pretrained(fla_folder, trust_remote_code=True),  # the registered classes win
        RWKV7ForCausalLM.from_pretrained(fla_folder),
    ):
        assert type(model) is RWKV7ForCausalLM
        assert model.config.intermediate_size == 4 * model.config.hidden_size  # from fla's hidden_ratio
        assert_matches_oracle(model.eval(), official_checkpoint)


def test_fla_folder_converts_like_the_official_weights(official_checkpoint, tmp_path):
    state_dict, path, _ = official_checkpoint
    from_official = convert_checkpoint(path + ".pth", tmp_path / "from_official")
    from_fla = convert_checkpoint(write_fla_folder(state_dict, tmp_path / "fla"), tmp_path / "from_fla")

    official_tensors, fla_tensors = oracle.folder_tensors(from_official), oracle.folder_tensors(from_fla)
    assert official_tensors.keys() == fla_tensors.keys()
    for name, tensor in official_tensors.items():
        assert torch.equal(fla_tensors[name], tensor), name
    official_config = json.loads((from_official / "config.json").read_text())
    fla_config = json.loads((from_fla / "config.json").read_text())
    assert fla_config.pop("pad_token_id") is None  # fla's default, kept; the official file has no say
    assert fla_config == {key: value for key, value in official_config.items() if key != "pad_token_id"}
    assert sorted(os.listdir(from_fla)) == sorted(os.listdir(from_official))


def test_interrupted_conversion_leaves_no_output(official_checkpoint, tmp_path, monkeypatch):
    _, path, _ = official_checkpoint
    real_save_file, calls = safetensors.torch.save_file, []

    def interrupted_save_file(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the third shard is written
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted_save_file)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(path + ".pth", tmp_path / "out", max_shard_size=300_000)
    assert len(calls) == 3
    assert os.listdir(tmp_path) == []  # neither the output folder nor the staging folder

    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "keep.txt").write_text("an earlier conversion")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(path + ".pth", previous, max_shard_size=300_000, overwrite=True)
    assert os.listdir(tmp_path) == ["previous"] and os.listdir(previous) == ["keep.txt"]


def test_refuses_to_overwrite_a_non_empty_folder(official_checkpoint, tmp_path):
    _, path, _ = official_checkpoint
    output = tmp_path / "out"
    output.mkdir()
    convert_checkpoint(path + ".pth", output)  # an empty folder is fine
    (output / "notes.txt").write_text("mine")

    with pytest.raises(FileExistsError, match=r"out exists and is not empty.*overwrite"):
        convert_checkpoint(path + ".pth", output)
    assert (output / "notes.txt").read_text() == "mine"

    convert_checkpoint(path + ".pth", output, overwrite=True, dtype="float16")
    assert not (output / "notes.txt").exists()
    assert json.loads((output / "config.json").read_text())["dtype"] == "float16"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_streaming_keeps_one_shard_in_memory(tmp_path, monkeypatch):
    """Converting ~130 MB of fp32 weights to bf16 in 4 MB shards must not hold the converted model (~65 MB)."""
    state_dict = oracle.random_official_state_dict(vocab_size=1000, hidden_size=512, num_layers=10, seed=7)
    path = oracle.write_official_checkpoint(state_dict, tmp_path, name="big")
    converted_bytes = sum(t.numel() for t in state_dict.values()) * 2
    del state_dict

    def anonymous_rss() -> int:
        with open("/proc/self/status") as status:
            line = next(line for line in status if line.startswith("RssAnon:"))
        return int(line.split()[1]) * 1024

    real_save_file, peaks = safetensors.torch.save_file, []

    def measured_save_file(*args, **kwargs):
        peaks.append(anonymous_rss())
        real_save_file(*args, **kwargs)
        peaks.append(anonymous_rss())

    monkeypatch.setattr(safetensors.torch, "save_file", measured_save_file)
    baseline = anonymous_rss()
    convert_checkpoint(path + ".pth", tmp_path / "out", dtype="bfloat16", max_shard_size="4MB")
    growth = max(peaks) - baseline
    assert len(peaks) > 2 * 10
    message = f"memory grew by {growth / 1e6:.1f} MB for {converted_bytes / 1e6:.1f} MB of weights"
    assert growth < converted_bytes / 3, message


def small_official_state_dict(seed=0) -> dict:
    return oracle.random_official_state_dict(
        vocab_size=100, hidden_size=64, num_layers=2, ranks=(32, 32, 32, 32), seed=seed
    )


@pytest.mark.parametrize(
    "removed, message",
    [
        ("blocks.0.att.r_k", r"missing tensors \['blocks.0.att.r_k'\]"),
        ("blocks.1.ffn.value.weight", r"missing tensors \['blocks.1.ffn.value.weight'\]"),
    ],
)
def test_incomplete_official_checkpoint_names_the_missing_tensors(tmp_path, removed, message):
    state_dict = small_official_state_dict()
    del state_dict[removed]
    path = oracle.write_official_checkpoint(state_dict, tmp_path, name="broken")
    with pytest.raises(CheckpointError, match=message):
        convert_checkpoint(path + ".pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_foreign_checkpoints_are_refused(tmp_path):
    rwkv6_like = small_official_state_dict()
    rwkv6_like["blocks.0.att.time_faaaa"] = rwkv6_like.pop("blocks.0.att.r_k")
    path = oracle.write_official_checkpoint(rwkv6_like, tmp_path, name="rwkv6")
    not_rwkv7 = r"Not an RWKV-7 \(x070\) checkpoint: missing tensors \['blocks.0.att.r_k'\]"
    with pytest.raises(CheckpointError, match=not_rwkv7):
        convert_checkpoint(path + ".pth", tmp_path / "out")

    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        convert_checkpoint(tmp_path / "tensor.pth", tmp_path / "out")

    fla_folder = write_fla_folder(small_official_state_dict(), tmp_path / "fla", model_type="rwkv6")
    with pytest.raises(CheckpointError, match="model_type='rwkv6'; expected 'rwkv7'"):
        convert_checkpoint(fla_folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_incomplete_fla_folder_names_the_missing_tensor(tmp_path):
    fla_folder = write_fla_folder(small_official_state_dict(), tmp_path / "fla")
    weights = os.path.join(fla_folder, "model.safetensors")
    with safe_open(weights, framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if key != "model.layers.1.attn.k_a"}
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.attn.k_a'\]"):
        convert_checkpoint(fla_folder, tmp_path / "out")


def test_source_inside_the_output_folder_is_refused(tmp_path):
    (tmp_path / "work").mkdir()
    path = oracle.write_official_checkpoint(small_official_state_dict(), tmp_path / "work", name="model")
    with pytest.raises(ValueError, match="must not contain the source checkpoint"):
        convert_checkpoint(path + ".pth", tmp_path / "work", overwrite=True)
    assert os.path.exists(path + ".pth")


def test_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    state_dict = small_official_state_dict()
    del state_dict["blocks.0.att.r_k"]
    path = oracle.write_official_checkpoint(state_dict, tmp_path, name="broken")
    with pytest.raises(SystemExit) as exit_info:
        main([path + ".pth", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    assert "error: Not an RWKV-7 (x070) checkpoint: missing tensors ['blocks.0.att.r_k']" in capsys.readouterr().err


def test_stale_staging_folders_of_gone_conversions_are_removed(official_checkpoint, tmp_path):
    """A conversion killed outright (SIGKILL) leaves its `.NAME.PID-RANDOM.partial` folder: the next conversion into
    the same parent removes those whose process is gone, and nothing else."""
    _, path, _ = official_checkpoint
    finished = subprocess.Popen(["true"])
    finished.wait()
    gone, running = finished.pid, os.getpid()
    stale = [f".out.{gone}-0123456789ab.partial", f".older.{gone}-0123456789ab.replaced"]
    kept = [f".out.{running}-0123456789ab.partial", ".cache", f"out.{gone}-0123456789ab.partial"]
    for name in stale + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"half a shard")

    convert_checkpoint(path + ".pth", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["out"])


KILLED_CONVERSION = """
import sys, time
import safetensors.torch
from modeling_rwkv7.convert_rwkv7_checkpoint_to_hf import main

write_shard = safetensors.torch.save_file
def write_shard_then_wait(*args, **kwargs):
    write_shard(*args, **kwargs)
    time.sleep(120)  # killed here
safetensors.torch.save_file = write_shard_then_wait
main(sys.argv[1:])
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
@pytest.mark.slow
def test_a_killed_conversion_leaves_no_staging_folder_behind(official_checkpoint, tmp_path, kill):
    """SIGTERM: the converter removes its staging folder as it exits. SIGKILL: the next conversion removes it."""
    _, path, _ = official_checkpoint
    conversion = subprocess.Popen(
        [sys.executable, "-c", KILLED_CONVERSION, path + ".pth", str(tmp_path / "out")],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.*.partial/*.safetensors")) and conversion.poll() is None:
        assert time.monotonic() < deadline, "the conversion wrote no shard in 120 s"
        time.sleep(0.1)
    assert conversion.poll() is None, conversion.stderr.read()
    (staging,) = tmp_path.glob(".out.*.partial")
    assert staging.name.startswith(f".out.{conversion.pid}-")
    conversion.send_signal(kill)
    conversion.communicate(timeout=60)
    assert conversion.returncode == (128 + signal.SIGTERM if kill == signal.SIGTERM else -signal.SIGKILL)
    assert staging.exists() == (kill == signal.SIGKILL)

    convert_checkpoint(path + ".pth", tmp_path / "out")
    assert os.listdir(tmp_path) == ["out"]


def test_output_folders_that_cannot_be_replaced_safely_are_refused_before_reading(tmp_path, monkeypatch):
    source = write_fla_folder(small_official_state_dict(), tmp_path / "work" / "fla")
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(real)
    elsewhere = tmp_path / "elsewhere" / "sub"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    monkeypatch.setattr(converter, "open_checkpoint", lambda source: pytest.fail("the source was read"))

    refused = [
        (tmp_path / "work" / "fla" / "converted", "must not lie inside the source folder"),
        (tmp_path / "work", "must not contain the source checkpoint"),
        (tmp_path / "work" / "fla", "must not contain the source checkpoint"),
        (tmp_path / "link", rf"link is a symbolic link \(to {re.escape(str(real))}\)"),
        (".", rf"\. is the current directory or holds it \({re.escape(str(elsewhere))}\)"),
        ("..", r"\.\. is the current directory or holds it"),
        ("new/..", r"new/\.\. is the current directory or holds it"),
    ]
    for output, message in refused:
        with pytest.raises(ValueError, match=message):
            convert_checkpoint(source, output, overwrite=True)
    assert sorted(str(path) for path in tmp_path.rglob("*")) == before


def test_a_file_of_a_folder_or_an_unreadable_pth_is_named(tmp_path):
    source = write_fla_folder(small_official_state_dict(), tmp_path / "fla")
    for file in ("config.json", "model.safetensors"):
        pass_the_folder = rf"fla/{file} is one file of a checkpoint folder; pass the folder \({re.escape(source)}\)"
        with pytest.raises(CheckpointError, match=pass_the_folder):
            convert_checkpoint(os.path.join(source, file), tmp_path / "out")

    complete = oracle.write_official_checkpoint(small_official_state_dict(), tmp_path, name="complete") + ".pth"
    data = open(complete, "rb").read()
    for name, content in (("truncated.pth", data[: len(data) // 2]), ("text.pth", b"not a checkpoint")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=rf"{name} is not a complete PyTorch checkpoint"):
            convert_checkpoint(tmp_path / name, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def break_weights(folder: str, how: str) -> str:
    """Damage an fla folder's weights; returns the file the error must name."""
    weights = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if how == "truncated":
        data = open(weights, "rb").read()
        open(weights, "wb").write(data[: len(data) // 2])
        return weights
    if how == "int8 tensor":
        with safe_open(weights, framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        tensors["model.layers.1.attn.k_a"] = tensors["model.layers.1.attn.k_a"].to(torch.int8)
        save_file(tensors, weights)
        return "model.layers.1.attn.k_a in model.safetensors is I8"
    os.remove(weights)
    if how == "index without its shard":
        json.dump({"weight_map": {"model.embeddings.weight": "model-00001-of-00002.safetensors"}}, open(index, "w"))
        return os.path.join(folder, "model-00001-of-00002.safetensors")
    open(index, "w").write('{"weight_map": ')
    return index


@pytest.mark.parametrize("how", ["truncated", "int8 tensor", "index without its shard", "index not json"])
def test_unreadable_weights_are_named_and_the_cli_prints_one_line(tmp_path, capsys, how):
    folder = write_fla_folder(small_official_state_dict(), tmp_path / "fla")
    named = break_weights(folder, how)
    with pytest.raises(CheckpointError, match=re.escape(named)):
        convert_checkpoint(folder, tmp_path / "out")

    with pytest.raises(SystemExit) as exit_info:
        main([folder, str(tmp_path / "out")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("rwkv7-convert: error: ") and named in error and error.count("\n") == 1, error
    assert os.listdir(tmp_path) == ["fla"]


def test_cli_refuses_to_overwrite_the_current_directory(official_checkpoint, tmp_path, monkeypatch, capsys):
    _, path, _ = official_checkpoint
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([path + ".pth", ".", "--overwrite"])
    assert exit_info.value.code == 1
    assert f"error: The output folder . is the current directory or holds it ({tmp_path})" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
