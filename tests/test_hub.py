"""Published folders load where `modeling_rwkv7` is not installed; `scripts/push_to_hub.py` against a mocked Hub."""

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path
from unittest import mock

import oracle
import pytest
import torch
import yaml
from helpers import load_script
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import RepoUrl
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_rwkv7  # noqa: F401  (registers rwkv7 with the Auto classes)
from modeling_rwkv7 import RWKV7ForCausalLM
from modeling_rwkv7.convert_rwkv7_checkpoint_to_hf import convert_checkpoint
from modeling_rwkv7.tokenization_rwkv7 import RWKV7Tokenizer

REPO = Path(__file__).resolve().parent.parent
TEXT = 'RWKV-7 "Goose" reads 中文 and emoji 🪿 too.\n\nUser: hi'

# Runs with `python -I -S`: no user site, no .pth files (so no editable-install finder), no repository on the path;
# only site-packages (argv[1]) is added back.
ISOLATED_LOAD = r"""
import sys
sys.path.append(sys.argv[1])
try:
    import modeling_rwkv7
except ImportError:
    pass
else:
    raise SystemExit("modeling_rwkv7 is importable in the isolated interpreter: " + str(modeling_rwkv7.__file__))
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

text, results = sys.argv[3], {}
for folder in sys.argv[4:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    ids = tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    results[folder] = {
        "model_class": type(model).__module__ + "." + type(model).__name__,
        "tokenizer_class": type(tokenizer).__module__ + "." + type(tokenizer).__name__,
        "ids": ids,
        "decoded": tokenizer.decode(ids),
        "logits": logits,
    }
torch.save(results, sys.argv[2])
"""


@pytest.fixture(scope="module")
def world_folder(tmp_path_factory) -> Path:
    """A converted random checkpoint with the World vocabulary (65536 ids), so the folder carries the tokenizer."""
    state_dict = oracle.random_official_state_dict(
        vocab_size=65536, hidden_size=64, num_layers=2, ranks=(32, 32, 32, 32), seed=5
    )
    work = tmp_path_factory.mktemp("world")
    path = oracle.write_official_checkpoint(state_dict, work)
    return convert_checkpoint(path + ".pth", work / "rwkv7-world-tiny", base_model="BlinkDL/rwkv7-g1")


@pytest.mark.slow
@pytest.mark.subprocess
def test_folders_load_where_the_package_is_not_installed(world_folder, tmp_path):
    # a folder written by save_pretrained (model and tokenizer) must be as self-contained as the converter's
    saved = tmp_path / "saved"
    RWKV7ForCausalLM.from_pretrained(world_folder).save_pretrained(saved)
    RWKV7Tokenizer.register_for_auto_class("AutoTokenizer")
    RWKV7Tokenizer().save_pretrained(saved)
    assert {"configuration_rwkv7.py", "modeling_rwkv7.py", "cache_rwkv7.py", "wkv.py", "tokenization_rwkv7.py"} <= set(
        os.listdir(saved)
    )

    output, cwd = tmp_path / "results.pt", tmp_path / "elsewhere"
    cwd.mkdir()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "HF_HOME": str(tmp_path / "hf"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
    }
    command = [sys.executable, "-I", "-S", "-c", ISOLATED_LOAD, site.getsitepackages()[0], str(output), TEXT]
    done = subprocess.run(
        command + [str(world_folder), str(saved)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = torch.load(output, weights_only=False)

    expected_ids = RWKV7Tokenizer()(TEXT)["input_ids"]
    reference = AutoModelForCausalLM.from_pretrained(world_folder).eval()
    with torch.no_grad():
        expected_logits = reference(torch.tensor([expected_ids])).logits[0]
    for folder in (world_folder, saved):
        result = results[str(folder)]
        assert result["model_class"].startswith("transformers_modules.") and result["model_class"].endswith(
            "modeling_rwkv7.RWKV7ForCausalLM"
        )
        expected_class = "RWKV7TokenizerFast" if folder == world_folder else "RWKV7Tokenizer"  # converter: fast
        assert result["tokenizer_class"].endswith("tokenization_rwkv7." + expected_class)
        assert result["ids"] == expected_ids and result["decoded"] == TEXT
        torch.testing.assert_close(result["logits"], expected_logits, rtol=0, atol=1e-5)


def fake_hub():
    """HfApi.create_repo / create_commit replaced by recorders; returns (patches, uploads)."""
    uploads = {}

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            content = operation.path_or_fileobj
            uploads[operation.path_in_repo] = content if isinstance(content, bytes) else Path(content).read_bytes()
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/0")

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    create_repo_patch = mock.patch.object(HfApi, "create_repo", autospec=True, side_effect=create_repo)
    create_commit_patch = mock.patch.object(HfApi, "create_commit", autospec=True, side_effect=create_commit)
    return create_repo_patch, create_commit_patch, uploads


BENCHMARKS = [
    {"task": "LAMBADA", "dataset": "lambada_openai", "metric": "accuracy", "value": 0.7123, "split": "test"},
    {"task": "PIQA", "metric": "accuracy", "value": 0.65},
]


def test_push_uploads_the_folder_with_a_parseable_card(world_folder, tmp_path):
    push_to_hub = load_script(REPO / "scripts" / "push_to_hub.py")
    benchmarks = tmp_path / "benchmarks.json"
    benchmarks.write_text(json.dumps(BENCHMARKS))
    create_repo, create_commit, uploads = fake_hub()
    with create_repo as repo_mock, create_commit as commit_mock:
        push_to_hub.main([str(world_folder), "me/rwkv7-tiny", "--benchmarks", str(benchmarks)])
    assert repo_mock.call_count == 1 and commit_mock.call_count == 1
    assert repo_mock.call_args.args[1] == "me/rwkv7-tiny"
    assert repo_mock.call_args.kwargs["private"] is True and repo_mock.call_args.kwargs["exist_ok"] is True

    local_files = {name for name in os.listdir(world_folder)}
    assert set(uploads) == local_files
    expected = {
        "config.json",
        "model.safetensors",
        "modeling_rwkv7.py",
        "tokenizer_config.json",
        "tokenization_rwkv7.py",
    }
    assert expected <= set(uploads)
    for name in local_files - {"README.md"}:
        assert uploads[name] == (world_folder / name).read_bytes(), name

    card_text = uploads["README.md"].decode("utf-8")
    model = AutoModelForCausalLM.from_pretrained(world_folder)
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    data = ModelCard(card_text).data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"rwkv", "rwkv7"} <= set(data.tags)
    assert data.license == "apache-2.0"
    assert data.base_model == "BlinkDL/rwkv7-g1"  # from the converter's card, not repeated on the command line
    assert data.num_parameters == num_parameters == model.config.param_count()
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in data.eval_results] == [
        ("lambada_openai", "accuracy", 0.7123),
        ("PIQA", "accuracy", 0.65),
    ]
    front_matter = yaml.safe_load(card_text.split("---")[1])
    assert front_matter["library_name"] == "transformers" and front_matter["num_parameters"] == num_parameters
    assert 'from_pretrained("me/rwkv7-tiny", trust_remote_code=True)' in card_text
    assert "| LAMBADA (test) | accuracy | 0.7123 |" in card_text and "| PIQA | accuracy | 0.65 |" in card_text
    assert f"({num_parameters:,})" in card_text


def test_dry_run_prints_exactly_what_a_push_uploads(world_folder, capsys):
    push_to_hub = load_script(REPO / "scripts" / "push_to_hub.py")
    create_repo, create_commit, uploads = fake_hub()
    with create_repo as repo_mock, create_commit as commit_mock:
        push_to_hub.main([str(world_folder), "me/rwkv7-tiny", "--dry-run"])
        assert repo_mock.call_count == 0 and commit_mock.call_count == 0
        listing, card = capsys.readouterr().out.split("----- README.md -----\n")
        push_to_hub.main([str(world_folder), "me/rwkv7-tiny"])

    listed = [line.strip().split(" ")[0] for line in listing.splitlines()[1:]]
    assert sorted(listed) == sorted(uploads)
    assert card == uploads["README.md"].decode("utf-8")
    assert ModelCard(card).data.license == "apache-2.0"


def test_a_folder_without_generation_config_is_published_with_the_sampling_defaults(world_folder, tmp_path, capsys):
    folder = tmp_path / "no-generation-config"
    shutil.copytree(world_folder, folder)
    expected = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").unlink()
    push_to_hub = load_script(REPO / "scripts" / "push_to_hub.py")
    create_repo, create_commit, uploads = fake_hub()
    with create_repo, create_commit:
        push_to_hub.main([str(folder), "me/rwkv7-tiny", "--dry-run"])
        assert "  generation_config.json (the folder has none" in capsys.readouterr().out
        push_to_hub.main([str(folder), "me/rwkv7-tiny"])
    published = json.loads(uploads["generation_config.json"])
    assert published["do_sample"] is True and published["top_p"] == 0.3 and published["eos_token_id"] == [0, 261]
    assert {key: published[key] for key in expected if key != "transformers_version"} == {
        key: value for key, value in expected.items() if key != "transformers_version"
    }  # what the converter writes
    assert not (folder / "generation_config.json").exists()  # the user's folder is not written to


def test_push_refuses_a_folder_that_cannot_load_on_its_own(world_folder, tmp_path, capsys):
    push_to_hub = load_script(REPO / "scripts" / "push_to_hub.py")
    broken = tmp_path / "broken"
    shutil.copytree(world_folder, broken)
    (broken / "wkv.py").unlink()  # imported by modeling_rwkv7.py, which auto_map names
    (broken / "tokenization_rwkv7.py").unlink()
    create_repo, create_commit, _ = fake_hub()
    with create_repo as repo_mock, create_commit, pytest.raises(SystemExit) as exit_info:
        push_to_hub.main([str(broken), "me/rwkv7-tiny"])
    assert exit_info.value.code == 1 and repo_mock.call_count == 0
    message = capsys.readouterr().err
    assert "code file wkv.py is missing" in message and "code file tokenization_rwkv7.py is missing" in message


def test_converter_card_tells_how_to_load(world_folder):
    card = ModelCard.load(world_folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.base_model == "BlinkDL/rwkv7-g1"
    assert 'AutoTokenizer.from_pretrained("rwkv7-world-tiny", trust_remote_code=True)' in card.text
    tokenizer_config = json.loads((world_folder / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][0] == "tokenization_rwkv7.RWKV7Tokenizer"
    loaded = AutoTokenizer.from_pretrained(world_folder, trust_remote_code=True)
    assert loaded(TEXT)["input_ids"] == RWKV7Tokenizer()(TEXT)["input_ids"]
