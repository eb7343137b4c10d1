"""The layout of transformers' own RWKV-7 ("native": official names under `rwkv7.`, a top-level `head.weight`, its
config keys): loading it with from_pretrained, converting both ways, and coexisting with a transformers release
that ships model_type "rwkv7" itself."""

import json
import os
import subprocess
import sys

import oracle
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import modeling_rwkv7  # noqa: F401  (registers rwkv7 with the Auto classes)
from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM
from modeling_rwkv7.conversion_mapping_rwkv7 import CheckpointError, config_from_official, hf_to_native, official_to_hf
from modeling_rwkv7.convert_rwkv7_checkpoint_to_hf import convert_checkpoint, main

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
LAYER0_VALUE_RESIDUAL = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}  # unused by the official code


def without_layer0_value_residual(state_dict: dict) -> dict:
    return {name: t for name, t in state_dict.items() if name not in LAYER0_VALUE_RESIDUAL}


def official_weights(seed: int, **sizes) -> dict[str, torch.Tensor]:
    """A random official state dict at trained scale, with layer 0's (unused) v0/v1/v2 as official files have."""
    sizes = {"vocab_size": 512, "hidden_size": 128, "num_layers": 3, "head_dim": 64, **sizes}
    state_dict = oracle.random_official_state_dict(seed=seed, **sizes)
    gen = torch.Generator().manual_seed(seed + 1)
    C, D = sizes["hidden_size"], state_dict["blocks.1.att.v1"].shape[1]
    state_dict["blocks.0.att.v0"] = torch.randn(1, 1, C, generator=gen)
    state_dict["blocks.0.att.v1"] = torch.randn(C, D, generator=gen) * 0.1
    state_dict["blocks.0.att.v2"] = torch.randn(D, C, generator=gen) * 0.1
    return state_dict


def native_config(config: RWKV7Config, **changes) -> dict:
    """config.json as transformers' `Rwkv7Config` writes it (every key of its dataclass)."""
    return {
        "architectures": ["Rwkv7ForCausalLM"],
        "model_type": "rwkv7",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "head_dim": config.head_dim,
        "num_heads": config.num_heads,
        "decay_low_rank_dim": config.decay_low_rank_dim,
        "a_low_rank_dim": config.a_low_rank_dim,
        "v_low_rank_dim": config.v_low_rank_dim,
        "gate_low_rank_dim": config.gate_low_rank_dim,
        "intermediate_size": config.intermediate_size,
        "norm_eps": 1e-5,
        "norm_bias": True,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_deep_embed": False,
        "wkv_state_dtype": "float32",
        "wkv_implementation": "eager",
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "dtype": "float32",
        "transformers_version": "5.99.0",
        **changes,
    }


def write_native_folder(state_dict: dict, folder, tie: bool = False, **config_changes) -> str:
    """A native-layout folder as the pull request's converter writes it from an official `.pth`: every official
    tensor under `rwkv7.`, `head.weight` at the top (none when tied)."""
    config = config_from_official(state_dict)
    tensors = {("head.weight" if name == "head.weight" else "rwkv7." + name): t for name, t in state_dict.items()}
    if tie:
        del tensors["head.weight"]
    os.makedirs(folder, exist_ok=True)
    save_file({name: t.contiguous() for name, t in tensors.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(native_config(config, tie_word_embeddings=tie, **config_changes), handle, indent=2)
    return str(folder)


def logits_of(model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Official weights, their `.pth` and the `rwkv` package's model of them, and random tokens."""
    state_dict = official_weights(seed=4242)
    official = without_layer0_value_residual(state_dict)
    path = oracle.write_official_checkpoint(official, tmp_path_factory.mktemp("official"))
    tokens = torch.randint(0, 512, (29,), generator=torch.Generator().manual_seed(7)).tolist()
    expected, _ = oracle.oracle_logits(oracle.load_oracle(path), tokens)
    return state_dict, path, tokens, expected


def test_from_pretrained_reads_the_native_layout(weights, tmp_path):
    state_dict, _, tokens, expected = weights
    folder = write_native_folder(state_dict, tmp_path / "native")

    model, info = RWKV7ForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert model.config.wkv_state_dtype == "float32" and model.config.num_heads == 2
    torch.testing.assert_close(logits_of(model.eval(), tokens), expected, rtol=0, atol=1e-4)

    config, ours = official_to_hf(without_layer0_value_residual(state_dict))
    reference = RWKV7ForCausalLM(config).eval()
    reference.load_state_dict(ours, strict=True)
    auto = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(auto) is RWKV7ForCausalLM
    assert torch.equal(logits_of(auto, tokens), logits_of(reference, tokens))

    # a model loaded from the native layout saves in ours, and reloads to the same logits
    model.save_pretrained(tmp_path / "saved")
    saved = oracle.folder_tensors(tmp_path / "saved")
    assert set(saved) == set(ours)
    reloaded = RWKV7ForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert torch.equal(logits_of(reloaded, tokens), logits_of(reference, tokens))


def test_tied_native_folder_loads_with_the_embedding_as_head(tmp_path):
    state_dict = official_weights(seed=99, vocab_size=300, num_layers=2)
    state_dict["head.weight"] = state_dict["emb.weight"].clone()
    official = without_layer0_value_residual(state_dict)
    path = oracle.write_official_checkpoint(official, tmp_path)
    tokens = torch.randint(0, 300, (17,)).tolist()
    expected, _ = oracle.oracle_logits(oracle.load_oracle(path), tokens)

    model, info = RWKV7ForCausalLM.from_pretrained(
        write_native_folder(state_dict, tmp_path / "native", tie=True), output_loading_info=True
    )
    assert info["missing_keys"] == set() and model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embeddings.weight.data_ptr()
    torch.testing.assert_close(logits_of(model.eval(), tokens), expected, rtol=0, atol=1e-4)


def test_converts_both_ways(weights, tmp_path):
    state_dict, path, tokens, expected = weights
    native_folder = write_native_folder(state_dict, tmp_path / "native")

    # native -> ours: the same folder as from the official .pth
    from_native = convert_checkpoint(native_folder, tmp_path / "from_native")
    from_official = convert_checkpoint(path + ".pth", tmp_path / "from_official")
    ours = oracle.folder_tensors(from_official)
    assert oracle.folder_tensors(from_native).keys() == ours.keys()
    for name, tensor in oracle.folder_tensors(from_native).items():
        assert torch.equal(tensor, ours[name]), name
    model = AutoModelForCausalLM.from_pretrained(from_native, trust_remote_code=True).eval()
    torch.testing.assert_close(logits_of(model, tokens), expected, rtol=0, atol=1e-4)

    # ours -> native: the official tensors under `rwkv7.` (layer 0's unused v0/v1/v2 as zeros), its config keys
    main([str(from_official), str(tmp_path / "back"), "--layout", "native", "--dtype", "float32"])
    native = tmp_path / "back"
    written = oracle.folder_tensors(native)
    in_memory = hf_to_native(ours, RWKV7Config.from_pretrained(from_official))
    assert in_memory.keys() == written.keys() and all(torch.equal(in_memory[n], t) for n, t in written.items())
    source = {("head.weight" if k == "head.weight" else "rwkv7." + k): v for k, v in state_dict.items()}
    assert written.keys() == source.keys()
    for name, tensor in written.items():
        if name.removeprefix("rwkv7.") in LAYER0_VALUE_RESIDUAL:
            assert tensor.shape == source[name].shape and not tensor.any(), name
        else:
            assert torch.equal(tensor, source[name]), name
    config = json.loads((native / "config.json").read_text())
    expected_config = native_config(RWKV7Config.from_pretrained(from_official))
    for key in ("max_position_embeddings", "wkv_implementation", "transformers_version"):
        expected_config.pop(key)
    assert config == expected_config
    assert "auto_map" not in config
    assert not any(name.endswith(".py") for name in os.listdir(native) if "token" not in name)
    assert "rwkv_vocab_v20230424.txt" not in os.listdir(native)  # vocab 512: no World tokenizer
    reloaded = RWKV7ForCausalLM.from_pretrained(native).eval()
    torch.testing.assert_close(logits_of(reloaded, tokens), expected, rtol=0, atol=1e-4)


def test_native_folder_missing_a_tensor_is_named(weights, tmp_path):
    state_dict, _, _, _ = weights
    broken = {k: v for k, v in state_dict.items() if k != "blocks.1.att.w1"}
    folder = write_native_folder(broken, tmp_path / "native")

    with pytest.raises(CheckpointError, match=r"missing tensors \['rwkv7\.blocks\.1\.att\.w1'\]"):
        convert_checkpoint(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(
        ValueError, match=r"lacks 1 block weights \['model\.layers\.1\.attn\.w_lora\.lora\.0\.weight'\]"
    ):
        RWKV7ForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"use_deep_embed": True}, r"use_deep_embed=True is not supported"),
        ({"norm_bias": False}, r"norm_bias=True"),
        ({"wkv_implementation": "my_fused_kernel"}, r"wkv_implementation='my_fused_kernel'"),
        (
            {"wkv_state_dtype": "float64"},
            r"wkv_state_dtype must be one of \('float32', 'bfloat16', 'float16'\), got 'float64'",
        ),
        ({"num_heads": 3}, r"num_heads=3 with head_dim=64 does not cover hidden_size=128"),
    ],
)
def test_native_config_that_we_cannot_compute_is_refused(weights, tmp_path, changes, message):
    folder = write_native_folder(weights[0], tmp_path / "native", **changes)
    with pytest.raises(ValueError, match=message):
        RWKV7ForCausalLM.from_pretrained(folder)


def test_wkv_state_dtype_field():
    for dtype in ("float32", "bfloat16", "float16"):
        config = RWKV7Config(hidden_size=128, head_dim=64, num_hidden_layers=1, wkv_state_dtype=dtype)
        assert RWKV7Config.from_dict(config.to_dict()).wkv_state_dtype == dtype
    assert RWKV7Config().wkv_state_dtype == "float32"


COEXISTENCE = r"""
import json, sys
import torch
sys.path.insert(0, {tests!r})
import builtin_rwkv7_fake
builtin_rwkv7_fake.install()
import modeling_rwkv7
from modeling_rwkv7 import RWKV7ForCausalLM
from transformers import AutoConfig, AutoModelForCausalLM
native, ours, tokens = {native!r}, {ours!r}, torch.tensor([{tokens!r}])
builtin = sys.modules["transformers.models.rwkv7"].Rwkv7ForCausalLM

def logits(model):
    with torch.no_grad():
        return model.eval()(tokens).logits[0].float()

def describe(model):
    return type(model).__module__ + "." + type(model).__name__

report = {{"ships": modeling_rwkv7.transformers_ships_rwkv7()}}
report["auto_config"] = type(AutoConfig.from_pretrained(native)).__module__
auto_native = AutoModelForCausalLM.from_pretrained(native)
report["auto_native"] = describe(auto_native)
builtin_logits = logits(auto_native)
ours_native = RWKV7ForCausalLM.from_pretrained(native)
report["ours_native_vs_builtin"] = (logits(ours_native) - builtin_logits).abs().max().item()
remote = AutoModelForCausalLM.from_pretrained(ours, trust_remote_code=True)
report["remote_ours"] = describe(remote)
report["remote_ours_vs_builtin"] = (logits(remote) - builtin_logits).abs().max().item()
try:
    builtin.from_pretrained(ours)
except ValueError as error:
    report["builtin_on_ours_error"] = str(error)
config = json.load(open(ours + "/config.json"))
config = type(auto_native.config)(**{{**config, "num_heads": 2}})
_, info = builtin.from_pretrained(ours, config=config, output_loading_info=True)
report["builtin_on_ours_missing"] = sorted(info["missing_keys"])[:3]
report["builtin_on_ours_unexpected"] = len(info["unexpected_keys"])

modeling_rwkv7.register_auto_classes(replace_builtin=True)
report["replaced_native"] = describe(AutoModelForCausalLM.from_pretrained(native))
replaced_ours = AutoModelForCausalLM.from_pretrained(ours)
report["replaced_ours"] = describe(replaced_ours)
report["replaced_ours_vs_builtin"] = (logits(replaced_ours) - builtin_logits).abs().max().item()
print("REPORT " + json.dumps(report))
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_coexistence_with_a_transformers_that_ships_rwkv7(weights, tmp_path):
    """With transformers' own rwkv7 registered before our import: the Auto classes keep its classes (and a warning
    says so), its class reads the native layout and ours reads both, our folders load ours with
    trust_remote_code, its class cannot read our layout (our config.json lacks its `num_heads`; given that, every
    weight is missing), and replace_builtin=True switches the Auto classes to ours."""
    state_dict, path, tokens, expected = weights
    native = write_native_folder(state_dict, tmp_path / "native")
    ours = convert_checkpoint(path + ".pth", tmp_path / "ours")
    script = COEXISTENCE.format(tests=TESTS, native=native, ours=str(ours), tokens=tokens[:8])
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": REPO, "TRANSFORMERS_VERBOSITY": "warning"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.split("REPORT ", 1)[1])
    assert "ships its own RWKV-7" in result.stderr

    assert report["ships"] is True
    assert report["auto_config"] == "transformers.models.rwkv7"  # not shadowed
    assert report["auto_native"] == "transformers.models.rwkv7.Rwkv7ForCausalLM"
    assert report["ours_native_vs_builtin"] < 1e-4
    assert report["remote_ours"].startswith("transformers_modules.")
    assert report["remote_ours"].endswith(".RWKV7ForCausalLM")
    assert report["remote_ours_vs_builtin"] < 1e-4
    assert report["builtin_on_ours_error"] == "num_heads must be hidden_size // head_dim = 2, got 12"
    assert report["builtin_on_ours_missing"] == ["head.weight", "rwkv7.blocks.0.att.a0", "rwkv7.blocks.0.att.a1"]
    assert report["builtin_on_ours_unexpected"] == len(oracle.folder_tensors(ours))
    assert report["replaced_native"] == "modeling_rwkv7.modeling_rwkv7.RWKV7ForCausalLM"
    assert report["replaced_ours"] == "modeling_rwkv7.modeling_rwkv7.RWKV7ForCausalLM"
    assert report["replaced_ours_vs_builtin"] < 1e-4
