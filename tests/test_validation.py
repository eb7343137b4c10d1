"""Issue 22: nothing silent, nothing run unasked. Every bad input below raises an error that names the value and what
was expected, or follows a documented rule (checked against an independent computation); Hub code, remote code and
uploads happen only on the user's explicit opt-in."""

import json
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from helpers import load_script, random_model
from huggingface_hub import HfApi
from huggingface_hub.hf_api import RepoUrl
from safetensors.torch import load_file, save_file

import kernels
from modeling_rwkv7 import RWKV7Cache, RWKV7Config, RWKV7ForCausalLM, RWKV7Model, wkv_kernel

REPO = Path(__file__).resolve().parent.parent
VOCAB = 50


# 2 layers of 2 heads of 32; the per-token WKV recurrence (no timing of the chunked form on first use)
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, head_dim=32, intermediate_size=128, wkv_backend="recurrent"
)


def tiny_config(**overrides) -> RWKV7Config:
    return RWKV7Config(**{**TINY, **overrides})


@pytest.fixture(scope="module")
def model() -> RWKV7ForCausalLM:
    return random_model(0, **TINY)


def token_ids(batch: int = 2, seq_len: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


# --- caches ------------------------------------------------------------------------------------------------------


def test_a_non_float_cache_is_refused(model):
    with pytest.raises(TypeError, match=r"shift states of torch\.int64; expected .*floating-point shift states"):
        model(token_ids(), cache=RWKV7Cache(model.config, 2, dtype=torch.int64))


def test_a_cache_in_another_dtype_than_init_cache_makes_is_refused(model):
    ids = token_ids()
    with torch.no_grad():
        expected = model(ids, cache=model.init_cache(2)).logits
        bf16_cache = RWKV7Cache(model.config, 2, dtype=torch.bfloat16)
        refused = r"shift states in torch\.bfloat16, but the model computes in torch\.float32: make the cache"
        with pytest.raises(ValueError, match=refused):
            model(ids, cache=bf16_cache)
        # the way out the message names: the converted cache gives init_cache's logits
        converted = bf16_cache.to(dtype=torch.float32)
        torch.testing.assert_close(model(ids, cache=converted).logits, expected, rtol=0, atol=0)

    torch.manual_seed(0)
    narrow = random_model(0, **TINY, wkv_state_dtype="bfloat16")
    with torch.no_grad():
        assert narrow(ids, cache=narrow.init_cache(2)).logits.isfinite().all()
        with pytest.raises(ValueError, match=r"WKV state in torch\.float32, but .*wkv_state_dtype is 'bfloat16'"):
            narrow(ids, cache=RWKV7Cache(model.config, 2))


def write_state(path, tensors: dict, **metadata_changes) -> None:
    metadata = {
        "format": "rwkv7-state",
        "num_hidden_layers": "2",
        "num_heads": "2",
        "head_dim": "32",
        "hidden_size": "64",
        "seen_tokens": "5",
    }
    metadata.update(metadata_changes)
    save_file(tensors, path, metadata={key: value for key, value in metadata.items() if value is not None})


@pytest.fixture
def saved_state(model, tmp_path) -> dict:
    """The tensors of a state that has read 5 tokens."""
    cache = model.init_cache(2)
    with torch.no_grad():
        model(token_ids(), cache=cache)
    cache.save(tmp_path / "state.safetensors")
    return load_file(tmp_path / "state.safetensors")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("seen_tokens", "-7", "metadata seen_tokens='-7' is not an integer >= 0"),
        ("seen_tokens", "x", "metadata seen_tokens='x' is not an integer >= 0"),
        ("seen_tokens", None, "metadata lacks 'seen_tokens'"),
        ("head_dim", None, "metadata lacks 'head_dim'"),
        ("num_heads", "0", "metadata num_heads='0' is not an integer >= 1"),
        ("num_hidden_layers", "2.0", "metadata num_hidden_layers='2.0' is not an integer >= 1"),
    ],
)
def test_bad_state_metadata_is_refused_naming_file_and_field(saved_state, tmp_path, field, value, message):
    path = tmp_path / "bad.safetensors"
    write_state(path, saved_state, **{field: value})
    with pytest.raises(ValueError, match=f"{path}: .*{message}"):
        RWKV7Cache.load(path)


def test_bad_state_tensors_are_refused(model, saved_state, tmp_path):
    path = tmp_path / "bad.safetensors"
    write_state(path, {key: tensor.long() for key, tensor in saved_state.items()})
    with pytest.raises(TypeError, match=r"holds a WKV state of torch\.int64 and shift states of torch\.int64"):
        RWKV7Cache.load(path)

    write_state(path, {**saved_state, "layers.1.ffn_shift_state": saved_state["layers.1.ffn_shift_state"].half()})
    with pytest.raises(ValueError, match=r"layers\.1\.ffn_shift_state is torch\.float16, expected torch\.float32"):
        RWKV7Cache.load(path)

    write_state(path, {**saved_state, "layers.2.recurrent_state": saved_state["layers.1.recurrent_state"].clone()})
    with pytest.raises(ValueError, match=r"unexpected tensors \['layers\.2\.recurrent_state'\]"):
        RWKV7Cache.load(path)

    bf16 = {key: t.bfloat16() if key.endswith("recurrent_state") else t for key, t in saved_state.items()}
    write_state(path, bf16)
    with pytest.raises(ValueError, match=r"WKV state in torch\.bfloat16; .*wkv_state_dtype is 'float32'"):
        RWKV7Cache.load(path, config=model.config)
    loaded = RWKV7Cache.load(path, config=tiny_config(wkv_state_dtype="bfloat16"))  # the matching model takes it
    assert loaded.seen_tokens == 5 and torch.equal(loaded.layers[1].recurrent_state, bf16["layers.1.recurrent_state"])

    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a safetensors file at all, just bytes")
    with pytest.raises(ValueError, match=f"{junk} is not a readable safetensors file"):
        RWKV7Cache.load(junk)


def test_a_valid_state_file_round_trips(model, saved_state, tmp_path):
    loaded = RWKV7Cache.load(tmp_path / "state.safetensors", config=model.config)
    assert loaded.seen_tokens == 5
    for i, layer in enumerate(loaded.layers):
        for name, tensor in layer.tensors().items():
            assert torch.equal(tensor, saved_state[f"layers.{i}.{name}"])


# --- masks, logits_to_keep, labels, pooling -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.5, 2, -1])
def test_mask_values_other_than_0_and_1_are_refused(model, bad):
    mask = torch.tensor([[1, 1, bad, 1, 1], [1] * 5])  # float for 0.5, int64 for 2 and -1
    with pytest.raises(ValueError, match=f"attention_mask holds {bad}; expected 1 for a token, 0 for padding"):
        model(token_ids(), attention_mask=mask)


def test_mask_dtypes_and_lengths(model):
    ids = token_ids(seq_len=6)
    with torch.no_grad():
        expected = model(ids).logits
        for mask in (torch.ones(2, 6, dtype=torch.bool), torch.ones(2, 6), torch.ones(2, 6, dtype=torch.long)):
            torch.testing.assert_close(model(ids, attention_mask=mask).logits, expected, rtol=0, atol=0)
        no_past = r"attention_mask must be \[batch=2, seq_len=6 \(no cache: no past\)\], got shape \(2, 8\)"
        with pytest.raises(ValueError, match=no_past):
            model(ids, attention_mask=torch.ones(2, 8))
        # continuing a cache, the mask covers past + seq_len
        cache = model.init_cache(2)
        model(ids[:, :4], cache=cache)
        continued = model(ids[:, 4:], attention_mask=torch.ones(2, 6), cache=cache).logits
        torch.testing.assert_close(continued, expected[:, 4:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, True, 1.5])
def test_bad_logits_to_keep_is_refused(model, bad):
    with pytest.raises(ValueError, match=f"logits_to_keep must be an integer >= 0 .* got {bad}"):
        model(token_ids(), logits_to_keep=bad)


def test_logits_to_keep_keeps_the_last_positions(model):
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, logits_to_keep=2).logits, model(ids).logits[:, -2:], rtol=0, atol=1e-6)


def test_loss_is_the_mean_over_counted_targets_and_zero_when_there_are_none(model):
    ids = token_ids(seq_len=6)
    labels = ids.clone()
    labels[0, 2:4] = -100
    output = model(ids, labels=labels)
    expected = F.cross_entropy(output.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(output.loss, expected, rtol=1e-6, atol=0)

    model.zero_grad()
    loss = model(ids, labels=torch.full_like(ids, -100)).loss
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    # the Trainer's count for a batch with nothing to predict
    assert model(ids, labels=torch.full_like(ids, -100), num_items_in_batch=torch.tensor(0)).loss.item() == 0.0
    model.zero_grad()


@pytest.mark.parametrize(
    "labels, error, message",
    [
        (torch.zeros(2, 4, dtype=torch.long), ValueError, r"labels must be \[batch, seq_len\] = \(2, 5\), .*\(2, 4\)"),
        (torch.zeros(10, dtype=torch.long), ValueError, r"labels must be \[batch, seq_len\] = \(2, 5\), .*\(10,\)"),
        (torch.zeros(2, 5), TypeError, r"labels must hold int64 token ids \(-100 to ignore\), got dtype torch\.float"),
        ([[0] * 5] * 2, TypeError, r"labels must be a torch\.Tensor \[batch, seq_len\], got a list"),
    ],
)
def test_bad_labels_are_refused_before_the_loss(model, labels, error, message):
    with pytest.raises(error, match=message):
        model(token_ids(), labels=labels)


def test_a_fully_padded_row_pools_to_zeros():
    torch.manual_seed(3)
    encoder = random_model(0, RWKV7Model, **TINY)
    ids = token_ids(batch=3, seq_len=5, seed=4)
    mask = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        pooled = encoder(ids, attention_mask=mask).pooler_output
        right = encoder(ids[1:2, :3]).last_hidden_state[0, -1]  # each real part alone
        left = encoder(ids[2:3, 2:]).last_hidden_state[0, -1]
    assert torch.equal(pooled[0], torch.zeros(64))
    torch.testing.assert_close(pooled[1], right, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled[2], left, rtol=1e-5, atol=1e-5)


# --- token ids, packing, generate -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.float32, torch.bool])
def test_token_ids_of_another_dtype_are_refused(model, dtype):
    with pytest.raises(TypeError, match=f"input_ids must hold int64 \\(or int32\\) token ids, got dtype {dtype}"):
        model(token_ids().to(dtype))


def test_int32_ids_are_read_like_int64_and_lists_are_refused(model):
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids.int()).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"input_ids must be a torch\.Tensor \[batch, seq_len\], got a list: pass"):
        model(ids.tolist())
    with pytest.raises(TypeError, match=r"inputs_embeds must be a torch\.Tensor \[batch, seq_len, 64\], got a list"):
        model(inputs_embeds=[[[0.0] * 64]])


def test_generate_on_an_empty_prompt_says_so(model):
    with pytest.raises(ValueError, match=r"generate\(\) got an empty prompt \(input_ids of shape \(1, 0\)\)"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


def test_an_empty_packed_document_is_refused(model):
    ids = token_ids(batch=1, seq_len=6)
    with pytest.raises(
        ValueError,
        match=r"cu_seq_lens \[0, 3, 3, 6\] must rise from 0 to seq_len=6 .*a document holds at least one token",
    ):
        model(ids, cu_seq_lens_q=torch.tensor([0, 3, 3, 6]))
    with torch.no_grad():  # the same documents without the empty one are fine: each reads as if alone
        packed = model(ids, cu_seq_lens_q=torch.tensor([0, 3, 6])).logits
        torch.testing.assert_close(packed[:, 3:], model(ids[:, 3:]).logits, rtol=1e-5, atol=1e-5)


# --- configuration and loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"eos_token_id": VOCAB}, f"eos_token_id={VOCAB} lies outside the vocabulary \\[0, vocab_size={VOCAB}\\)"),
        ({"eos_token_id": [0, 99]}, "eos_token_id=\\[0, 99\\] lies outside the vocabulary"),
        ({"pad_token_id": -1}, "pad_token_id=-1 lies outside the vocabulary"),
        ({"bos_token_id": 1000}, "bos_token_id=1000 lies outside the vocabulary"),
        ({"bos_token_id": "0"}, "bos_token_id must be None or an integer token id, got '0'"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be True or False, got 'yes'"),
        ({"num_labels": 0}, r"num_labels must be an integer in \[1, 1048576\], got 0"),
        ({"dropout": "x"}, r"dropout must be in \[0, 1\), got 'x'"),
        ({"norm_eps": None}, "norm_eps must be > 0, got None"),
    ],
)
def test_bad_config_values_are_refused(overrides, message):
    with pytest.raises(ValueError, match=f"RWKV7Config.{message}"):
        tiny_config(**overrides)


def test_config_ids_within_the_vocabulary_are_accepted():
    config = tiny_config(eos_token_id=[0, VOCAB - 1], pad_token_id=None, num_labels=3, dropout=0)
    assert config.eos_token_id == [0, VOCAB - 1] and config.num_labels == 3
    assert RWKV7Config(vocab_size=None, input_size=8, hidden_size=64, head_dim=32).pad_token_id == 0  # no vocabulary


@pytest.mark.parametrize("num_hidden_layers, message", [(3, "lacks 33 block weights"), (1, "holds 33 that the model")])
def test_a_config_with_another_layer_count_than_the_weights_is_refused(model, tmp_path, num_hidden_layers, message):
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            RWKV7ForCausalLM.from_pretrained(tmp_path)(token_ids()).logits,
            model(token_ids()).logits,
            rtol=1e-5,
            atol=1e-5,
        )
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": num_hidden_layers}))
    with pytest.raises(ValueError, match=f"config.num_hidden_layers={num_hidden_layers}: .*{message}.*model.layers"):
        RWKV7ForCausalLM.from_pretrained(tmp_path)


# --- consent: train.py --------------------------------------------------------------------------------------------

REMOTE_CODE = """
import os
from modeling_rwkv7 import {base}
with open(os.environ["RWKV7_REMOTE_CODE_MARKERS"], "a") as handle:
    handle.write("{name}\\n")


class Custom{name}({base}):
    pass
"""


@pytest.fixture
def folder_with_its_own_code(model, tmp_path, monkeypatch):
    """A model folder whose config.json and tokenizer_config.json name Python code of the folder (auto_map); the
    code appends its name to the file $RWKV7_REMOTE_CODE_MARKERS when it runs."""
    import transformers.dynamic_module_utils as dynamic_module_utils

    folder, markers = tmp_path / "model", tmp_path / "markers"
    monkeypatch.setenv("RWKV7_REMOTE_CODE_MARKERS", str(markers))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    model.save_pretrained(folder)
    from modeling_rwkv7 import RWKV7Tokenizer

    RWKV7Tokenizer().save_pretrained(folder)
    (folder / "custom_model.py").write_text(REMOTE_CODE.format(base="RWKV7ForCausalLM", name="Model"))
    (folder / "custom_tokenizer.py").write_text(REMOTE_CODE.format(base="RWKV7Tokenizer", name="Tokenizer"))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_rwkv7.RWKV7Config",
        "AutoModelForCausalLM": "custom_model.CustomModel",
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["custom_tokenizer.CustomTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder, markers


def test_train_runs_a_folders_own_code_only_with_trust_remote_code(folder_with_its_own_code):
    from transformers import AutoModelForCausalLM, HfArgumentParser

    train = load_script(REPO / "scripts" / "train.py")
    folder, markers = folder_with_its_own_code
    parser = HfArgumentParser(train.ScriptArguments)
    real_from_pretrained = AutoModelForCausalLM.from_pretrained
    load_model = mock.patch.object(AutoModelForCausalLM, "from_pretrained", side_effect=real_from_pretrained)

    (args,) = parser.parse_args_into_dataclasses(args=["--model", str(folder), "--data", "d.txt"])
    with load_model as spy:
        model, tokenizer = train.load_model(args), train.load_tokenizer(args)
    assert spy.call_args.kwargs["trust_remote_code"] is False and not markers.exists()
    assert type(model) is RWKV7ForCausalLM and type(tokenizer).__module__ == "modeling_rwkv7.tokenization_rwkv7"

    argv = ["--model", str(folder), "--data", "d.txt", "--trust-remote-code"]
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    with load_model as spy:
        train.load_model(args)
        tokenizer = train.load_tokenizer(args)
    assert spy.call_args.kwargs["trust_remote_code"] is True
    assert type(tokenizer).__name__ == "CustomTokenizer" and "Tokenizer" in markers.read_text().split()


@pytest.mark.parametrize("source", ["my_txt.txt", "data/missing.jsonl", "./missing", "/no/such/folder", "a/b/c"])
def test_a_mistyped_data_path_fails_locally(monkeypatch, source):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail(f"load_dataset{a} was called"))
    with pytest.raises(FileNotFoundError, match=f"Data '{source}': no such file or folder"):
        load_script(REPO / "scripts" / "train.py").load_documents(source, "text")


def test_a_dataset_name_is_still_looked_up(monkeypatch):
    import datasets

    asked = []
    not_texts = datasets.Dataset.from_dict({"x": [1]})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: asked.append(a) or not_texts)
    with pytest.raises(ValueError, match=r"has columns \['x'\], not the text column 'text'"):
        load_script(REPO / "scripts" / "train.py").load_documents("someone/some-dataset", "text")
    assert asked == [("someone/some-dataset", None)]


# --- consent: push_to_hub.py -------------------------------------------------------------------------------------


@pytest.fixture
def publishable(model, tmp_path) -> Path:
    folder = tmp_path / "publish"
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("extra, private", [([], True), (["--public"], False)])
def test_push_creates_private_repositories_unless_public(publishable, extra, private):
    push = load_script(REPO / "scripts" / "push_to_hub.py")
    uploaded = []

    def create_commit(self, operations, **kwargs):
        uploaded.extend(operation.path_in_repo for operation in operations)

    url = RepoUrl("https://huggingface.co/me/x")
    with mock.patch.object(HfApi, "create_repo", autospec=True, return_value=url) as repo:
        with mock.patch.object(HfApi, "create_commit", autospec=True, side_effect=create_commit):
            push.main([str(publishable), "me/x", *extra])
    assert repo.call_args.kwargs["private"] is private
    assert {"README.md", "config.json", "model.safetensors"} <= set(uploaded)


@pytest.mark.parametrize("link", ["file", "folder"])
def test_push_refuses_links_to_outside_the_folder(publishable, tmp_path, capsys, link):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("private key")
    name = "notes.txt" if link == "file" else "extra"
    (publishable / name).symlink_to(secret / "id_rsa" if link == "file" else secret)
    (publishable / "inside.json").symlink_to(publishable / "config.json")  # a link within the folder is fine
    push = load_script(REPO / "scripts" / "push_to_hub.py")
    with mock.patch.object(HfApi, "create_repo", side_effect=AssertionError("no repository may be created")):
        with pytest.raises(SystemExit) as exit_info:
            push.main([str(publishable), "me/x"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "symbolic links to outside it" in error and f"{name} -> {secret}" in error and "inside.json" not in error
    (publishable / name).unlink()
    assert publishable / "inside.json" in push.files_to_upload(publishable)


# --- consent: Hub kernels -----------------------------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_variant(tmp_path, monkeypatch):
    """kernels.install_kernel "downloads" a variant whose metadata.json has no digest; kernels.get_local_kernel
    records what it imports. No opt-in, no local build, an empty loader cache; CUDA reported available."""
    variant = tmp_path / "torch-cpu"
    variant.mkdir()
    (variant / "metadata.json").write_text(
        json.dumps(
            {
                "name": "rwkv7-wkv",
                "id": "_rwkv7_wkv_0",
                "version": 1,
                "license": "Apache-2.0",
                "python-depends": [],
                "backend": {"type": "cpu"},
            }
        )
    )
    (variant / "__init__.py").write_text("")
    downloads, imported = [], []
    monkeypatch.setattr(kernels, "install_kernel", lambda repo_id, **kwargs: downloads.append(repo_id) or variant)
    monkeypatch.setattr(kernels, "get_local_kernel", lambda path: imported.append(path) or "module")
    monkeypatch.setattr(wkv_kernel, "_loaded", {})
    monkeypatch.setattr(wkv_kernel, "_reported", set())
    monkeypatch.setattr(wkv_kernel, "_trusted", None)
    monkeypatch.delenv(wkv_kernel.KERNEL_PATH_ENV, raising=False)
    monkeypatch.delenv(wkv_kernel.HUB_KERNEL_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return variant, downloads, imported


def test_a_hub_kernel_without_digest_needs_allow_unverified(hub_variant, monkeypatch):
    variant, downloads, imported = hub_variant
    wkv_kernel.trust_hub_kernel("me/rwkv7-wkv", COMMIT)
    with pytest.raises(RuntimeError, match=r"metadata\.json has no digest .*allow_unverified=True"):
        wkv_kernel.load_wkv_kernel(None, required=True)
    monkeypatch.setenv(wkv_kernel.HUB_KERNEL_ENV, f"me/rwkv7-wkv@{COMMIT}")
    monkeypatch.setattr(wkv_kernel, "_trusted", None)
    monkeypatch.setattr(wkv_kernel, "_loaded", {})
    with pytest.raises(RuntimeError, match=r"metadata\.json has no digest"):
        wkv_kernel.load_wkv_kernel(None, required=True)
    assert downloads == ["me/rwkv7-wkv"] * 2 and imported == []

    hub = wkv_kernel.trust_hub_kernel("me/rwkv7-wkv", COMMIT, allow_unverified=True)
    assert wkv_kernel.fetch_pinned_kernel(hub) == "module" and imported == [variant]
    with pytest.raises(ValueError, match="allow_unverified must be True or False, got 'yes'"):
        wkv_kernel.trust_hub_kernel("me/rwkv7-wkv", COMMIT, allow_unverified="yes")


def test_kernels_data_is_checked_before_any_download(hub_variant, monkeypatch):
    _, downloads, _ = hub_variant
    monkeypatch.setitem(sys.modules, "kernels_data", None)  # not installed
    with pytest.raises(RuntimeError, match=r"@0123.* is not fetched: kernels-data.*`pip install kernels-data`"):
        wkv_kernel.fetch_pinned_kernel(wkv_kernel.trust_hub_kernel("me/rwkv7-wkv", COMMIT))
    assert downloads == []
