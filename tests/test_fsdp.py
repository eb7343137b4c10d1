"""FSDP2 on CPU: two processes under `accelerate launch`, each holding half of every parameter (one unit per
`RWKV7Block`, full shard), end a few SGD-with-momentum steps with the weights of one unsharded process that takes the
same global batches (scripts/fsdp_check.py); scripts/train.py refuses FSDP where accelerate would silently run DDP."""

import json
import os

import pytest
import torch
from helpers import accelerate_launch, installed_environment, load_script
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "fsdp_check.py")
DEFAULT_MODEL = os.path.join(REPO, "models", "rwkv7-tiny-default")


def launch_in_train_install(installed_package, launch_options: list[str], script, script_options: list[str], cwd):
    """`accelerate launch` on 2 processes from a fresh install of the train extra."""
    target, _ = installed_package
    env = installed_environment(target, "train")
    return accelerate_launch(["--num_processes", "2", *launch_options], script, script_options, cwd, env)


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_fsdp_processes_end_with_the_weights_of_one_process(installed_package, tmp_path):
    options = [
        "--model",
        DEFAULT_MODEL,
        "--steps",
        "3",
        "--batch_size",
        "4",
        "--seq_len",
        "48",
        "--learning_rate",
        "0.02",
        "--seed",
        "3",
    ]
    result = launch_in_train_install(
        installed_package, ["--multi_gpu"], SCRIPT, [*options, "--output_dir", str(tmp_path / "fsdp")], tmp_path
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    with open(tmp_path / "fsdp" / "report.json") as handle:
        report = json.load(handle)
    assert report["world_size"] == 2 and report["fsdp_units"] == 5  # 4 blocks + the root
    assert all(
        0.4 < fraction < 0.6 for fraction in report["parameter_fraction_per_process"]
    )  # sharded, not replicated

    fsdp_check = load_script(SCRIPT)
    initial = fsdp_check.build_model(fsdp_check.parse_args([*options, "--output_dir", "unused"])).state_dict()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): the same measured CPU paths, the same rounding
    try:
        fsdp_check.main([*options, "--output_dir", str(tmp_path / "single")])  # this process alone: no sharding
    finally:
        torch.set_num_threads(threads)
    with open(tmp_path / "single" / "report.json") as handle:
        single_report = json.load(handle)
    assert single_report["world_size"] == 1
    # float32 rounding apart: each process measures its own WKV chunk size, and a near-tie may still split them
    torch.testing.assert_close(
        torch.tensor(report["losses"]), torch.tensor(single_report["losses"]), rtol=1e-5, atol=1e-5
    )
    assert len(set(report["losses"])) == 3  # each step's loss reads the weights the step before wrote

    sharded, single = (load_file(tmp_path / name / "model.safetensors") for name in ("fsdp", "single"))
    assert sharded.keys() == single.keys() == initial.keys()
    changes = {name: (weight - initial[name]).abs().max().item() for name, weight in single.items()}
    assert sum(change > 1e-3 for change in changes.values()) > len(changes) / 2  # trained: far beyond the tolerance
    for name, weight in single.items():
        assert sharded[name].shape == weight.shape == initial[name].shape, name
        torch.testing.assert_close(sharded[name], weight, rtol=0, atol=5e-5, msg=name)  # changes are > 1e-3


@pytest.mark.slow
@pytest.mark.subprocess
def test_train_script_refuses_fsdp_that_accelerate_turns_into_ddp_on_cpu(installed_package, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 1, "head_dim": 16, "vocab_size": 65536}))
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "To be, or not to be, that is the question."}) + "\n")
    launch = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_transformer_layer_cls_to_wrap", "RWKV7Block"]
    options = [
        "--config",
        str(config),
        "--data",
        str(data),
        "--block_size",
        "8",
        "--max_steps",
        "1",
        "--use_cpu",
        "--report_to",
        "none",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    result = launch_in_train_install(
        installed_package, launch, os.path.join(REPO, "scripts", "train.py"), options, tmp_path
    )
    assert result.returncode != 0
    assert "FSDP was asked for, but accelerate" in result.stderr and "MULTI_CPU" in result.stderr, result.stderr[
        -3000:
    ]
    assert not (tmp_path / "out" / "model.safetensors").exists()
