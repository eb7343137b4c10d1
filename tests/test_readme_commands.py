"""Every command the README shows runs, in a tiny form, from a fresh non-editable install that sees only the
dependencies of the extra the README installs before it (`helpers.installed_environment`).

The README's bash blocks are read here: a command without a tiny form below fails `test_every_readme_command_is_run`.
The tiny form keeps the command's script and flags and shrinks its inputs (the shipped tiny model, a random official
checkpoint, one or two training steps). Commands run by another test in the same environment are named with it.
"""

import re
import shlex
import shutil
import subprocess
import sys

import oracle
import pytest
import torch
from helpers import REPO, installed_environment

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

TINY_MODEL = "models/rwkv7-tiny-default"  # the shipped default
CONVERTED = "out/rwkv7-0.1b"  # the README's converted folder, here from a random official checkpoint
# README command (its first words) -> the tiny form's argument list, run in the working folder
TINY_FORMS = {
    "bash scripts/run_demo.sh": ["python", "scripts/demo.py", "--max-new-tokens", "8"],
    "rwkv7-convert RWKV-x070-World-0.1B.pth": ["rwkv7-convert", "official.pth", CONVERTED, "--dtype", "bfloat16"],
    "rwkv7-convert out/rwkv7-0.1b": ["rwkv7-convert", CONVERTED, "out/rwkv7-0.1b-native", "--layout", "native"],
    "python scripts/push_to_hub.py": ["python", "scripts/push_to_hub.py", CONVERTED, "me/rwkv7-0.1b", "--dry-run"],
    "python scripts/export_onnx.py": [
        "python", "scripts/export_onnx.py", TINY_MODEL, "out/onnx", "--prefill-length", "4",
    ],
    "python scripts/export_gguf.py": ["python", "scripts/export_gguf.py", CONVERTED, "tiny.gguf", "--outtype", "bf16"],
    "python scripts/train.py": [
        "python", "scripts/train.py", "--model", TINY_MODEL, "--data", "my_text.txt", "--method", "lora",
        "--eval_fraction", "0.5", "--output_dir", "out/lora", "--max_steps", "2", "--learning_rate", "1e-3",
        "--eval_strategy", "steps", "--eval_steps", "1", "--block_size", "32",
    ],
}  # fmt: skip
RUN_ELSEWHERE = {
    "python scripts/serve.py": "tests/test_serve.py (the launcher, the openai client, in the serve extra's install)",
    "lm_eval": "tests/test_lm_eval.py (a saved folder scored offline, in the eval extra's install)",
    "accelerate launch --multi_gpu": "tests/test_fsdp.py (two CPU processes, in the train extra's install)",
    "bash scripts/run_tests.sh": ".ci/run (this suite)",
}
NOT_RUN = {"accelerate launch --use_fsdp": "FSDP on 8 GPUs: no GPU here (the README says untested)"}


def readme_commands() -> list[tuple[str, str]]:
    """(extra, command) for every command of the README's bash blocks, `extra` being what the block's last
    `pip install ".[extra]"` before it names ("" for none)."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", (REPO / "README.md").read_text(), re.S):
        extra = ""
        for line in block.replace("\\\n", " ").splitlines():
            words = [word for word in shlex.split(line, comments=True) if not re.fullmatch(r"[A-Z_]+=\S*", word)]
            if words[:2] == ["pip", "install"]:
                extra = re.fullmatch(r"\.\[(\w[\w,-]*)\]", words[2]).group(1)
            elif words:
                commands.append((extra, " ".join(words)))
    return commands


def key_of(command: str) -> str:
    keys = [key for key in (*TINY_FORMS, *RUN_ELSEWHERE, *NOT_RUN) if command.startswith(key)]
    assert len(keys) == 1, f"README command {command!r} matches {keys}: give it one tiny form in {__file__}"
    return keys[0]


def test_every_readme_command_is_run():
    commands = readme_commands()
    keys = [key_of(command) for _, command in commands]
    assert sorted(keys) == sorted({*TINY_FORMS, *RUN_ELSEWHERE, *NOT_RUN}), "a tiny form names no README command"
    for key, test in RUN_ELSEWHERE.items():
        path = REPO / test.split()[0]
        extra = next(extra for extra, command in commands if command.startswith(key))
        if path.suffix == ".py":  # it runs the command in the install of the extra the README names
            assert f'installed_environment(target, "{extra}")' in path.read_text(), (key, extra, test)


def test_the_environment_holds_only_the_extras_dependencies(installed_package):
    """The check behind every run here: an install's environment finds what its extra brings and nothing else."""
    target, work = installed_package
    probe = "import importlib.util as u; print([u.find_spec(m) is not None for m in ('transformers', 'peft', 'onnx')])"
    found = {
        extra: subprocess.run(
            [sys.executable, "-c", probe], env=installed_environment(target, extra), capture_output=True, text=True
        ).stdout.strip()
        for extra in ("", "train", "export")
    }
    assert found == {"": "[True, False, False]", "train": "[True, True, False]", "export": "[True, False, True]"}


@pytest.fixture(scope="module")
def work(installed_package):
    """The working folder, holding the README's inputs: the shipped tiny model, an official checkpoint, a text."""
    _, work = installed_package
    for folder in ("scripts", "models", "configuration"):  # a clone's files, beside the install
        if not (work / folder).exists():
            (work / folder).symlink_to(REPO / folder)
    state_dict = oracle.random_official_state_dict(vocab_size=65536, hidden_size=64, num_layers=2, seed=5)
    torch.save(state_dict, work / "official.pth")
    paragraphs = [" ".join(f"word{(i * 7 + j) % 50}" for j in range(40)) for i in range(12)]
    (work / "my_text.txt").write_text("\n\n".join(paragraphs) + "\n")
    return work


def extra_of(key: str) -> str:
    return next(extra for extra, command in readme_commands() if command.startswith(key))


@pytest.mark.parametrize("key", list(TINY_FORMS))
def test_the_readme_command_runs_from_a_fresh_install(installed_package, work, key):
    target, _ = installed_package
    first_conversion = "rwkv7-convert RWKV-x070-World-0.1B.pth"
    if key == first_conversion:
        shutil.rmtree(work / CONVERTED, ignore_errors=True)
    elif CONVERTED in TINY_FORMS[key][2:4] and not (work / CONVERTED).exists():
        run(target, work, first_conversion)  # the README's conversion writes that folder
    run(target, work, key)
    outputs = {
        "python scripts/export_onnx.py": ["out/onnx/decode.onnx", "out/onnx/prefill_4.onnx"],
        "python scripts/export_gguf.py": ["tiny.gguf"],
        "python scripts/train.py": ["out/lora/adapter_model.safetensors"],
        "rwkv7-convert RWKV-x070-World-0.1B.pth": [f"{CONVERTED}/model.safetensors", f"{CONVERTED}/README.md"],
        "rwkv7-convert out/rwkv7-0.1b": ["out/rwkv7-0.1b-native/model.safetensors"],
    }
    for output in outputs.get(key, []):
        assert (work / output).is_file() and (work / output).stat().st_size > 0, output


def run(target, work, key: str) -> None:
    command, extra = TINY_FORMS[key], extra_of(key)
    executable = sys.executable if command[0] == "python" else str(target / "bin" / command[0])
    env = {**installed_environment(target, extra), "OMP_NUM_THREADS": "2"}
    done = subprocess.run([executable, *command[1:]], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)} (extra {extra!r}):\n{(done.stdout + done.stderr)[-4000:]}"
