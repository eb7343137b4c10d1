"""Chunked WKV-7: the generalized delta rule of `wkv7_recurrent`, parallel inside chunks of tokens.

Same arguments and results as `wkv7_recurrent` (see ``wkv_reference.py``). Per head, with the state ``S`` laid out
``[value, key]``, ``u_t = S_{t-1} a_t`` and ``w_t = exp(log_decay_t)``:

    S_t = S_{t-1} diag(w_t) + u_t b_t^T + v_t k_t^T,        y_t = S_t r_t

Inside a chunk that starts from state ``S0``, with ``c_t`` the log-decay summed from the chunk start through token
``t``, every contribution is a decayed dot product:

    u_t = S0 (a_t e^{c_{t-1}}) + sum_{s<t}  [u_s (a_t . b_s e^{c_{t-1}-c_s}) + v_s (a_t . k_s e^{c_{t-1}-c_s})]
    y_t = S0 (r_t e^{c_t})     + sum_{s<=t} [u_s (r_t . b_s e^{c_t-c_s})     + v_s (r_t . k_s e^{c_t-c_s})]

The first line is a unit lower-triangular system for the chunk's ``u`` (the WY / UT form of the delta rule); its
solution is affine in the start state, ``U = W S0^T + U_intra``. Everything but ``S0`` is computed for many chunks
at once (a tile of about `_TILE_PROBLEMS` chunk x head problems, small enough to stay in cache); only the carry
loops over chunks:

    U = W S0^T + U_intra,    S_end = S0 diag(e^{c_L}) + U^T (b e^{c_L - c}) + v^T (k e^{c_L - c})

and then ``y = (r e^c) S0^T + A_rb U + A_rk v`` for the whole tile. Decays are always exponentials of differences
of cumulative log-decays. The pairwise ones are factored around a reference point ``m`` in the middle of each block
of ``_BLOCK`` rows, ``e^{c_t - c_s} = e^{c_t - m} e^{m - c_s}``, so that no factor exceeds
``e^{_BLOCK/2 * max|log_decay|}`` whatever the chunk size. Log-decays are floored at ``_MIN_LOG_DECAY`` (-16; a
decay below e^-16 = 1e-7 is under float32's resolution of the state it multiplies), which bounds the factors by
e^64: any log-decay <= 0 is safe, including -inf. RWKV-7's lie in ``(-0.61, 0)``.

A ``reset`` inside a chunk cuts it into segments: a pairwise term is kept only within a segment, ``S0`` reaches
only the tokens before the chunk's first reset, and only the last segment reaches the chunk's end state.

The backward pass recomputes the chunk terms from the inputs and the saved chunk-start states (one state per chunk,
no state per token), carries the state gradient backwards across chunks, and differentiates the chunk terms by
hand.
"""

import functools
from typing import NamedTuple, Optional

import torch

DEFAULT_CHUNK_SIZE = 16

_BLOCK = 8  # rows sharing one decay reference point inside a chunk
_MIN_LOG_DECAY = -16.0  # a decay below e^-16 (1e-7, fp32 resolution) counts as e^-16: the factors stay < e^64
_MAX_EXPONENT = 80.0  # cap on the factored decay exponents, so that masked-out entries stay finite
_LOG2_E = 1.4426950408889634
_TILE_PROBLEMS = 64  # chunk x head problems computed together, so that their intermediates stay in cache
# (32 to 256 ran within run-to-run noise, ~10%, of each other on a Zen 5: unlike the chunk size, not measured)


def wkv7_chunked(
    r: torch.Tensor,
    log_decay: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    reset: Optional[torch.Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """WKV-7 computed chunk by chunk; matches `wkv7_recurrent` up to float32 rounding, with its own backward.

    Args:
        r, log_decay, k, v, a, b: ``[batch, seq_len, num_heads, head_dim]``. ``log_decay`` (``<= 0``) must be
            float32, or float64, which then sets the precision of all accumulation and of the state.
        initial_state: ``[batch, num_heads, head_dim (value), head_dim (key)]``, or None for zeros.
        reset: ``[batch, seq_len]`` bool, or None. True where a new document starts: the state is zeroed before
            that token is written.
        chunk_size: tokens per chunk, at most 8 or a multiple of 8. The per-chunk state carry, which grows as
            1/chunk_size, balances the intra-chunk work, which grows with it: on CPU `wkv7` takes the size measured
            fastest on the machine (`wkv.wkv_choice`), often 16, or 32 for a few heads.

    Returns:
        ``y`` ``[batch, seq_len, num_heads, head_dim]`` in r's dtype, and the final state
        ``[batch, num_heads, head_dim, head_dim]`` in log_decay's dtype.
    """
    _check_inputs(r, log_decay, k, v, a, b, initial_state, reset, chunk_size)
    if r.shape[1] == 0:
        batch_size, _, num_heads, head_dim = r.shape
        if initial_state is None:
            initial_state = log_decay.new_zeros(batch_size, num_heads, head_dim, head_dim)
        return r.new_zeros(r.shape), initial_state.to(log_decay.dtype, copy=True)
    with torch.autocast(r.device.type, enabled=False):  # the triangular solves need float32 (no bf16 kernel)
        return _WKV7Chunked.apply(r, log_decay, k, v, a, b, initial_state, reset, chunk_size)


class _WKV7Chunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, log_decay, k, v, a, b, initial_state, reset, chunk_size):
        batch_size, seq_len, num_heads, head_dim = r.shape
        heads = batch_size * num_heads
        # states[c] is the state at the start of chunk c, states[-1] the final state
        states = log_decay.new_empty(-(-seq_len // chunk_size) + 1, heads, head_dim, head_dim)
        if initial_state is None:
            states[0].zero_()
        else:
            states[0].copy_(initial_state.reshape(heads, head_dim, head_dim))
        y = torch.empty_like(r, memory_format=torch.contiguous_format)
        for first, last in _tiles(states.shape[0] - 1, heads):
            tokens = slice(first * chunk_size, last * chunk_size)
            chunks = [_to_chunks(x[:, tokens], chunk_size, log_decay.dtype) for x in (r, log_decay, k, v, a, b)]
            terms = _chunk_terms(*chunks, _segments(reset, tokens, chunk_size, num_heads))

            w, u_intra, b_end, k_end, gamma, v_chunks = (
                x.unflatten(0, (last - first, heads))
                for x in (terms.w, terms.u_intra, *terms.ends.chunk(2, 1), terms.gamma, chunks[3])
            )
            u = torch.empty_like(u_intra)
            for c in range(last - first):
                state = states[first + c]
                torch.baddbmm(u_intra[c], w[c], state.mT, out=u[c])
                next_state = torch.mul(state, gamma[c], out=states[first + c + 1])
                next_state.baddbmm_(v_chunks[c].mT, k_end[c]).baddbmm_(u[c].mT, b_end[c])

            r_rows = _score_rows(terms.scores, 1)
            y_chunks = torch.bmm(terms.r_start, states[first:last].flatten(0, 1).mT)
            y_chunks.baddbmm_(r_rows[..., :chunk_size], u.flatten(0, 1)).baddbmm_(r_rows[..., chunk_size:], chunks[3])
            _from_chunks(y_chunks, y[:, tokens])

        ctx.save_for_backward(r, log_decay, k, v, a, b, reset, states)
        ctx.chunk_size = chunk_size
        ctx.initial_state_dtype = None if initial_state is None else initial_state.dtype
        return y, states[-1].view(batch_size, num_heads, head_dim, head_dim).clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_final_state):
        saved = ctx.saved_tensors  # unpack once: activation checkpointing allows a single unpack
        inputs, reset, states = saved[:6], saved[6], saved[7]
        batch_size, _, num_heads, head_dim = inputs[0].shape
        chunk_size, dtype = ctx.chunk_size, states.dtype
        heads = batch_size * num_heads
        grads = [
            torch.empty_like(x, memory_format=torch.contiguous_format) if needed else None
            for x, needed in zip(inputs, ctx.needs_input_grad)
        ]
        grad_state = grad_final_state.to(dtype).reshape(heads, head_dim, head_dim)
        for first, last in reversed(_tiles(states.shape[0] - 1, heads)):
            tokens = slice(first * chunk_size, last * chunk_size)
            chunks = [_to_chunks(x[:, tokens], chunk_size, dtype) for x in inputs]
            terms = _chunk_terms(*chunks, _segments(reset, tokens, chunk_size, num_heads))
            grad_y_chunks = _to_chunks(grad_y[:, tokens], chunk_size, dtype)
            starts = states[first:last].flatten(0, 1)
            uv = torch.cat([torch.baddbmm(terms.u_intra, terms.w, starts.mT), chunks[3]], 1)  # [U; v]

            # carry the state gradient backwards through the tile's chunks
            grad_uv = _score_rows(terms.scores, 1).mT @ grad_y_chunks  # y's share; the loop adds the end state's
            grad_ends = torch.empty_like(starts)  # d(loss)/d(state at the end of each chunk)
            grad_gamma = torch.empty_like(terms.gamma)
            w, ends, gamma, start_states, grad_uv_chunks, grad_ends_chunks, grad_gamma_chunks, grad_start_from_y = (
                x.unflatten(0, (last - first, heads))
                for x in (
                    terms.w,
                    terms.ends,
                    terms.gamma,
                    starts,
                    grad_uv,
                    grad_ends,
                    grad_gamma,
                    grad_y_chunks.mT @ terms.r_start,
                )
            )
            for c in reversed(range(last - first)):
                grad_ends_chunks[c] = grad_state
                torch.sum(grad_state * start_states[c], -2, keepdim=True, out=grad_gamma_chunks[c])
                grad_uv_chunks[c].baddbmm_(ends[c], grad_state.mT)
                grad_state = torch.addcmul(grad_start_from_y[c], grad_state, gamma[c])
                grad_state.baddbmm_(grad_uv_chunks[c, :, :chunk_size].mT, w[c])

            tile_grads = _chunk_terms_backward(
                terms,
                *chunks,
                uv=uv,
                grad_y=grad_y_chunks,
                grad_uv=grad_uv,
                grad_w=grad_uv[:, :chunk_size] @ starts,
                grad_ends=uv @ grad_ends,
                grad_gamma=grad_gamma,
                grad_r_start=grad_y_chunks @ starts,
            )
            for grad, tile_grad in zip(grads, tile_grads):
                if grad is not None:
                    _from_chunks(tile_grad, grad[:, tokens])

        grad_initial_state = None
        if ctx.needs_input_grad[6]:
            grad_initial_state = grad_state.view(batch_size, num_heads, head_dim, head_dim).to(ctx.initial_state_dtype)
        return (*grads, grad_initial_state, None, None)


def _tiles(n_chunks, heads):
    """Ranges of chunks processed together: about `_TILE_PROBLEMS` chunk x head problems, so that a tile's
    intermediates stay in cache."""
    step = max(1, _TILE_PROBLEMS // heads)
    return [(first, min(first + step, n_chunks)) for first in range(0, n_chunks, step)]


class _ChunkTerms(NamedTuple):
    """A chunk's terms apart from its start state ``S0``, for a tile of chunks and heads (``[problems, L,
    head_dim]`` unless noted), and the intermediates the backward pass reuses. With ``U = w S0^T + u_intra``:

        S_end = S0 * gamma + [U; v]^T ends,    y = r_start S0^T + [rb | rk] [U; v]
    """

    w: torch.Tensor
    u_intra: torch.Tensor
    ends: torch.Tensor  # [problems, 2 L, head_dim]: b and k decayed to the chunk end, [b_end; k_end]
    gamma: torch.Tensor  # [problems, 1, head_dim]: decay of S0 over the whole chunk
    r_start: torch.Tensor  # r times the decay of S0 up to y_t
    scores: torch.Tensor  # [problems, blocks, 2 block, 2 L]: rows (a | r) of one block, columns (b | k), masked
    invalid: torch.Tensor  # bool, broadcasts against `scores`: the masked entries
    left: torch.Tensor  # [problems, blocks, 2, block, head_dim]: (a | r) e^{c - m}, rows of one block
    right: torch.Tensor  # [problems, blocks, 2, L, head_dim]: (b | k) e^{m - c}, all columns
    row_scale: torch.Tensor  # [problems, blocks, 2, block, head_dim]: e^{c_{t-1} - m} | e^{c_t - m}
    column_scale: torch.Tensor  # [problems, blocks, L, head_dim]: e^{m - c_s}
    start_factor: torch.Tensor  # e^m, 0 from the chunk's first reset on: left * start_factor = (a_start | r_start)
    end_factor: torch.Tensor  # e^{c_L - m_last}, 0 before the last reset: right[:, -1] * end_factor = ends
    inverse: torch.Tensor  # [problems, L, L]: (I - ab)^-1


def _chunk_terms(r, log_decay, k, v, a, b, segment) -> _ChunkTerms:
    """Inputs ``[problems, L, head_dim]`` (problems = chunks x batch x heads); ``segment`` ``[problems, L]``
    (resets so far in the chunk) or None."""
    problems, chunk_size, head_dim = r.shape
    block = min(chunk_size, _BLOCK)
    blocks = chunk_size // block
    in_blocks = (problems, blocks, block, head_dim)
    log_decay = log_decay.clamp(min=_MIN_LOG_DECAY)
    cum = (log_decay * _LOG2_E).cumsum(1)  # c_t, in base 2 (exp2 is much faster than exp on CPU)

    # e^{c_t - c_s} = e^{c_t - m} e^{m - c_s}, with m in the middle of t's block of rows
    middle = cum.view(in_blocks)[:, :, (block - 1) // 2 : (block + 1) // 2]  # [problems, blocks, 1, head_dim]
    # (stacked rather than written through `out=` slices, which torch.compile cannot trace)
    row_shift = cum.view(in_blocks) - middle  # c_t - m
    row_scale = torch.stack([row_shift.add(log_decay.view(in_blocks), alpha=-_LOG2_E), row_shift], dim=2).exp2_()
    column_scale = torch.sub(middle, cum.unsqueeze(1)).clamp_(max=_MAX_EXPONENT * _LOG2_E).exp2_()
    left = torch.stack([a.view(in_blocks), r.view(in_blocks)], dim=2).mul_(row_scale)
    right = torch.stack([b, k], dim=1).unsqueeze(1) * column_scale.unsqueeze(2)
    scores = left.view(problems, blocks, 2 * block, head_dim) @ right.view(problems, blocks, -1, head_dim).mT
    invalid = _invalid_scores(chunk_size, block, segment, r.device)
    scores.masked_fill_(invalid, 0.0)

    # decays from the chunk start and to its end, from the same factors: e^{c} = e^{c - m} e^m and
    # e^{c_L - c} = e^{m_last - c} e^{c_L - m_last} (below 1e-38 they flush to 0, as e^c itself would)
    start_factor = middle.exp2().unsqueeze(2)  # [problems, blocks, 1, 1, head_dim]
    end_factor = torch.exp2(cum[:, None, -1:] - middle[:, -1:])  # [problems, 1, 1, head_dim]
    gamma = cum[:, -1:].exp2()
    if segment is not None:
        first = (segment == 0).view(problems, blocks, 1, block, 1)  # S0 still reaches u_t, y_t
        start_factor = start_factor * first
        end_factor = end_factor * (segment == segment[:, -1:]).view(problems, 1, chunk_size, 1)
        gamma = gamma * first[:, -1, :, -1]
    starts = (left * start_factor).transpose(1, 2).reshape(problems, 2, chunk_size, head_dim)
    a_start, r_start = starts.unbind(1)
    ends = (right[:, -1] * end_factor).view(problems, 2 * chunk_size, head_dim)

    eye = torch.eye(chunk_size, dtype=r.dtype, device=r.device).expand(problems, chunk_size, chunk_size)
    a_rows = _score_rows(scores, 0)
    inverse = torch.linalg.solve_triangular(-a_rows[..., :chunk_size], eye, upper=False, unitriangular=True)
    return _ChunkTerms(
        w=inverse @ a_start,
        u_intra=inverse @ (a_rows[..., chunk_size:] @ v),
        ends=ends,
        gamma=gamma,
        r_start=r_start,
        scores=scores,
        invalid=invalid,
        left=left,
        right=right,
        row_scale=row_scale,
        column_scale=column_scale,
        start_factor=start_factor,
        end_factor=end_factor,
        inverse=inverse,
    )


def _chunk_terms_backward(
    terms, r, log_decay, k, v, a, b, *, uv, grad_y, grad_uv, grad_w, grad_ends, grad_gamma, grad_r_start
):
    """Gradients of (r, log_decay, k, v, a, b) from those of the chunk terms; ``uv`` is ``[U; v]`` and
    ``grad_uv`` its gradient (the part through ``u_intra`` included, as ``U = w S0^T + u_intra``)."""
    problems, chunk_size, head_dim = r.shape
    blocks, _, block = terms.left.shape[1:4]
    grad_u, grad_v = grad_uv[:, :chunk_size], grad_uv[:, chunk_size:]
    grad_scores = torch.empty_like(terms.scores)

    # y = ... + [rb | rk] [U; v]
    _set_score_rows(grad_scores, 1, grad_y @ uv.mT)
    # [w | u_intra] = (I - ab)^-1 [a_start | ak v]
    inverse_t = terms.inverse.mT.contiguous()
    grad_a_start = inverse_t @ grad_w
    grad_z = inverse_t @ grad_u
    a_rows = torch.cat([torch.baddbmm(grad_a_start @ terms.w.mT, grad_z, terms.u_intra.mT), grad_z @ v.mT], -1)
    _set_score_rows(grad_scores, 0, a_rows)
    grad_v = grad_v.baddbmm(_score_rows(terms.scores, 0)[..., chunk_size:].mT, grad_z)

    # scores = left right^T, masked
    grad_scores.masked_fill_(terms.invalid, 0.0)
    grad_left = (grad_scores @ terms.right.view(problems, blocks, 2 * chunk_size, head_dim)).view_as(terms.left)
    for which, grad_start in enumerate((grad_a_start, grad_r_start)):
        grad_left[:, :, which].addcmul_(
            grad_start.view(problems, blocks, block, head_dim), terms.start_factor[:, :, 0]
        )
    grad_left.mul_(terms.row_scale)
    grad_right = grad_scores.mT @ terms.left.view(problems, blocks, 2 * block, head_dim)
    grad_right = grad_right.view_as(terms.right)
    grad_ends = grad_ends.view(problems, 2, chunk_size, head_dim)
    grad_right[:, -1].addcmul_(grad_ends, terms.end_factor)
    grad_right = grad_right.mul_(terms.column_scale.unsqueeze(2)).sum(1)

    grad_a = grad_left[:, :, 0].reshape(problems, chunk_size, head_dim)
    grad_r = grad_left[:, :, 1].reshape(problems, chunk_size, head_dim)
    grad_b, grad_k = grad_right.unbind(1)

    # every decay factor is e^{+-c}: a rides on +c_{t-1}, r on +c_t, b and k on -c_s, and the ends on +c_L
    grad_cum_before = a * grad_a
    grad_cum = (r * grad_r).addcmul_(b, grad_b, value=-1).addcmul_(k, grad_k, value=-1).add_(grad_cum_before)
    ends = terms.ends.view(problems, 2, chunk_size, head_dim)
    grad_cum[:, -1:] += (grad_ends * ends).sum((1, 2)).unsqueeze(1) + grad_gamma * terms.gamma
    # d c_t / d log_decay_s = 1 for s <= t: a reverse cumulative sum
    later = torch.ones(chunk_size, chunk_size, dtype=r.dtype, device=r.device).triu_()
    grad_log_decay = torch.baddbmm(grad_cum_before, later.expand(problems, -1, -1), grad_cum, beta=-1)
    grad_log_decay.masked_fill_(log_decay < _MIN_LOG_DECAY, 0.0)
    return grad_r, grad_log_decay, grad_k, grad_v, grad_a, grad_b


def _score_rows(scores, which):
    """The (a | r)-rows (which = 0 | 1) of the block-laid-out scores as ``[problems, L, 2 L]`` (a view if one
    block)."""
    problems, blocks, rows, columns = scores.shape
    block = rows // 2
    return scores[:, :, which * block : (which + 1) * block].reshape(problems, blocks * block, columns)


def _set_score_rows(scores, which, value):
    problems, blocks, rows, columns = scores.shape
    block = rows // 2
    scores[:, :, which * block : (which + 1) * block] = value.view(problems, blocks, block, columns)


def _cached_when_eager(fn):
    """`functools.lru_cache(maxsize=16)`, bypassed while torch.compile / torch.export traces: a tensor made during
    tracing is a placeholder of that trace and must not be handed to later calls."""
    cached = functools.lru_cache(maxsize=16)(fn)

    @functools.wraps(fn)
    def wrapper(*args):
        return fn(*args) if torch.compiler.is_compiling() else cached(*args)

    return wrapper


@_cached_when_eager
def _causal_scores(chunk_size, device):
    """Which scores are causal, ``[2, L, L]``: rows for u_t see tokens s < t, rows for y_t see s <= t."""
    position = torch.arange(chunk_size, device=device)
    earlier = position[None, :] < position[:, None]
    return torch.stack([earlier, earlier | (position[None, :] == position[:, None])])


def _invalid_scores(chunk_size, block, segment, device):
    """Which scores are masked out, broadcasting against ``[problems, blocks, 2 block, 2 L]``: the non-causal
    ones, and those across a reset."""
    if segment is None:
        return _invalid_scores_without_reset(chunk_size, block, device)
    causal = _causal_scores(chunk_size, device) & (segment[:, None, :, None] == segment[:, None, None, :])
    return _causal_to_invalid(causal, block)


@_cached_when_eager
def _invalid_scores_without_reset(chunk_size, block, device):
    return _causal_to_invalid(_causal_scores(chunk_size, device), block)


def _causal_to_invalid(causal, block):
    chunk_size = causal.shape[-1]
    causal = causal.unflatten(-2, (chunk_size // block, block)).transpose(-4, -3).flatten(-3, -2)
    return ~torch.cat([causal, causal], -1)  # [..., blocks, 2 block, 2 L]


def _segments(reset, tokens, chunk_size, num_heads):
    """``[chunks*batch*heads, L]``: how many resets each token of `tokens` follows in its chunk (None if no
    reset)."""
    if reset is None:
        return None
    batch_size = reset.shape[0]
    segment = _to_chunks(reset[:, tokens, None, None], chunk_size, torch.int32).cumsum(1)  # [chunks*batch, L, 1]
    return segment.view(-1, batch_size, 1, chunk_size).expand(-1, -1, num_heads, -1).reshape(-1, chunk_size)


def _to_chunks(x, chunk_size, dtype):
    """``[batch, tokens, heads, dim]`` -> ``[chunks*batch*heads, chunk_size, dim]`` in `dtype`, zero-padded.
    Zero padding is neutral: no write, no removal, and the padded log-decay 0 keeps the state."""
    batch_size, n_tokens, num_heads, dim = x.shape
    n_full, remainder = n_tokens // chunk_size, n_tokens % chunk_size  # (not divmod: torch.compile traces these)
    out = x.new_empty(n_full + (remainder > 0), batch_size, num_heads, chunk_size, dim, dtype=dtype)
    full = x[:, : n_full * chunk_size].view(batch_size, n_full, chunk_size, num_heads, dim)
    out[:n_full].copy_(full.permute(1, 0, 3, 2, 4))
    if remainder:
        out[-1, :, :, :remainder].copy_(x[:, n_full * chunk_size :].transpose(1, 2))
        out[-1, :, :, remainder:].zero_()
    return out.flatten(0, 2)


def _from_chunks(x, out):
    """Inverse of `_to_chunks`: writes ``[chunks*batch*heads, chunk_size, dim]`` into ``out``
    ``[batch, tokens, heads, dim]`` (in out's dtype), dropping the padding."""
    batch_size, n_tokens, num_heads, dim = out.shape
    chunk_size = x.shape[1]
    n_full, remainder = n_tokens // chunk_size, n_tokens % chunk_size  # (not divmod: torch.compile traces these)
    x = x.view(-1, batch_size, num_heads, chunk_size, dim)
    full = out[:, : n_full * chunk_size].view(batch_size, n_full, chunk_size, num_heads, dim)
    full.copy_(x[:n_full].permute(1, 0, 3, 2, 4))
    if remainder:
        out[:, n_full * chunk_size :].copy_(x[-1, :, :, :remainder].transpose(1, 2))


def _check_inputs(r, log_decay, k, v, a, b, initial_state, reset, chunk_size):
    named = dict(r=r, log_decay=log_decay, k=k, v=v, a=a, b=b)
    for name, x in named.items():
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if r.dim() != 4:
        raise ValueError(f"r must be [batch, seq_len, num_heads, head_dim], got shape {tuple(r.shape)}")
    for name, x in named.items():
        if x.shape != r.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected r's shape {tuple(r.shape)}")
        if x.device != r.device:
            raise ValueError(f"{name} is on {x.device}, expected r's device {r.device}")
    if log_decay.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"log_decay must be float32 (or float64), got {log_decay.dtype}")
    batch_size, seq_len, num_heads, head_dim = r.shape
    if initial_state is not None:
        expected = (batch_size, num_heads, head_dim, head_dim)
        if tuple(initial_state.shape) != expected:
            raise ValueError(f"initial_state has shape {tuple(initial_state.shape)}, expected {expected}")
        if not initial_state.is_floating_point():
            raise ValueError(f"initial_state must be floating point, got {initial_state.dtype}")
    if reset is not None:
        if tuple(reset.shape) != (batch_size, seq_len):
            raise ValueError(f"reset has shape {tuple(reset.shape)}, expected {(batch_size, seq_len)}")
        if reset.dtype != torch.bool:
            raise ValueError(f"reset must be bool, got {reset.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1 or (chunk_size > _BLOCK and chunk_size % _BLOCK):
        raise ValueError(f"chunk_size must be a positive int, at most {_BLOCK} or a multiple of it, got {chunk_size}")
