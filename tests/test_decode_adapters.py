"""Issue 11: the compiled decoding step (`compile_decode_step`) on top of PEFT LoRA adapters and state tuning. The
eager model stays the reference: the compiled step gives its logits and state, also after adapters are disabled or
switched once the step is compiled (torch.compile's guards see the change and trace the new configuration)."""

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers import VOCAB, assert_close, assert_states_close, decode, random_model
from peft import LoraConfig, get_peft_model

from modeling_rwkv7 import RWKV7ForCausalLM
from modeling_rwkv7.decode_rwkv7 import compile_decode_step
from modeling_rwkv7.state_tuning import RWKV7StateTuning

SEED = 41
TARGETS = ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"]  # the attention and FFN projections


@pytest.fixture(scope="module", autouse=True)
def fresh_dynamo():
    """The graphs counted here are this module's own (and torch.compile's recompile limit is per code object)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def lora_config() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)


@pytest.fixture(scope="module")
def adapted():
    """`random_model(SEED)` with two LoRA adapters, "default" (active) and "second", whose B matrices (zero at
    initialisation) are random, and its compiled step for batch 2, compiled by inductor through a backend that
    records every graph it is given."""
    model = random_model(seed=SEED)
    # F.linear for every few-row product (each gives the same results: tests/test_projection.py), so that
    # compile_decode_step has no candidates to time; what is checked here is the compiled graph of the adapters
    model.set_implementation(projection="linear")
    peft_model = get_peft_model(model, lora_config())
    peft_model.add_adapter("second", lora_config())
    generator = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1, generator=generator)
    assert sum("lora_B" in name for name, _ in peft_model.named_parameters()) == 2 * 2 * len(TARGETS)

    graphs = []
    inductor = torch._dynamo.lookup_backend("inductor")

    def counting_inductor(graph_module, example_inputs):
        graphs.append(graph_module)
        return inductor(graph_module, example_inputs)

    step = compile_decode_step(peft_model, batch_size=2, backend=counting_inductor)
    return SimpleNamespace(peft_model=peft_model.eval(), step=step, graphs=graphs, base=random_model(seed=SEED))


@pytest.fixture(scope="module")
def merged(adapted):
    """A copy of the adapted model with the "default" adapter merged into its weights (a plain RWKV7ForCausalLM),
    wrapped for state tuning (which freezes it, so before compiling), and its compiled step for batch 1 (the
    default inductor backend)."""
    peft_copy = copy.deepcopy(adapted.peft_model)
    peft_copy.set_adapter("default")
    model = peft_copy.merge_and_unload()
    tuned = RWKV7StateTuning(model)
    return SimpleNamespace(model=model, tuned=tuned, step=compile_decode_step(model, batch_size=1))


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Every position within 1e-4 of the expected logits' largest magnitude there."""
    assert actual.shape == expected.shape
    for t in range(expected.shape[1]):
        assert_close(actual[:, t], expected[:, t], 1e-4, f"{what}: token {t}")


def assert_differs(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Far outside the 1e-4 tolerance: a step that kept the other configuration would fail the comparison."""
    assert (a - b).abs().max() > 0.1 * b.abs().max(), what


@pytest.mark.slow
@pytest.mark.compile
def test_compiled_lora_model_matches_the_eager_lora_model_over_64_tokens(adapted):
    """Batch 2, a 5-token eager prompt, then 64 tokens through both: logits and every state tensor agree, and the
    adapters are in the computation (the base model decodes otherwise). The PEFT forward traces as one graph."""
    peft_model, step = adapted.peft_model, adapted.step
    assert peft_model.active_adapter == "default"
    tokens = torch.randint(0, VOCAB, (2, 69), generator=torch.Generator().manual_seed(43))
    graphs_before = len(adapted.graphs)
    with torch.no_grad():
        eager_cache = peft_model(tokens[:, :5], use_cache=True).cache
        compiled_cache = eager_cache.copy()
        base_cache = adapted.base(tokens[:, :5], use_cache=True).cache
    eager = decode(peft_model, tokens[:, 5:], eager_cache)
    compiled = decode(step, tokens[:, 5:], compiled_cache)
    assert eager.shape == (2, 64, VOCAB)
    assert_logits_close(compiled, eager, "compiled LoRA step")
    assert_states_close(compiled_cache, eager_cache, 1e-4, scale_floor=1.0)
    assert int(compiled_cache.seen_tokens) == 69
    assert_differs(eager, decode(adapted.base, tokens[:, 5:], base_cache), "the adapters change nothing")
    assert adapted.graphs, "the step was not compiled"
    assert len(adapted.graphs) - graphs_before <= 1, "the PEFT forward broke into several graphs"


@pytest.mark.slow
@pytest.mark.compile
def test_merged_model_decodes_like_the_adapter_model(adapted, merged):
    """`merge_and_unload` of the adapted model, through its own compiled step (batch 1), gives the eager adapter
    model's logits and state over 32 tokens."""
    assert type(merged.model) is RWKV7ForCausalLM
    assert not any("lora_A" in name or "lora_B" in name for name, _ in merged.model.named_parameters())
    tokens = torch.randint(0, VOCAB, (1, 32), generator=torch.Generator().manual_seed(44))
    adapter_cache, merged_cache = adapted.peft_model.init_cache(1), merged.model.init_cache(1)
    adapter = decode(adapted.peft_model, tokens, adapter_cache)
    assert_logits_close(decode(merged.step, tokens, merged_cache), adapter, "compiled merged model")
    assert_states_close(merged_cache, adapter_cache, 1e-4, scale_floor=1.0)
    assert int(merged_cache.seen_tokens) == 32


@pytest.mark.slow
@pytest.mark.compile
def test_disabling_or_switching_adapters_after_compiling_recompiles_to_the_new_configuration(adapted):
    """`disable_adapter()` and `set_adapter("second")` after the step was compiled for "default": torch.compile's
    guards (on the LoRA layers' flags and active adapter) fail, the step is traced again, and it gives the eager
    result of the new configuration, never the old adapter's. Back in a configuration, its result comes back."""
    peft_model, step, graphs = adapted.peft_model, adapted.step, adapted.graphs
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(45))

    def both():
        """(compiled logits, eager logits) from a zero state, after comparing the two final states."""
        compiled_cache, eager_cache = peft_model.init_cache(2), peft_model.init_cache(2)
        compiled, eager = decode(step, tokens, compiled_cache), decode(peft_model, tokens, eager_cache)
        assert_states_close(compiled_cache, eager_cache, 1e-4, scale_floor=1.0)
        assert int(compiled_cache.seen_tokens) == 24
        return compiled, eager

    compiled, with_default = both()
    assert_logits_close(compiled, with_default, "adapter 'default'")
    base = decode(adapted.base, tokens, adapted.base.init_cache(2))

    graphs_before = len(graphs)
    with peft_model.disable_adapter():
        compiled, disabled = both()
        assert_logits_close(disabled, base, "eager with the adapters disabled")
        assert_logits_close(compiled, disabled, "compiled with the adapters disabled")
    assert len(graphs) > graphs_before, "disabling the adapters did not retrace the step"
    assert_differs(disabled, with_default, "disabling the adapters changes nothing")

    compiled, eager = both()
    assert_logits_close(eager, with_default, "eager, adapters enabled again")
    assert_logits_close(compiled, with_default, "compiled, adapters enabled again")

    graphs_before = len(graphs)
    try:
        peft_model.set_adapter("second")
        compiled, with_second = both()
        assert_logits_close(compiled, with_second, "adapter 'second'")
        assert len(graphs) > graphs_before, "switching the adapter did not retrace the step"
    finally:
        peft_model.set_adapter("default")
    assert_differs(with_second, with_default, "the second adapter gives the first one's result")
    assert_differs(with_second, base, "the second adapter changes nothing")

    compiled, eager = both()
    assert_logits_close(eager, with_default, "eager, back to 'default'")
    assert_logits_close(compiled, with_default, "compiled, back to 'default'")


@pytest.mark.slow
@pytest.mark.compile
def test_compiled_step_decodes_from_a_tuned_initial_state(merged):
    """A tuned initial WKV state (`RWKV7StateTuning.initial_cache`, batch 1) decoded 32 tokens through the compiled
    step equals eager decoding from the same state and the wrapper's own forward pass, and differs from decoding
    from the zero state; `initial_state` itself is left unchanged."""
    tuned, step = merged.tuned, merged.step
    generator = torch.Generator().manual_seed(46)
    with torch.no_grad():
        tuned.initial_state.copy_(torch.randn(tuned.initial_state.shape, generator=generator))
    initial_state = tuned.initial_state.detach().clone()
    tokens = torch.randint(0, VOCAB, (1, 32), generator=generator)
    with torch.no_grad():
        eager_cache, compiled_cache = tuned.initial_cache(1), tuned.initial_cache(1)
        full_pass = tuned(input_ids=tokens).logits
    for layer, state in zip(compiled_cache.layers, initial_state):
        assert torch.equal(layer.recurrent_state, state[None])
    eager = decode(tuned.model, tokens, eager_cache)
    compiled = decode(step, tokens, compiled_cache)
    assert_logits_close(compiled, eager, "compiled step from the tuned state")
    assert_logits_close(full_pass, eager, "the wrapper's forward from the tuned state")
    assert_states_close(compiled_cache, eager_cache, 1e-4, scale_floor=1.0)
    assert int(compiled_cache.seen_tokens) == 32
    assert_differs(eager, decode(tuned.model, tokens, tuned.model.init_cache(1)), "the tuned state changes nothing")
    assert torch.equal(tuned.initial_state, initial_state)
