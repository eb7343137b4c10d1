"""What several test files share (in the manner of fla's tests/ops/utils.py): the one model factory (a small model
at a trained model's scale), token-by-token decoding, the one closeness measure and its assertions for tensors,
states and WKV results, loading a repository script as a module, a lock for the pytest-xdist workers, and a fresh
non-editable install seen with one README extra's dependencies only."""

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM
from modeling_rwkv7.cache_rwkv7 import STATE_NAMES, RWKV7Cache

__all__ = [
    "STATE_NAMES",
    "accelerate_launch",
    "VOCAB",
    "WKV_INPUT_NAMES",
    "assert_close",
    "assert_states_close",
    "assert_wkv_close",
    "decode",
    "default_path",
    "eager_model",
    "install_package",
    "installed_environment",
    "load_script",
    "random_model",
    "random_tokens",
    "relative_error",
    "run_lock",
    "state_errors",
    "trained_scale_",
    "wkv_outputs_and_grads",
]

VOCAB = 1000


def trained_scale_(model: RWKV7ForCausalLM) -> RWKV7ForCausalLM:
    """Random weights at a trained model's scale, in place (the official init leaves the output projections and
    the LoRAs' first layers at zero, which would hide the recurrence): every matrix ~ 1/sqrt(in), mixes in (0, 1),
    decay biases across their range. Returns the model in eval mode."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embeddings" not in name:
                param.normal_(0, param.shape[1] ** -0.5)
            elif "x_" in name:
                param.uniform_(0, 1)
            elif name.endswith("w_lora.lora.2.bias"):
                param.uniform_(-4, 2)
    return model.eval()


def random_model(seed: int, cls=RWKV7ForCausalLM, **config_overrides):
    """The tests' model: `cls` (RWKV7ForCausalLM, RWKV7Model, ...) of 2 layers, hidden 128, 2 heads of 64 and a
    vocabulary of VOCAB (any config field can be overridden), with random weights at a trained model's scale
    (`trained_scale_`, after `torch.manual_seed(seed)`), in eval mode."""
    config = dict(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, head_dim=64, intermediate_size=512)
    torch.manual_seed(seed)
    return trained_scale_(cls(RWKV7Config(**{**config, **config_overrides})))


def eager_model(seed: int) -> RWKV7ForCausalLM:
    """`random_model(seed)` decoding through its eager modules: the reference of the decoding paths."""
    model = random_model(seed)
    model.set_implementation(decode="eager")
    return model


def default_path(model: RWKV7ForCausalLM) -> RWKV7ForCausalLM:
    """`model` decoding as a plain call does by default ("auto": the native ops on CPU), in place."""
    model.set_implementation(decode="auto")
    return model


def random_tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    """Token ids [batch, length] of the VOCAB-token models, from their own generator."""
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode(step, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Feed `tokens` [batch, n] one at a time through `step` with `cache`; returns the logits [batch, n, VOCAB]."""
    logits = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            output = step(tokens[:, t : t + 1], cache=cache)
            assert output.logits.shape == (tokens.shape[0], 1, VOCAB)
            assert output.cache is cache
            logits.append(output.logits)
    return torch.cat(logits, dim=1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor, scale_floor: float = 1e-6) -> float:
    """max |actual - expected| / max(max |expected|, scale_floor), in float64, after checking that the shapes agree
    and that `actual` is finite. The one closeness measure of the tests (a floor of 1 for values of order one whose
    expected maximum may be tiny or zero, such as gradients)."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), "non-finite values"
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(scale_floor)).item()


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, tol: float, name: str = "", scale_floor: float = 1e-6
) -> None:
    """`relative_error(actual, expected, scale_floor) <= tol`, naming `name` and the error when it is not."""
    error = relative_error(actual, expected, scale_floor)
    assert error <= tol, f"{name}: max abs error {error:.3g} of the largest expected magnitude > {tol:g}"


WKV_INPUT_NAMES = ("r", "log_decay", "k", "v", "a", "b")  # the WKV operator's tensor inputs, in its order


def wkv_outputs_and_grads(op, inputs: dict, initial_state=None, reset=None, **kwargs):
    """y, the final state, and {name: gradient} of a fixed random projection of both with respect to each of the
    WKV_INPUT_NAMES tensors of `inputs` (a `random_wkv_inputs` dict) and to `initial_state` where there is one."""
    leaves = {name: inputs[name].detach().clone().requires_grad_() for name in WKV_INPUT_NAMES}
    if initial_state is not None:
        leaves["initial_state"] = initial_state.detach().clone().requires_grad_()
    y, final_state = op(*(leaves[name] for name in WKV_INPUT_NAMES), leaves.get("initial_state"), reset, **kwargs)
    generator = torch.Generator().manual_seed(7)
    grad_y = torch.randn(y.shape, generator=generator).to(y.dtype)
    grad_state = torch.randn(final_state.shape, generator=generator)
    grads = torch.autograd.grad([y, final_state], list(leaves.values()), [grad_y, grad_state])
    return y, final_state, dict(zip(leaves, grads))


def assert_wkv_close(actual, expected, tol: float) -> None:
    """Two `wkv_outputs_and_grads` results agree within `tol` (values of order one: a scale floor of 1)."""
    assert_close(actual[0], expected[0], tol, "y", scale_floor=1.0)
    assert_close(actual[1], expected[1], tol, "final state", scale_floor=1.0)
    assert actual[2].keys() == expected[2].keys()
    for name in expected[2]:
        assert_close(actual[2][name], expected[2][name], tol, f"grad of {name}", scale_floor=1.0)


def state_errors(actual: RWKV7Cache, expected: RWKV7Cache, scale_floor: float = 1e-6, same_dtype: bool = True) -> dict:
    """{(layer, name): `relative_error`} for every state tensor, after checking the shapes (and, `same_dtype`, the
    dtypes: a cache of another dtype is compared in float64 too)."""
    assert len(actual.layers) == len(expected.layers)
    errors = {}
    for layer_idx, (actual_layer, expected_layer) in enumerate(zip(actual.layers, expected.layers)):
        for name in STATE_NAMES:
            a, e = getattr(actual_layer, name), getattr(expected_layer, name)
            what = f"layer {layer_idx} {name}: {tuple(a.shape)} {a.dtype} vs {tuple(e.shape)} {e.dtype}"
            assert a.shape == e.shape and (a.dtype == e.dtype or not same_dtype), what
            errors[layer_idx, name] = relative_error(a, e, scale_floor)
    return errors


def assert_states_close(actual: RWKV7Cache, expected: RWKV7Cache, tol: float, scale_floor: float = 1e-6) -> None:
    """Every state tensor within `tol` (`state_errors`), and the same number of tokens seen."""
    errors = state_errors(actual, expected, scale_floor)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"state {worst}: relative error {errors[worst]:.3g} > {tol:g}"
    assert int(actual.seen_tokens) == int(expected.seen_tokens), (actual.seen_tokens, expected.seen_tokens)


# --- a fresh non-editable install, seen with only the dependencies one README extra installs ----------------------

REPO = Path(__file__).resolve().parents[1]

# Run at start-up by the interpreter of `installed_environment` (a sitecustomize.py on its PYTHONPATH): top-level
# modules of distributions outside the allowed set are not found, as in an environment where they are not installed.
_ONLY_ALLOWED_DISTRIBUTIONS = """
import importlib.machinery, importlib.metadata, json, os, re, sys

_allowed = set(json.loads(os.environ["RWKV7_TEST_ALLOWED_DISTRIBUTIONS"]))
_owners = importlib.metadata.packages_distributions()


def _not_installed(name):
    owners = [re.sub(r"[-_.]+", "-", owner).lower() for owner in _owners.get(name, ())]
    return bool(owners) and not any(owner in _allowed for owner in owners)


class _OnlyAllowedDistributions:
    def find_spec(self, name, path=None, target=None):
        if path is None and _not_installed(name):
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    def __getattr__(self, attribute):
        return getattr(importlib.machinery.PathFinder, attribute)


sys.meta_path[:] = [
    _OnlyAllowedDistributions() if finder is importlib.machinery.PathFinder else finder for finder in sys.meta_path
]
"""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distribution_closure(distribution, extras: set[str]) -> set[str]:
    """Canonical names of `distribution`, of what it requires with `extras`, and so on down (what `pip install`
    of it would bring, as far as this environment has those distributions)."""
    from packaging.requirements import Requirement

    seen, todo = set(), [(distribution, extras)]
    while todo:
        dist, wanted = todo.pop()
        name = _canonical(dist.metadata["Name"])
        key = (name, frozenset(wanted))
        if key in seen:
            continue
        seen.add(key)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker and not any(requirement.marker.evaluate({"extra": e}) for e in wanted | {""}):
                continue
            required = distribution if _canonical(requirement.name) == name else None
            try:
                required = required or importlib.metadata.distribution(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                continue  # not installed here: whatever needs it fails, as it would after that install
            todo.append((required, set(requirement.extras)))
    return {name for name, _ in seen}


def load_script(path) -> ModuleType:
    """A script of the repository (scripts/, the kernel's benchmarks/) imported from its file as a module."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"rwkv7_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def run_lock(tmp_path_factory, name: str):
    """A lock held by one pytest-xdist worker at a time; yields the folder the workers of this test run share (the
    session's own temporary folder without xdist)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    with FileLock(shared / f"{name}.lock"):
        yield shared


def install_package(work: Path) -> Path:
    """`pip install --no-deps --target` of a copy of the sources (what a fresh clone's `pip install .` puts in
    site-packages); returns the install folder."""
    source = work / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
    for folder in ("modeling_rwkv7", "kernels"):  # modeling_rwkv7/kernel links to kernels/rwkv7_wkv
        shutil.copytree(REPO / folder, source / folder, symlinks=True, ignore=ignore)
    target = work / "site-packages"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet"]
    done = subprocess.run(
        [*command, "--target", str(target), str(source)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    shutil.rmtree(source)
    (work / "startup").mkdir()
    (work / "startup" / "sitecustomize.py").write_text(_ONLY_ALLOWED_DISTRIBUTIONS)
    return target


def installed_environment(target: Path, extra: str = "") -> dict:
    """Environment variables under which a Python process imports the package from `target` and sees only the
    distributions that `pip install ".[extra]"` (or `pip install .` for "") brings; offline."""
    (ours,) = importlib.metadata.distributions(path=[str(target)], name="modeling_rwkv7")
    allowed = distribution_closure(ours, {extra} if extra else set()) | {"pip", "setuptools"}
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target.parent / "startup"), str(target)]),
        "PATH": os.pathsep.join([str(target / "bin"), os.environ["PATH"]]),
        "RWKV7_TEST_ALLOWED_DISTRIBUTIONS": json.dumps(sorted(allowed)),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }


def accelerate_launch(launch_options: list[str], script, script_options: list[str], cwd, env: dict):
    """`accelerate launch` of `script` on one machine, without mixed precision or dynamo, one thread per process,
    in `env` (the environment it runs in: an install's, or this checkout's)."""
    command = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"),
        "launch",
        *launch_options,
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        *script_options,
    ]
    env = {**env, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=str(cwd))
