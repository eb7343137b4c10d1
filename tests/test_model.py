"""Issue 2: the model computes exactly what BlinkDL's official RWKV-7 computes, and behaves as a transformers model."""

import glob
import json
import os

import oracle
import pytest
import torch
from helpers import assert_close
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from modeling_rwkv7 import (
    RWKV7Cache,
    RWKV7Config,
    RWKV7ForCausalLM,
    RWKV7ForSequenceClassification,
    RWKV7Model,
)
from modeling_rwkv7.conversion_mapping_rwkv7 import CheckpointError, hf_to_official, official_to_hf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides) -> RWKV7Config:
    values = dict(vocab_size=1000, hidden_size=128, num_hidden_layers=2, head_dim=64)
    values.update(overrides)
    return RWKV7Config(**values)


def random_tokens(length: int, seed: int, vocab_size: int = 1000) -> list[int]:
    return torch.randint(0, vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- parity with the official `rwkv` package -------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("seq_len", [1, 17, 200])
def test_logits_and_state_match_official_package(official_checkpoint, converted_model, seq_len, seed):
    _, _, official = official_checkpoint
    tokens = random_tokens(seq_len, seed=100 * seed + seq_len)
    expected_logits, expected_state = oracle.oracle_logits(official, tokens)

    with torch.no_grad():
        out = converted_model(torch.tensor([tokens]), use_cache=True)

    assert out.logits.shape == (1, seq_len, 1000)
    assert (out.logits[0] - expected_logits).abs().max().item() <= 1e-4
    for i, layer in enumerate(out.cache.layers):
        # the official state is [heads, value, key], as ours
        assert layer.recurrent_state.dtype == torch.float32
        assert_close(layer.recurrent_state[0], expected_state[3 * i + 1], 1e-5, scale_floor=1.0)
        assert_close(layer.attn_shift_state[0], expected_state[3 * i + 0], 1e-5, scale_floor=1.0)
        assert_close(layer.ffn_shift_state[0], expected_state[3 * i + 2], 1e-5, scale_floor=1.0)


def test_official_checkpoint_from_other_sizes_matches():
    """Another shape: 4 layers, head_dim 32, a non-4x FFN and uneven LoRA ranks, all inferred from the tensors."""
    state_dict = oracle.random_official_state_dict(
        vocab_size=300, hidden_size=192, num_layers=4, head_dim=64, ffn_size=448, ranks=(48, 16, 24, 40), seed=7
    )
    config, converted = official_to_hf(state_dict)
    assert (config.num_hidden_layers, config.hidden_size, config.num_heads, config.intermediate_size) == (
        4,
        192,
        3,
        448,
    )
    assert (config.decay_low_rank_dim, config.a_low_rank_dim, config.v_low_rank_dim, config.gate_low_rank_dim) == (
        48,
        16,
        24,
        40,
    )
    model = RWKV7ForCausalLM(config)
    model.load_state_dict(converted, strict=True)
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        official = oracle.load_oracle(oracle.write_official_checkpoint(state_dict, directory))
        tokens = random_tokens(33, seed=5, vocab_size=300)
        expected, _ = oracle.oracle_logits(official, tokens)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
    assert (logits - expected).abs().max().item() <= 1e-4


# --- conversion ----------------------------------------------------------------------------------------------


def test_official_to_hf_round_trips_every_tensor(official_checkpoint):
    state_dict = official_checkpoint[0]
    config, converted = official_to_hf(state_dict)
    back = hf_to_official(converted)
    assert set(back) == set(state_dict)
    for name, tensor in state_dict.items():
        assert back[name].shape == tensor.shape and back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name


def test_layer0_value_residual_tensors_are_dropped(official_checkpoint):
    """Released checkpoints carry blocks.0.att.v0/v1/v2, which the official code never uses."""
    state_dict = dict(official_checkpoint[0])
    state_dict["blocks.0.att.v0"] = torch.randn(1, 1, 256)
    state_dict["blocks.0.att.v1"] = torch.randn(256, 32)
    state_dict["blocks.0.att.v2"] = torch.randn(32, 256)
    _, converted = official_to_hf(state_dict)
    assert not any(name.startswith("model.layers.0.attn.v_lora") for name in converted)


def test_checkpoint_with_missing_or_unknown_tensors_is_refused(official_checkpoint):
    state_dict = dict(official_checkpoint[0])
    del state_dict["blocks.1.att.k_a"]
    state_dict["blocks.2.ffn.s_emb.weight"] = torch.zeros(3, 3)  # DeepEmbed, not x070
    with pytest.raises(CheckpointError, match=r"blocks\.1\.att\.k_a") as error:
        official_to_hf(state_dict)
    assert "blocks.2.ffn.s_emb.weight" in str(error.value)

    not_rwkv7 = {k: v for k, v in official_checkpoint[0].items() if k != "blocks.0.att.r_k"}
    with pytest.raises(CheckpointError, match=r"blocks\.0\.att\.r_k"):
        official_to_hf(not_rwkv7)


def test_checkpoint_with_wrong_shape_is_refused(official_checkpoint):
    state_dict = dict(official_checkpoint[0])
    state_dict["blocks.1.att.receptance.weight"] = torch.zeros(256, 128)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.attn\.r_proj\.weight"):
        official_to_hf(state_dict)


# --- configuration -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(glob.glob(os.path.join(REPO, "configuration", "*.json"))))
def test_param_count_is_exact_for_every_preset(preset):
    config = RWKV7Config.from_json_file(preset)
    model_class = RWKV7ForCausalLM if config.vocab_size is not None else RWKV7Model
    with torch.device("meta"):
        model = model_class(config)
    assert config.param_count() == sum(p.numel() for p in model.parameters())


def test_param_count_for_every_head_and_tying():
    config = tiny_config(num_labels=3)
    for head, model_class in (
        ("lm", RWKV7ForCausalLM),
        ("none", RWKV7Model),
        ("classification", RWKV7ForSequenceClassification),
    ):
        assert config.param_count(head) == sum(p.numel() for p in model_class(config).parameters()), head
    tied = tiny_config(tie_word_embeddings=True)
    model = RWKV7ForCausalLM(tied)
    assert model.lm_head.weight is model.model.embeddings.weight
    assert tied.param_count() == sum(p.numel() for p in model.parameters())


def test_official_preset_sizes():
    config = RWKV7Config.from_json_file(os.path.join(REPO, "configuration", "rwkv7-0.1b.json"))
    assert config.param_count() == 191_034_624  # the released 0.1B: 191.0 M
    seed = RWKV7Config.from_json_file(os.path.join(REPO, "configuration", "seed-default.json"))
    assert (seed.input_size, seed.hidden_size, seed.num_hidden_layers, seed.head_dim) == (287, 256, 6, 64)
    assert (seed.dropout, seed.window_size, seed.output_size) == (0.1, 60, 256)
    assert RWKV7Config.recommended_defaults() == {
        "hidden_size": 256,
        "num_hidden_layers": 6,
        "head_dim": 64,
        "dropout": 0.1,
        "window_size": 60,
    }


def test_default_low_rank_dims_follow_official_formula():
    config = RWKV7Config(hidden_size=2048, num_hidden_layers=1)
    # max(32, round(k * sqrt(2048) / 32) * 32) with k = 2.5, 2.5, 1.7, 5
    assert (config.decay_low_rank_dim, config.a_low_rank_dim, config.v_low_rank_dim, config.gate_low_rank_dim) == (
        128,
        128,
        64,
        224,
    )
    assert config.intermediate_size == 8192 and config.num_heads == 32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=100, head_dim=64), "hidden_size=100 must be divisible by head_dim=64"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer, got 0"),
        (dict(hidden_size=-64), "hidden_size must be a positive integer"),
        (dict(dropout=1.5), "dropout must be in"),
        (dict(wkv_backend="magic"), r"implementation\['wkv'\]='magic' is not one of"),
        (dict(vocab_size=None), "needs vocab_size"),
        (dict(hiden_size=128), r"Unknown RWKV7Config field\(s\) \['hiden_size'\]"),
        (dict(value_dim=64), "value_dim"),
    ],
)
def test_bad_config_is_refused_with_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RWKV7Config(**kwargs)


def test_config_json_round_trip(tmp_path):
    config = tiny_config(input_size=40, dropout=0.2, window_size=30)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, RWKV7Config)
    for key in ("vocab_size", "hidden_size", "input_size", "dropout", "window_size", "gate_low_rank_dim"):
        assert getattr(loaded, key) == getattr(config, key)
    data = json.loads((tmp_path / "config.json").read_text())
    data["not_a_field"] = 1
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not_a_field"):
        AutoConfig.from_pretrained(tmp_path)


# --- transformers integration --------------------------------------------------------------------------------


def test_auto_classes_build_our_models():
    config = AutoConfig.for_model("rwkv7", vocab_size=1000, hidden_size=128, num_hidden_layers=1)
    assert isinstance(config, RWKV7Config)
    assert type(AutoModel.from_config(config)) is RWKV7Model
    assert type(AutoModelForCausalLM.from_config(config)) is RWKV7ForCausalLM
    assert type(AutoModelForSequenceClassification.from_config(config)) is RWKV7ForSequenceClassification


def test_save_pretrained_round_trips_logits_exactly(tmp_path, converted_model):
    converted_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rwkv7.RWKV7ForCausalLM"
    assert (tmp_path / "modeling_rwkv7.py").exists() and (tmp_path / "configuration_rwkv7.py").exists()

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is RWKV7ForCausalLM
    tokens = torch.tensor([random_tokens(50, seed=3)])
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, converted_model(tokens).logits)


def trained_like_model(config: RWKV7Config, seed: int = 0) -> RWKV7ForCausalLM:
    """The official init with its zero matrices (output projections, LoRA down-projections) filled in, so every
    path carries signal at a trained model's scale (logit std ~0.5)."""
    torch.manual_seed(seed)
    model = RWKV7ForCausalLM(config).eval()
    oracle.fill_zero_matrices(model)
    with torch.no_grad():
        model.model.embeddings.weight.normal_()
    return model


def test_bf16_model_keeps_float32_state_and_close_logits(tmp_path):
    """bf16 weights and activations, float32 WKV state: within 2e-2 of float32 logits, and no further from them
    than the official package's own bf16 path on the same weights."""
    fp32 = trained_like_model(RWKV7Config(vocab_size=1000, hidden_size=256, num_hidden_layers=3))
    tokens = torch.tensor([random_tokens(64, seed=11)])
    bf16 = RWKV7ForCausalLM(fp32.config).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)
    with torch.no_grad():
        reference = fp32(tokens).logits
        out = bf16(tokens, use_cache=True)
    assert out.logits.dtype == torch.bfloat16
    assert all(layer.recurrent_state.dtype == torch.float32 for layer in out.cache.layers)
    error = (out.logits.float() - reference).abs().max().item()
    assert error <= 2e-2 * max(1.0, reference.abs().max().item())

    path = oracle.write_official_checkpoint(hf_to_official(fp32.state_dict()), tmp_path)
    official_logits, _ = oracle.oracle_logits(oracle.load_oracle(path), tokens[0].tolist())
    official_bf16_logits, _ = oracle.oracle_logits(oracle.load_oracle(path, strategy="cpu bf16"), tokens[0].tolist())
    assert (official_logits - reference[0]).abs().max().item() <= 1e-4
    assert error <= 1.5 * (official_bf16_logits.float() - official_logits).abs().max().item()


def test_logits_to_keep_skips_the_head_for_other_positions(converted_model):
    tokens = torch.tensor([random_tokens(20, seed=4), random_tokens(20, seed=5)])
    head_inputs = []
    hook = converted_model.lm_head.register_forward_hook(lambda module, args, out: head_inputs.append(args[0].shape))
    try:
        with torch.no_grad():
            full = converted_model(tokens).logits
            last = converted_model(tokens, logits_to_keep=1).logits
            picked = converted_model(tokens, logits_to_keep=torch.tensor([3, 7])).logits
    finally:
        hook.remove()
    assert head_inputs == [(2, 20, 256), (2, 1, 256), (2, 2, 256)]
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-5)
    torch.testing.assert_close(picked, full[:, [3, 7]], rtol=0, atol=1e-5)


def test_causal_lm_loss_matches_manual_cross_entropy(converted_model):
    tokens = torch.tensor([random_tokens(30, seed=6)])
    labels = tokens.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        out = converted_model(tokens, labels=labels)
        manual = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
        summed = converted_model(tokens, labels=labels, num_items_in_batch=torch.tensor(10)).loss
    torch.testing.assert_close(out.loss, manual)
    torch.testing.assert_close(summed, manual * 25 / 10)  # 25 counted targets, divided by num_items_in_batch


def test_return_dict_false_and_hidden_states(converted_model):
    tokens = torch.tensor([random_tokens(5, seed=8)])
    with torch.no_grad():
        as_tuple = converted_model(tokens, return_dict=False, use_cache=False)
        out = converted_model(tokens, output_hidden_states=True, use_cache=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
    assert len(out.hidden_states) == converted_model.config.num_hidden_layers + 1


def test_training_init_follows_official_recipe():
    config = tiny_config(num_hidden_layers=3)
    model = RWKV7ForCausalLM(config)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        assert torch.allclose(layer.attn.g_norm.weight, torch.full((128,), ((i + 1) / 3) ** 0.7))
        assert torch.count_nonzero(layer.attn.o_proj.weight) == 0 and torch.count_nonzero(layer.ffn.value.weight) == 0
        assert torch.count_nonzero(layer.attn.w_lora.lora[0].weight) == 0
        assert torch.allclose(layer.attn.k_a, torch.full((128,), 1.02))
    # decay bias: -6 + 6 * (n / (C - 1)) ** p + 0.5 + 2.5 * zigzag, from -8 to 3
    w0 = layers[0].attn.w_lora.lora[2].bias
    torch.testing.assert_close((w0.min().item(), w0.max().item()), (-8.0, 3.0))
    assert model.model.embeddings.weight.abs().max() <= 1e-4
    with torch.no_grad():
        logits = model(torch.tensor([random_tokens(8, seed=0)])).logits
    assert torch.isfinite(logits).all()


def test_sequence_classification_head_and_loss():
    config = tiny_config(num_labels=3)
    model = RWKV7ForSequenceClassification(config).eval()
    tokens = torch.tensor([random_tokens(12, seed=1), random_tokens(12, seed=2)])
    mask = torch.ones_like(tokens)
    mask[1, 8:] = 0  # right padding: the second row is 8 tokens long
    with torch.no_grad():
        out = model(tokens, attention_mask=mask, labels=torch.tensor([0, 2]))
        alone = model(tokens[1:, :8]).logits
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0
    torch.testing.assert_close(out.logits[1:], alone, rtol=0, atol=1e-5)


# --- the sequence-encoder path (the seed's use case) ----------------------------------------------------------


def test_encoder_maps_feature_sequences_to_pooled_vectors():
    config = RWKV7Config.from_json_file(os.path.join(REPO, "configuration", "seed-default.json"))
    model = RWKV7Model(config).eval()
    assert config.param_count() == sum(p.numel() for p in model.parameters())
    features = torch.randn(2, 60, 287)
    with torch.no_grad():
        out = model(inputs_embeds=features)
    assert out.pooler_output.shape == (2, config.output_size) == (2, 256)
    assert out.last_hidden_state.shape == (2, 60, 256)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, -1])


def test_encoder_pools_the_last_real_position_with_right_padding():
    torch.manual_seed(0)
    model = RWKV7Model(
        RWKV7Config(vocab_size=None, input_size=20, hidden_size=64, num_hidden_layers=2, head_dim=32)
    ).eval()
    features = torch.randn(3, 15, 20)
    mask = torch.ones(3, 15, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        pooled = model(inputs_embeds=features, attention_mask=mask).pooler_output
        for row, length in ((0, 15), (1, 9), (2, 4)):
            alone = model(inputs_embeds=features[row : row + 1, :length]).pooler_output
            torch.testing.assert_close(pooled[row : row + 1], alone, rtol=0, atol=1e-5)


def test_encoder_with_input_size_equal_to_hidden_has_no_projection():
    model = RWKV7Model(RWKV7Config(vocab_size=None, input_size=64, hidden_size=64, num_hidden_layers=1, head_dim=32))
    assert model.input_proj is None and model.embeddings is None
    assert model(inputs_embeds=torch.randn(1, 3, 64)).pooler_output.shape == (1, 64)


# --- bad input -----------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(converted_model):
    encoder = RWKV7Model(
        RWKV7Config(vocab_size=None, input_size=287, hidden_size=64, num_hidden_layers=1, head_dim=32)
    )
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, seq_len, 287\], got shape \(2, 60, 286\)"):
        encoder(inputs_embeds=torch.randn(2, 60, 286))
    with pytest.raises(ValueError, match="floating-point"):
        encoder(inputs_embeds=torch.ones(2, 3, 287, dtype=torch.long))
    with pytest.raises(ValueError, match="no token embedding"):
        encoder(input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Token id 1000 is out of the vocabulary range \[0, 1000\)"):
        converted_model(torch.tensor([[1, 2, 1000]]))
    with pytest.raises(ValueError, match=r"Token id -1 is out"):
        converted_model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        converted_model()
    with pytest.raises(ValueError, match=r"attention_mask must be \[batch=1"):
        converted_model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(2, 3))
    with pytest.raises(TypeError, match="RWKV7Cache"):
        from transformers import DynamicCache

        converted_model(torch.tensor([[1, 2]]), cache=DynamicCache())
    wrong_cache = RWKV7Cache(tiny_config(hidden_size=128), batch_size=1)
    with pytest.raises(ValueError, match="does not match the model"):
        converted_model(torch.tensor([[1, 2]]), cache=wrong_cache)
    with pytest.raises(ValueError, match="batch size 2 but the input has batch size 1"):
        converted_model(torch.tensor([[1, 2]]), cache=converted_model.init_cache(2))
