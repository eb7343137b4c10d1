"""lm-evaluation-harness scores a saved RWKV-7 folder through its own code (trust_remote_code), offline, on tasks
defined from local JSONL files; its log-likelihoods are those our model computes directly.

The README's command, run here from a fresh install of the eval extra (`helpers.installed_environment`):

    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 lm_eval --model hf \\
        --model_args pretrained=<folder>,trust_remote_code=True,dtype=float32,softmax_dtype=float64 \\
        --tasks rwkv7_local_choice,rwkv7_local_rolling --include_path <folder with the task YAMLs> \\
        --device cpu --batch_size 4 --output_path <results> --log_samples
"""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import installed_environment

from modeling_rwkv7 import RWKV7ForCausalLM, RWKV7Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join(REPO, "models", "rwkv7-tiny-default")
CORPUS = os.path.join(REPO, "data", "shakespeare", "validation.jsonl")

CHOICE_TASK = """task: rwkv7_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

ROLLING_TASK = """task: rwkv7_local_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
"""


def write_tasks(folder, seed: int) -> None:
    """Two tasks on random held-out Shakespeare lines: which of 4 lines follows a line (one is the true next line),
    and the log-likelihood of 3 consecutive lines."""
    with open(CORPUS) as handle:
        lines = [line.strip() for row in handle for line in json.loads(row)["text"].split("\n")]
    lines = [line for line in lines if len(line) > 10]
    generator = torch.Generator().manual_seed(seed)

    def draw(n: int) -> int:
        return torch.randint(n, (1,), generator=generator).item()

    with open(folder / "choice.jsonl", "w") as handle:
        for _ in range(4):
            line, answer = draw(len(lines) - 1), draw(4)
            others = [lines[draw(len(lines))] for _ in range(3)]
            choices = others[:answer] + [lines[line + 1]] + others[answer:]
            handle.write(json.dumps({"question": lines[line], "choices": choices, "answer": answer}) + "\n")
    with open(folder / "rolling.jsonl", "w") as handle:
        for _ in range(2):
            start = draw(len(lines) - 3)
            handle.write(json.dumps({"text": "\n".join(lines[start : start + 3])}) + "\n")
    (folder / "choice.yaml").write_text(CHOICE_TASK.format(data=folder / "choice.jsonl"))
    (folder / "rolling.yaml").write_text(ROLLING_TASK.format(data=folder / "rolling.jsonl"))


@pytest.fixture(scope="module")
def lm_eval_run(installed_package, tmp_path_factory):
    """The shipped default model saved (float32, with its code and tokenizer) to a folder, and lm_eval's results:
    (aggregated results, per-task samples, the HF modules cache)."""
    work = tmp_path_factory.mktemp("lm_eval")
    folder, tasks, results, modules = work / "rwkv7-tiny", work / "tasks", work / "results", work / "modules"
    RWKV7ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).save_pretrained(folder)
    RWKV7Tokenizer.register_for_auto_class("AutoTokenizer")
    RWKV7Tokenizer().save_pretrained(folder)
    tasks.mkdir()
    write_tasks(tasks, seed=11)

    target, _ = installed_package
    env = {
        **installed_environment(target, "eval"),
        "HOME": str(work),
        "HF_HOME": str(work / "hf"),
        "HF_MODULES_CACHE": str(modules),
        "OMP_NUM_THREADS": "2",
    }
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={folder},trust_remote_code=True,dtype=float32,softmax_dtype=float64",
        "--tasks",
        "rwkv7_local_choice,rwkv7_local_rolling",
        "--include_path",
        str(tasks),
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--output_path",
        str(results),
        "--log_samples",
    ]
    done = subprocess.run(command, cwd=str(work), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    (results_file,) = glob.glob(str(results / "**" / "results_*.json"), recursive=True)
    with open(results_file) as handle:
        aggregated = json.load(handle)["results"]
    samples = {}
    for task in ("rwkv7_local_choice", "rwkv7_local_rolling"):
        (samples_file,) = glob.glob(str(results / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        with open(samples_file) as handle:
            samples[task] = sorted((json.loads(line) for line in handle), key=lambda sample: sample["doc_id"])
    return aggregated, samples, modules


@pytest.fixture(scope="module")
def ours():
    return RWKV7ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval(), RWKV7Tokenizer()


def log_likelihood(model, ids: list[int], first_target: int) -> tuple[float, bool]:
    """sum of log p(ids[t] | ids[:t]) for t >= first_target (float64 softmax), and whether every one of those
    tokens is the most likely one."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids[:-1]])).logits[0, first_target - 1 :].double()
    targets = torch.tensor(ids[first_target:])
    log_probs = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    return log_probs.sum().item(), bool((logits.argmax(-1) == targets).all())


@pytest.mark.slow
@pytest.mark.subprocess
def test_lm_eval_ran_the_folders_own_code(lm_eval_run):
    _, _, modules = lm_eval_run
    copied = {os.path.basename(path) for path in glob.glob(str(modules / "**" / "*.py"), recursive=True)}
    assert {"modeling_rwkv7.py", "configuration_rwkv7.py", "tokenization_rwkv7.py", "wkv.py"} <= copied


@pytest.mark.slow
@pytest.mark.subprocess
def test_multiple_choice_log_likelihoods_equal_our_own(lm_eval_run, ours):
    aggregated, samples, _ = lm_eval_run
    model, tokenizer = ours
    correct = []
    for sample in samples["rwkv7_local_choice"]:
        doc = sample["doc"]
        assert len(sample["resps"]) == len(doc["choices"]) == 4
        scores = []
        for choice, ((harness_ll, harness_greedy),) in zip(doc["choices"], sample["resps"]):
            # lm_eval's convention: the continuation is " " + choice, tokenized with the context then split off it
            context_ids = tokenizer(doc["question"])["input_ids"]
            whole = tokenizer(doc["question"] + " " + choice)["input_ids"]
            assert whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids)
            expected_ll, expected_greedy = log_likelihood(model, whole, len(context_ids))
            assert abs(float(harness_ll) - expected_ll) <= 1e-5, (choice, harness_ll, expected_ll)
            assert (harness_greedy == "True") == expected_greedy
            scores.append(expected_ll)
        correct.append(float(max(range(4), key=scores.__getitem__) == doc["answer"]))
        assert sample["acc"] == correct[-1]
    assert aggregated["rwkv7_local_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


@pytest.mark.slow
@pytest.mark.subprocess
def test_rolling_log_likelihoods_equal_our_own(lm_eval_run, ours):
    _, samples, _ = lm_eval_run
    model, tokenizer = ours
    assert len(samples["rwkv7_local_rolling"]) == 2
    for sample in samples["rwkv7_local_rolling"]:
        # one window (the text is far shorter than lm_eval's 2048-token default), after the end-of-text token
        ids = [tokenizer.eos_token_id] + tokenizer(sample["doc"]["text"])["input_ids"]
        expected_ll, _ = log_likelihood(model, ids, 1)
        (harness_ll,) = sample["resps"][0]
        assert abs(float(harness_ll) - expected_ll) <= 1e-5, (harness_ll, expected_ll)
