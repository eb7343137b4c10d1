"""Issue 11: the CPU WKV path chosen by measurement. Every chunk size the measurement can choose computes what the
reference loop computes, a wrong cached decision changes nothing but speed, the decision is measured once per key
and is only read (never timed) while torch.compile traces."""

import pytest
import torch
from helpers import WKV_INPUT_NAMES as INPUT_NAMES
from helpers import assert_close, assert_wkv_close, wkv_outputs_and_grads

from modeling_rwkv7 import wkv
from modeling_rwkv7.wkv import CHUNK_SIZES, WKVChoice, select_wkv_backend, wkv7, wkv_choice_key
from modeling_rwkv7.wkv_chunked import wkv7_chunked
from modeling_rwkv7.wkv_reference import random_wkv_inputs, wkv7_recurrent

BATCH, HEADS, HEAD_DIM = 2, 2, 64
KEY = (BATCH * HEADS, HEAD_DIM, torch.float32, False)  # the key of a no-grad call on these shapes


def resets(seq_len):
    """Resets at 0, inside and at the end of chunks, two in a row: different per sequence."""
    reset = torch.zeros(BATCH, seq_len, dtype=torch.bool)
    for row, positions in enumerate(([0, 16, 37], [5, 40, 41, seq_len - 1])):
        reset[row, [p for p in positions if p < seq_len]] = True
    return reset


@pytest.fixture
def forced_choice(monkeypatch):
    """Returns `force(chunk_size, chunked_min_seq_len, key=KEY)`: from then on `wkv_choices` holds only that
    decision, and any measurement fails the test."""
    monkeypatch.setattr(wkv, "wkv_choices", {})

    def no_measurement(*key):
        raise AssertionError(f"measured {key}")

    monkeypatch.setattr(wkv, "measure_wkv_choice", no_measurement)

    def force(chunk_size, chunked_min_seq_len, key=KEY):
        wkv.wkv_choices[key] = WKVChoice(chunk_size, chunked_min_seq_len, {}, torch.get_num_threads(), 0.0)

    return force


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_every_candidate_chunk_size_matches_the_loop(chunk_size):
    """At RWKV-7's head size, with resets and an initial state: y, the final state and every gradient."""
    inputs = random_wkv_inputs(BATCH, 70, HEADS, HEAD_DIM, seed=chunk_size)
    initial_state = inputs["initial_state"]
    expected = wkv_outputs_and_grads(wkv7_recurrent, inputs, initial_state, resets(70))
    actual = wkv_outputs_and_grads(wkv7_chunked, inputs, initial_state, resets(70), chunk_size=chunk_size)
    assert_wkv_close(actual, expected, 1e-5)


@pytest.mark.parametrize("chunk_size, chunked_min_seq_len", [(8, 0), (32, -5), (16, 2), (32, 10**9), (8, 2**63 - 1)])
@pytest.mark.parametrize("seq_len", [1, 5, 40])
def test_a_wrong_cached_decision_changes_only_the_speed(forced_choice, chunk_size, chunked_min_seq_len, seq_len):
    """Whatever chunk size and threshold (absurd ones included) the cache holds, `wkv7` gives the loop's results;
    the decision is read (the path follows the threshold), not measured again. One token is always a step."""
    key = (BATCH * HEADS, HEAD_DIM, torch.float32, True)  # the gradients below make it a with-grad call
    forced_choice(chunk_size, chunked_min_seq_len, key)
    inputs = random_wkv_inputs(BATCH, seq_len, HEADS, HEAD_DIM, seed=seq_len)
    initial_state = inputs["initial_state"]
    expected = wkv_outputs_and_grads(wkv7_recurrent, inputs, initial_state, resets(seq_len))
    assert_wkv_close(wkv_outputs_and_grads(wkv7, inputs, initial_state, resets(seq_len)), expected, 1e-5)
    name, _ = select_wkv_backend("auto", seq_len, torch.device("cpu"), None, key)
    assert name == ("step" if seq_len == 1 else "chunked" if seq_len >= chunked_min_seq_len else "recurrent")


def test_an_illegal_cached_chunk_size_is_refused(forced_choice):
    """A chunk size the chunked form cannot use raises; it never computes something else."""
    forced_choice(20, 2)
    inputs = random_wkv_inputs(BATCH, 40, HEADS, HEAD_DIM, seed=9)
    with torch.no_grad(), pytest.raises(ValueError, match="chunk_size must be"):
        wkv7(*(inputs[name] for name in INPUT_NAMES))


def test_the_key_says_whether_gradients_flow():
    inputs = random_wkv_inputs(3, 4, 12, 64, seed=10)  # 36 problems: the bucket stops at 16
    r, *others = (inputs[name] for name in INPUT_NAMES)
    assert wkv_choice_key(r, *others) == (16, 64, torch.float32, False)
    state = inputs["initial_state"].requires_grad_()
    assert wkv_choice_key(r, *others, state) == (16, 64, torch.float32, True)
    with torch.no_grad():
        assert wkv_choice_key(r, *others, state) == (16, 64, torch.float32, False)
    assert wkv_choice_key(r[:1, :, :1].bfloat16())[::2] == (1, torch.bfloat16)


def test_the_decision_is_measured_once_and_kept(monkeypatch):
    """The first eager call that needs it measures (every run gets a time, the global RNG is left alone, the result
    is a candidate); later calls read the same decision; a call that needs none (one token) measures nothing."""
    monkeypatch.setattr(wkv, "wkv_choices", {})
    measured = []
    measure = wkv.measure_wkv_choice
    monkeypatch.setattr(wkv, "measure_wkv_choice", lambda *key: measured.append(key) or measure(*key))
    inputs = random_wkv_inputs(BATCH, 40, HEADS, HEAD_DIM, seed=12)
    rng_state = torch.random.get_rng_state()
    with torch.no_grad():
        wkv7(*(inputs[name][:, :1] for name in INPUT_NAMES))
        assert measured == []
        first = wkv7(*(inputs[name] for name in INPUT_NAMES))
        ((key, choice),) = wkv.wkv_choices.items()
        second = wkv7(*(inputs[name] for name in INPUT_NAMES))
    assert measured == [KEY] and key == KEY and wkv.wkv_choices[key] is choice
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # seeded sampling stays reproducible
    assert choice.chunk_size in CHUNK_SIZES and choice.chunked_min_seq_len >= 2
    assert choice.threads == torch.get_num_threads() and choice.other_cpu_seconds >= 0
    assert len(choice.seconds) == 1 + 2 * len(CHUNK_SIZES) and all(0 < s < 1 for s in choice.seconds.values())
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_a_decision_with_gradients_is_measured_inside_bfloat16_autocast(monkeypatch):
    """Training under `torch.autocast("cpu", torch.bfloat16)` makes its first decision there: the measurement (whose
    timed backward recomputes the chunk terms) runs in float32, as the chunked form itself does, and the call then
    gives the loop's values and gradients."""
    monkeypatch.setattr(wkv, "wkv_choices", {})
    inputs = random_wkv_inputs(BATCH, 40, HEADS, HEAD_DIM, seed=13)
    leaves = {name: inputs[name].clone().requires_grad_() for name in INPUT_NAMES}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = wkv7(*(leaves[name] for name in INPUT_NAMES))
    ((key, choice),) = wkv.wkv_choices.items()
    assert key == (BATCH * HEADS, HEAD_DIM, torch.float32, True) and choice.chunk_size in CHUNK_SIZES
    reference = {name: inputs[name].clone().requires_grad_() for name in INPUT_NAMES}
    expected_y, expected_state = wkv7_recurrent(*(reference[name] for name in INPUT_NAMES))
    assert_close(y, expected_y, 1e-5, "y", scale_floor=1.0)
    assert_close(state, expected_state, 1e-5, "final state", scale_floor=1.0)
    grads = torch.autograd.grad(y.sum(), [leaves[name] for name in INPUT_NAMES])
    expected_grads = torch.autograd.grad(expected_y.sum(), [reference[name] for name in INPUT_NAMES])
    for name, grad, expected_grad in zip(INPUT_NAMES, grads, expected_grads):
        assert_close(grad, expected_grad, 1e-5, f"grad of {name}", scale_floor=1.0)


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.compile
def test_a_compiled_call_reads_the_decision_and_times_nothing(forced_choice, cached):
    """Under torch.compile(fullgraph=True): one graph, no break, nothing measured (the cached decision, or the
    defaults without one), and the loop's results."""
    torch._dynamo.reset()
    if cached:
        forced_choice(32, 20)
    inputs = random_wkv_inputs(BATCH, 40, HEADS, HEAD_DIM, seed=13)
    args = [inputs[name] for name in INPUT_NAMES] + [inputs["initial_state"], resets(40)]
    with torch.no_grad():
        explanation = torch._dynamo.explain(wkv7)(*args)
        compiled = torch.compile(wkv7, fullgraph=True, backend="eager")
        y, state = compiled(*args)
        expected_y, expected_state = wkv7_recurrent(*args)
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    assert_close(y, expected_y, 1e-5, "y", scale_floor=1.0)
    assert_close(state, expected_state, 1e-5, "final state", scale_floor=1.0)
    assert len(wkv.wkv_choices) == (1 if cached else 0)


def test_a_near_tie_between_chunk_sizes_keeps_the_default():
    """Another chunk size is chosen only when clearly faster than the default (16): a noisy near-tie must not make
    two processes round differently."""
    assert wkv._chosen_chunk_size({8: 0.95, 16: 1.0, 32: 0.97}) == 16
    assert wkv._chosen_chunk_size({8: 1.2, 16: 1.0, 32: 0.8}) == 32
    assert wkv._chosen_chunk_size({8: 0.5, 16: 1.0, 32: 0.9}) == 8


def test_a_decision_made_inside_activation_checkpointing_keeps_the_recomputation_identical(monkeypatch):
    """The first decision made inside a non-reentrant activation checkpoint: the measurement's own saved tensors are
    not the checkpoint's, so the recomputation matches and the gradients are the loop's."""
    monkeypatch.setattr(wkv, "wkv_choices", {})
    inputs = random_wkv_inputs(BATCH, 40, HEADS, HEAD_DIM, seed=14)
    leaves = {name: inputs[name].clone().requires_grad_() for name in INPUT_NAMES}
    y, state = torch.utils.checkpoint.checkpoint(wkv7, *(leaves[name] for name in INPUT_NAMES), use_reentrant=False)
    assert len(wkv.wkv_choices) == 1
    grads = torch.autograd.grad((y * y).sum() + state.sum(), [leaves[name] for name in INPUT_NAMES])
    reference = {name: inputs[name].clone().requires_grad_() for name in INPUT_NAMES}
    expected_y, expected_state = wkv7_recurrent(*(reference[name] for name in INPUT_NAMES))
    expected_grads = torch.autograd.grad(
        (expected_y * expected_y).sum() + expected_state.sum(), [reference[name] for name in INPUT_NAMES]
    )
    assert_close(y, expected_y, 1e-5, "y", scale_floor=1.0)
    for name, grad, expected_grad in zip(INPUT_NAMES, grads, expected_grads):
        assert_close(grad, expected_grad, 1e-5, f"grad of {name}", scale_floor=1.0)
