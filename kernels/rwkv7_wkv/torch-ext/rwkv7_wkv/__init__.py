"""RWKV-7 WKV kernel (the generalized delta rule with a per-channel decay), CUDA and CPU builds.

Per head, with the state ``S`` laid out ``[value, key]``:

    S_t = S_{t-1} @ (diag(exp(log_decay_t)) + a_t b_t^T) + v_t k_t^T
    y_t = S_t @ r_t

    r, log_decay, k, v, a, b: [batch, seq_len, num_heads, head_dim]; r, k, v, a, b in one of float32, float16,
                              bfloat16; log_decay is used in float32
    initial_state:            [batch, num_heads, head_dim (value), head_dim (key)] float32, or None (zeros)
    reset:                    [batch, seq_len] bool, or None: the state is zeroed before the tokens marked True

`wkv7` returns ``(y in r's dtype, final_state float32)`` and is differentiable (all inputs, initial_state
included); `wkv7_decode_step` advances a state by one token in place. Head sizes: `HEAD_SIZES`. `layers.RWKV7WKV`
is the hub layer `kernels.kernelize` puts in place of `modeling_rwkv7`'s WKV layer.

The CPU build also has the decoding ops: `gemv` (a few rows times a float32, bfloat16, per-row-scaled int8 or
per-group-scaled int4 weight, the last packed by `pack_int4`) and `block_decode_step` (one token through a whole
RWKV-7 block, its state updated in place), which `modeling_rwkv7.decode_rwkv7.native_decode_step` drives.
"""

from typing import Optional

import torch

from ._ops import add_op_namespace_prefix, ops

HEAD_SIZES = (16, 32, 64)
CHECKPOINT_INTERVAL = 16  # the forward keeps the state every this many steps for the backward


def wkv7(
    r: torch.Tensor,
    log_decay: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    reset: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 over a sequence. Returns ``(y [batch, seq_len, num_heads, head_dim], final_state float32)``."""
    log_decay = log_decay.float()
    if initial_state is not None:
        initial_state = initial_state.float()
    inputs = (r, log_decay, k, v, a, b, initial_state)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs):
        return _WKV7.apply(r, log_decay, k, v, a, b, initial_state, reset)
    y, final_state, _ = ops.forward(r, log_decay, k, v, a, b, initial_state, reset, False)
    return y, final_state


def wkv7_decode_step(
    r: torch.Tensor,
    log_decay: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """One token: inputs ``[batch, num_heads, head_dim]``, ``state [batch, num_heads, head_dim, head_dim]`` float32
    updated in place. Returns ``y [batch, num_heads, head_dim]`` in r's dtype. Not differentiable."""
    return ops.decode_step(r, log_decay.float(), k, v, a, b, state)


def gemv(rows: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``rows [n, in] @ weight [out, in]^T``, summed in float32 and returned in the rows' dtype (float32 or
    bfloat16). weight: float32; bfloat16 (times the rows rounded to bfloat16); int8 times ``scale [out]``; or int4
    from `pack_int4` (uint8 [out, in / 2]) times ``scale [out, in / group]``, one per group of `group` values (a
    multiple of 32). Each row's result is the same bits whatever the other rows (batch invariance). CPU only."""
    return ops.gemv(rows, weight, scale)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int4 values [out, in] (an integer tensor in [-8, 7], in a multiple of 32) as the decoding ops read them:
    uint8 [out, in / 2], where byte j of each 32 values holds value j + 8 in its low nibble and value j + 16 (+ 8)
    in its high nibble (llama.cpp's Q4_0 order)."""
    out, size = values.shape
    if size % 32 or values.dtype.is_floating_point or values.min() < -8 or values.max() > 7:
        raise ValueError(
            f"pack_int4 takes integers in [-8, 7] with a multiple of 32 per row, got {values.dtype} "
            f"[{out}, {size}] in [{values.min()}, {values.max()}]"
        )
    biased = (values.to(torch.int16) + 8).to(torch.uint8).reshape(out, size // 32, 2, 16)
    return (biased[:, :, 0] | (biased[:, :, 1] << 4)).reshape(out, size // 2).contiguous()


def decode_vector_bits() -> int:
    """The vector width of the decoding ops' loops on this CPU: 512 (AVX-512), 256 (AVX2 + FMA) or 128 (the
    baseline), the best the CPU has, capped by ``ATEN_CPU_CAPABILITY`` ("default", "avx2") as torch's kernels are."""
    return ops.decode_vector_bits()


def _block_layout() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names of `block_decode_step`'s vectors and weights in its argument order, as the op defines them (empty
    in a build without the CPU decoding ops)."""
    try:
        vectors, weights = ops.block_layout()
    except (NotImplementedError, RuntimeError):
        return (), ()
    return tuple(vectors), tuple(weights)


# The vectors and weights of `block_decode_step`, in the op's order (None where layer 0 has none: v0, v1, v2).
BLOCK_VECTORS, BLOCK_WEIGHTS = _block_layout()


def block_decode_step(
    hidden: torch.Tensor,
    v_first: Optional[torch.Tensor],
    vectors: list,
    weights: list,
    scales: list,
    attn_shift_state: torch.Tensor,
    recurrent_state: torch.Tensor,
    ffn_shift_state: torch.Tensor,
    norm_eps: float,
    group_norm_eps: float,
    decay_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token through an RWKV-7 block, in float32. hidden: [batch, hidden] float32, the block's input. v_first:
    layer 0's value [batch, hidden] float32 (None in layer 0). vectors / weights / scales: in the order of
    `BLOCK_VECTORS` / `BLOCK_WEIGHTS` (weights [out, in] float32, bfloat16, int8 with a scale per row, or int4
    from `pack_int4` with a scale per group, as `gemv` takes them; else None). attn_shift_state, ffn_shift_state:
    [batch, hidden]; recurrent_state: [batch, heads, head_dim, head_dim] float32; all three updated in place.
    Returns (the block's output [batch, hidden], its value [batch, hidden]: in layer 0, the v_first of the later
    layers). CPU only."""
    return ops.block_decode_step(
        hidden,
        v_first,
        vectors,
        weights,
        scales,
        attn_shift_state,
        recurrent_state,
        ffn_shift_state,
        norm_eps,
        group_norm_eps,
        decay_scale,
    )


class _WKV7(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, log_decay, k, v, a, b, initial_state, reset):
        y, final_state, checkpoints = ops.forward(r, log_decay, k, v, a, b, initial_state, reset, True)
        ctx.save_for_backward(r, log_decay, k, v, a, b, reset, checkpoints)
        ctx.has_initial_state = initial_state is not None
        ctx.set_materialize_grads(False)
        return y, final_state

    @staticmethod
    def backward(ctx, dy, dfinal_state):
        r, log_decay, k, v, a, b, reset, checkpoints = ctx.saved_tensors
        dy = torch.zeros_like(r) if dy is None else dy.contiguous()
        dr, dlog_decay, dk, dv, da, db, dinitial_state = ops.backward(
            r, log_decay, k, v, a, b, reset, checkpoints, dy, dfinal_state
        )
        return dr, dlog_decay, dk, dv, da, db, dinitial_state if ctx.has_initial_state else None, None


# Shapes for torch.compile / meta tensors: contiguous, like the ops' outputs whatever the inputs' strides.
@torch.library.register_fake(add_op_namespace_prefix("forward"))
def _forward_fake(r, log_decay, k, v, a, b, initial_state, reset, save_checkpoints):
    batch, seq_len, num_heads, head_dim = r.shape
    num_checkpoints = (seq_len + CHECKPOINT_INTERVAL - 1) // CHECKPOINT_INTERVAL
    final_state = r.new_empty(batch, num_heads, head_dim, head_dim, dtype=torch.float32)
    checkpoint_shape = (batch, num_heads, num_checkpoints, head_dim, head_dim) if save_checkpoints else (0,)
    return r.new_empty(r.shape), final_state, r.new_empty(checkpoint_shape, dtype=torch.float32)


@torch.library.register_fake(add_op_namespace_prefix("backward"))
def _backward_fake(r, log_decay, k, v, a, b, reset, checkpoints, dy, dfinal_state):
    batch, _, num_heads, head_dim = r.shape
    input_grads = [r.new_empty(r.shape) for _ in range(6)]
    input_grads[1] = log_decay.new_empty(log_decay.shape)
    return (*input_grads, r.new_empty(batch, num_heads, head_dim, head_dim, dtype=torch.float32))


@torch.library.register_fake(add_op_namespace_prefix("decode_step"))
def _decode_step_fake(r, log_decay, k, v, a, b, state):
    return r.new_empty(r.shape)


@torch.library.register_fake(add_op_namespace_prefix("gemv"))
def _gemv_fake(rows, weight, scale):
    return rows.new_empty(rows.shape[0], weight.shape[0])


@torch.library.register_fake(add_op_namespace_prefix("block_decode_step"))
def _block_decode_step_fake(
    hidden,
    v_first,
    vectors,
    weights,
    scales,
    attn_shift_state,
    recurrent_state,
    ffn_shift_state,
    norm_eps,
    group_norm_eps,
    decay_scale,
):
    return hidden.new_empty(hidden.shape), hidden.new_empty(hidden.shape)


from . import layers  # noqa: E402  (its layers call wkv7)

__all__ = [
    "BLOCK_VECTORS",
    "BLOCK_WEIGHTS",
    "CHECKPOINT_INTERVAL",
    "HEAD_SIZES",
    "block_decode_step",
    "decode_vector_bits",
    "gemv",
    "layers",
    "ops",
    "pack_int4",
    "wkv7",
    "wkv7_decode_step",
]
