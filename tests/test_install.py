"""A non-editable install (what `pip install .` puts in site-packages), used from outside the repository: it
converts an official checkpoint (the model card template ships with it) and runs the converted model to the
official logits."""

import json
import subprocess
import sys
from pathlib import Path

import oracle
import pytest
import torch
from helpers import installed_environment

REPO = Path(__file__).resolve().parents[1]
SHIPS_KERNEL_SOURCES = '"kernel/build.toml"' in (REPO / "pyproject.toml").read_text()  # package data

# scripts/demo.py's steps (load, forward, greedy generate) on a converted folder, reported as JSON
DEMO = """
import json, sys
import torch
import modeling_rwkv7
from transformers import AutoModelForCausalLM

folder, tokens = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.tensor([tokens])).logits[0]
generated = model.generate(torch.tensor([tokens]), max_new_tokens=4, do_sample=False)
print("REPORT " + json.dumps({
    "package": modeling_rwkv7.__file__,
    "model": f"{type(model).__module__}.{type(model).__name__}",
    "converter_imported": "modeling_rwkv7.convert_rwkv7_checkpoint_to_hf" in sys.modules,
    "logits": logits.tolist(),
    "generated": generated[0, len(tokens):].tolist(),
}))
"""


def run(command: list[str], installed_package) -> subprocess.CompletedProcess:
    target, work = installed_package
    done = subprocess.run(
        command, cwd=work, env=installed_environment(target), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    return done


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_install_carries_what_the_package_reads(installed_package):
    target, _ = installed_package
    package = target / "modeling_rwkv7"
    template = "model_card_template.md"
    assert (package / template).read_text() == (REPO / "modeling_rwkv7" / template).read_text()
    assert (package / "rwkv_vocab_v20230424.txt").is_file()
    assert (target / "bin" / "rwkv7-convert").is_file()
    if SHIPS_KERNEL_SOURCES:
        kernel = package / "kernel"
        assert kernel.is_dir() and not kernel.is_symlink()  # the sources themselves, not a link into a checkout
        assert (kernel / "build.toml").is_file() and any((kernel / "csrc").iterdir())


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_installed_converter_and_model_give_the_official_logits(installed_package, official_checkpoint):
    target, work = installed_package
    _, path, rwkv_model = official_checkpoint
    module = [sys.executable, "-m", "modeling_rwkv7.convert_rwkv7_checkpoint_to_hf"]
    run([*module, path + ".pth", "converted", "--base-model", "BlinkDL/rwkv7-g1"], installed_package)
    card = (work / "converted" / "README.md").read_text()
    assert card.startswith("---\n") and "# converted\n" in card and "BlinkDL/rwkv7-g1" in card
    run([str(target / "bin" / "rwkv7-convert"), "converted", "native", "--layout", "native"], installed_package)

    tokens = torch.randint(0, 1000, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    for folder in ("converted", "native"):
        done = run([sys.executable, "-c", DEMO, folder, json.dumps(tokens)], installed_package)
        report = json.loads(done.stdout.split("REPORT ", 1)[1])
        assert Path(report["package"]).is_relative_to(target), report["package"]
        assert report["model"] == "modeling_rwkv7.modeling_rwkv7.RWKV7ForCausalLM"
        assert report["converter_imported"] is False  # `import modeling_rwkv7` reads no checkpoint code
        expected, _ = oracle.oracle_logits(rwkv_model, tokens)
        torch.testing.assert_close(torch.tensor(report["logits"]), expected, rtol=0, atol=1e-4)
        context = list(tokens)
        for token in report["generated"]:
            assert token == int(oracle.oracle_logits(rwkv_model, context)[0][-1].argmax()), (folder, context)
            context.append(token)
        assert len(report["generated"]) == 4
