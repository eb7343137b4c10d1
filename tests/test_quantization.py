"""Issue 11: bfloat16 weights (float32 recurrent state) and torchao int8 weight-only projections.

bfloat16 is held to the official package's own bfloat16 error; int8 to the same model with its weights
dequantized (the quantized product must compute exactly what its int8 values say) and, loosely, to float32."""

import oracle
import pytest
import torch
import torch.nn.functional as F
from helpers import relative_error

from modeling_rwkv7 import RWKV7ForCausalLM, linear_rwkv7
from modeling_rwkv7.conversion_mapping_rwkv7 import official_to_hf
from modeling_rwkv7.linear_rwkv7 import CANDIDATES, RWKV7Linear


def rms_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| over all entries (steadier than the max for bfloat16 rounding)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    actual, expected = actual.float(), expected.float()
    return ((actual - expected).norm() / expected.norm()).item()


def test_bfloat16_logits_are_within_the_official_bfloat16_error(official_checkpoint):
    """Our bfloat16 model against the official float32 logits errs (RMS) at most 1.5x what the official bfloat16
    model does (the same random checkpoint, 48 tokens, prefill and decoding), and its recurrent state stays
    float32."""
    state_dict, path, official_fp32 = official_checkpoint
    official_bf16 = oracle.load_oracle(path, strategy="cpu bf16")
    tokens = torch.randint(0, 1000, (48,), generator=torch.Generator().manual_seed(11)).tolist()
    expected, _ = oracle.oracle_logits(official_fp32, tokens)
    official_error = rms_relative_error(oracle.oracle_logits(official_bf16, tokens)[0], expected)

    config, hf_state_dict = official_to_hf(state_dict)
    model = RWKV7ForCausalLM(config)
    model.load_state_dict(hf_state_dict, strict=True)
    model = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        output = model(torch.tensor([tokens]), use_cache=True)
        cache = model.init_cache(batch_size=1)  # decoding token by token: the few-row products
        decoded = torch.cat([model(torch.tensor([[t]]), cache=cache).logits for t in tokens[:8]], dim=1)
    assert output.logits.dtype == torch.bfloat16 and output.logits.shape == (1, 48, 1000)
    assert all(layer.recurrent_state.dtype == torch.float32 for layer in output.cache.layers)
    ours_error = rms_relative_error(output.logits[0], expected)
    assert 0 < official_error < 0.1
    assert ours_error <= 1.5 * official_error, (ours_error, official_error)
    official_state, official_decoded = None, []
    for token in tokens[:8]:  # the official RNN path, in bfloat16
        logits, official_state = oracle.oracle_logits(official_bf16, [token], official_state)
        official_decoded.append(logits)
    official_decode_error = rms_relative_error(torch.cat(official_decoded), expected[:8])
    assert rms_relative_error(decoded[0], expected[:8]) <= 1.5 * official_decode_error


@pytest.fixture(scope="module")
def int8_pair(official_checkpoint, tmp_path_factory):
    """(float32 model, the same folder loaded with TorchAoConfig(Int8WeightOnlyConfig()), the vocabulary head
    included: transformers keeps the output embedding unquantized unless `modules_to_not_convert` is given)."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    config, hf_state_dict = official_to_hf(official_checkpoint[0])
    model = RWKV7ForCausalLM(config)
    model.load_state_dict(hf_state_dict, strict=True)
    folder = tmp_path_factory.mktemp("int8")
    model.save_pretrained(folder)
    quantized = RWKV7ForCausalLM.from_pretrained(
        folder,
        dtype=torch.float32,
        quantization_config=TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=[]),
    )
    return model.eval(), quantized.eval()


def test_int8_weights_load_into_every_projection_and_nothing_else(int8_pair):
    """Every projection matrix holds int8 values with per-row scales; norms, mixes, decay/learning-rate biases and
    the recurrent state stay float32."""
    _, quantized = int8_pair
    projections = [m for m in quantized.modules() if isinstance(m, RWKV7Linear)]
    assert projections and all(type(m.weight) not in (torch.Tensor, torch.nn.Parameter) for m in projections)
    assert all(m.weight.qdata.dtype == torch.int8 for m in projections)
    projection_weights = {id(m.weight) for m in projections}
    others = [p for p in quantized.parameters() if id(p) not in projection_weights]
    assert others and all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in others)
    with torch.no_grad():
        cache = quantized(torch.tensor([[1, 2, 3]]), use_cache=True).cache
    assert all(layer.recurrent_state.dtype == torch.float32 for layer in cache.layers)


def test_int8_model_computes_its_dequantized_weights_and_stays_near_float32(int8_pair):
    """Prefill and token-by-token decoding of the int8 model equal the float32 model holding the dequantized
    weights (to float32 rounding); against the original float32 weights the logits move by int8 rounding only."""
    model, quantized = int8_pair
    dequantized = RWKV7ForCausalLM(model.config)
    dequantized.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, RWKV7Linear):
                dequantized.get_submodule(name).weight.copy_(module.weight.dequantize())
    dequantized.eval()
    tokens = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        expected = dequantized(tokens).logits
        prefill = quantized(tokens).logits
        cache = quantized.init_cache(batch_size=2)
        decoded = torch.cat([quantized(tokens[:, t : t + 1], cache=cache).logits for t in range(24)], dim=1)
        original = model(tokens).logits
    assert prefill.shape == decoded.shape == (2, 24, 1000)
    assert relative_error(prefill, expected) < 1e-5
    assert relative_error(decoded, expected) < 1e-5
    int8_error = relative_error(prefill, original)
    assert 1e-4 < int8_error < 0.05  # really quantized, and only by rounding to 255 levels per row


def int8_projection(in_features: int, out_features: int, seed: int) -> RWKV7Linear:
    """An RWKV7Linear with a bias at a trained model's scale, quantized by torchao (int8 weight-only, per row)."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    generator = torch.Generator().manual_seed(seed)
    projection = RWKV7Linear(in_features, out_features)
    with torch.no_grad():
        projection.weight.copy_(torch.randn(out_features, in_features, generator=generator) / in_features**0.5)
        projection.bias.copy_(0.5 * torch.randn(out_features, generator=generator))
    quantize_(projection, Int8WeightOnlyConfig())
    return projection


@pytest.mark.parametrize("product", sorted(CANDIDATES["int8_rows"]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features,out_features", [(768, 3072), (3072, 768), (64, 768), (768, 32), (128, 1000)])
def test_every_int8_product_computes_the_dequantized_weight(forced_product, product, dtype, in_features, out_features):
    """1..16 rows against a torchao int8 weight: F.linear with the dequantized weight, to float32 rounding (float32
    rows) or bfloat16 rounding of the output (bfloat16 rows, as torchao's own product), whichever product is
    forced."""
    forced_product(product, [(in_features, out_features)], dtype=torch.int8)
    projection = int8_projection(in_features, out_features, seed=in_features + out_features)
    assert linear_rwkv7.weight_kind(projection.weight, dtype) == "int8_rows"
    dequantized = projection.weight.dequantize().float()
    generator = torch.Generator().manual_seed(out_features)
    with torch.no_grad():
        for rows in range(1, 17):
            inputs = torch.randn(rows, 1, in_features, generator=generator).to(dtype)
            output = projection.to(dtype)(inputs)
            expected = F.linear(inputs.float(), dequantized, projection.bias.float())
            assert output.shape == (rows, 1, out_features) and output.dtype == dtype
            assert relative_error(output, expected) < (1e-5 if dtype == torch.float32 else 1e-2)
    decisions = {choice.product for choice in linear_rwkv7.few_row_choices.values()}
    assert decisions == {product}  # the forced decision was read, nothing was measured instead


@pytest.mark.parametrize("product", sorted(CANDIDATES["int8_rows"]))
@pytest.mark.compile
def test_compiled_int8_products_compute_the_dequantized_weight(forced_product, product):
    """The same under torch.compile (inductor), for one and for three rows."""
    forced_product(product, [(256, 512)], dtype=torch.int8)
    projection = int8_projection(256, 512, seed=13)
    compiled = torch.compile(projection, fullgraph=True)
    generator = torch.Generator().manual_seed(14)
    with torch.no_grad():
        for rows in (1, 3):
            inputs = torch.randn(rows, 1, 256, generator=generator)
            expected = F.linear(inputs, projection.weight.dequantize().float(), projection.bias)
            assert relative_error(compiled(inputs), expected) < 1e-5


def test_an_int8_decision_is_measured_under_inference_mode(monkeypatch):
    """The first call measures both int8 candidates on zero-filled copies of the quantized weight (rebuilt through
    its tensor-subclass protocol), under `torch.inference_mode()` as generate() runs it, and then computes the
    dequantized product."""
    monkeypatch.setattr(linear_rwkv7, "few_row_choices", {})
    monkeypatch.setattr(linear_rwkv7, "_choices_threads", [0])
    projection = int8_projection(64, 96, seed=15)
    inputs = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(16))
    with torch.inference_mode():
        output = projection(inputs)
    ((key, choice),) = linear_rwkv7.few_row_choices.items()
    assert key == (96, 64, torch.int8, 1, False)
    assert set(choice.seconds) == set(CANDIDATES["int8_rows"]) and all(0 < s < 1 for s in choice.seconds.values())
    expected = F.linear(inputs, projection.weight.dequantize().float(), projection.bias)
    assert relative_error(output, expected) < 1e-5
