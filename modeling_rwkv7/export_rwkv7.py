"""RWKV-7 as a pure function of its state, for `torch.export` and ONNX (`scripts/export_onnx.py`).

An exported graph cannot hold a Python `RWKV7Cache`, so the state goes in and comes out as tensors:

    logits, *new_state = RWKV7StateFunction(model)(input_ids, attention_mask, *state)

    input_ids:      [batch, seq_len] token ids
    attention_mask: [batch, seq_len], 0 at padding (padded positions leave the state unchanged)
    state:          per layer, in order: recurrent_state [batch, heads, head_dim, head_dim],
                    attn_shift_state [batch, hidden], ffn_shift_state [batch, hidden] (see `cache_rwkv7.py`)
    logits:         [batch, seq_len, vocab_size]

One export with seq_len 1 is the decoding step; one with a fixed prompt length L is a prefill that takes any
prompt in pieces of L (left-padded in the first piece). The chunked WKV form unrolls its loop over 16-token
chunks, so a graph holds one length (batch may vary).

`torch.export.export(model, ...)` also works on the model itself (`RWKV7Cache` is a pytree node), and so does
transformers' `DynamoExporter.export_for_generation`. Its ExecuTorch recipe
(`transformers.integrations.executorch.TorchExportableModuleForDecoderOnlyLM`, `convert_and_export_with_cache`)
does not: it builds a key/value `StaticCache` sized from the config's attention heads and a `max_cache_len`, and
positions tokens in it by `cache_position`. `RWKV7ExportableModule` is the same recipe for a recurrent state:
`forward(input_ids, cache_position) -> logits`, the state held in buffers that the exported program updates in
place (ExecuTorch's LLM runner signature), and `export_with_state` / `RWKV7ExportableModule.generate` the
counterparts of `convert_and_export_with_cache` and its `generate`.
"""

from typing import Optional

import torch
from torch import nn

from .cache_rwkv7 import STATE_NAMES, RWKV7Cache
from .modeling_rwkv7 import RWKV7ForCausalLM


class RWKV7StateFunction(nn.Module):
    """`(input_ids, attention_mask, *state) -> (logits, *new_state)` around an `RWKV7ForCausalLM` (weights shared)."""

    def __init__(self, model: RWKV7ForCausalLM):
        super().__init__()
        if not isinstance(model, RWKV7ForCausalLM):
            raise TypeError(f"RWKV7StateFunction wraps an RWKV7ForCausalLM, got {type(model).__name__}.")
        self.model = model
        self.num_layers = model.config.num_hidden_layers

    def state_names(self) -> list[str]:
        """The names of the state tensors, in the order `forward` takes and returns them."""
        return [f"layers.{i}.{name}" for i in range(self.num_layers) for name in STATE_NAMES]

    def initial_state(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        """The zero state of a fresh sequence, in `state_names()` order."""
        cache = self.model.init_cache(batch_size)
        return tuple(layer.tensors()[name] for layer in cache.layers for name in STATE_NAMES)

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, *state: torch.Tensor):
        if len(state) != 3 * self.num_layers:
            raise ValueError(f"Expected {3 * self.num_layers} state tensors ({self.state_names()}), got {len(state)}.")
        cache = RWKV7Cache(self.model.config, input_ids.shape[0], dtype=state[1].dtype, device=input_ids.device)
        for i, layer in enumerate(cache.layers):
            layer.update(*state[3 * i : 3 * i + 3])
        logits = self.model(input_ids, attention_mask=attention_mask, cache=cache, use_cache=True).logits
        return (logits, *(layer.tensors()[name] for layer in cache.layers for name in STATE_NAMES))


def export_onnx(model: RWKV7ForCausalLM, path, seq_len: int, batch_size: int = 1) -> list[str]:
    """Write `RWKV7StateFunction(model)` for inputs of [batch_size, seq_len] tokens to an ONNX file at `path`
    (`torch.onnx.export(..., dynamo=True)`). Inputs: input_ids, attention_mask, then the state (`state_names()`);
    outputs: logits, then the new state (`new.` + state name). Returns the input names. The graph runs the
    per-token WKV recurrence (ONNX has no triangular solve for the chunked form), whatever `config.wkv_backend`."""
    if not isinstance(seq_len, int) or seq_len <= 0 or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"seq_len and batch_size must be positive integers, got {seq_len!r} and {batch_size!r}.")
    function = RWKV7StateFunction(model).eval()
    input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device=model.device)
    inputs = (input_ids, torch.ones_like(input_ids), *function.initial_state(batch_size))
    input_names = ["input_ids", "attention_mask", *function.state_names()]
    output_names = ["logits", *(f"new.{name}" for name in function.state_names())]
    backend, model.config.wkv_backend = model.config.wkv_backend, "recurrent"
    try:
        with torch.no_grad():
            torch.onnx.export(
                function,
                inputs,
                str(path),
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                verbose=False,
            )
    finally:
        model.config.wkv_backend = backend
    return input_names


class RWKV7ExportableModule(nn.Module):
    """`forward(input_ids [batch, seq_len], cache_position [seq_len]) -> logits [batch, seq_len, vocab_size]` around
    an `RWKV7ForCausalLM` (weights shared), the state of `batch_size` sequences in non-persistent buffers that the
    forward pass updates in place. A call whose `cache_position` starts at 0 starts new sequences (the state is
    zeroed first, inside the graph); any other continues them. Nothing is padded."""

    def __init__(self, model: RWKV7ForCausalLM, batch_size: int = 1):
        super().__init__()
        if not isinstance(model, RWKV7ForCausalLM):
            raise TypeError(f"RWKV7ExportableModule wraps an RWKV7ForCausalLM, got {type(model).__name__}.")
        self.model = model
        self.cache = model.init_cache(batch_size)
        for i, layer in enumerate(self.cache.layers):
            for name, tensor in layer.tensors().items():
                self.register_buffer(f"layers_{i}_{name}", tensor, persistent=False)
        self.register_buffer("seen_tokens", self.cache._seen_tokens, persistent=False)

    def forward(self, input_ids: torch.LongTensor, cache_position: torch.LongTensor) -> torch.Tensor:
        continuing = cache_position[0] != 0
        for tensor in self.buffers(recurse=False):  # the state
            tensor.mul_(continuing)
        return self.model(input_ids, cache=self.cache, use_cache=True).logits

    @staticmethod
    def generate(
        exported_program: torch.export.ExportedProgram, prompt_token_ids: torch.LongTensor, max_new_tokens: int
    ) -> torch.LongTensor:
        """Greedy decoding through an exported `RWKV7ExportableModule` (as transformers' `generate` for its
        ExecuTorch recipe: the prompt fed one token at a time, so one graph of seq_len 1 serves): the prompt
        [batch, prompt_len] followed by `max_new_tokens` tokens."""
        module = exported_program.module()
        sequence = prompt_token_ids
        for position in range(prompt_token_ids.shape[1] + max_new_tokens - 1):
            cache_position = torch.tensor([position], device=sequence.device)
            logits = module(input_ids=sequence[:, position : position + 1], cache_position=cache_position)
            if position + 1 >= prompt_token_ids.shape[1]:
                sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=1)
        return sequence


def export_with_state(
    model: RWKV7ForCausalLM, batch_size: int = 1, seq_len: int = 1, dynamic_shapes: Optional[dict] = None
) -> torch.export.ExportedProgram:
    """`torch.export` of `RWKV7ExportableModule(model, batch_size)` for inputs of [batch_size, seq_len] tokens
    (transformers' `convert_and_export_with_cache` for a recurrent state)."""
    if not isinstance(seq_len, int) or seq_len <= 0 or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"seq_len and batch_size must be positive integers, got {seq_len!r} and {batch_size!r}.")
    module = RWKV7ExportableModule(model, batch_size).eval()
    inputs = {
        "input_ids": torch.zeros(batch_size, seq_len, dtype=torch.long, device=model.device),
        "cache_position": torch.arange(seq_len, device=model.device),
    }
    with torch.no_grad():
        return torch.export.export(module, (), inputs, dynamic_shapes=dynamic_shapes)


__all__ = ["RWKV7ExportableModule", "RWKV7StateFunction", "STATE_NAMES", "export_onnx", "export_with_state"]
