"""Issue 11: `RWKV7Linear`'s measured few-row products. Every product the selector can choose computes F.linear's
values for every projection shape of the official 0.1B and the built-in tiny model, whatever the decision says."""

import functools
import os

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from modeling_rwkv7 import RWKV7Config, RWKV7ForCausalLM, linear_rwkv7
from modeling_rwkv7.linear_rwkv7 import CANDIDATES, GEMV_MAX_ROWS, RWKV7Linear

DENSE = sorted(CANDIDATES["dense"])

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def projection_shapes(config_path: str) -> set[tuple[int, int, bool]]:
    """(in_features, out_features, bias) of every RWKV7Linear in a RWKV7ForCausalLM built from this config."""
    with torch.device("meta"):
        model = RWKV7ForCausalLM(RWKV7Config.from_json_file(config_path))
    return {(m.in_features, m.out_features, m.bias is not None) for m in model.modules() if isinstance(m, RWKV7Linear)}


SHAPES = sorted(
    projection_shapes(os.path.join(REPO, "configuration", "rwkv7-0.1b.json"))
    | projection_shapes(os.path.join(REPO, "models", "rwkv7-tiny-default", "config.json"))
)


def random_projection(in_features, out_features, bias, seed, dtype=torch.float32) -> RWKV7Linear:
    """A projection at a trained model's scale (weights ~ 1/sqrt(in), bias ~ 0.5)."""
    generator = torch.Generator().manual_seed(seed)
    projection = RWKV7Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        projection.weight.copy_(torch.randn(out_features, in_features, generator=generator) / in_features**0.5)
        if bias:
            projection.bias.copy_(0.5 * torch.randn(out_features, generator=generator))
    return projection.to(dtype)


@functools.cache
def preset_projection_and_reference(in_features, out_features):
    """A random projection with a bias, inputs of batch 1..16 and F.linear's outputs with and without the bias
    (computed once per shape for every product: the 65536-wide head is 200 MB)."""
    projection = random_projection(in_features, out_features, True, seed=in_features + out_features)
    generator = torch.Generator().manual_seed(out_features)
    inputs = [torch.randn(batch, 1, in_features, generator=generator) for batch in range(1, GEMV_MAX_ROWS + 1)]
    with torch.no_grad():
        expected = {
            bias: [F.linear(x, projection.weight, projection.bias if bias else None) for x in inputs]
            for bias in (False, True)
        }
    return projection, inputs, expected


@pytest.mark.parametrize("product", DENSE)
@pytest.mark.parametrize("in_features,out_features", sorted({shape[:2] for shape in SHAPES}))
def test_every_product_equals_f_linear_for_every_preset_shape(forced_product, product, in_features, out_features):
    """Batch 1..16 (one token each, as when decoding), with and without a bias, float32: F.linear's values."""
    forced_product(product, [(in_features, out_features)])
    projection, inputs, expected = preset_projection_and_reference(in_features, out_features)
    bias = projection.bias
    for with_bias in (False, True):
        projection.bias = bias if with_bias else None
        with torch.no_grad():
            for x, expected_output in zip(inputs, expected[with_bias]):
                output = projection(x)
                assert output.shape == (x.shape[0], 1, out_features)
                assert_close(output, expected_output, 1e-5)
    projection.bias = bias
    decisions = {choice.product for choice in linear_rwkv7.few_row_choices.values()}
    assert decisions == {product}  # the forced decision was read, nothing was measured instead


@pytest.mark.parametrize("product", DENSE)
@pytest.mark.parametrize("out_features", [768, 96, 6, 7])
@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (2, 8), (1, 17)])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_nn_linear(forced_product, product, out_features, shape, bias):
    """Odd widths and longer inputs too (17 rows take nn.Linear's own path); the gradients are nn.Linear's."""
    forced_product(product, [(64, out_features)])
    projection = random_projection(64, out_features, bias, seed=out_features + 10 * sum(shape))
    generator = torch.Generator().manual_seed(out_features)
    inputs = torch.randn(*shape, 64, generator=generator, requires_grad=True)

    output = projection(inputs)
    expected = F.linear(inputs, projection.weight, projection.bias)
    assert output.shape == (*shape, out_features)
    assert_close(output, expected, 1e-5)

    grad_output = torch.randn(output.shape, generator=generator)
    grads = torch.autograd.grad(output, (inputs, projection.weight), grad_output)
    expected_grads = torch.autograd.grad(expected, (inputs, projection.weight), grad_output)
    for grad, expected_grad in zip(grads, expected_grads):
        assert_close(grad, expected_grad, 1e-5)


@pytest.mark.parametrize("product", DENSE)
def test_a_lora_adapter_on_top_equals_the_merged_weight(forced_product, product):
    """PEFT's LoRA wraps RWKV7Linear as its base layer: the adapted output is F.linear with the merged weight."""
    from peft import LoraConfig, get_peft_model

    forced_product(product, [(768, 3072), (3072, 768)])

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.key = random_projection(768, 3072, False, seed=1)
            self.value = random_projection(3072, 768, True, seed=2)

        def forward(self, x):
            return self.value(torch.relu(self.key(x)))

    peft_model = get_peft_model(
        Block(), LoraConfig(r=8, lora_alpha=16, target_modules=["key", "value"], init_lora_weights=False)
    )
    inputs = torch.randn(4, 1, 768, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        adapted = peft_model(inputs)
        merged = peft_model.merge_and_unload()
        expected = F.linear(torch.relu(F.linear(inputs, merged.key.weight)), merged.value.weight, merged.value.bias)
        unadapted = F.linear(torch.relu(F.linear(inputs, Block().key.weight)), Block().value.weight, merged.value.bias)
    assert_close(adapted, expected, 1e-5)
    assert (adapted - unadapted).abs().max() > 1e-3  # the adapter is really in the computation


def test_a_corrupted_decision_changes_nothing_but_speed(forced_product):
    """A whole model decodes to the same logits and state whichever product every decision names."""
    config = RWKV7Config(vocab_size=1000, hidden_size=128, num_hidden_layers=2, head_dim=64)
    torch.manual_seed(0)
    model = RWKV7ForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # the official init leaves some matrices at zero: give every one signal
            if param.dim() == 2:
                param.normal_(0, param.shape[1] ** -0.5)
    shapes = projection_shapes_of(model)
    tokens = torch.randint(0, 1000, (3, 6), generator=torch.Generator().manual_seed(4))
    runs = {}
    for product in DENSE:
        forced_product(product, shapes)
        with torch.no_grad():
            cache = model.init_cache(batch_size=3)
            logits = torch.cat([model(tokens[:, t : t + 1], cache=cache).logits for t in range(6)], dim=1)
        runs[product] = (logits, cache.layers[-1].recurrent_state.clone(), cache.layers[-1].ffn_shift_state.clone())
    reference, *others = runs.values()
    for other in others:
        for actual, expected in zip(other, reference):
            assert_close(actual, expected, 1e-5)


def projection_shapes_of(model) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, RWKV7Linear)]


def test_the_measured_decision_is_a_candidate_and_is_kept(monkeypatch):
    """The first eager call measures (every candidate gets a time, the global RNG is left alone), later calls read
    the same decision."""
    monkeypatch.setattr(linear_rwkv7, "few_row_choices", {})
    monkeypatch.setattr(linear_rwkv7, "_choices_threads", [0])
    projection = random_projection(96, 192, True, seed=5)
    inputs = torch.randn(2, 1, 96)
    rng_state = torch.random.get_rng_state()
    with torch.no_grad():
        first = projection(inputs)
        ((key, choice),) = linear_rwkv7.few_row_choices.items()
        assert torch.equal(torch.random.get_rng_state(), rng_state)  # seeded sampling stays reproducible
        assert key == (192, 96, torch.float32, 2, False)  # an eager decision only, outside compile_decode_step
        assert choice.product in DENSE and choice.threads == torch.get_num_threads()
        assert set(choice.seconds) == set(DENSE) and all(0 < s < 1 for s in choice.seconds.values())
        second = projection(inputs)
    assert linear_rwkv7.few_row_choices[key] is choice
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert_close(first, F.linear(inputs, projection.weight, projection.bias), 1e-5)


def test_weights_that_are_tensor_subclasses_take_f_linear(forced_product):
    """A weight that is a tensor subclass (here one that records the ops it sees; torchao's quantized tensors are
    others) goes through F.linear whatever the decision: RWKV7Linear never reshapes a tensor it does not know."""
    seen = []

    class Recording(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return super().__torch_function__(func, types, args, kwargs or {})

    forced_product("row_blocks", [(64, 128)])
    projection = random_projection(64, 128, False, seed=6)
    plain_weight = projection.weight.detach().clone()
    projection.weight = torch.nn.Parameter(plain_weight.as_subclass(Recording), requires_grad=False)
    inputs = torch.randn(1, 1, 64)
    with torch.no_grad():
        output = projection(inputs)
    assert "linear" in seen and "view" not in seen and "bmm" not in seen
    assert_close(output.as_subclass(torch.Tensor), F.linear(inputs, plain_weight), 1e-6)


@pytest.mark.compile
def test_compiled_projection_reads_the_decision(forced_product):
    """Under torch.compile(fullgraph=True) nothing is timed: the graph reads the cached decision and computes the
    same values."""
    forced_product("row_blocks", [(128, 256)])
    projection = random_projection(128, 256, True, seed=7)
    inputs = torch.randn(1, 1, 128)
    compiled = torch.compile(projection, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert_close(compiled(inputs), F.linear(inputs, projection.weight, projection.bias), 1e-5)
    assert len(linear_rwkv7.few_row_choices) == 10  # no new decision was measured while tracing


def bmm_count_of_traced_graph(module, inputs) -> int:
    """The number of batched products in the graph torch.compile traces for `module(inputs)`."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch.compile(module, fullgraph=True, backend=backend)(inputs)
    (graph,) = graphs
    return sum(node.target is torch.bmm for node in graph.graph.nodes)


@pytest.mark.compile
def test_a_traced_graph_reads_the_compiled_decision_and_eager_calls_the_eager_one(forced_product):
    """Eager calls take the eager decision, traced graphs the compiled one (both forced here, opposite ways): the
    values are F.linear's either way."""
    forced_product("linear", [(128, 256)], compiled_name="row_blocks")
    projection = random_projection(128, 256, True, seed=8)
    inputs = torch.randn(2, 1, 128)
    expected = F.linear(inputs, projection.weight, projection.bias)
    with torch.no_grad():
        assert bmm_count_of_traced_graph(projection, inputs) == 1
        assert_close(projection(inputs), expected, 1e-5)
    forced_product("row_blocks", [(128, 256)], compiled_name="linear")
    with torch.no_grad():
        assert bmm_count_of_traced_graph(projection, inputs) == 0
        assert_close(torch.compile(projection, fullgraph=True)(inputs), expected, 1e-5)


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_decisions_are_measured_only_when_asked(monkeypatch):
    """Inside `measuring_compiled_products()` an eager call also times the candidates compiled (each one a real
    inductor graph) and records a compiled decision beside the eager one; outside, only the eager one is made."""
    monkeypatch.setattr(linear_rwkv7, "few_row_choices", {})
    monkeypatch.setattr(linear_rwkv7, "_choices_threads", [0])
    projection = random_projection(64, 96, False, seed=9)
    inputs = torch.randn(1, 1, 64)
    with torch.no_grad():
        with linear_rwkv7.measuring_compiled_products():
            output = projection(inputs)
        projection(torch.randn(3, 1, 64))  # another rows bucket, outside: eager only
    assert set(linear_rwkv7.few_row_choices) == {
        (96, 64, torch.float32, 1, False),
        (96, 64, torch.float32, 1, True),
        (96, 64, torch.float32, 4, False),
    }
    compiled = linear_rwkv7.few_row_choices[(96, 64, torch.float32, 1, True)]
    assert compiled.product in DENSE and set(compiled.seconds) == set(DENSE)
    assert all(0 < s < 1 for s in compiled.seconds.values())
    assert_close(output, F.linear(inputs, projection.weight), 1e-5)
