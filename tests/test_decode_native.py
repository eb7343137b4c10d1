"""The native CPU decoding step (the package's `block_decode_step` per block and `gemv` for the head), which a plain
decoding call of the model takes by default on CPU (`dispatch_rwkv7`), computes what the eager model computes, token
after token: float32 weights to float32 rounding; bfloat16 weights times the rows rounded to bfloat16, summed in
float32 (no further from the float32 truth than the eager bfloat16 model); torchao int8 and int4 weights as their
dequantized values. `gemv` against F.linear for every projection shape of the presets, and batch invariance. Calls
the step cannot run (adapters, padding, gradients) run the eager model."""

import copy
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers import STATE_NAMES, VOCAB, decode, default_path, relative_error, state_errors
from helpers import eager_model as random_model
from helpers import random_tokens as tokens_for
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache

from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM, RWKV7Model, dispatch_rwkv7
from modeling_rwkv7.decode_rwkv7 import native_decode_step
from modeling_rwkv7.linear_rwkv7 import RWKV7Linear
from modeling_rwkv7.state_tuning import RWKV7StateTuning

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernel(native_decoding_ops):
    """The package's native CPU decoding ops (built once per machine; see conftest)."""
    return native_decoding_ops


# --- the step against the eager model ------------------------------------------------------------------------


@pytest.fixture
def counting(kernel, monkeypatch):
    """The native ops the default path loads, counting the block steps they run."""
    counting = CountingKernel(kernel)
    monkeypatch.setitem(dispatch_rwkv7._native, "module", counting)
    return counting


@pytest.mark.parametrize("batch", [1, 3])
def test_float32_default_decoding_is_native_and_matches_the_eager_step_over_64_tokens(counting, batch):
    """A 5-token eager prompt, then 64 tokens through the eager model and a plain call of the same model (the
    default path: native) from copies of its cache: the logits at every token and, at the end, every state tensor
    and the token count agree to float32 rounding; every default step ran the native blocks."""
    model = random_model(seed=50 + batch)
    tokens = tokens_for(batch, 69, seed=60 + batch)
    with torch.no_grad():
        eager_cache = model(tokens[:, :5], use_cache=True).cache
    native_cache = eager_cache.copy()
    eager = decode(model, tokens[:, 5:], eager_cache)
    native = decode(default_path(model), tokens[:, 5:], native_cache)
    assert counting.blocks == 64 * len(model.model.layers)
    assert native.dtype == torch.float32
    for t in range(64):
        assert relative_error(native[:, t], eager[:, t]) <= 1e-5, f"token {5 + t}"
    errors = state_errors(native_cache, eager_cache)
    assert max(errors.values()) <= 1e-5, errors
    assert int(native_cache.seen_tokens) == int(eager_cache.seen_tokens) == 69


def test_bfloat16_native_step_is_no_further_from_the_float32_truth_than_eager_bfloat16(counting):
    """bfloat16 weights: the native step rounds the inputs of its products to bfloat16 and computes the rest in
    float32 (the logits and shift states rounded to bfloat16), the eager bfloat16 model after every op. Truth: the
    float32 eager model holding the same bfloat16-rounded weights. Over 32 tokens from a fresh cache the native
    step's logits and states are no further from it than the eager bfloat16 model's, and close in absolute terms."""
    model = random_model(seed=71).to(torch.bfloat16)
    truth_model = copy.deepcopy(model).float()
    tokens = tokens_for(2, 32, seed=72)
    native_cache, eager_cache, truth_cache = (m.init_cache(batch_size=2) for m in (model, model, truth_model))
    eager = decode(model, tokens, eager_cache)
    truth = decode(truth_model, tokens, truth_cache)
    native = decode(default_path(model), tokens, native_cache)
    assert counting.blocks == 32 * len(model.model.layers)
    assert native.dtype == eager.dtype == torch.bfloat16
    native_error, eager_error = relative_error(native, truth), relative_error(eager, truth)
    assert native_error <= eager_error, (native_error, eager_error)
    assert native_error <= 3e-2, native_error  # measured 1.5e-2 (eager: larger): the products' rounded inputs
    # the states: the native step's (its shift states in the model's dtype, like eager's) vs eager bfloat16's
    state_errors(native_cache, eager_cache)  # shapes and dtypes
    native_states = state_errors(native_cache, truth_cache, same_dtype=False)
    eager_states = state_errors(eager_cache, truth_cache, same_dtype=False)
    for key, error in native_states.items():
        assert error <= min(eager_states[key], 1e-2), (key, error, eager_states[key])  # measured 1.5e-3 .. 4.5e-3
    assert int(native_cache.seen_tokens) == int(truth_cache.seen_tokens) == 32


def test_int8_native_step_computes_the_dequantized_weights(counting):
    """torchao int8 weight-only (every projection and the head, one scale per row): over 32 tokens from a fresh
    cache the native step's logits and states equal the float32 eager model holding the dequantized weights."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    original = random_model(seed=81)
    model = copy.deepcopy(original)
    quantize_(model, Int8WeightOnlyConfig())
    projections = {name: m for name, m in model.named_modules() if isinstance(m, RWKV7Linear)}
    assert "lm_head" in projections and len(projections) == 27  # 12 in layer 0 (no value LoRA), 14 in layer 1, head
    assert all(
        m.weight.qdata.dtype == torch.int8 and m.weight.scale.numel() == m.weight.shape[0]
        for m in projections.values()
    )
    dequantized = copy.deepcopy(original)
    with torch.no_grad():
        for name, module in projections.items():
            dequantized.get_submodule(name).weight.copy_(module.weight.dequantize())
    tokens = tokens_for(2, 32, seed=82)
    native_cache, truth_cache = model.init_cache(batch_size=2), dequantized.init_cache(batch_size=2)
    native = decode(default_path(model), tokens, native_cache)
    assert counting.blocks == 32 * len(model.model.layers)
    truth = decode(dequantized, tokens, truth_cache)
    assert native.dtype == torch.float32
    assert relative_error(native, truth) <= 1e-5
    errors = state_errors(native_cache, truth_cache)
    assert max(errors.values()) <= 1e-5, errors
    # really quantized: the original float32 weights give other logits
    assert relative_error(truth, decode(original, tokens, original.init_cache(batch_size=2))) > 1e-3


def int4_config(group_size: int = 32):
    """torchao's int4 weight-only config with symmetric scales per group (llama.cpp's Q4_0 layout at 32)."""
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))


def dequantized_copy(original: RWKV7ForCausalLM, quantized: RWKV7ForCausalLM) -> RWKV7ForCausalLM:
    """`original` holding the dequantized float32 values of `quantized`'s projection weights."""
    dequantized = copy.deepcopy(original)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, RWKV7Linear):
                dequantized.get_submodule(name).weight.copy_(module.weight.dequantize())
    return dequantized


@pytest.mark.parametrize("batch", [1, 3])
def test_int4_native_step_computes_the_dequantized_weights(counting, batch):
    """torchao int4 weight-only, symmetric per group (every projection and the head): over 64 tokens from a fresh
    cache the native step's logits and every state tensor equal the float32 eager model holding the dequantized
    weights, and greedy generate() gives its tokens."""
    from torchao.quantization import IntxUnpackedToInt8Tensor, quantize_

    original = random_model(seed=83)
    model = copy.deepcopy(original)
    quantize_(model, int4_config(32))
    projections = [m for m in model.modules() if isinstance(m, RWKV7Linear)]
    assert len(projections) == 27 and all(isinstance(m.weight, IntxUnpackedToInt8Tensor) for m in projections)
    dequantized = dequantized_copy(original, model)
    tokens = tokens_for(batch, 64, seed=84)
    native_cache, truth_cache = model.init_cache(batch_size=batch), dequantized.init_cache(batch_size=batch)
    native = decode(default_path(model), tokens, native_cache)
    assert counting.blocks == 64 * len(model.model.layers)
    truth = decode(dequantized, tokens, truth_cache)
    # float32 rounding over 64 recurrent steps; the eager reference's few-row products are measured per machine
    assert relative_error(native, truth) <= 2e-5
    errors = state_errors(native_cache, truth_cache)
    assert max(errors.values()) <= 2e-5, errors
    assert relative_error(truth, decode(original, tokens, original.init_cache(batch_size=batch))) > 1e-2  # 4 bits
    prompt = tokens[:, :5]
    greedy = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(prompt, **greedy), dequantized.generate(prompt, **greedy))


def test_int4_weights_from_from_pretrained_decode_natively(counting, tmp_path):
    """`from_pretrained(..., quantization_config=TorchAoConfig(int4 config))`, then a plain generate(): the native
    step runs, and gives the tokens of the same model decoding eagerly (torchao's own int4 linear)."""
    from transformers import TorchAoConfig

    default_path(random_model(seed=85)).save_pretrained(tmp_path)
    config = TorchAoConfig(int4_config(32), modules_to_not_convert=[])
    model = RWKV7ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, quantization_config=config)
    assert type(model.lm_head.weight).__name__ == "IntxUnpackedToInt8Tensor"
    prompt = tokens_for(2, 6, seed=86)
    greedy = dict(
        max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    native = model.generate(prompt, **greedy)
    assert counting.blocks == 9 * len(model.model.layers)  # every decoding step after the prefill
    model.set_implementation(decode="eager")
    eager = model.generate(prompt, **greedy)
    assert torch.equal(native.sequences, eager.sequences)
    for native_logits, eager_logits in zip(native.logits, eager.logits):
        assert relative_error(native_logits, eager_logits) <= 1e-4  # torchao dequantizes in its own order


def int4_groups_weight(out_features: int, in_features: int, group_size: int, generator, scale_dtype=torch.float32):
    """Random int4 values over the whole range and one positive scale per group of `group_size` values of a row."""
    q = torch.randint(-8, 8, (out_features, in_features), dtype=torch.int8, generator=generator)
    scale = (torch.rand(out_features, in_features // group_size, generator=generator) + 0.5) * (in_features**-0.5 / 4)
    return q, scale.to(scale_dtype)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, group_size", [((64, 128), 32), ((96, 768), 128), ((7, 64), 64), ((768, 3072), 32)])
def test_gemv_of_an_int4_weight_equals_f_linear_of_its_values(kernel, shape, group_size, scale_dtype):
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(out_features + in_features + group_size)
    q, scale = int4_groups_weight(out_features, in_features, group_size, generator, scale_dtype)
    packed = kernel.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (out_features, in_features // 2)
    dense = (q.float().reshape(out_features, -1, group_size) * scale.float()[:, :, None]).reshape(shape)
    for n in (1, 2, 3, 4, 5, 8, 16):
        rows = torch.randn(n, in_features, generator=generator)
        assert relative_error(kernel.gemv(rows, packed, scale), F.linear(rows, dense)) <= 1e-5, f"{n} rows"


def test_int4_packing_and_scales_are_checked(kernel):
    q = torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"pack_int4 takes integers in \[-8, 7\] with a multiple of 32 per row"):
        kernel.pack_int4(q[:, :48])
    with pytest.raises(ValueError, match=r"got torch.int8 \[4, 64\] in \[-9, -9\]"):
        kernel.pack_int4(q - 9)
    packed, rows = kernel.pack_int4(q), torch.randn(1, 64)
    with pytest.raises(RuntimeError, match=r"int4 weight 0 \(uint8 \[4, 32\]\) needs scales \[4, groups\]"):
        kernel.gemv(rows, packed, None)
    with pytest.raises(RuntimeError, match="has 3 scale groups; a group must be a multiple of 32 values"):
        kernel.gemv(rows, packed, torch.ones(4, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_reads_in_place_weight_updates(kernel, dtype):
    """The step holds the model's tensors: after in-place changes of a projection, the first and the last norms, a
    block's norm, a mix and the head, the next tokens are those of the changed model (float32: the eager model
    itself; bfloat16: the float32 eager model holding the changed bfloat16 weights, as in the bfloat16 test), and
    differ from before the change."""
    model = random_model(seed=91).to(dtype)
    tokens = tokens_for(2, 8, seed=92)
    step = native_decode_step(model, kernel)
    native_cache = model.init_cache(batch_size=2)
    decode(step, tokens[:, :4], native_cache)
    with torch.no_grad():
        model.model.layers[1].ffn.value.weight.mul_(-1.5)
        model.model.layers[0].pre_norm.weight.mul_(2.0)
        model.model.layers[0].attn_norm.bias.add_(0.5)
        model.model.layers[1].attn.x_k.mul_(0.25)
        model.model.norm.weight.mul_(-1.0)
        model.model.norm.bias.add_(0.5)
        model.lm_head.weight.mul_(0.5)
    native = decode(step, tokens[:, 4:], native_cache)
    truth_model = copy.deepcopy(model).float()
    truth_cache = truth_model.init_cache(batch_size=2)
    original = random_model(seed=91).to(dtype).float()
    original_cache = original.init_cache(batch_size=2)
    # the truth runs the first 4 tokens with the original weights, the rest with the changed ones
    decode(original, tokens[:, :4], truth_cache)
    truth = decode(truth_model, tokens[:, 4:], truth_cache)
    unchanged = decode(original, tokens, original_cache)[:, 4:]
    assert relative_error(truth, unchanged) > 0.1
    assert relative_error(native, truth) <= (1e-5 if dtype == torch.float32 else 1e-2)


def test_replaced_parameters_and_modules_are_read_again(kernel, caplog):
    """A parameter or a projection replaced after the step was made is found at the next call and read (the step
    gives the eager model's tokens); a LoRA adapter attached after it was made is found at the next call, which
    decodes through the eager model and says so."""
    model = random_model(seed=95)
    tokens = tokens_for(2, 8, seed=96)
    step = native_decode_step(model, kernel)
    native_cache = model.init_cache(batch_size=2)
    decode(step, tokens[:, :3], native_cache)
    eager_cache = model.init_cache(batch_size=2)
    decode(model, tokens[:, :3], eager_cache)
    generator = torch.Generator().manual_seed(97)
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 128, generator=generator) * 128**-0.5)
        value = RWKV7Linear(512, 128, bias=False)
        value.weight.copy_(torch.randn(128, 512, generator=generator) * 512**-0.5)
        model.model.layers[1].ffn.value = value
        model.model.layers[0].attn.x_r = torch.nn.Parameter(
            torch.rand(model.model.layers[0].attn.x_r.shape, generator=generator)
        )
    eager = decode(model, tokens[:, 3:6], eager_cache)
    native = decode(step, tokens[:, 3:6], native_cache)
    assert relative_error(native, eager) <= 1e-5
    errors = state_errors(native_cache, eager_cache)
    assert max(errors.values()) <= 1e-5, errors

    # an adapter attached after the step was made: the next call finds it (the step is no longer readable), and
    # the default path decodes through the eager model and says so
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["key"]))  # wraps in place
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1, generator=generator)
    with caplog.at_level(logging.WARNING):
        assert not step.readable()
        with pytest.raises(ValueError, match="cannot read"):
            step(tokens[:, 6:7], native_cache)
        native = decode(default_path(model), tokens[:, 6:8], native_cache)
    assert any("model.layers.0.ffn.key" in message for message in fallback_warnings(caplog))
    model.set_implementation(decode="eager")
    assert relative_error(native, decode(model, tokens[:, 6:8], eager_cache)) <= 1e-5


# --- gemv ----------------------------------------------------------------------------------------------------


def projection_shapes(config_file: str) -> list:
    """The (out, in) shape of every projection of the preset `configuration/<config_file>` (the head included when
    it has a vocabulary), read off the model built on the meta device."""
    config = RWKV7Config.from_json_file(str(REPO / "configuration" / config_file))
    model_class = RWKV7ForCausalLM if config.vocab_size is not None else RWKV7Model
    with torch.device("meta"):
        model = model_class(config)
    return sorted({tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)})


SMALL_SHAPES = [
    (file, shape)
    for file in ("rwkv7-0.1b.json", "seed-default.json")
    for shape in projection_shapes(file)
    if shape[0] < 65536
]
# random_model's head and odd sizes (tails of every vector width)
SMALL_SHAPES += [("random_model", (VOCAB, 128)), ("odd", (37, 301)), ("odd", (5, 7))]


def test_the_preset_shapes_are_the_expected_ones():
    """The shape lists below hold what the presets say (so the gemv tests cover the real projections)."""
    shapes_01b = projection_shapes("rwkv7-0.1b.json")
    assert set(shapes_01b) == {
        (768, 768),
        (64, 768),
        (768, 64),
        (32, 768),
        (768, 32),
        (128, 768),
        (768, 128),
        (3072, 768),
        (768, 3072),
        (65536, 768),
    }
    assert (256, 287) in projection_shapes("seed-default.json")  # the feature encoder's input projection


def int8_rows_weight(out_features: int, in_features: int, generator, scale_dtype=torch.float32):
    """Random int8 values over the whole range and one positive scale per row (a dequantized weight ~ 1/sqrt(in))."""
    q = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
    scale = (torch.rand(out_features, generator=generator) + 0.5) * (in_features**-0.5 / 64)
    return q, scale.to(scale_dtype)


@pytest.mark.parametrize("weight_kind", ["float32", "bfloat16", "int8", "int8-bf16-scale"])
@pytest.mark.parametrize(
    "shape", [shape for _, shape in SMALL_SHAPES], ids=[f"{f}-{s[0]}x{s[1]}" for f, s in SMALL_SHAPES]
)
def test_gemv_equals_f_linear(kernel, shape, weight_kind):
    """1, 2, 3, 5, 8 and 16 float32 rows times every projection weight: F.linear of the float32 rows (rounded to
    bfloat16 for a bfloat16 weight) with the weight's float32 value (an int8 weight: its values times its scales),
    to float32 rounding, in float32."""
    out_features, in_features = shape
    generator = torch.Generator().manual_seed(out_features * 7919 + in_features)
    weight, scale, dense = _weight(weight_kind, out_features, in_features, generator)
    for n in (1, 2, 3, 5, 8, 16):
        rows = torch.randn(n, in_features, generator=generator)
        actual = kernel.gemv(rows, weight, scale)
        assert actual.dtype == torch.float32
        assert relative_error(actual, F.linear(rows_as_multiplied(rows, weight), dense)) <= 1e-5, f"{n} rows"


def rows_as_multiplied(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The float32 values gemv multiplies `weight` by: the rows, rounded to bfloat16 for a bfloat16 weight."""
    return rows.bfloat16().float() if weight.dtype == torch.bfloat16 else rows


@pytest.mark.parametrize("weight_kind", ["float32", "bfloat16", "int8", "int4"])
def test_gemv_is_batch_invariant(kernel, weight_kind):
    """Each row of a batch gets exactly (bit for bit) what it gets alone or in a batch of another size, whichever
    tile computes it: a request decodes the same alone and among others (continuous batching)."""
    generator = torch.Generator().manual_seed(77)
    if weight_kind == "int4":
        weight = kernel.pack_int4(torch.randint(-8, 8, (197, 768), dtype=torch.int8, generator=generator))
        scale = torch.rand(197, 24, generator=generator)
    else:
        weight, scale, _ = _weight(weight_kind, 197, 768, generator)  # 197 outputs: whole and partial tiles
    rows = torch.randn(37, 768, generator=generator)
    batched = kernel.gemv(rows, weight, scale)
    for n in (1, 2, 3, 5, 11):
        assert torch.equal(kernel.gemv(rows[:n], weight, scale), batched[:n]), n
        assert torch.equal(kernel.gemv(rows[n : 2 * n + 1], weight, scale), batched[n : 2 * n + 1]), n


def _weight(kind: str, out_features: int, in_features: int, generator):
    """(weight, scale or None, its float32 value)."""
    if kind.startswith("int8"):
        q, scale = int8_rows_weight(
            out_features, in_features, generator, torch.bfloat16 if kind == "int8-bf16-scale" else torch.float32
        )
        return q, scale, q.float() * scale.float()[:, None]
    weight = (torch.randn(out_features, in_features, generator=generator) * in_features**-0.5).to(getattr(torch, kind))
    return weight, None, weight.float()


@pytest.mark.parametrize("weight_kind", ["float32", "bfloat16", "int8"])
def test_gemv_the_0_1b_head(kernel, weight_kind):
    """The 0.1B vocabulary head (65536 x 768), 1 and 16 rows."""
    generator = torch.Generator().manual_seed(65536)
    weight, scale, dense = _weight(weight_kind, 65536, 768, generator)
    for n in (1, 16):
        rows = torch.randn(n, 768, generator=generator)
        expected = F.linear(rows_as_multiplied(rows, weight), dense)
        assert relative_error(kernel.gemv(rows, weight, scale), expected) <= 1e-5, f"{n} rows"


@pytest.mark.parametrize("weight_kind", ["float32", "bfloat16", "int8"])
def test_gemv_bfloat16_rows_return_bfloat16(kernel, weight_kind):
    """bfloat16 rows: the product of their float32 values, summed in float32 and rounded once to bfloat16."""
    generator = torch.Generator().manual_seed(3)
    for out_features, in_features in [(3072, 768), (768, 3072), (64, 768), (VOCAB, 128)]:
        weight, scale, dense = _weight(weight_kind, out_features, in_features, generator)
        for n in (1, 3, 16):
            rows = torch.randn(n, in_features, generator=generator).bfloat16()
            actual = kernel.gemv(rows, weight, scale)
            assert actual.dtype == torch.bfloat16 and actual.shape == (n, out_features)
            expected = F.linear(rows.float(), dense)
            # one rounding of each output: within half a bfloat16 ulp of the float32 sum (plus float32 rounding)
            bound = expected.abs() * 2.0**-8 + 1e-5 * expected.abs().max()
            assert ((actual.float() - expected).abs() <= bound).all(), (out_features, in_features, n)


@pytest.mark.compile
def test_gemv_compiles_fullgraph(kernel):
    """torch.compile(fullgraph=True) traces gemv through its fake implementation and runs the same product."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(3072, 768, generator=generator) * 768**-0.5
    q, scale = int8_rows_weight(768, 3072, generator)
    dense = torch.compile(lambda h: kernel.gemv(h, weight, None), fullgraph=True)
    quantized = torch.compile(lambda h: kernel.gemv(h, q, scale) * 2, fullgraph=True)
    rows = torch.randn(3, 768, generator=generator)
    compiled = dense(rows)
    assert compiled.shape == (3, 3072) and compiled.dtype == torch.float32
    assert torch.equal(compiled, kernel.gemv(rows, weight, None))
    assert relative_error(compiled, F.linear(rows, weight)) <= 1e-5
    wide_rows = torch.randn(3, 3072, generator=generator)
    assert relative_error(quantized(wide_rows), 2 * F.linear(wide_rows, q.float() * scale[:, None])) <= 1e-5


# --- refusals ------------------------------------------------------------------------------------------------


def lora_model(targets: list) -> RWKV7ForCausalLM:
    """random_model with a LoRA adapter on `targets` whose B matrices (zero at initialisation) are random; returns
    the PEFT model."""
    peft_model = get_peft_model(random_model(seed=101), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    generator = torch.Generator().manual_seed(102)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1, generator=generator)
    return peft_model.eval()


class CountingKernel:
    """The kernel, counting the native block steps it runs."""

    def __init__(self, kernel):
        self.kernel, self.blocks = kernel, 0
        self.BLOCK_VECTORS, self.BLOCK_WEIGHTS = kernel.BLOCK_VECTORS, kernel.BLOCK_WEIGHTS

    def block_decode_step(self, *args):
        self.blocks += 1
        return self.kernel.block_decode_step(*args)

    def gemv(self, *args):
        return self.kernel.gemv(*args)

    def pack_int4(self, values):
        return self.kernel.pack_int4(values)


def fallback_warnings(caplog) -> list:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "modeling_rwkv7.decode_rwkv7" and r.levelno == logging.WARNING
    ]


@pytest.mark.parametrize(
    "targets,path",
    [
        (["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"], "model.layers.0.attn.r_proj"),
        (["value"], "model.layers.0.ffn.value"),
        (["model.layers.1.attn.v_lora.lora.0"], "model.layers.1.attn.v_lora.lora.0"),
        (["lm_head"], "lm_head"),
    ],
)
def test_a_lora_adapter_decodes_eagerly_and_the_merged_model_natively(counting, targets, path, caplog):
    """A model carrying a PEFT LoRA adapter: its default decoding runs the eager model (no native block runs),
    giving the adapter model's logits, and says so once, naming the first wrapped module and merge_and_unload.
    After merge_and_unload() it decodes natively and equals the eager merged model (whose logits the adapter
    changed)."""
    peft_model = lora_model(targets)
    default_path(peft_model.get_base_model())
    tokens = tokens_for(2, 6, seed=103)
    with caplog.at_level(logging.WARNING):
        fallback = decode(peft_model, tokens, peft_model.get_base_model().init_cache(batch_size=2))
    assert counting.blocks == 0
    warnings = fallback_warnings(caplog)
    assert len(warnings) == 1 and path in warnings[0] and "merge_and_unload" in warnings[0], warnings
    with torch.no_grad():
        adapted_logits = peft_model(tokens).logits
    assert relative_error(fallback, adapted_logits) <= 1e-5

    merged = peft_model.merge_and_unload()
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    base = random_model(seed=101)
    native = decode(merged, tokens, merged.init_cache(batch_size=2))
    assert counting.blocks == 6 * len(merged.model.layers)
    merged.set_implementation(decode="eager")
    eager = decode(merged, tokens, merged.init_cache(batch_size=2))
    assert relative_error(native, eager) <= 1e-5
    assert relative_error(native, adapted_logits) <= 1e-5
    assert relative_error(eager, decode(base, tokens, base.init_cache(batch_size=2))) > 1e-3


def test_a_tuned_initial_state_decodes_natively(counting):
    """State tuning: decoding from `RWKV7StateTuning.initial_cache` through the default (native) path equals eager
    decoding from the same state (logits over 24 tokens, and every state tensor), differs from decoding from
    zeros, and leaves the trained `initial_state` as it was."""
    model = random_model(seed=131)
    tuned = RWKV7StateTuning(model)
    generator = torch.Generator().manual_seed(132)
    with torch.no_grad():
        tuned.initial_state.normal_(0.0, 0.5, generator=generator)
    initial_state = tuned.initial_state.detach().clone()
    tokens = tokens_for(1, 24, seed=133)
    with torch.no_grad():
        native_cache, eager_cache = tuned.initial_cache(1), tuned.initial_cache(1)
    eager = decode(model, tokens, eager_cache)
    native = decode(default_path(model), tokens, native_cache)
    assert counting.blocks == 24 * len(model.model.layers)
    assert relative_error(native, eager) <= 1e-5
    errors = state_errors(native_cache, eager_cache)
    assert max(errors.values()) <= 1e-5, errors
    model.set_implementation(decode="eager")
    assert relative_error(eager, decode(model, tokens, model.init_cache(1))) > 1e-3
    assert torch.equal(tuned.initial_state, initial_state)


def test_wrong_inputs_to_a_native_step_are_refused_by_name(counting):
    """Through the default (native) path: a cache of another batch size, a token id outside the vocabulary, a
    cache that is not an RWKV7Cache: each refused with the value named; the cache is left as it was."""
    model = default_path(random_model(seed=111))
    cache = model.init_cache(batch_size=2)
    before = [{name: getattr(layer, name).clone() for name in STATE_NAMES} for layer in cache.layers]
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"batch size 2.*batch size 3"):
            model(torch.zeros(3, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match=f"Token id {VOCAB} .*\\[0, {VOCAB}\\)"):
            model(torch.tensor([[3], [VOCAB]]), cache=cache)
        with pytest.raises(ValueError, match="Token id -1 "):
            model(torch.tensor([[-1], [3]]), cache=cache)
        with pytest.raises(TypeError, match="DynamicCache"):
            model(torch.zeros(2, 1, dtype=torch.long), cache=DynamicCache())
    for layer, saved in zip(cache.layers, before):
        assert all(torch.equal(getattr(layer, name), saved[name]) for name in STATE_NAMES)
    assert int(cache.seen_tokens) == 0 and counting.blocks == 0


def test_a_kernel_without_the_ops_is_refused(kernel):
    """native_decode_step takes a kernel module with the decoding ops (not, e.g., one that has only some of them);
    the error names what is missing."""
    model = random_model(seed=121)
    with pytest.raises(ValueError, match="block_decode_step"):
        native_decode_step(model, SimpleNamespace())
    with pytest.raises(ValueError, match="block_decode_step") as refusal:
        native_decode_step(model, SimpleNamespace(gemv=kernel.gemv))
    assert "'gemv'" not in str(refusal.value)
    renamed = SimpleNamespace(**{name: getattr(kernel, name) for name in ("block_decode_step", "gemv", "pack_int4")})
    renamed.BLOCK_VECTORS, renamed.BLOCK_WEIGHTS = (*kernel.BLOCK_VECTORS, "x_q"), kernel.BLOCK_WEIGHTS
    with pytest.raises(ValueError, match="does not know: \\['x_q'\\]"):
        native_decode_step(model, renamed)


def test_the_block_layout_is_the_ops_own(kernel):
    """BLOCK_VECTORS / BLOCK_WEIGHTS come from the op (`block_layout`), which checks their counts on every call: a
    list one short is refused, naming the counts."""
    assert kernel.ops.block_layout() == (list(kernel.BLOCK_VECTORS), list(kernel.BLOCK_WEIGHTS))
    assert len(kernel.BLOCK_VECTORS) == 19 and kernel.BLOCK_WEIGHTS[-2:] == ("ffn.key", "ffn.value")
    model = random_model(seed=122)
    vectors, weights, scales = native_decode_step(model, kernel)._tensors["blocks"][1]
    cache = model.init_cache(batch_size=1)
    state = cache.layers[1]
    with pytest.raises(RuntimeError, match="expected 19 vectors and 14 weights and scales, got 18, 14, 14"):
        kernel.block_decode_step(
            torch.zeros(1, 128),
            torch.zeros(1, 128),
            vectors[:-1],
            weights,
            scales,
            state.attn_shift_state,
            state.recurrent_state,
            state.ffn_shift_state,
            1e-5,
            64e-5,
            0.6,
        )


def test_a_training_model_with_dropout_decodes_eagerly_and_natively_in_eval_mode(counting):
    """The native step is the inference step: a model in training mode with dropout > 0 decodes through the eager
    modules (which drop activations); after model.eval() a plain step runs natively, as the eager model does."""
    config = RWKV7Config(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, head_dim=64, intermediate_size=512, dropout=0.1
    )
    model = RWKV7ForCausalLM(config)
    token = torch.tensor([[7]])
    with torch.no_grad():
        model(token, cache=model.init_cache(batch_size=1))
    assert counting.blocks == 0
    model.eval()
    with torch.no_grad():
        actual = model(token, cache=model.init_cache(batch_size=1)).logits
        assert counting.blocks == 2
        model.set_implementation(decode="eager")
        expected = model(token, cache=model.init_cache(batch_size=1)).logits
    assert actual.shape == expected.shape == (1, 1, VOCAB)
    assert relative_error(actual, expected) <= 1e-5


def test_opcheck_gemv_and_block_decode_step(kernel):
    """torch.library.opcheck (schema with its in-place annotations, fake implementations, AOT dispatch) on both
    decoding ops, with the tensors of a real block (layer 1, which has the value-residual LoRA) and layer 0."""
    generator = torch.Generator().manual_seed(41)
    torch.library.opcheck(
        kernel.ops.gemv, (torch.randn(3, 128, generator=generator), torch.randn(96, 128, generator=generator), None)
    )
    q, scale = int8_rows_weight(96, 128, generator)
    torch.library.opcheck(kernel.ops.gemv, (torch.randn(2, 128, generator=generator), q, scale))

    model = random_model(seed=42)
    step = native_decode_step(model, kernel)
    cache = model.init_cache(batch_size=2)
    for layer_idx, v_first in ((0, None), (1, torch.randn(2, 128, generator=generator))):
        vectors, weights, scales = step._tensors["blocks"][layer_idx]
        state = cache.layers[layer_idx]
        state.recurrent_state.normal_(generator=generator)
        args = (
            torch.randn(2, 128, generator=generator),
            v_first,
            vectors,
            weights,
            scales,
            state.attn_shift_state.clone(),
            state.recurrent_state.clone(),
            state.ffn_shift_state.clone(),
            1e-5,
            64e-5,
            0.6,
        )
        torch.library.opcheck(kernel.ops.block_decode_step, args)


_VARIANT_CHECK = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from helpers import eager_model as random_model
from modeling_rwkv7.decode_rwkv7 import native_decode_step
from modeling_rwkv7.dispatch_rwkv7 import native_ops
kernel = native_ops(wait=True)
model = random_model(seed=51)
tokens = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(52))
step = native_decode_step(model, kernel)
worst = 0.0
with torch.no_grad():
    eager_cache = model(tokens[:, :4], use_cache=True).cache
    native_cache = eager_cache.copy()
    for t in range(4, 20):
        eager = model(tokens[:, t : t + 1], cache=eager_cache).logits
        native = step(tokens[:, t : t + 1], cache=native_cache).logits
        worst = max(worst, float((native - eager).abs().max() / eager.abs().max()))
    for weight in (torch.randn(70, 133), torch.randn(70, 133).bfloat16()):  # odd sizes: the vector tails too
        rows = torch.randn(3, 133)
        multiplied = rows.bfloat16().float() if weight.dtype == torch.bfloat16 else rows  # (gemv's contract)
        worst = max(worst, float((kernel.gemv(rows, weight) - multiplied @ weight.float().T).abs().max() / 10))
print(kernel.decode_vector_bits(), worst)
"""


@pytest.mark.parametrize("capability, bits", [("avx512", 512), ("avx2", 256), ("default", 128)])
@pytest.mark.slow
@pytest.mark.subprocess
def test_every_isa_variant_matches_the_eager_step(kernel, capability, bits):
    """The AVX-512 build without AVX512-BF16 (what a CPU without it runs), the AVX2 and the baseline builds of the
    loops (chosen by ATEN_CPU_CAPABILITY, as torch's own kernels are) give the eager model's logits (batch 2, 16
    tokens) and F.linear's products, each in a process of its own; the variant in use is the one asked for, or the
    best below it that the CPU has."""
    script = _VARIANT_CHECK.format(tests=str(REPO / "tests"))
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "ATEN_CPU_CAPABILITY": capability},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    used_bits, worst = result.stdout.split()[-2:]
    assert int(used_bits) == min(bits, kernel.decode_vector_bits())
    assert float(worst) <= 1e-5


# --- generate() ----------------------------------------------------------------------------------------------


def test_default_generate_runs_the_native_step_and_gives_the_eager_tokens(counting):
    """Greedy and beam-search generate() on left-padded prompts, with nothing asked for: the same tokens as eager
    generate(), scores within 1e-5, every decoding step through the native blocks (the prompt through the eager
    modules); the model's forward is its own throughout."""
    model = random_model(seed=141)
    input_ids = tokens_for(2, 7, seed=142)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # row 0 is left-padded
    options = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=12,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    eager = model.generate(**options)
    eager_beams = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, num_beams=3)
    default_path(model)
    native = model.generate(**options)
    steps_greedy = counting.blocks // len(model.model.layers)
    native_beams = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, num_beams=3)
    assert "forward" not in model.__dict__
    assert native.sequences.shape == eager.sequences.shape == (2, 7 + 12)
    assert torch.equal(native.sequences, eager.sequences)
    for native_scores, eager_scores in zip(native.scores, eager.scores, strict=True):
        assert relative_error(native_scores, eager_scores) <= 1e-5
    assert steps_greedy == 11  # 12 new tokens: the first from the prompt's forward, 11 decoding steps
    assert torch.equal(native_beams, eager_beams)
    assert counting.blocks // len(model.model.layers) == steps_greedy + 7


def test_calls_that_are_not_plain_decoding_steps_run_the_eager_modules(counting):
    """A padded token in the step, a prompt, output_hidden_states, grad mode on, labels: the eager modules; a plain
    step runs natively."""
    model = default_path(random_model(seed=151))
    tokens = tokens_for(2, 4, seed=152)
    with torch.no_grad():
        cache = model(tokens[:, :3], cache=model.init_cache(batch_size=2)).cache
        padded = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
        model(input_ids=tokens[:, 3:], cache=cache.copy(), attention_mask=padded)
        model(input_ids=tokens[:, 3:], cache=cache.copy(), output_hidden_states=True)
        model(input_ids=tokens[:, 3:], cache=cache.copy(), labels=tokens[:, 3:])
        with torch.enable_grad():  # gradients wanted: the eager modules
            assert model(input_ids=tokens[:, 3:], cache=cache.copy()).logits.requires_grad
        assert counting.blocks == 0
        model(input_ids=tokens[:, 3:], cache=cache.copy(), attention_mask=torch.ones(2, 4))
        assert counting.blocks == len(model.model.layers)
