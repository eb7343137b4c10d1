"""Issue 13: native code from the Hub runs only on the user's own, pinned opt-in, and the WKV operator is a
`kernels` hub layer.

- A model folder whose config.json names a kernel repo loads and runs on a machine that reports CUDA, and nothing
  fetches from the Hub (every `kernels` fetch function patched to fail the test).
- With the user's opt-in (`trust_hub_kernel` or RWKV7_HUB_KERNEL), the pinned fetch is attempted (patched: it
  "downloads" this machine's CPU build), the files are checked against metadata.json's digest before the import,
  and a tampered download is refused.
- `kernels.kernelize` with a `LocalLayerRepository` swaps the model's WKV layer for the kernel's `layers.RWKV7WKV`;
  the fla mapping (`FlaWKVRepository`) converts the layouts of fla's `chunk_rwkv7` (a stand-in computing fla's
  convention with the reference recurrence).
- transformers' own route, `from_pretrained(..., use_kernels=True, kernel_config=KernelConfig(...))`, runs the
  kernel layer from a local build or from a Hub repository pinned to a commit; a Hub entry without a commit pin is
  refused before anything is fetched, and a plain `from_pretrained` kernelizes nothing and logs nothing.
"""

import logging
import shutil
import sys
import types
from pathlib import Path

import oracle
import pytest
import torch
from helpers import relative_error
from transformers import KernelConfig

import kernels
from modeling_rwkv7 import RWKV7ForCausalLM, wkv_kernel
from modeling_rwkv7 import wkv as wkv_module
from modeling_rwkv7.conversion_mapping_rwkv7 import official_to_hf
from modeling_rwkv7.wkv import select_wkv_backend
from modeling_rwkv7.wkv_reference import random_wkv_inputs, wkv7_recurrent

REPO = Path(__file__).resolve().parents[1]
KERNEL_DIR = REPO / "kernels" / "rwkv7_wkv"
CHECKPOINT_REPO = "someone-else/rwkv7-wkv"  # what a downloaded config.json names
TRUSTED_REPO = "me/rwkv7-wkv"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FETCH_FUNCTIONS = (
    "get_kernel",
    "install_kernel",
    "get_locked_kernel",
    "load_kernel",
    "has_kernel",
    "get_kernel_variants",
)


@pytest.fixture
def clean_loader(monkeypatch):
    """No local build, no opt-in, an empty cache; every Hub fetch of `kernels` fails the test."""
    monkeypatch.setattr(wkv_kernel, "_loaded", {})
    monkeypatch.setattr(wkv_kernel, "_reported", set())
    monkeypatch.setattr(wkv_kernel, "_trusted", None)
    monkeypatch.delenv(wkv_kernel.KERNEL_PATH_ENV, raising=False)
    monkeypatch.delenv(wkv_kernel.HUB_KERNEL_ENV, raising=False)
    for name in FETCH_FUNCTIONS:
        monkeypatch.setattr(kernels, name, lambda *args, name=name, **kwargs: pytest.fail(f"kernels.{name} called"))


def random_model(seed: int, **config_overrides) -> RWKV7ForCausalLM:
    """2 layers, hidden 128 (2 heads of 64), vocab 300, random weights at a trained model's scale."""
    config, state_dict = official_to_hf(
        oracle.random_official_state_dict(vocab_size=300, hidden_size=128, num_layers=2, seed=seed)
    )
    for key, value in config_overrides.items():
        setattr(config, key, value)
    model = RWKV7ForCausalLM(config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def tokens(seed: int, batch: int = 2, seq_len: int = 37) -> torch.Tensor:
    return torch.randint(0, 300, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == wkv_kernel.__name__ and r.levelno == logging.WARNING]


# --- a checkpoint cannot choose native code ---------------------------------------------------------------------


def test_a_checkpoint_naming_a_kernel_repo_runs_without_fetching(clean_loader, monkeypatch, tmp_path, caplog):
    random_model(1, kernel_repo=CHECKPOINT_REPO).save_pretrained(tmp_path)
    assert f'"kernel_repo": "{CHECKPOINT_REPO}"' in (tmp_path / "config.json").read_text()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    model = RWKV7ForCausalLM.from_pretrained(tmp_path).eval()
    assert model.config.kernel_repo == CHECKPOINT_REPO and model.config.wkv_backend == "auto"
    ids = tokens(2)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        # what "auto" picks for CUDA tensors on this machine: the chunked form, the checkpoint's repo refused
        assert select_wkv_backend("auto", ids.shape[1], torch.device("cuda"), model.config.kernel_repo) == (
            "chunked",
            None,
        )
        logits = model(ids).logits
        expected = random_model(1, wkv_backend="recurrent")(ids).logits
    assert relative_error(logits, expected) < 1e-4
    (message,) = warnings_of(caplog)
    assert "no kernel source chosen" in message and f"kernel_repo {CHECKPOINT_REPO!r} is not fetched" in message
    assert "trust_hub_kernel(repo_id, revision)" in message and wkv_kernel.HUB_KERNEL_ENV in message

    model.config.wkv_backend = "kernel"  # forcing the kernel does not fetch either: it says how to opt in
    with pytest.raises(RuntimeError, match="no kernel source chosen .*trust_hub_kernel"):
        select_wkv_backend("kernel", ids.shape[1], torch.device("cuda"), model.config.kernel_repo)


def test_the_default_config_names_no_repo_and_old_configs_still_load(tmp_path):
    model = random_model(3)
    assert model.config.kernel_repo is None
    model.config.kernel_repo = "modeling-rwkv7/rwkv7-wkv"  # what configs written before issue 13 hold
    model.save_pretrained(tmp_path)
    assert RWKV7ForCausalLM.from_pretrained(tmp_path).config.kernel_repo == "modeling-rwkv7/rwkv7-wkv"


# --- the user's pinned opt-in -----------------------------------------------------------------------------------


@pytest.fixture
def fake_download(clean_loader, monkeypatch, kernel_variant):
    """kernels.install_kernel patched to record its arguments and return a variant directory (the CPU build unless
    the test sets `served`); CUDA reported available."""
    calls, served = [], {"variant": kernel_variant}

    def install_kernel(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return served["variant"]

    monkeypatch.setattr(kernels, "install_kernel", install_kernel)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls, served


@pytest.mark.parametrize("opt_in", ["function", "environment"])
@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_opt_in_fetches_the_pinned_commit(fake_download, monkeypatch, caplog, opt_in):
    calls, _ = fake_download
    if opt_in == "function":
        assert wkv_kernel.trust_hub_kernel(TRUSTED_REPO, COMMIT.upper()) == (TRUSTED_REPO, COMMIT, False)
    else:
        monkeypatch.setenv(wkv_kernel.HUB_KERNEL_ENV, f"{TRUSTED_REPO}@{COMMIT}")
    model = random_model(4, kernel_repo=CHECKPOINT_REPO, wkv_backend="kernel")
    ids = tokens(5, seq_len=23)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        logits = model(ids).logits  # every layer through the "downloaded" kernel
        expected = random_model(4, wkv_backend="recurrent")(ids).logits
    assert relative_error(logits, expected) < 1e-4
    assert calls == [
        (
            TRUSTED_REPO,
            {"revision": COMMIT, "trust_remote_code": [TRUSTED_REPO], "local_files_only": wkv_kernel._hub_offline()},
        )
    ]  # once, for every layer
    assert [m for m in warnings_of(caplog) if CHECKPOINT_REPO in m] == [
        f"RWKV-7 WKV: the checkpoint's kernel_repo {CHECKPOINT_REPO!r} is ignored; the trusted Hub kernel is "
        f"{TRUSTED_REPO}@{COMMIT}"
    ]


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_a_download_that_does_not_match_its_digest_is_not_imported(fake_download, monkeypatch, tmp_path, caplog):
    calls, served = fake_download
    tampered = tmp_path / served["variant"].name
    shutil.copytree(served["variant"], tampered, ignore=shutil.ignore_patterns("__pycache__"))
    with open(tampered / "layers.py", "a") as f:
        f.write("import os  # injected\n")
    served["variant"] = tampered
    monkeypatch.setattr(kernels, "get_local_kernel", lambda *a, **k: pytest.fail("a tampered variant was imported"))
    wkv_kernel.trust_hub_kernel(TRUSTED_REPO, COMMIT)
    with caplog.at_level(logging.WARNING):
        assert wkv_kernel.load_wkv_kernel(None) is None
    (message,) = warnings_of(caplog)
    assert f"the variant {tampered.name} of {TRUSTED_REPO}@{COMMIT} is not loaded" in message
    assert "do not match metadata.json's digest" in message and "layers.py" in message
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="do not match metadata.json's digest"):
        wkv_kernel.load_wkv_kernel(None, required=True)


def test_bad_opt_in_values_are_refused(clean_loader, monkeypatch):
    with pytest.raises(ValueError, match=r"revision 'main' of me/rwkv7-wkv is not a full commit hash \(40 hex"):
        wkv_kernel.trust_hub_kernel(TRUSTED_REPO, "main")
    with pytest.raises(ValueError, match=r"repo_id 'rwkv7-wkv' is not a Hub repository id '<owner>/<name>'"):
        wkv_kernel.trust_hub_kernel("rwkv7-wkv", COMMIT)
    monkeypatch.setenv(wkv_kernel.HUB_KERNEL_ENV, TRUSTED_REPO)
    with pytest.raises(ValueError, match=r"RWKV7_HUB_KERNEL='me/rwkv7-wkv' is not of the form '<repo_id>@<40"):
        wkv_kernel.load_wkv_kernel(None)
    assert wkv_kernel._trusted is None  # the refused values left no opt-in behind


# --- the kernels layer API --------------------------------------------------------------------------------------


def forbid_the_eager_wkv(monkeypatch):
    """After kernelize, the model's own WKV must not run."""
    monkeypatch.setattr(wkv_module, "wkv7", lambda *a, **k: pytest.fail("the unkernelized WKV ran"))


@pytest.mark.parametrize("mode", ["INFERENCE", "TRAINING"])
@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_kernelize_swaps_in_the_kernel_layer(clean_loader, monkeypatch, kernel_variant, mode):
    model = random_model(6, wkv_backend="recurrent").train(mode == "TRAINING")
    reference = random_model(6, wkv_backend="recurrent").train(mode == "TRAINING")
    ids = tokens(7, seq_len=29)
    mapping = {"RWKV7WKV": {"cpu": kernels.LocalLayerRepository(KERNEL_DIR, layer_name="RWKV7WKV")}}
    with kernels.use_kernel_mapping(mapping, inherit_mapping=False):
        kernels.kernelize(model, mode=getattr(kernels.Mode, mode), device="cpu")
    layer = kernels.get_local_kernel(KERNEL_DIR, backend="cpu").layers.RWKV7WKV
    assert all(block.attn.wkv.forward.__func__ is layer.forward for block in model.model.layers)
    forbid_the_eager_wkv(monkeypatch)
    logits = model(ids).logits
    monkeypatch.undo()
    expected = reference(ids).logits
    assert relative_error(logits, expected) < 1e-4
    if mode == "TRAINING":  # the kernel's backward op
        logits.square().mean().backward()
        expected.square().mean().backward()
        for (name, param), reference_param in zip(model.named_parameters(), reference.parameters()):
            assert relative_error(param.grad, reference_param.grad) < 1e-3, name


def fla_stand_in() -> types.ModuleType:
    """A module laid out like kernels-community/fla whose `ops.rwkv7.chunk_rwkv7` follows fla's convention (state
    [key, value], keyword arguments), computed with the reference recurrence."""

    def chunk_rwkv7(r, w, k, v, a, b, *, scale, initial_state, output_final_state):
        assert scale == 1.0 and output_final_state is True and w.dtype == r.dtype
        state = None if initial_state is None else initial_state.transpose(-1, -2)
        y, final_state = wkv7_recurrent(r, w, k, v, a, b, state)
        return y, final_state.transpose(-1, -2)

    package = types.ModuleType("fla_stand_in")
    package.__path__ = []
    ops = types.ModuleType("fla_stand_in.ops")
    rwkv7 = types.ModuleType("fla_stand_in.ops.rwkv7")
    rwkv7.chunk_rwkv7 = chunk_rwkv7
    package.ops, ops.rwkv7 = ops, rwkv7
    return package


def test_the_fla_mapping_converts_layouts(clean_loader, monkeypatch):
    package = fla_stand_in()
    for module in (package, package.ops, package.ops.rwkv7):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    fetched = []
    monkeypatch.setattr(wkv_kernel, "fetch_pinned_kernel", lambda hub: fetched.append(hub) or package)
    repository = wkv_kernel.FlaWKVRepository(revision=COMMIT)

    model = random_model(8, wkv_backend="recurrent")
    ids = tokens(9, seq_len=21)
    with torch.no_grad():
        expected_logits = model(ids).logits
        cache = model.init_cache(batch_size=2)
        model(ids[:, :13], cache=cache)  # leaves a non-zero state for the continuation below
        expected_continuation = model(ids[:, 13:], cache=cache).logits
    with kernels.use_kernel_mapping({"RWKV7WKV": {"cpu": repository}}, inherit_mapping=False):
        kernels.kernelize(model, mode=kernels.Mode.INFERENCE, device="cpu")
    assert fetched == [wkv_kernel.HubKernel("kernels-community/fla", COMMIT)]
    forbid_the_eager_wkv(monkeypatch)
    with torch.no_grad():
        assert relative_error(model(ids).logits, expected_logits) < 1e-4
        cache = model.init_cache(batch_size=2)
        model(ids[:, :13], cache=cache)
        assert relative_error(model(ids[:, 13:], cache=cache).logits, expected_continuation) < 1e-4

        x = torch.randn(1, 4, 2, 64)
        with pytest.raises(ValueError, match="fla's chunk_rwkv7 takes no reset mask"):
            model.model.layers[0].attn.wkv(x, -x.abs(), x, x, x, x, None, torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="revision 'v2' of kernels-community/fla is not a full commit hash"):
        wkv_kernel.FlaWKVRepository(revision="v2")


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
@pytest.mark.compile
def test_the_kernel_layer_compiles_as_one_graph(clean_loader, kernel_variant):
    """Mode.TORCH_COMPILE is accepted (`can_torch_compile`): the kernelized layer traces whole, backward included."""
    model = random_model(10, wkv_backend="recurrent")
    mapping = {"RWKV7WKV": {"cpu": kernels.LocalLayerRepository(KERNEL_DIR, layer_name="RWKV7WKV")}}
    with kernels.use_kernel_mapping(mapping, inherit_mapping=False):
        kernels.kernelize(model, mode=kernels.Mode.TRAINING | kernels.Mode.TORCH_COMPILE, device="cpu")
    layer = model.model.layers[0].attn.wkv
    *inputs, state, reset = random_wkv_inputs(2, 20, 2, 64, seed=11, reset_rate=0.2).values()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    gradients = []
    for fn in (compiled, wkv7_recurrent):
        leaves = [x.clone().requires_grad_() for x in (*inputs, state)]
        y, final_state = fn(*leaves, reset)
        (y.square().sum() + final_state.sum()).backward()
        gradients.append([y.detach(), final_state.detach()] + [x.grad for x in leaves])
    for actual, expected in zip(*gradients):
        assert relative_error(actual, expected) < 1e-4


# --- transformers' own route: from_pretrained(..., use_kernels=True, kernel_config=KernelConfig(...)) -------------


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A folder holding `random_model(12)`."""
    path = tmp_path_factory.mktemp("rwkv7")
    random_model(12).save_pretrained(path)
    return path


def runs_the_kernel_layer(model, layer) -> bool:
    return all(block.attn.wkv.forward.__func__ is layer.forward for block in model.model.layers)


@pytest.mark.parametrize("per_device", [False, True])
@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_from_pretrained_with_a_local_kernel_config(
    clean_loader, monkeypatch, kernel_variant, saved_model, per_device
):
    source = f"{KERNEL_DIR}:RWKV7WKV"
    kernel_config = KernelConfig({"RWKV7WKV": {"cpu": source} if per_device else source}, use_local_kernel=True)
    model = RWKV7ForCausalLM.from_pretrained(saved_model, use_kernels=True, kernel_config=kernel_config)
    reference = random_model(12, wkv_backend="recurrent")
    layer = kernels.get_local_kernel(KERNEL_DIR, backend="cpu").layers.RWKV7WKV
    assert model.use_kernels and model.kernels_mode == kernels.Mode.INFERENCE and runs_the_kernel_layer(model, layer)
    ids = tokens(13, seq_len=29)
    forbid_the_eager_wkv(monkeypatch)
    with torch.no_grad():
        logits = model(ids).logits
    model.train()  # transformers kernelizes again, for training
    assert model.kernels_mode == kernels.Mode.TRAINING and runs_the_kernel_layer(model, layer)
    train_logits = model(ids).logits
    monkeypatch.undo()
    with torch.no_grad():
        assert relative_error(logits, reference(ids).logits) < 1e-4
    expected = reference.train()(ids).logits
    assert relative_error(train_logits, expected) < 1e-4
    train_logits.square().mean().backward()
    expected.square().mean().backward()
    for (name, param), reference_param in zip(model.named_parameters(), reference.parameters()):
        assert relative_error(param.grad, reference_param.grad) < 1e-3, name


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.kernel_build
def test_from_pretrained_with_a_pinned_hub_kernel_config(clean_loader, monkeypatch, kernel_variant, saved_model):
    """The mapping carries the commit to `kernels` (whose fetch is patched to hand over this machine's build)."""
    requests = []

    def get_kernel(repo_id, **kwargs):
        requests.append((repo_id, kwargs["revision"], kwargs["version"], kwargs["trust_remote_code"]))
        return kernels.get_local_kernel(KERNEL_DIR, backend="cpu")

    monkeypatch.setattr(sys.modules[kernels.LayerRepository.__module__], "get_kernel", get_kernel)
    entry = (f"{TRUSTED_REPO}:RWKV7WKV", {"revision": COMMIT, "trust_remote_code": True})
    kernel_config = KernelConfig({"RWKV7WKV": entry})
    model = RWKV7ForCausalLM.from_pretrained(saved_model, use_kernels=True, kernel_config=kernel_config)
    assert requests and set(requests) == {(TRUSTED_REPO, COMMIT, None, True)}
    assert runs_the_kernel_layer(model, kernels.get_local_kernel(KERNEL_DIR, backend="cpu").layers.RWKV7WKV)
    ids = tokens(14, seq_len=23)
    with torch.no_grad():
        assert relative_error(model(ids).logits, random_model(12, wkv_backend="recurrent")(ids).logits) < 1e-4


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"RWKV7WKV": f"{TRUSTED_REPO}:RWKV7WKV"}, "does not pin me/rwkv7-wkv to a commit"),
        ({"RWKV7WKV": (f"{TRUSTED_REPO}:RWKV7WKV", {"version": 1})}, "does not pin me/rwkv7-wkv to a commit"),
        (
            {"RWKV7WKV": {"cuda": (f"{TRUSTED_REPO}:RWKV7WKV", {"revision": "main"})}},
            "revision 'main' of me/rwkv7-wkv is not a full commit hash",
        ),
        ({"RWKV7WKV": f"{KERNEL_DIR}:RWKV7WKV"}, "is not a Hub repository id .*use_local_kernel=True"),
        (
            {"RWKV7WKV": (f"{TRUSTED_REPO}:SiluAndMul", {"revision": COMMIT})},
            "is not one source of the layer 'RWKV7WKV'",
        ),
        ({"RMSNorm": f"{TRUSTED_REPO}:RMSNorm"}, r"maps \['RMSNorm'\]; RWKV-7 has one hub layer, 'RWKV7WKV'"),
    ],
)
def test_a_kernel_config_without_a_commit_pin_fetches_nothing(
    clean_loader, monkeypatch, saved_model, mapping, message
):
    monkeypatch.setattr(kernels.LayerRepository, "load", lambda self: pytest.fail("a Hub kernel was fetched"))
    with pytest.raises(ValueError, match=message):
        RWKV7ForCausalLM.from_pretrained(saved_model, use_kernels=True, kernel_config=KernelConfig(mapping))


@pytest.mark.parametrize("use_kernels", [None, True])
def test_a_plain_from_pretrained_kernelizes_nothing_and_logs_nothing(clean_loader, saved_model, caplog, use_kernels):
    with caplog.at_level(logging.WARNING):
        model = RWKV7ForCausalLM.from_pretrained(saved_model, **({} if use_kernels is None else {"use_kernels": True}))
        model.train().eval()
    assert [record.getMessage() for record in caplog.records] == []
    assert not model.use_kernels and model.kernel_config is None
    assert all(block.attn.wkv.forward.__func__ is wkv_module.RWKV7WKV.forward for block in model.model.layers)
