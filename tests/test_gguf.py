"""scripts/export_gguf.py: the file read back with gguf's reader holds every tensor llama.cpp's RWKV-7 loader
requires, named as gguf's RWKV7 layout names them, shaped as the loader creates them, with the values llama.cpp's
converter would write; a numpy run of llama.cpp's RWKV-7 graph on those tensors gives the `rwkv` package's logits;
what llama.cpp cannot hold is refused without a file."""

import codecs
import os
from pathlib import Path

import gguf
import numpy as np
import oracle
import pytest
import torch
from gguf import GGUFReader
from helpers import load_script

import modeling_rwkv7  # noqa: F401
from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM
from modeling_rwkv7.conversion_mapping_rwkv7 import official_to_hf

REPO = Path(__file__).resolve().parent.parent
export_gguf = load_script(REPO / "scripts" / "export_gguf.py")

VOCAB, C, LAYERS, N = 65536, 128, 2, 64
RANKS = (32, 40, 24, 48)  # decay, a, v, gate: all different, so a mixed-up rank shows


def loader_dims(config: RWKV7Config) -> dict[str, tuple[int, ...]]:
    """Every tensor llama.cpp's RWKV-7 loader creates (src/models/rwkv7.cpp, `load_arch_tensors`), with the ggml
    dims (ne, innermost first) it requires."""
    C, V, F = config.hidden_size, config.vocab_size, config.intermediate_size
    d_w, d_a, d_v, d_g = (
        config.decay_low_rank_dim,
        config.a_low_rank_dim,
        config.v_low_rank_dim,
        config.gate_low_rank_dim,
    )
    dims = {
        "token_embd.weight": (C, V),
        "token_embd_norm.weight": (C,),
        "token_embd_norm.bias": (C,),
        "output_norm.weight": (C,),
        "output_norm.bias": (C,),
        "output.weight": (C, V),
    }
    for i in range(config.num_hidden_layers):
        d_value = d_a if i == 0 else d_v  # layer 0's unused v1/v2 are created with the a rank
        dims.update(
            {
                f"blk.{i}.attn_norm.weight": (C,),
                f"blk.{i}.attn_norm.bias": (C,),
                f"blk.{i}.attn_norm_2.weight": (C,),
                f"blk.{i}.attn_norm_2.bias": (C,),
                f"blk.{i}.time_mix_w0.weight": (C,),
                f"blk.{i}.time_mix_w1.weight": (C, d_w),
                f"blk.{i}.time_mix_w2.weight": (d_w, C),
                f"blk.{i}.time_mix_a0.weight": (C,),
                f"blk.{i}.time_mix_a1.weight": (C, d_a),
                f"blk.{i}.time_mix_a2.weight": (d_a, C),
                f"blk.{i}.time_mix_v0.weight": (C,),
                f"blk.{i}.time_mix_v1.weight": (C, d_value),
                f"blk.{i}.time_mix_v2.weight": (d_value, C),
                f"blk.{i}.time_mix_g1.weight": (C, d_g),
                f"blk.{i}.time_mix_g2.weight": (d_g, C),
                f"blk.{i}.time_mix_lerp_fused.weight": (C, 1, 1, 6),
                f"blk.{i}.time_mix_k_k.weight": (C,),
                f"blk.{i}.time_mix_k_a.weight": (C,),
                f"blk.{i}.time_mix_r_k.weight": (C,),
                f"blk.{i}.time_mix_key.weight": (C, C),
                f"blk.{i}.time_mix_value.weight": (C, C),
                f"blk.{i}.time_mix_receptance.weight": (C, C),
                f"blk.{i}.time_mix_ln.weight": (C,),
                f"blk.{i}.time_mix_ln.bias": (C,),
                f"blk.{i}.time_mix_output.weight": (C, C),
                f"blk.{i}.channel_mix_lerp_k.weight": (C, 1, 1),
                f"blk.{i}.channel_mix_key.weight": (C, F),
                f"blk.{i}.channel_mix_value.weight": (F, C),
            }
        )
    return dims


def converter_values(official: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """What llama.cpp's convert_hf_to_gguf.py (`Rwkv7Model.modify_tensors`) writes for official-layout weights: the
    LoRA factors transposed, vectors squeezed, r_k flattened, the six token-shift mixes stacked, layer 0's v0/v1/v2
    copied from a0/a1/a2, the head as `output`."""
    top = {
        "emb.weight": "token_embd",
        "blocks.0.ln0.weight": "token_embd_norm",
        "blocks.0.ln0.bias": "token_embd_norm",
        "ln_out.weight": "output_norm",
        "ln_out.bias": "output_norm",
        "head.weight": "output",
    }
    names = {
        "ln1": "attn_norm",
        "ln2": "attn_norm_2",
        "att.ln_x": "time_mix_ln",
        "att.receptance": "time_mix_receptance",
        "att.key": "time_mix_key",
        "att.value": "time_mix_value",
        "att.output": "time_mix_output",
        "ffn.key": "channel_mix_key",
        "ffn.value": "channel_mix_value",
        "ffn.x_k": "channel_mix_lerp_k",
    }
    values = {}
    for name, tensor in official.items():
        if name in top:
            values[f"{top[name]}.{name.rsplit('.', 1)[1]}"] = tensor
            continue
        _, layer, rest = name.split(".", 2)
        stem, _, leaf = rest.rpartition(".")
        if rest.startswith("att.x_"):
            continue
        if leaf in ("weight", "bias") and stem in names:
            values[f"blk.{layer}.{names[stem]}.{leaf}"] = tensor.squeeze()
        elif rest in names:
            values[f"blk.{layer}.{names[rest]}.weight"] = tensor.squeeze()
        else:  # att.w0 .. att.g2, k_k, k_a, r_k
            tensor = tensor.squeeze()
            if leaf[-1] in "12":
                tensor = tensor.t()
            if leaf == "r_k":
                tensor = tensor.flatten()
            values[f"blk.{layer}.time_mix_{leaf}.weight"] = tensor
            if layer == "0" and leaf[0] == "a":
                values[f"blk.0.time_mix_v{leaf[1]}.weight"] = tensor
    for layer in range(LAYERS):
        mixes = [official[f"blocks.{layer}.att.x_{m}"] for m in "rwkvag"]
        values[f"blk.{layer}.time_mix_lerp_fused.weight"] = torch.stack(mixes)
    return {name: t.float().numpy() for name, t in values.items()}


def read(path) -> tuple[dict[str, object], dict]:
    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


def llama_cpp_logits(tensors: dict, fields: dict, tokens: list[int]) -> np.ndarray:
    """llama.cpp's RWKV-7 graph (src/models/rwkv7.cpp, graph/rwkv7-base.cpp) in float64 numpy, on the GGUF tensors.
    `ggml_mul_mat(W, x)` with W of ne {in, out} is `x @ W.T` on the stored `[out, in]` array."""
    t = {
        name: np.asarray(tensor.data, dtype=np.float64).reshape(tuple(int(d) for d in tensor.shape[::-1]))
        for name, tensor in tensors.items()
    }
    eps, N = fields["rwkv7.attention.layer_norm_epsilon"], fields["rwkv7.wkv.head_size"]
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731

    def norm(x, prefix):
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
        return x * t[prefix + ".weight"] + t[prefix + ".bias"]

    def shifted(x):
        return np.concatenate([np.zeros_like(x[:1]), x[:-1]])

    x = norm(t["token_embd.weight"][tokens], "token_embd_norm")
    T, C = x.shape
    H = C // N
    v_first = None
    for i in range(fields["rwkv7.block_count"]):
        p = f"blk.{i}."
        att = norm(x, p + "attn_norm")
        xr, xw, xk, xv, xa, xg = att + (shifted(att) - att) * t[p + "time_mix_lerp_fused.weight"].reshape(6, 1, C)
        r = xr @ t[p + "time_mix_receptance.weight"].T
        w = np.exp(
            -0.606531
            * sigmoid(
                np.tanh(xw @ t[p + "time_mix_w1.weight"].T) @ t[p + "time_mix_w2.weight"].T
                + t[p + "time_mix_w0.weight"]
            )
        )
        k = xk @ t[p + "time_mix_key.weight"].T
        v = xv @ t[p + "time_mix_value.weight"].T
        if v_first is None:
            v_first = v
        else:
            mix = sigmoid(
                xv @ t[p + "time_mix_v1.weight"].T @ t[p + "time_mix_v2.weight"].T + t[p + "time_mix_v0.weight"]
            )
            v = v + (v_first - v) * mix
        g = sigmoid(xg @ t[p + "time_mix_g1.weight"].T) @ t[p + "time_mix_g2.weight"].T
        a = sigmoid(xa @ t[p + "time_mix_a1.weight"].T @ t[p + "time_mix_a2.weight"].T + t[p + "time_mix_a0.weight"])
        kk = (k * t[p + "time_mix_k_k.weight"]).reshape(T, H, N)
        kk = (kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), 1e-12)).reshape(T, C)
        k = k + a * k * t[p + "time_mix_k_a.weight"] - k * t[p + "time_mix_k_a.weight"]
        heads = lambda z: z.reshape(T, H, N)  # noqa: E731
        rh, wh, kh, vh, ah, bh = heads(r), heads(w), heads(k), heads(v), heads(-kk), heads(kk * a)
        state, out = np.zeros((H, N, N)), np.zeros((T, H, N))  # state[h, value, key]
        for step in range(T):
            sa = np.einsum("hvk,hk->hv", state, ah[step])
            state = (
                state * wh[step][:, None, :]
                + sa[:, :, None] * bh[step][:, None, :]
                + vh[step][:, :, None] * kh[step][:, None, :]
            )
            out[step] = np.einsum("hvk,hk->hv", state, rh[step])
        out = (out - out.mean(-1, keepdims=True)) / np.sqrt(out.var(-1, keepdims=True) + 64e-5)
        y = out.reshape(T, C) * t[p + "time_mix_ln.weight"] + t[p + "time_mix_ln.bias"]
        bonus = (heads(k) * heads(r) * t[p + "time_mix_r_k.weight"].reshape(H, N)).sum(-1, keepdims=True) * heads(v)
        x = x + ((y + bonus.reshape(T, C)) * g) @ t[p + "time_mix_output.weight"].T
        ffn = norm(x, p + "attn_norm_2")
        xk = ffn + (shifted(ffn) - ffn) * t[p + "channel_mix_lerp_k.weight"].reshape(C)
        x = x + np.maximum(xk @ t[p + "channel_mix_key.weight"].T, 0) ** 2 @ t[p + "channel_mix_value.weight"].T
    return norm(x, "output_norm") @ t["output.weight"].T


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    """Official weights with the World vocabulary (65536 ids), the `rwkv` package's logits, and a plain
    `save_pretrained` folder of ours (no tokenizer files in it)."""
    official = oracle.random_official_state_dict(
        vocab_size=VOCAB, hidden_size=C, num_layers=LAYERS, head_dim=N, ranks=RANKS, seed=2718
    )
    folder = tmp_path_factory.mktemp("gguf")
    path = oracle.write_official_checkpoint(official, folder)
    tokens = torch.randint(0, 65530, (13,), generator=torch.Generator().manual_seed(5)).tolist()
    expected, _ = oracle.oracle_logits(oracle.load_oracle(path), tokens)
    config, state_dict = official_to_hf(official)
    model = RWKV7ForCausalLM(config)
    model.load_state_dict(state_dict, strict=True)
    model.save_pretrained(folder / "saved")
    return official, folder / "saved", tokens, expected.numpy()


@pytest.mark.slow
def test_export_matches_llama_cpp_layout_and_computes_the_model(world_model, tmp_path):
    official, saved, tokens, expected = world_model
    assert not (saved / "rwkv_vocab_v20230424.txt").exists()  # what made llama.cpp's converter assert
    path = export_gguf.export_gguf(saved, tmp_path / "model.gguf")
    assert sorted(os.listdir(tmp_path)) == ["model.gguf"]
    fields, tensors = read(path)
    config = RWKV7Config.from_pretrained(saved)

    assert fields["general.architecture"] == "rwkv7"
    assert {
        key: fields[f"rwkv7.{key}"]
        for key in (
            "embedding_length",
            "block_count",
            "wkv.head_size",
            "attention.decay_lora_rank",
            "attention.iclr_lora_rank",
            "attention.value_residual_mix_lora_rank",
            "attention.gate_lora_rank",
            "feed_forward_length",
            "token_shift_count",
            "attention.head_count",
        )
    } == {
        "embedding_length": C,
        "block_count": LAYERS,
        "wkv.head_size": N,
        "attention.decay_lora_rank": RANKS[0],
        "attention.iclr_lora_rank": RANKS[1],
        "attention.value_residual_mix_lora_rank": RANKS[2],
        "attention.gate_lora_rank": RANKS[3],
        "feed_forward_length": 4 * C,
        "token_shift_count": 2,
        "attention.head_count": 0,
    }
    assert fields["rwkv7.attention.layer_norm_epsilon"] == pytest.approx(1e-5)

    # names: exactly the loader's tensors, each a name of gguf's RWKV7 layout
    dims = loader_dims(config)
    assert set(tensors) == set(dims)
    layout = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.RWKV7]}
    for name in tensors:
        base = name.rsplit(".", 1)[0]
        assert (base if not base.startswith("blk.") else "blk.{bid}." + base.split(".", 2)[2]) in layout, name
    # shapes as the loader creates them (ggml compares all four dims, absent ones being 1), values as the converter
    values = converter_values(official)
    assert set(values) == set(tensors)
    for name, tensor in tensors.items():
        ne = [int(d) for d in tensor.shape]
        assert ne + [1] * (4 - len(ne)) == list(dims[name]) + [1] * (4 - len(dims[name])), name
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
        np.testing.assert_array_equal(np.asarray(tensor.data).reshape(values[name].shape), values[name], err_msg=name)

    logits = llama_cpp_logits(tensors, fields, tokens)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=2e-4)


@pytest.mark.slow
def test_export_carries_the_world_vocabulary(world_model, tmp_path):
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    path = export_gguf.export_gguf(world_model[1], tmp_path / "model.gguf")
    reader = GGUFReader(path)
    field = reader.get_field("tokenizer.ggml.tokens")
    tokens = [bytes(field.parts[i]) for i in field.data]
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    assert reader.get_field("tokenizer.ggml.model").contents() == "rwkv"
    assert len(tokens) == len(types) == VOCAB
    assert tokens[0] == b"<|endoftext|>" and types[0] == gguf.TokenType.CONTROL  # our token 0, not llama.cpp's <s>
    official = TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))
    for token_id in range(1, 65530):
        # llama.cpp reads each text with its backslash escapes (\\xNN, \\n, \\', ...) undone
        assert codecs.escape_decode(tokens[token_id])[0] == official.idx2token[token_id], token_id
        assert types[token_id] == gguf.TokenType.NORMAL
    assert tokens[65530:] == [f"[PAD{i}]".encode() for i in range(65530, VOCAB)]
    assert set(types[65530:]) == {gguf.TokenType.UNUSED}
    for key, value in (("bos_token_id", 0), ("eos_token_id", 0), ("padding_token_id", 0), ("eot_token_id", 261)):
        assert reader.get_field(f"tokenizer.ggml.{key}").contents() == value, key
    assert reader.get_field("tokenizer.chat_template").contents() == "rwkv-world"


@pytest.mark.slow
def test_bf16_export_and_tied_embeddings(world_model, tmp_path):
    official, saved, _, _ = world_model
    config, state_dict = official_to_hf(official)
    config.tie_word_embeddings = True
    tied = RWKV7ForCausalLM(config)
    state_dict.pop("lm_head.weight")
    tied.load_state_dict(state_dict, strict=False)

    fields, tensors = read(export_gguf.export_gguf(tied, tmp_path / "tied.gguf", outtype="bf16"))
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_BF16
    big = {"token_embd.weight", "output.weight"} | {
        f"blk.{i}.{m}.weight"
        for i in range(LAYERS)
        for m in (
            "time_mix_key",
            "time_mix_value",
            "time_mix_receptance",
            "time_mix_output",
            "channel_mix_key",
            "channel_mix_value",
        )
    }
    for name, tensor in tensors.items():
        expected_type = gguf.GGMLQuantizationType.BF16 if name in big else gguf.GGMLQuantizationType.F32
        assert tensor.tensor_type == expected_type, name
    # llama.cpp needs a separate output matrix: the tied head is written as a copy of the embedding
    embedding = official["emb.weight"].to(torch.bfloat16).view(torch.int16).numpy()
    for name in ("token_embd.weight", "output.weight"):
        stored = np.asarray(tensors[name].data).view(np.int16).reshape(VOCAB, C)
        np.testing.assert_array_equal(stored, embedding, err_msg=name)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"head_dim": 32}, r"head_dim \* norm_eps = 32 \* 1e-05 = 0\.00032; llama\.cpp hardcodes 0\.00064"),
        ({"vocab_size": 1000}, r"vocab_size=1000 is smaller than the RWKV World vocabulary \(65530 ids\)"),
        ({"input_size": 16}, r"llama\.cpp's RWKV-7 is a token language model"),
    ],
)
def test_what_llama_cpp_cannot_hold_is_refused_without_a_file(tmp_path, changes, message):
    sizes = {"vocab_size": 65536, "hidden_size": 64, "head_dim": 64, "num_hidden_layers": 1, **changes}
    model = RWKV7ForCausalLM(RWKV7Config(**sizes))
    with pytest.raises(ValueError, match=message):
        export_gguf.export_gguf(model, tmp_path / "model.gguf")
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_cli_refuses_an_unknown_outtype(world_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_gguf.main([str(world_model[1]), str(tmp_path / "x.gguf"), "--outtype", "q4"])
    assert "invalid choice: 'q4'" in capsys.readouterr().err and os.listdir(tmp_path) == []
