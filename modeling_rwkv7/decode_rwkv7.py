"""Fast decoding steps beside the eager model, which stays the reference: a compiled step (the eager forward traced
once by torch.compile, so that a token costs a few fused kernels instead of ~400 module calls;
tests/test_decode_compiled.py) and a native CPU step through the kernel package's decoding ops
(tests/test_decode_native.py)."""

import sys
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import logging

from .linear_rwkv7 import GEMV_MAX_ROWS, RWKV7Linear, measuring_compiled_products, weight_kind
from .wkv_reference import DECAY_SCALE

logger = logging.get_logger(__name__)

_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def compile_decode_step(model, batch_size: int = 1, **compile_options):
    """`torch.compile(model, **compile_options)` (a model with token embeddings) for decoding `batch_size` rows one
    token at a time with an `RWKV7Cache` (`step(input_ids[:, t : t + 1], cache=cache)`; any other call runs too,
    compiled again).

    Before compiling, one eager step on a scratch state makes `RWKV7Linear`'s few-row product decisions for this
    batch size, eager and compiled (each candidate compiled alone and timed; nothing is timed inside the trace,
    which reads them). The model's state is not touched. Call it again after changing the thread count. A PEFT
    model compiles the same way (its adapters are plain modules; switching or disabling them retraces).
    """
    if not 0 < batch_size <= GEMV_MAX_ROWS:
        raise ValueError(f"batch_size must be in [1, {GEMV_MAX_ROWS}] for a decoding step, got {batch_size}.")
    was_training, implementation = model.training, dict(model.config.implementation)
    model.eval()
    model.config.implementation["decode"] = "eager"  # the warm-up measures the eager modules' products
    try:
        with torch.no_grad(), measuring_compiled_products():
            scratch = model.init_cache(batch_size=batch_size)
            token = torch.zeros(batch_size, 1, dtype=torch.long, device=model.device)
            model(token, cache=scratch)
    finally:
        model.config.implementation = implementation
        model.train(was_training)
    return torch.compile(model, **compile_options)


class NativeDecodeStep:
    """One token through the whole model in the package's native CPU ops (the CPU build of `kernels/rwkv7_wkv`):
    one `block_decode_step` per block (norms, token shift, the six lerps, the LoRAs, the WKV step, group norm,
    bonus, gate and the channel mix in float32, the block's state updated in place) and one `gemv` for the head,
    so that a token costs little more than reading the weights once. `RWKV7ForCausalLM.forward` runs it for a
    decoding step when `dispatch_rwkv7.decode_implementation` says "native" (see there).

    `step(input_ids [batch, 1], cache)` returns what the eager model returns for that call (logits [batch, 1,
    vocab] in the model's dtype; the cache updated in place). Weights may be float32, bfloat16, torchao int8
    weight-only with one scale per row, or torchao int4 weight-only with symmetric scales per group of a multiple
    of 32 (`IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))`, llama.cpp's Q4_0 layout),
    which the step packs two values per byte once, when it reads them. The arithmetic is float32 whatever their
    dtype, except that bfloat16 weights multiply their inputs rounded to bfloat16 (the eager bfloat16 model rounds
    after every op). Each row of a batch gets exactly the bits it gets alone. The step holds the model's tensors
    (the int4 ones packed): in-place updates are seen, and a replaced parameter or module is found at the next
    call (a few microseconds of identity checks) and read again. `readable()` is False while the model holds a
    module the ops cannot read (a PEFT adapter, a replaced layer, weights in another format; said once, naming
    it): the eager model decodes then. Not differentiable.
    """

    def __init__(self, model, kernel):
        names = ("block_decode_step", "gemv", "pack_int4", "BLOCK_VECTORS", "BLOCK_WEIGHTS")
        missing = [name for name in names if not getattr(kernel, name, None)]
        if missing:
            raise ValueError(
                f"The kernel module {getattr(kernel, '__name__', kernel)!r} has no {missing}: it is not a CPU "
                "build of kernels/rwkv7_wkv with the decoding ops."
            )
        unknown = sorted(
            (set(kernel.BLOCK_VECTORS) - set(_BLOCK_VECTORS)) | (set(kernel.BLOCK_WEIGHTS) - set(_BLOCK_PROJECTIONS))
        )
        if unknown:
            raise ValueError(
                f"The kernel's block_decode_step takes tensors this package does not know: {unknown} (a kernel "
                "built from other sources than this package's)."
            )
        self.model, self.kernel = model, kernel
        config = model.config
        self._norm_eps, self._group_norm_eps = config.norm_eps, config.head_dim * config.norm_eps
        self._said = set()
        self._tensors = self._read_model()

    def _read_model(self) -> Optional[dict]:
        """The model's tensors as the ops take them, recording where each came from; None (said once) while a
        module is one the ops cannot read."""
        self._sources = read = _Sources(self.kernel.pack_int4)
        try:
            model = read.child(self.model, "model")
            layers = read.child(model, "layers")
            blocks = [
                _block_tensors(read, read.child(layers, str(i)), f"model.layers.{i}", self.kernel)
                for i in range(len(layers))
            ]
            return {
                "embeddings": read.param(read.child(model, "embeddings"), "weight"),
                "pre_norm": _norm_tensors(read, read.child(read.child(layers, "0"), "pre_norm")),
                "blocks": blocks,
                "norm": _norm_tensors(read, read.child(model, "norm")),
                "head": _weight_and_scale(read, read.child(self.model, "lm_head"), "lm_head"),
            }
        except _NotNative as reason:
            if str(reason) not in self._said:  # once per model and module
                self._said.add(str(reason))
                logger.warning(
                    f"RWKV-7 native decoding: {reason}; the eager model decodes while it is there (merge adapters "
                    "with merge_and_unload() to decode natively, or use compile_decode_step, which traces them)."
                )
            return None

    def readable(self) -> bool:
        """Whether the ops can read every module of the model now (read again if one was replaced)."""
        if not self._sources.unchanged():
            self._tensors = self._read_model()
        return self._tensors is not None

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, cache) -> CausalLMOutputWithPast:
        if not self.readable():
            raise ValueError("The model holds a module the native decoding ops cannot read (said above).")
        tensors, kernel = self._tensors, self.kernel
        hidden = _layer_norm(tensors["embeddings"][input_ids[:, 0]].float(), *tensors["pre_norm"])
        v_first = None
        for (vectors, weights, scales), state in zip(tensors["blocks"], cache.layers):
            hidden, value = kernel.block_decode_step(
                hidden,
                v_first,
                vectors,
                weights,
                scales,
                state.attn_shift_state,
                state.recurrent_state,
                state.ffn_shift_state,
                self._norm_eps,
                self._group_norm_eps,
                DECAY_SCALE,
            )
            v_first = value if v_first is None else v_first
        logits = kernel.gemv(_layer_norm(hidden, *tensors["norm"]), *tensors["head"])
        cache.add_seen_tokens(1)
        return CausalLMOutputWithPast(logits=logits.to(self.model.dtype)[:, None], cache=cache)


_native_steps: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def native_decode_step(model, kernel) -> NativeDecodeStep:
    """The `NativeDecodeStep` of `model` through `kernel` (made once per model and kernel)."""
    step = _native_steps.get(model)
    if step is None or step.kernel is not kernel:
        step = _native_steps[model] = NativeDecodeStep(model, kernel)
    return step


class _NotNative(ValueError):
    """A module or weight that the native ops cannot read."""


class _Sources:
    """Where each tensor the native step holds was read from (a module's `_modules` or `_parameters` entry), so
    that a call can check that none was replaced since."""

    def __init__(self, pack_int4):
        self.entries = []
        self.pack_int4 = pack_int4  # the kernel's: int4 values [out, in] -> the uint8 [out, in / 2] the ops read

    def child(self, module, name: str):
        return self._read(module._modules, name)

    def param(self, module, name: str):
        return self._read(module._parameters, name)

    def _read(self, entries: dict, name: str):
        value = entries[name]
        self.entries.append((entries, name, value))
        return value

    def unchanged(self) -> bool:
        return all(entries.get(name) is value for entries, name, value in self.entries)


def _norm_tensors(read: _Sources, norm) -> tuple:
    """A LayerNorm's (normalized_shape, weight, bias, eps), its parameters as they are (converted at each call)."""
    return norm.normalized_shape, read.param(norm, "weight"), read.param(norm, "bias"), norm.eps


def _layer_norm(hidden: torch.Tensor, normalized_shape, weight, bias, eps) -> torch.Tensor:
    """F.layer_norm in float32, whatever the parameters' dtype."""
    return F.layer_norm(hidden, normalized_shape, weight.float(), bias.float(), eps)


def _weight_and_scale(read: _Sources, module, path: str, has_bias: bool = False) -> tuple:
    """The weight of an `RWKV7Linear` as the native ops take it: (a plain float32 / bfloat16 tensor, None), or (int8
    values, one scale per row) of a torchao int8 weight-only tensor. `has_bias`: its bias is passed separately."""
    if type(module) is not RWKV7Linear:
        raise _NotNative(f"{path} is a {type(module).__name__}, not the model's own RWKV7Linear")
    weight = read.param(module, "weight")
    input_dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    kind = "int4_groups" if _is_int4_groups(weight) else weight_kind(weight, input_dtype)
    if (
        (module.bias is not None) != has_bias
        or kind is None
        or (kind == "dense" and weight.dtype not in _NATIVE_DTYPES)
    ):
        raise _NotNative(
            f"{path} holds a {type(weight).__name__} of dtype {weight.dtype} "
            f"{'with' if module.bias is not None else 'without'} "
            f"bias; the native ops read float32 / bfloat16 weights, torchao int8 weight-only ones with a scale per "
            f"row or int4 weight-only ones with symmetric scales per group of 32k values, "
            f"{'with' if has_bias else 'without'} bias"
        )
    if kind == "int8_rows":
        return weight.qdata, weight.scale.view(-1)
    if kind == "int4_groups":
        scale = weight.scale if weight.scale.dtype in _NATIVE_DTYPES else weight.scale.float()
        return read.pack_int4(weight.qdata), scale.reshape(weight.shape[0], -1).contiguous()
    return weight, None


def _is_int4_groups(weight: torch.Tensor) -> bool:
    """Whether `weight` is a torchao int4 weight-only tensor with symmetric scales per group of a multiple of 32
    values of a row (`IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g))`), which the native
    ops read packed two values per byte."""
    intx_type = getattr(sys.modules.get("torchao.quantization"), "IntxUnpackedToInt8Tensor", None)  # never imported
    if intx_type is None or not isinstance(weight, intx_type) or weight.target_dtype != torch.int4:
        return False
    rows, group = weight.block_size
    return (
        weight.activation_quantization is None
        and rows == 1
        and group % 32 == 0
        and weight.shape[1] % group == 0
        and (weight.zero_point is None or not weight.zero_point.any())
    )


# Where each of the kernel's BLOCK_WEIGHTS (its names) lives in an `RWKV7Block`; the w, a and v LoRAs' second
# layers have biases, which are among the vectors.
_BLOCK_PROJECTIONS = {
    "r": ("attn", "r_proj"),
    "k": ("attn", "k_proj"),
    "v": ("attn", "v_proj"),
    "o": ("attn", "o_proj"),
    "w1": ("attn", "w_lora", "lora", "0"),
    "w2": ("attn", "w_lora", "lora", "2"),
    "a1": ("attn", "a_lora", "lora", "0"),
    "a2": ("attn", "a_lora", "lora", "2"),
    "v1": ("attn", "v_lora", "lora", "0"),
    "v2": ("attn", "v_lora", "lora", "2"),
    "g1": ("attn", "g_lora", "lora", "0"),
    "g2": ("attn", "g_lora", "lora", "2"),
    "ffn.key": ("ffn", "key"),
    "ffn.value": ("ffn", "value"),
}
# Where each of the kernel's BLOCK_VECTORS lives: (module path, parameter name).
_BLOCK_VECTORS = {
    "attn_norm.weight": (("attn_norm",), "weight"),
    "attn_norm.bias": (("attn_norm",), "bias"),
    "x_r": (("attn",), "x_r"),
    "x_w": (("attn",), "x_w"),
    "x_k": (("attn",), "x_k"),
    "x_v": (("attn",), "x_v"),
    "x_a": (("attn",), "x_a"),
    "x_g": (("attn",), "x_g"),
    "k_k": (("attn",), "k_k"),
    "k_a": (("attn",), "k_a"),
    "r_k": (("attn",), "r_k"),
    "w0": (("attn", "w_lora", "lora", "2"), "bias"),
    "a0": (("attn", "a_lora", "lora", "2"), "bias"),
    "v0": (("attn", "v_lora", "lora", "2"), "bias"),
    "g_norm.weight": (("attn", "g_norm"), "weight"),
    "g_norm.bias": (("attn", "g_norm"), "bias"),
    "ffn_norm.weight": (("ffn_norm",), "weight"),
    "ffn_norm.bias": (("ffn_norm",), "bias"),
    "ffn.x_k": (("ffn",), "x_k"),
}


def _block_tensors(read: _Sources, layer, path: str, kernel) -> tuple[list, list, list]:
    """The vectors, weights and scales of one `RWKV7Block` in the order of the kernel's `BLOCK_VECTORS` /
    `BLOCK_WEIGHTS` (None for layer 0's absent value-residual LoRA)."""

    def module_at(names):
        module = layer
        for name in names:
            if name == "v_lora" and layer.layer_idx == 0:
                return None
            module = read.child(module, name)
        return module

    vectors = []
    for name in kernel.BLOCK_VECTORS:
        names, param = _BLOCK_VECTORS[name]
        module = module_at(names)
        vectors.append(None if module is None else read.param(module, param))
    weights, scales = [], []
    for name in kernel.BLOCK_WEIGHTS:
        names = _BLOCK_PROJECTIONS[name]
        module = module_at(names)
        has_bias = names[1] in ("w_lora", "a_lora", "v_lora") and names[-1] == "2"
        weight, scale = (
            (None, None) if module is None else _weight_and_scale(read, module, f"{path}.{'.'.join(names)}", has_bias)
        )
        weights.append(weight)
        scales.append(scale)
    return vectors, weights, scales


__all__ = ["NativeDecodeStep", "compile_decode_step", "native_decode_step"]
