"""The chunked WKV-7 operator computes what the reference loop `wkv7_recurrent` computes, forward and backward."""

import ast
import sys
from pathlib import Path

import pytest
import torch
from helpers import WKV_INPUT_NAMES as INPUT_NAMES
from helpers import assert_close, assert_wkv_close, wkv_outputs_and_grads

from modeling_rwkv7.wkv_chunked import wkv7_chunked
from modeling_rwkv7.wkv_reference import random_wkv_inputs, wkv7_recurrent


def assert_matches_reference(inputs, initial_state=None, reset=None, chunk_size=16, tol=1e-4):
    expected = wkv_outputs_and_grads(wkv7_recurrent, inputs, initial_state, reset)
    actual = wkv_outputs_and_grads(wkv7_chunked, inputs, initial_state, reset, chunk_size=chunk_size)
    assert_wkv_close(actual, expected, tol)


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("seq_len", [1, 17, 100])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_reference(chunk_size, seq_len, with_state):
    seed = 1000 * chunk_size + 10 * seq_len + with_state
    inputs = random_wkv_inputs(2, seq_len, 2, 16, seed)
    assert_matches_reference(inputs, inputs["initial_state"] if with_state else None, chunk_size=chunk_size)


def test_matches_reference_at_full_head_size():
    """The 0.1B shape's head size (64), several chunks and a ragged last one."""
    inputs = random_wkv_inputs(1, 80, 2, 64, seed=5)
    assert_matches_reference(inputs, inputs["initial_state"])


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_reset_matches_reference(chunk_size):
    """Resets at position 0, on chunk boundaries and inside chunks, different per sequence in the batch."""
    seq_len = 100
    reset = torch.zeros(3, seq_len, dtype=torch.bool)
    reset[0, [0, 16, 32, 64]] = True  # at 0 and on chunk boundaries
    reset[1, [5, 21, 40, 41, 99]] = True  # inside chunks, two in a row, the last token
    reset[2, torch.randperm(seq_len, generator=torch.Generator().manual_seed(chunk_size))[:12]] = True
    inputs = random_wkv_inputs(3, seq_len, 2, 16, seed=chunk_size)
    assert_matches_reference(inputs, inputs["initial_state"], reset, chunk_size=chunk_size)


def test_reset_starts_a_fresh_document():
    """A packed sequence with a reset computes, after the reset, exactly what the second document alone computes
    from a zero state, and the state carried in before the reset has no gradient."""
    first, second = random_wkv_inputs(1, 23, 2, 16, seed=11), random_wkv_inputs(1, 30, 2, 16, seed=12)
    packed = {name: torch.cat([first[name], second[name]], 1) for name in INPUT_NAMES}
    reset = torch.zeros(1, 53, dtype=torch.bool)
    reset[0, 23] = True
    initial_state = first["initial_state"].requires_grad_()
    y_packed, state_packed = wkv7_chunked(*(packed[name] for name in INPUT_NAMES), initial_state, reset)
    y_alone, state_alone = wkv7_chunked(*(second[name] for name in INPUT_NAMES))
    assert_close(y_packed[:, 23:], y_alone, 1e-5, "y after the reset", scale_floor=1.0)
    assert_close(state_packed, state_alone, 1e-5, "final state", scale_floor=1.0)
    (grad_state,) = torch.autograd.grad((y_packed[:, 23:] ** 2).sum() + state_packed.sum(), initial_state)
    assert torch.count_nonzero(grad_state) == 0


def test_bfloat16_inputs():
    """bf16 r, k, v, a, b (float32 log-decay): y comes back in bf16 within bf16 rounding of the reference, the
    state and the accumulation stay float32, and each gradient has its input's dtype."""
    inputs = random_wkv_inputs(2, 50, 2, 16, seed=21, dtype=torch.bfloat16)
    initial_state = inputs["initial_state"]
    expected = wkv_outputs_and_grads(wkv7_recurrent, inputs, initial_state, None)
    actual = wkv_outputs_and_grads(wkv7_chunked, inputs, initial_state, None, chunk_size=16)
    assert actual[0].dtype == torch.bfloat16 and actual[1].dtype == torch.float32
    assert_close(actual[0], expected[0], 2e-2, "y", scale_floor=1.0)
    assert_close(actual[1], expected[1], 1e-4, "final state", scale_floor=1.0)
    for name in expected[2]:
        assert actual[2][name].dtype == (inputs[name].dtype if name in inputs else torch.float32), name
        assert_close(actual[2][name], expected[2][name], 2e-2, f"grad of {name}", scale_floor=1.0)


@pytest.mark.parametrize("low", [-5.0, -40.0])
def test_strong_decay(low):
    """Log-decays far below RWKV-7's range (-0.61), down to -inf, stay finite and match, at the largest chunk."""
    inputs = random_wkv_inputs(2, 100, 2, 16, seed=31)
    inputs["log_decay"] = low * torch.rand(inputs["log_decay"].shape, generator=torch.Generator().manual_seed(32))
    inputs["log_decay"][:, ::7, 0] = -float("inf")
    assert_matches_reference(inputs, inputs["initial_state"], chunk_size=64)
    # a decay of exactly 0 has no gradient through its log, as in the reference
    _, _, grads = wkv_outputs_and_grads(wkv7_chunked, inputs, inputs["initial_state"], None, chunk_size=64)
    assert torch.count_nonzero(grads["log_decay"][:, ::7, 0]) == 0


def test_gradcheck_float64():
    """Numerical gradients in float64: several chunks of 4, a ragged last one, a reset and an initial state."""
    inputs = random_wkv_inputs(1, 10, 2, 3, seed=41)
    leaves = [inputs[name].double().requires_grad_() for name in INPUT_NAMES]
    initial_state = inputs["initial_state"].double().requires_grad_()
    reset = torch.zeros(1, 10, dtype=torch.bool)
    reset[0, 6] = True

    def op(*args):
        return wkv7_chunked(*args, reset=reset, chunk_size=4)

    assert torch.autograd.gradcheck(op, (*leaves, initial_state))


def test_memory_is_one_state_per_chunk():
    """What the backward pass keeps: the inputs, and one float32 state per chunk (not one per token)."""
    batch_size, seq_len, num_heads, head_dim, chunk_size = 2, 100, 2, 16, 16
    inputs = random_wkv_inputs(batch_size, seq_len, num_heads, head_dim, seed=51)
    inputs = {name: inputs[name].requires_grad_() for name in INPUT_NAMES}
    y, _ = wkv7_chunked(*(inputs[name] for name in INPUT_NAMES), chunk_size=chunk_size)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    n_chunks = -(-seq_len // chunk_size)
    states = batch_size * num_heads * head_dim * head_dim * (n_chunks + 1)
    assert sum(t.numel() for t in saved) == sum(x.numel() for x in inputs.values()) + states


def test_empty_sequence():
    inputs = random_wkv_inputs(2, 0, 2, 16, seed=61)
    initial_state = inputs["initial_state"]
    y, final_state = wkv7_chunked(*(inputs[name] for name in INPUT_NAMES), initial_state)
    assert y.shape == (2, 0, 2, 16)
    assert torch.equal(final_state, initial_state) and final_state.data_ptr() != initial_state.data_ptr()
    _, zero_state = wkv7_chunked(*(inputs[name] for name in INPUT_NAMES))
    assert torch.equal(zero_state, torch.zeros(2, 2, 16, 16))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(k=torch.zeros(2, 5, 2, 8)), r"k has shape \(2, 5, 2, 8\), expected r's shape \(2, 5, 2, 16\)"),
        (dict(log_decay=torch.zeros(2, 5, 2, 16, dtype=torch.bfloat16)), "log_decay must be float32.*bfloat16"),
        (dict(v=torch.zeros(2, 5, 2, 16, dtype=torch.long)), "v must be a floating-point tensor, got torch.int64"),
        (
            dict(initial_state=torch.zeros(2, 2, 16, 8)),
            r"initial_state has shape \(2, 2, 16, 8\), expected \(2, 2, 16, 16\)",
        ),
        (dict(reset=torch.zeros(2, 4, dtype=torch.bool)), r"reset has shape \(2, 4\), expected \(2, 5\)"),
        (dict(reset=torch.zeros(2, 5)), "reset must be bool, got torch.float32"),
        (dict(chunk_size=20), "chunk_size must be .* got 20"),
        (dict(chunk_size=0), "chunk_size must be .* got 0"),
    ],
)
def test_bad_input_raises(change, message):
    arguments = dict(random_wkv_inputs(2, 5, 2, 16, seed=71), initial_state=None, reset=None, chunk_size=16)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        wkv7_chunked(**arguments)


def test_the_operator_files_import_only_torch_and_the_standard_library():
    """wkv_reference.py and wkv_chunked.py load from their paths where torch is all there is (the kernel's GPU
    check): no relative import, and no module but torch and the standard library's."""
    package = Path(__file__).resolve().parents[1] / "modeling_rwkv7"
    for name in ("wkv_reference", "wkv_chunked"):
        tree = ast.parse((package / f"{name}.py").read_text())
        modules = {
            alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        modules |= {
            node.module.split(".")[0] if node.level == 0 else "." * node.level
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
        }
        assert "torch" in modules and modules - {"torch"} <= sys.stdlib_module_names, (name, sorted(modules))
