import shutil

import oracle  # (sets RWKV_V7_ON before anything imports `rwkv`; tests/ is on the path: the root conftest.py)
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def native_decoding_ops():
    """The package's native CPU decoding ops, built (once per machine; the test command's install builds them)
    before any test, so that "auto" decoding takes the same path in every test."""
    from modeling_rwkv7.dispatch_rwkv7 import native_ops

    ops = native_ops(wait=True)
    assert ops is not None, "the native CPU decoding ops could not be built (see the warning above)"
    return ops


@pytest.fixture(scope="session")
def installed_package(tmp_path_factory):
    """A fresh non-editable install of the package (`helpers.install_package`, once per test run, shared by the
    xdist workers) and a working folder of this worker outside the repository: (install folder, working folder).
    Run things in it with `helpers.installed_environment`."""
    from helpers import install_package, run_lock

    with run_lock(tmp_path_factory, "installed") as shared:
        folder = shared / "installed"
        if not (folder / "complete").exists():
            shutil.rmtree(folder, ignore_errors=True)  # an install that failed in another worker
            folder.mkdir()
            install_package(folder)
            (folder / "complete").touch()
    return folder / "site-packages", tmp_path_factory.mktemp("work")


@pytest.fixture(autouse=True)
def fresh_decisions(tmp_path, monkeypatch):
    """Each test measures its own decisions: none stored on this machine by another test or an earlier run."""
    from modeling_rwkv7 import measured_rwkv7

    monkeypatch.setattr(measured_rwkv7, "decisions_path", lambda: tmp_path / "decisions" / "machine.json")


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory):
    """A random official-format RWKV-7 checkpoint (3 layers, hidden 256, 4 heads, vocab 1000) on disk, its state
    dict, and the `rwkv` package's model loaded from it."""
    state_dict = oracle.random_official_state_dict(vocab_size=1000, hidden_size=256, num_layers=3, seed=1234)
    path = oracle.write_official_checkpoint(state_dict, tmp_path_factory.mktemp("official"))
    return state_dict, path, oracle.load_oracle(path)


@pytest.fixture(scope="session")
def converted_model(official_checkpoint):
    """Our RWKV7ForCausalLM holding the weights of `official_checkpoint` (eval mode, fp32)."""
    from modeling_rwkv7 import RWKV7ForCausalLM
    from modeling_rwkv7.conversion_mapping_rwkv7 import official_to_hf

    config, state_dict = official_to_hf(official_checkpoint[0])
    model = RWKV7ForCausalLM(config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


@pytest.fixture
def forced_product(monkeypatch):
    """Returns `force(name, [(in, out), ...], dtype)`: from then on every few-row decision of this process for those
    weights (dtype torch.int8 for torchao int8 weights), eager (and compiled, unless `compiled_name` says
    otherwise), reads `name` (no measurement)."""
    from modeling_rwkv7 import linear_rwkv7
    from modeling_rwkv7.linear_rwkv7 import FewRowChoice

    monkeypatch.setattr(linear_rwkv7, "few_row_choices", {})
    monkeypatch.setattr(linear_rwkv7, "_choices_threads", [torch.get_num_threads()])

    def force(name: str, shapes, dtype=torch.float32, compiled_name=None):
        for in_features, out_features, *_ in shapes:
            for bucket in (1, 2, 4, 8, 16):
                for compiled, product in ((False, name), (True, compiled_name or name)):
                    key = (out_features, in_features, dtype, bucket, compiled)
                    linear_rwkv7.few_row_choices[key] = FewRowChoice(product, {}, torch.get_num_threads(), 0.0)

    return force
