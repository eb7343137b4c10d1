"""The one dispatch point (`dispatch_rwkv7`): `config.implementation` forces any op's implementation and every choice
gives the eager reference's results; "auto" takes the native decoding ops where they exist and says once why not
where they do not (no compiler, a remote-code folder without the package); measured decisions are stored per
machine, so a fresh process reads them instead of timing candidates."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import default_path, relative_error, state_errors
from helpers import eager_model as random_model
from helpers import random_tokens as tokens_for

from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM, dispatch_rwkv7

REPO = Path(__file__).resolve().parents[1]
REFERENCE = {"wkv": "recurrent", "projection": "linear", "decode": "eager"}


def prompt_then_steps(model, tokens: torch.Tensor, prompt: int):
    """Logits [batch, seq_len, vocab] of a prompt forward then one-token steps, and the final cache."""
    with torch.no_grad():
        output = model(tokens[:, :prompt], cache=model.init_cache(batch_size=tokens.shape[0]))
        logits, cache = [output.logits], output.cache
        for t in range(prompt, tokens.shape[1]):
            logits.append(model(tokens[:, t : t + 1], cache=cache).logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize(
    "forced",
    [
        {"decode": "native"},
        {"decode": "eager"},
        {"wkv": "chunked"},
        {"wkv": "recurrent"},
        {"projection": "linear"},
        {"projection": "row_blocks"},
        {},
    ],
    ids=lambda forced: ",".join(f"{op}={name}" for op, name in forced.items()) or "auto",
)
def test_forcing_an_implementation_gives_the_reference_results(forced, tmp_path):
    """A 40-token prompt (long enough for the chunked WKV) and 6 decoding steps, batch 2, with each op forced
    through `from_pretrained(..., implementation=...)`: the logits and every state tensor equal those of the
    all-reference model (per-token WKV, F.linear, eager decoding) to float32 rounding (5e-5 of the largest logit:
    the chunked WKV sums 40 tokens in another order; measured up to 1.3e-5); the config says what was forced."""
    random_model(seed=7).save_pretrained(tmp_path)
    reference = RWKV7ForCausalLM.from_pretrained(tmp_path, implementation=REFERENCE)
    model = RWKV7ForCausalLM.from_pretrained(tmp_path, implementation=forced)
    assert model.config.implementation == {**{op: "auto" for op in REFERENCE}, **forced}
    tokens = tokens_for(2, 46, seed=8)
    expected, expected_cache = prompt_then_steps(reference, tokens, prompt=40)
    actual, actual_cache = prompt_then_steps(model, tokens, prompt=40)
    assert actual.shape == expected.shape == (2, 46, model.config.vocab_size)
    assert relative_error(actual, expected) <= 5e-5
    assert max(state_errors(actual_cache, expected_cache).values()) <= 5e-5


def test_set_implementation_switches_at_run_time_and_refuses_unknown_names():
    """model.set_implementation(...) writes config.implementation and the next call follows it ("auto" gives an
    op back); unknown ops or names, and a product that cannot multiply the weight, are refused by name."""
    model = default_path(random_model(seed=9))
    model.set_implementation(projection="row_blocks", wkv="chunked")
    assert model.config.implementation == {"wkv": "chunked", "projection": "row_blocks", "decode": "auto"}
    assert model.lm_head.forced_product == "row_blocks"
    model.set_implementation(projection="auto")
    assert model.lm_head.forced_product is None
    with pytest.raises(ValueError, match=r"implementation\['decode'\]='magic' is not one of"):
        model.set_implementation(decode="magic")
    with pytest.raises(ValueError, match="unknown op 'attention'"):
        RWKV7Config(implementation={"attention": "eager"})
    model.set_implementation(projection="int8_rows")
    with pytest.raises(ValueError, match=r"'int8_rows' cannot multiply a dense weight"):
        model(torch.zeros(1, 1, dtype=torch.long))


def test_older_configs_wkv_backend_is_the_wkv_implementation():
    """`wkv_backend` (older configs, and code that set it) reads and writes implementation["wkv"]."""
    config = RWKV7Config(vocab_size=50, hidden_size=64, num_hidden_layers=1, head_dim=32, wkv_backend="chunked")
    assert config.implementation["wkv"] == config.wkv_backend == "chunked"
    config.wkv_backend = "recurrent"
    assert config.implementation == {"wkv": "recurrent", "projection": "auto", "decode": "auto"}
    assert "wkv_backend" not in config.to_dict()
    with pytest.raises(ValueError, match="'fast' is not one of"):
        RWKV7Config(wkv_backend="fast")


def test_past_key_values_is_still_taken_as_the_cache():
    """transformers 5.25 names the state `cache`; the old keyword still works (with transformers' deprecation
    warning) and gives the same logits."""
    model = random_model(seed=10)
    tokens = tokens_for(1, 5, seed=11)
    with torch.no_grad():
        new = model(tokens, cache=model.init_cache(1)).logits
        old = model(tokens, past_key_values=model.init_cache(1)).logits
    assert torch.equal(new, old)


@pytest.fixture
def fresh_native_state(monkeypatch, tmp_path):
    """No native ops loaded or being built in this process, and an empty kernel cache ($RWKV7_CACHE)."""
    monkeypatch.setattr(dispatch_rwkv7, "_native", {"module": None, "build": None, "unavailable": None})
    monkeypatch.setenv("RWKV7_CACHE", str(tmp_path / "cache"))


def native_warnings(caplog) -> list:
    return [
        r.getMessage() for r in caplog.records if r.name == dispatch_rwkv7.__name__ and r.levelno >= logging.WARNING
    ]


def test_without_a_compiler_decoding_runs_the_eager_model_and_says_so_once(fresh_native_state, monkeypatch, caplog):
    """A machine where the native ops cannot be compiled: the build started at the first decoding step fails,
    one warning says so (with the compiler's last words), and every step decodes through the eager modules with
    the eager results; forcing native then raises with the same reason."""
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    model = default_path(random_model(seed=12))
    tokens = tokens_for(1, 6, seed=13)
    with caplog.at_level(logging.WARNING):
        assert dispatch_rwkv7.native_ops(wait=True) is None
        auto, _ = prompt_then_steps(model, tokens, prompt=2)
    warnings = native_warnings(caplog)
    assert len(warnings) == 2, warnings  # "building in the background", then the failure
    assert "failed" in warnings[1] and "eager" in warnings[1]
    model.set_implementation(decode="eager")
    eager, _ = prompt_then_steps(model, tokens, prompt=2)
    assert torch.equal(auto, eager)
    model.set_implementation(decode="native")
    with pytest.raises(RuntimeError, match="cannot run: building the native CPU decoding ops failed"):
        prompt_then_steps(model, tokens, prompt=2)


_REMOTE_CODE = r"""
import json, logging, sys, torch
sys.modules["modeling_rwkv7"] = None  # an environment without the package: only the folder's own Python files
from transformers import AutoModelForCausalLM
messages = []
handler = logging.Handler()
handler.emit = lambda record: messages.append(record.getMessage()) if "dispatch_rwkv7" in record.name else None
logging.getLogger("transformers_modules").addHandler(handler)
model = AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code=True).eval()
tokens = torch.randint(0, 1000, (1, 6), generator=torch.Generator().manual_seed(15))
logits = []
for implementation in ("auto", "eager"):
    model.set_implementation(decode=implementation)
    with torch.no_grad():
        cache = model(tokens[:, :2], cache=model.init_cache(1)).cache
        logits.append(torch.cat([model(tokens[:, t : t + 1], cache=cache).logits for t in range(2, 6)], 1))
print(json.dumps({{"module": type(model).__module__, "messages": messages,
                   "difference": float((logits[0] - logits[1]).abs().max())}}))
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_remote_code_folder_decodes_eagerly_and_says_how_to_get_the_native_path(tmp_path):
    """A saved folder loaded with trust_remote_code=True where the package is not installed runs its own copy of
    the Python files, which has no kernel sources: its default decoding is the eager modules' (the same logits as
    forcing eager) and it says once how to get the native path."""
    random_model(seed=14).save_pretrained(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", _REMOTE_CODE.format(folder=str(tmp_path))], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = json.loads(result.stdout.strip().splitlines()[-1])
    assert run["module"].startswith("transformers_modules."), run
    assert len(run["messages"]) == 1 and "pip install modeling_rwkv7" in run["messages"][0], run
    assert run["difference"] == 0.0


_FIRST_GENERATE = r"""
import json, sys, time, torch
from modeling_rwkv7 import RWKV7ForCausalLM, linear_rwkv7, measured_rwkv7, wkv
from pathlib import Path
torch.set_num_threads(2)
measured_rwkv7.decisions_path = lambda: Path({decisions!r})
timed = []
for module, name in ((linear_rwkv7, "measure_few_row_products"), (wkv, "measure_wkv_choice")):
    original = getattr(module, name)
    setattr(module, name, lambda *args, _original=original, **kwargs: timed.append(1) or _original(*args, **kwargs))
model = RWKV7ForCausalLM.from_pretrained({folder!r})
ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
seconds = []
for _ in range(2):
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=8, do_sample=False)
    seconds.append(time.perf_counter() - start)
print(json.dumps({{"timed": len(timed), "seconds": seconds}}))
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_fresh_process_reads_the_stored_decisions_instead_of_timing(tmp_path):
    """Two processes, each generating twice from a 6-token prompt (few-row products and a WKV decision to make):
    the first times candidates and stores its decisions; the second times none, and its first generate() costs
    less than 1 s more than its second."""
    random_model(seed=16).save_pretrained(tmp_path / "model")
    decisions = tmp_path / "decisions.json"
    script = _FIRST_GENERATE.format(decisions=str(decisions), folder=str(tmp_path / "model"))
    runs = []
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "2"},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
    assert runs[0]["timed"] > 0 and runs[1]["timed"] == 0, runs
    stored = json.loads(decisions.read_text())
    assert stored["machine"]["threads"] == 2 and stored["few_row"] and stored["wkv"]
    first, second = runs[1]["seconds"]
    assert first - second < 1.0, runs[1]
