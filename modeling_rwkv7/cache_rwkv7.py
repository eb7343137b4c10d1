"""The RWKV-7 recurrent state as a transformers `Cache`.

Per layer the state is three tensors, whatever the sequence length:

    recurrent_state:  [batch, num_heads, head_dim (value), head_dim (key)] (the WKV matrix state, in the official
                      `[V, K]` layout), float32 unless `config.wkv_state_dtype` asks for bfloat16 / float16
    attn_shift_state: [batch, hidden_size] (the last token's time-mix input, for token shift)
    ffn_shift_state:  [batch, hidden_size] (the last token's channel-mix input)

The tensors are allocated once and a forward pass writes the new state into them (`RWKV7LayerState.update`), so a
compiled or CUDA-graph-captured decoding step finds them at the same addresses every time.

A bfloat16 / float16 recurrent state halves its memory; the WKV arithmetic stays float32 (the state is upcast when
read and rounded when written back after every forward pass). Drift against a float32 state, measured on the
built-in trained model (models/rwkv7-tiny-default) decoding 4096 random tokens one at a time (largest logit
difference relative to the largest logit; agreement of the arg-max token):

    bfloat16: 1.8e-2 over the first 256 tokens, 6.9e-2 over tokens 3840-4096; arg-max agrees 100% / 99.6%
    float16:  3.3e-3 over the first 256 tokens, 8.8e-3 over tokens 3840-4096; arg-max agrees 100% / 100%

so float16 is the better half-size state where its range suffices; float32 stays the default.
"""

import json
import os
from typing import Optional

import torch
import torch.utils._pytree as pytree
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.cache_utils import Cache

from .configuration_rwkv7 import RWKV7Config


def wkv_state_dtype(config: RWKV7Config) -> torch.dtype:
    """The dtype of `recurrent_state`: `config.wkv_state_dtype` ("float32", "bfloat16" or "float16"; the config
    validates it)."""
    return getattr(torch, config.wkv_state_dtype)


def _mark_static(tensors) -> None:
    """Tell torch.compile (and CUDA graphs) that these tensors keep their address from one call to the next."""
    if not torch.compiler.is_compiling():
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor)


def _is_leading_rows(tensor: torch.Tensor, pool: torch.Tensor) -> bool:
    """Whether `tensor` is `pool[:n]` for some n (an empty one included)."""
    return (
        tensor.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()
        and tensor.storage_offset() == pool.storage_offset()
        and tensor.shape[1:] == pool.shape[1:]
        and tensor.stride() == pool.stride()
        and tensor.shape[0] <= pool.shape[0]
    )


class RWKV7LayerState:
    """The state of one RWKV-7 block. Its size is fixed at creation; `update` writes a forward pass's new state."""

    is_compileable = True
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, recurrent_state: torch.Tensor, attn_shift_state: torch.Tensor, ffn_shift_state: torch.Tensor):
        self.recurrent_state = recurrent_state
        self.attn_shift_state = attn_shift_state
        self.ffn_shift_state = ffn_shift_state
        _mark_static(self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "recurrent_state": self.recurrent_state,
            "attn_shift_state": self.attn_shift_state,
            "ffn_shift_state": self.ffn_shift_state,
        }

    def update(self, recurrent_state: torch.Tensor, attn_shift_state: torch.Tensor, ffn_shift_state: torch.Tensor):
        """Store the state after a forward pass (each tensor keeps its dtype). Written in place, so the addresses
        stay fixed, unless autograd is involved: then the tensors are replaced, since the backward pass may need
        the old values (state tuning, training through a cache)."""
        new = {
            "recurrent_state": recurrent_state,
            "attn_shift_state": attn_shift_state,
            "ffn_shift_state": ffn_shift_state,
        }
        old = self.tensors()
        if torch.is_grad_enabled() and any(t.requires_grad for t in (*new.values(), *old.values())):
            for name, tensor in new.items():
                setattr(self, name, tensor.to(old[name].dtype))
        else:
            for name, tensor in new.items():
                old[name].copy_(tensor)

    def _replace(self, fn) -> None:
        """Replace every tensor `t` by `fn(t)` (for changes of batch size or device)."""
        self.recurrent_state = fn(self.recurrent_state)
        self.attn_shift_state = fn(self.attn_shift_state)
        self.ffn_shift_state = fn(self.ffn_shift_state)
        _mark_static(self.tensors().values())

    @property
    def batch_size(self) -> int:
        return self.recurrent_state.shape[0]

    def reset(self) -> None:
        for tensor in self.tensors().values():
            tensor.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i takes row beam_idx[i]'s state, in place."""
        for tensor in self.tensors().values():
            tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._replace(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._replace(lambda t: t.repeat_interleave(repeats, dim=0))

    def offload(self) -> None:
        self._replace(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError(
            "An RWKV-7 state cannot be cropped: it keeps no per-token history. Save a copy with `cache.copy()` "
            "before the tokens you may want to undo."
        )

    def get_max_length(self) -> int:
        return -1

    def pools(self) -> dict[str, torch.Tensor]:
        """The tensors of `capacity` rows whose first `batch_size` rows are this state (see `RWKV7Cache.resize`):
        the state's own tensors unless they are such a view."""
        current = self.tensors()
        pools = getattr(self, "_pools", None)
        if pools is None or any(not _is_leading_rows(tensor, pools[name]) for name, tensor in current.items()):
            pools = self._pools = current
        return pools

    def resize(self, batch_size: int) -> None:
        """Make the first `batch_size` rows of the pools this state (views: nothing is copied)."""
        for name, pool in self.pools().items():
            setattr(self, name, pool[:batch_size])


class RWKV7Cache(Cache):
    """Recurrent state of an RWKV-7 model for `batch_size` sequences: O(1) in the sequence length.

    Create it with `RWKV7Cache(config, batch_size)` or `model.init_cache(batch_size)`, pass it as
    `cache`, and the model continues from it and writes the new state into it.
    `seen_tokens` counts the positions processed so far (padding included), which `generate()` needs; it is kept
    in a tensor on the state's device so that a compiled step can count without a recompilation.
    """

    def __init__(
        self,
        config: RWKV7Config,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device | str] = None,
    ):
        self._allocate(
            config.num_hidden_layers,
            config.num_heads,
            config.head_dim,
            batch_size,
            dtype,
            wkv_state_dtype(config),
            device,
        )

    def _allocate(
        self, num_layers: int, num_heads: int, head_dim: int, batch_size: int, dtype, recurrent_dtype, device
    ) -> None:
        """Zero state for `batch_size` sequences: shift states in `dtype`, the WKV state in `recurrent_dtype`."""
        # (a symbolic batch size is a torch.export with a dynamic batch dimension)
        if not isinstance(batch_size, torch.SymInt) and (not isinstance(batch_size, int) or batch_size <= 0):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        hidden_size = num_heads * head_dim
        layers = [
            RWKV7LayerState(
                recurrent_state=torch.zeros(
                    batch_size, num_heads, head_dim, head_dim, dtype=recurrent_dtype, device=device
                ),
                attn_shift_state=torch.zeros(batch_size, hidden_size, dtype=dtype, device=device),
                ffn_shift_state=torch.zeros(batch_size, hidden_size, dtype=dtype, device=device),
            )
            for _ in range(num_layers)
        ]
        self._adopt(layers, torch.zeros((), dtype=torch.long, device=device), num_heads, head_dim)

    def _adopt(self, layers: list[RWKV7LayerState], seen_tokens: torch.Tensor, num_heads: int, head_dim: int) -> None:
        """Make `layers` and the counter `seen_tokens` (a 0-d long tensor) this cache's state."""
        self.num_heads, self.head_dim, self.hidden_size = num_heads, head_dim, num_heads * head_dim
        super().__init__(layers=layers)
        self._seen_tokens = seen_tokens
        _mark_static([self._seen_tokens])

    # --- what `generate()` and the model ask of a cache -------------------------------------------------------

    @property
    def seen_tokens(self) -> int:
        return int(self._seen_tokens)

    @seen_tokens.setter
    def seen_tokens(self, value: int) -> None:
        self._seen_tokens.fill_(value)

    def add_seen_tokens(self, num_tokens: int) -> None:
        """Count `num_tokens` more processed positions (in place, inside a compiled graph too)."""
        self._seen_tokens.add_(num_tokens)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_length(self, layer_idx: Optional[int] = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return True

    @property
    def batch_size(self) -> int:
        return self.layers[0].batch_size

    @property
    def nbytes(self) -> int:
        """Memory held by the state tensors, in bytes (constant during generation)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors().values())

    def reset(self) -> None:
        super().reset()
        self._seen_tokens.zero_()

    def check_compatible(self, config: RWKV7Config, batch_size: int, dtype: Optional[torch.dtype] = None) -> None:
        """Raise if this state cannot continue a forward pass of `config` on `batch_size` rows whose activations
        are `dtype`. The rule is that of `model.init_cache`: the shift states in the activation dtype, the WKV state
        in `config.wkv_state_dtype` (a TypeError for a non-float state, a ValueError for any other mismatch)."""
        expected = (config.num_hidden_layers, config.num_heads, config.head_dim, config.hidden_size)
        found = (len(self.layers), self.num_heads, self.head_dim, self.hidden_size)
        if found != expected:
            raise ValueError(
                f"RWKV7Cache (layers, heads, head_dim, hidden) = {found} does not match the model's {expected}."
            )
        if self.batch_size != batch_size:
            raise ValueError(
                f"RWKV7Cache holds batch size {self.batch_size} but the input has batch size {batch_size}."
            )
        layer = self.layers[0]
        _check_state_dtypes(layer.recurrent_state.dtype, layer.attn_shift_state.dtype, "RWKV7Cache")
        if layer.recurrent_state.dtype != wkv_state_dtype(config):
            raise ValueError(
                f"RWKV7Cache holds its WKV state in {layer.recurrent_state.dtype}, but the model's "
                f"config.wkv_state_dtype is {config.wkv_state_dtype!r}: make the cache with model.init_cache()."
            )
        if dtype is not None and layer.attn_shift_state.dtype != dtype:
            raise ValueError(
                f"RWKV7Cache holds its shift states in {layer.attn_shift_state.dtype}, but the model computes in "
                f"{dtype}: make the cache with model.init_cache(), or convert it with cache.to(dtype={dtype})."
            )

    # --- rows of a pool, for continuous batching ---------------------------------------------------------------
    # A cache made for `capacity` rows is a pool: its active batch is its first `batch_size` rows (views of the pool,
    # so a forward pass on the cache runs on the active rows only). Rows join at the end of the batch and a leaving
    # row takes the last one in its place, so no operation copies more than one row. `seen_tokens` counts the forward
    # passes' positions and means nothing per row here.

    @property
    def capacity(self) -> int:
        """How many rows the pool holds (the batch size it was made with)."""
        return self.layers[0].pools()["recurrent_state"].shape[0]

    def resize(self, batch_size: int) -> None:
        """Grow or shrink the active batch to the first `batch_size` rows of the pool, copying nothing; rows that
        join keep whatever state they were left with (`take_row` zeroes its row)."""
        if not isinstance(batch_size, int) or not 0 <= batch_size <= self.capacity:
            raise ValueError(f"batch_size must be an integer in [0, capacity={self.capacity}], got {batch_size!r}.")
        for layer in self.layers:
            layer.resize(batch_size)

    def take_row(self) -> int:
        """Add one zeroed row at the end of the active batch and return its index."""
        row = self.batch_size
        if row == self.capacity:
            raise RuntimeError(
                f"All {self.capacity} rows of the cache are taken: free one with free_row(row), or make a cache with "
                "more rows."
            )
        self.resize(row + 1)
        self.reset_row(row)
        return row

    def free_row(self, row: int) -> Optional[int]:
        """Remove `row` from the active batch: the last row moves into its place (its state copied there) and the
        batch shrinks by one. Returns the index the moved row had (None when `row` was the last)."""
        self._check_row(row)
        last = self.batch_size - 1
        if row != last:
            for layer in self.layers:
                for tensor in layer.tensors().values():
                    tensor[row].copy_(tensor[last])
        self.resize(last)
        return last if row != last else None

    def reset_row(self, row: int) -> None:
        """Zero the state of `row` (a fresh start for the sequence it holds)."""
        self._check_row(row)
        for layer in self.layers:
            for tensor in layer.tensors().values():
                tensor[row].zero_()

    def write_row(self, row: int, source: "RWKV7Cache", source_row: int = 0) -> None:
        """Copy the state of row `source_row` of `source` into `row` (e.g. a prompt prefilled in a cache of its
        own)."""
        self._check_row(row)
        source._check_row(source_row)
        if (
            len(source.layers) != len(self.layers)
            or source.layers[0].recurrent_state.shape[1:] != (self.layers[0].recurrent_state.shape[1:])
        ):
            raise ValueError("write_row: the source cache has another shape (layers, heads, head_dim) than this one.")
        for layer, source_layer in zip(self.layers, source.layers):
            for name, tensor in layer.tensors().items():
                tensor[row].copy_(getattr(source_layer, name)[source_row])

    def _check_row(self, row: int) -> None:
        if not isinstance(row, int) or not 0 <= row < self.batch_size:
            raise IndexError(f"row must be an integer in [0, batch_size={self.batch_size}), got {row!r}.")

    # --- state as a first-class object -----------------------------------------------------------------------

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "RWKV7Cache":
        """Move the state to `device`; `dtype` applies to the shift states only (the WKV state keeps its dtype)."""
        for layer in self.layers:
            layer.recurrent_state = layer.recurrent_state.to(device)
            layer.attn_shift_state = layer.attn_shift_state.to(device, dtype)
            layer.ffn_shift_state = layer.ffn_shift_state.to(device, dtype)
            _mark_static(layer.tensors().values())
        self._seen_tokens = self._seen_tokens.to(device)
        _mark_static([self._seen_tokens])
        return self

    def copy(self) -> "RWKV7Cache":
        """An independent copy (e.g. to branch several continuations off one processed prompt)."""
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.layers = [RWKV7LayerState(**{k: t.clone() for k, t in layer.tensors().items()}) for layer in self.layers]
        clone._seen_tokens = self._seen_tokens.clone()
        _mark_static([clone._seen_tokens])
        return clone

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to a safetensors file (atomically: a temporary file renamed at the end)."""
        tensors = {
            f"layers.{i}.{name}": tensor.detach().contiguous().cpu()
            for i, layer in enumerate(self.layers)
            for name, tensor in layer.tensors().items()
        }
        metadata = {
            "format": "rwkv7-state",
            "num_hidden_layers": str(len(self.layers)),
            "num_heads": str(self.num_heads),
            "head_dim": str(self.head_dim),
            "hidden_size": str(self.hidden_size),
            "seen_tokens": str(self.seen_tokens),
        }
        path = os.fspath(path)
        tmp_path = f"{path}.tmp-{os.getpid()}"
        try:
            save_file(tensors, tmp_path, metadata=metadata)
            os.replace(tmp_path, path)
        finally:
            if os.path.exists(tmp_path):
                os.remove(tmp_path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, config: Optional[RWKV7Config] = None, device: Optional[torch.device | str] = None
    ) -> "RWKV7Cache":
        """Read a state written by `save` (in the dtypes it was saved in). With `config`, check that it fits that
        model (raises ValueError)."""
        try:
            with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != "rwkv7-state":
                    raise ValueError(f"{path} is not an RWKV7Cache file (metadata format={metadata.get('format')!r}).")
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except SafetensorError as error:
            raise ValueError(f"{path} is not a readable safetensors file: {error}") from error
        shape = {key: _metadata_int(metadata, key, path, minimum=1) for key in _SHAPE_KEYS}
        seen_tokens = _metadata_int(metadata, "seen_tokens", path, minimum=0)
        if config is not None:
            expected = {
                "num_hidden_layers": config.num_hidden_layers,
                "num_heads": config.num_heads,
                "head_dim": config.head_dim,
                "hidden_size": config.hidden_size,
            }
            if shape != expected:
                raise ValueError(
                    f"The state in {path} has shape {json.dumps(shape)}, the model expects {json.dumps(expected)}."
                )
        shift, recurrent = tensors.get("layers.0.attn_shift_state"), tensors.get("layers.0.recurrent_state")
        if shift is None or recurrent is None or shift.dim() != 2:
            raise ValueError(f"{path}: layer 0 lacks its recurrent_state or a [batch, hidden] attn_shift_state.")
        _check_state_dtypes(recurrent.dtype, shift.dtype, str(path))
        # the metadata must agree with layer 0 and the number of tensors before anything is allocated from it
        layer0 = (shift.shape[0], shape["num_heads"], shape["head_dim"], shape["head_dim"])
        if shape["hidden_size"] != shape["num_heads"] * shape["head_dim"] or tuple(recurrent.shape) != layer0:
            raise ValueError(
                f"{path}: metadata {json.dumps(shape)} does not match layer 0's recurrent_state "
                f"{tuple(recurrent.shape)} (expected [batch, num_heads, head_dim, head_dim], hidden_size = "
                "num_heads * head_dim)."
            )
        if shape["num_hidden_layers"] * len(STATE_NAMES) > len(tensors):
            raise ValueError(
                f"{path}: metadata num_hidden_layers={shape['num_hidden_layers']} needs "
                f"{shape['num_hidden_layers'] * len(STATE_NAMES)} tensors; the file holds {len(tensors)}."
            )
        if config is not None and recurrent.dtype != wkv_state_dtype(config):
            raise ValueError(
                f"The state in {path} holds its WKV state in {recurrent.dtype}; the model's config.wkv_state_dtype "
                f"is {config.wkv_state_dtype!r}."
            )
        expected_keys = {f"layers.{i}.{name}" for i in range(shape["num_hidden_layers"]) for name in STATE_NAMES}
        if set(tensors) - expected_keys:
            raise ValueError(f"{path} holds unexpected tensors {sorted(set(tensors) - expected_keys)}.")
        cache = cls.__new__(cls)
        cache._allocate(
            shape["num_hidden_layers"],
            shape["num_heads"],
            shape["head_dim"],
            shift.shape[0],
            shift.dtype,
            recurrent.dtype,
            device,
        )
        for i, layer in enumerate(cache.layers):
            for name, empty in layer.tensors().items():
                key = f"layers.{i}.{name}"
                if key not in tensors or tensors[key].shape != empty.shape:
                    found = tuple(tensors[key].shape) if key in tensors else "missing"
                    raise ValueError(f"{path}: tensor {key} is {found}, expected {tuple(empty.shape)}.")
                if tensors[key].dtype != empty.dtype:
                    raise ValueError(
                        f"{path}: tensor {key} is {tensors[key].dtype}, expected {empty.dtype} (as in layer 0)."
                    )
                empty.copy_(tensors[key])
        cache.seen_tokens = seen_tokens
        return cache


_SHAPE_KEYS = ("num_hidden_layers", "num_heads", "head_dim", "hidden_size")
STATE_NAMES = ("recurrent_state", "attn_shift_state", "ffn_shift_state")
_RECURRENT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_METADATA_INT = 2**63 - 1  # seen_tokens is an int64 tensor


def _metadata_int(metadata: dict, key: str, path, minimum: int) -> int:
    """The integer at `key` of a state file's metadata (decimal digits, at least `minimum`), or a ValueError."""
    value = metadata.get(key)
    if value is None:
        raise ValueError(f"{path}: the RWKV7Cache metadata lacks {key!r} (found {sorted(metadata)}).")
    if not value.isdecimal() or not value.isascii() or not minimum <= int(value) <= _MAX_METADATA_INT:
        raise ValueError(f"{path}: metadata {key}={value!r} is not an integer >= {minimum} (and < 2**63).")
    return int(value)


def _check_state_dtypes(recurrent_dtype: torch.dtype, shift_dtype: torch.dtype, where: str) -> None:
    """A TypeError unless the WKV state is float32 / bfloat16 / float16 and the shift states are floating point."""
    if recurrent_dtype not in _RECURRENT_DTYPES or not shift_dtype.is_floating_point:
        raise TypeError(
            f"{where} holds a WKV state of {recurrent_dtype} and shift states of {shift_dtype}; expected a WKV state "
            f"in one of {_RECURRENT_DTYPES} and floating-point shift states."
        )


def _flatten(cache: RWKV7Cache) -> tuple[list[torch.Tensor], tuple[int, int]]:
    """`RWKV7Cache` as a pytree node (so that `torch.export` takes and returns it, as transformers' caches): the
    leaves are every layer's state tensors (in `STATE_NAMES` order), then the `seen_tokens` counter; the context
    is (num_heads, head_dim)."""
    leaves = [tensor for layer in cache.layers for tensor in layer.tensors().values()]
    return [*leaves, cache._seen_tokens], (cache.num_heads, cache.head_dim)


def _flatten_with_keys(cache: RWKV7Cache) -> tuple[list, tuple[int, int]]:
    leaves, context = _flatten(cache)
    return [(pytree.SequenceKey(i), leaf) for i, leaf in enumerate(leaves)], context


def _unflatten(tensors, context) -> RWKV7Cache:
    *state, seen_tokens = tensors
    num_heads, head_dim = context
    step = len(STATE_NAMES)
    cache = RWKV7Cache.__new__(RWKV7Cache)
    layers = [RWKV7LayerState(*state[i : i + step]) for i in range(0, len(state), step)]
    cache._adopt(layers, seen_tokens, num_heads, head_dim)
    return cache


pytree.register_pytree_node(
    RWKV7Cache,
    _flatten,
    _unflatten,
    serialized_type_name=f"{RWKV7Cache.__module__}.{RWKV7Cache.__qualname__}",
    flatten_with_keys_fn=_flatten_with_keys,
)

__all__ = ["RWKV7Cache", "RWKV7LayerState"]
