"""State tuning: RWKV's cheap fine-tuning method. Every weight stays frozen; what is trained is the WKV state each
layer starts from, one `[num_heads, head_dim (value), head_dim (key)]` matrix per layer (float32), shared by every
row of a batch. The result is a small file that any copy of the base model can start from.

    tuned = RWKV7StateTuning(model)                         # freezes `model`, initial state = zeros
    Trainer(model=tuned, args=..., train_dataset=...).train()
    tuned.save_state("state.safetensors")                   # an `RWKV7Cache` file of batch size 1

    cache = RWKV7Cache.load("state.safetensors")            # later, with the base model alone:
    model.generate(input_ids, cache=cache)        # (or `tuned.generate(input_ids, ...)` for any batch)

Each row of a batch is one document that starts from the tuned state. Packed rows (document starts marked in
`position_ids`) are refused: the model resets the state to zeros at a document start, not to the tuned state.
"""

import os
from typing import Optional

import torch
from torch import nn

from .cache_rwkv7 import RWKV7Cache
from .modeling_rwkv7 import RWKV7PreTrainedModel, document_starts


class RWKV7StateTuning(nn.Module):
    """An RWKV-7 model (any head) with frozen weights and a trainable initial WKV state.

    `initial_state`: [num_hidden_layers, num_heads, head_dim (value), head_dim (key)] float32, the official `[V, K]`
    layout of `RWKV7Cache.recurrent_state`. `forward` takes the wrapped model's arguments (labels included) and
    returns its output; gradients reach `initial_state` only.
    """

    def __init__(self, model: RWKV7PreTrainedModel):
        super().__init__()
        if not isinstance(model, RWKV7PreTrainedModel):
            raise TypeError(f"RWKV7StateTuning wraps an RWKV-7 model, got {type(model).__name__}.")
        config = model.config
        self.model = model.requires_grad_(False)
        self.config = config
        self.initial_state = nn.Parameter(
            torch.zeros(
                config.num_hidden_layers,
                config.num_heads,
                config.head_dim,
                config.head_dim,
                dtype=torch.float32,
                device=model.device,
            )
        )

    def initial_cache(self, batch_size: int = 1) -> RWKV7Cache:
        """An `RWKV7Cache` for `batch_size` rows whose WKV states are `initial_state` (differentiable: the cache
        holds copies expanded over the batch, so decoding, which writes into the cache, never changes
        `initial_state`) and whose token-shift states are zeros."""
        cache = RWKV7Cache(self.config, batch_size, dtype=self.model.dtype, device=self.initial_state.device)
        for layer, state in zip(cache.layers, self.initial_state):
            layer.recurrent_state.copy_(state.expand(batch_size, -1, -1, -1))
        return cache

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        """The wrapped model's forward pass, every row starting from `initial_state`."""
        inputs = input_ids if input_ids is not None else inputs_embeds
        if inputs is None:
            raise ValueError("Pass input_ids or inputs_embeds.")
        batch_size, seq_len = inputs.shape[:2]
        packing = {name: kwargs.get(name) for name in ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")}
        padding_mask = attention_mask[:, -seq_len:].bool() if attention_mask is not None else None
        if document_starts(batch_size, seq_len, position_ids, **packing, padding_mask=padding_mask) is not None:
            raise ValueError(
                "State tuning needs one document per row, but position_ids (or cu_seq_lens_q / cu_seq_lens_k / "
                "seq_idx) mark a document start after the first position (packed rows); the state would restart "
                "from zeros there instead of the tuned state."
            )
        if labels is not None:
            kwargs["labels"] = labels
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=self.initial_cache(batch_size),
            use_cache=False,
            **kwargs,
        )

    @torch.no_grad()
    def generate(self, input_ids: torch.LongTensor, **kwargs) -> torch.LongTensor:
        """`model.generate` with every row starting from the tuned state (`input_ids`: [batch, prompt_len])."""
        return self.model.generate(input_ids, cache=self.initial_cache(input_ids.shape[0]), **kwargs)

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """Recompute each block in the backward pass (see `PreTrainedModel.activation_checkpointing_enable`)."""
        self.model.activation_checkpointing_enable(**kwargs)

    def save_state(self, path: str | os.PathLike) -> None:
        """Write `initial_state` as an `RWKV7Cache` file of batch size 1 (layers x heads x head_dim^2 float32 plus
        two zero shift vectors per layer)."""
        with torch.no_grad():
            self.initial_cache(1).save(path)

    def load_state(self, path: str | os.PathLike) -> "RWKV7StateTuning":
        """Read a state written by `save_state` into `initial_state` (checks that it fits the model)."""
        cache = RWKV7Cache.load(path, config=self.config)
        if cache.batch_size != 1:
            raise ValueError(
                f"{path} holds a state of batch size {cache.batch_size}; an initial state has batch size 1."
            )
        for i, layer in enumerate(cache.layers):
            if layer.attn_shift_state.any() or layer.ffn_shift_state.any():
                raise ValueError(
                    f"{path} holds non-zero token-shift states (layer {i}): it is a processed prompt, not an initial "
                    "WKV state; use it directly as `cache` instead."
                )
        with torch.no_grad():
            self.initial_state.copy_(torch.stack([layer.recurrent_state[0] for layer in cache.layers]))
        return self


__all__ = ["RWKV7StateTuning"]
