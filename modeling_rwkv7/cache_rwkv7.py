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
from safetensors import safe_open
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
        new = {"recurrent_state": recurrent_state, "attn_shift_state": attn_shift_state, "ffn_shift_state": ffn_shift_state}
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


class RWKV7Cache(Cache):
    """Recurrent state of an RWKV-7 model for `batch_size` sequences: O(1) in the sequence length.

    Create it with `RWKV7Cache(config, batch_size)` or `model.init_cache(batch_size)`, pass it as
    `past_key_values`, and the model continues from it and writes the new state into it.
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
            config.num_hidden_layers, config.num_heads, config.head_dim, batch_size, dtype, wkv_state_dtype(config), device
        )

    def _allocate(
        self, num_layers: int, num_heads: int, head_dim: int, batch_size: int, dtype, recurrent_dtype, device
    ) -> None:
        """Zero state for `batch_size` sequences: shift states in `dtype`, the WKV state in `recurrent_dtype`."""
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.num_heads, self.head_dim, self.hidden_size = num_heads, head_dim, num_heads * head_dim
        layers = [
            RWKV7LayerState(
                recurrent_state=torch.zeros(batch_size, num_heads, head_dim, head_dim, dtype=recurrent_dtype, device=device),
                attn_shift_state=torch.zeros(batch_size, self.hidden_size, dtype=dtype, device=device),
                ffn_shift_state=torch.zeros(batch_size, self.hidden_size, dtype=dtype, device=device),
            )
            for _ in range(num_layers)
        ]
        super().__init__(layers=layers)
        self._seen_tokens = torch.zeros((), dtype=torch.long, device=device)
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

    def check_compatible(self, config: RWKV7Config, batch_size: int) -> None:
        """Raise a ValueError if this state cannot continue a forward pass of `config` on `batch_size` rows."""
        expected = (config.num_hidden_layers, config.num_heads, config.head_dim, config.hidden_size)
        found = (len(self.layers), self.num_heads, self.head_dim, self.hidden_size)
        if found != expected:
            raise ValueError(
                f"RWKV7Cache (layers, heads, head_dim, hidden) = {found} does not match the model's {expected}."
            )
        if self.batch_size != batch_size:
            raise ValueError(f"RWKV7Cache holds batch size {self.batch_size} but the input has batch size {batch_size}.")

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
        with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != "rwkv7-state":
                raise ValueError(f"{path} is not an RWKV7Cache file (metadata format={metadata.get('format')!r}).")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        shape = {key: int(metadata[key]) for key in ("num_hidden_layers", "num_heads", "head_dim", "hidden_size")}
        if config is not None:
            expected = {
                "num_hidden_layers": config.num_hidden_layers,
                "num_heads": config.num_heads,
                "head_dim": config.head_dim,
                "hidden_size": config.hidden_size,
            }
            if shape != expected:
                raise ValueError(f"The state in {path} has shape {json.dumps(shape)}, the model expects {json.dumps(expected)}.")
        shift, recurrent = tensors.get("layers.0.attn_shift_state"), tensors.get("layers.0.recurrent_state")
        if shift is None or recurrent is None or shift.dim() != 2:
            raise ValueError(f"{path}: layer 0 lacks its recurrent_state or a [batch, hidden] attn_shift_state.")
        cache = cls.__new__(cls)
        cache._allocate(
            shape["num_hidden_layers"], shape["num_heads"], shape["head_dim"], shift.shape[0], shift.dtype,
            recurrent.dtype, device,
        )
        for i, layer in enumerate(cache.layers):
            for name, empty in layer.tensors().items():
                key = f"layers.{i}.{name}"
                if key not in tensors or tensors[key].shape != empty.shape:
                    found = tuple(tensors[key].shape) if key in tensors else "missing"
                    raise ValueError(f"{path}: tensor {key} is {found}, expected {tuple(empty.shape)}.")
                empty.copy_(tensors[key])
        cache.seen_tokens = int(metadata["seen_tokens"])
        return cache


__all__ = ["RWKV7Cache", "RWKV7LayerState"]
