"""RWKV-7 "Goose" (x070) for transformers, following BlinkDL's official RWKV-LM / `rwkv` package equations.

Parameter names follow flash-linear-attention's RWKV-7 (so fla-hub checkpoints load as they are and PEFT's default
LoRA targets for `rwkv7` apply). Official names are given next to each parameter.
"""

import math
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation.configuration_utils import GenerationMode
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutputWithPast
from transformers.utils import ModelOutput, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.kernel_config import infer_device

from .cache_rwkv7 import RWKV7Cache
from .configuration_rwkv7 import RWKV7Config
from .decode_rwkv7 import native_decode_step
from .dispatch_rwkv7 import decode_implementation, native_ops, resolve_implementation
from .linear_rwkv7 import RWKV7Linear
from .wkv import RWKV7WKV
from .wkv_kernel import LAYER_NAME, kernel_config_repository
from .wkv_reference import DECAY_SCALE

logger = logging.get_logger(__name__)


# a parameter of one block, e.g. "model.layers.3.attn.x_r"
_BLOCK_KEY = re.compile(r"(^|\.)layers\.\d+\.")

# what RWKV7ForCausalLM.forward passes on to the loss (the Trainer's `num_items_in_batch`, ...)
LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")

# the positions RWKV7ForCausalLM.forward reads at once when only the last logits are kept (a long prompt): a chunk's
# activations are the memory it needs, whatever the prompt's length
PREFILL_CHUNK_SIZE = 4096

# what generate() consumes itself and its decoding loop passes on to prepare_inputs_for_generation
GENERATE_ONLY_KWARGS = ("tokenizer", "assistant_tokenizer", "assistant_model")
# the generation-config fields that turn generate() into assisted decoding (besides `assistant_model`)
ASSISTED_DECODING_SETTINGS = ("prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")


def token_shift(
    hidden_states: torch.Tensor,
    shift_state: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    reset: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous token's input for every position.

    hidden_states: [batch, seq_len, hidden]; shift_state: [batch, hidden], the input of the token before this chunk
    (zeros at a fresh start). mask: [batch, seq_len] bool, False at padding: padded positions are skipped, so a token
    sees the last *real* token before it. reset: [batch, seq_len] bool, True where a document starts (previous = 0).
    Returns (x_prev [batch, seq_len, hidden], the new shift_state [batch, hidden]).
    """
    batch_size, seq_len, hidden_size = hidden_states.shape
    shift_state = shift_state.to(hidden_states.dtype)
    if seq_len == 1:  # decoding: the previous token is the shift state; a padded token leaves it as it is
        x_prev = shift_state[:, None]
        new_shift_state = hidden_states[:, 0] if mask is None else torch.where(mask, hidden_states[:, 0], shift_state)
    elif mask is None:
        x_prev = torch.cat([shift_state[:, None], hidden_states[:, :-1]], dim=1)
        new_shift_state = hidden_states[:, -1]
    else:
        extended = torch.cat([shift_state[:, None], hidden_states], dim=1)
        positions = torch.arange(1, seq_len + 1, device=mask.device).expand(batch_size, seq_len)
        # index into `extended` of the last real token at or before each position (0 = the shift state)
        last_real = _running_max(torch.where(mask, positions, 0))
        previous_real = torch.cat([last_real.new_zeros(batch_size, 1), last_real[:, :-1]], dim=1)
        x_prev = extended.gather(1, previous_real[..., None].expand(-1, -1, hidden_size))
        new_shift_state = extended[torch.arange(batch_size, device=mask.device), last_real[:, -1]]
    if reset is not None:
        x_prev = x_prev.masked_fill(reset[..., None], 0.0)
    return x_prev, new_shift_state


def _running_max(values: torch.Tensor) -> torch.Tensor:
    """`values.cummax(dim=1).values` for [batch, seq_len] integers, in ceil(log2(seq_len)) shifted maxima (ONNX has
    no cummax)."""
    shift = 1
    while shift < values.shape[1]:
        values = torch.maximum(values, F.pad(values[:, :-shift], (shift, 0)))
        shift *= 2
    return values


class RWKV7LoRA(nn.Module):
    """`x -> activation(x @ A^T) @ B^T (+ bias)`: [..., hidden] -> [..., hidden], rank `low_rank_dim`.

    Official: `A^T = att.{w,a,v,g}1` [C, D], `B^T = att.{w,a,v,g}2` [D, C], `bias = att.{w,a,v}0`.
    """

    def __init__(self, hidden_size: int, low_rank_dim: int, activation: Optional[nn.Module], bias: bool = True):
        super().__init__()
        self.lora = nn.Sequential(
            RWKV7Linear(hidden_size, low_rank_dim, bias=False),
            activation if activation is not None else nn.Identity(),
            RWKV7Linear(low_rank_dim, hidden_size, bias=bias),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lora(hidden_states)


class RWKV7Attention(nn.Module):
    """RWKV-7 time mix (official `blocks.{i}.att`): token shift, the six lerps, the LoRAs, the WKV delta rule,
    per-head GroupNorm, the `r * k * r_k` bonus and the output gate."""

    def __init__(self, config: RWKV7Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        hidden_size = config.hidden_size

        # token-shift interpolation weights (att.x_r ... att.x_g)
        self.x_r = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.x_w = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.x_k = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.x_v = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.x_a = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.x_g = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.k_k = nn.Parameter(torch.zeros(hidden_size))  # att.k_k: scales k into the removal key
        self.k_a = nn.Parameter(torch.zeros(hidden_size))  # att.k_a: how much the learning rate scales k
        self.r_k = nn.Parameter(torch.zeros(self.num_heads, self.head_dim))  # att.r_k: bonus weights

        self.r_proj = RWKV7Linear(hidden_size, hidden_size, bias=False)  # att.receptance
        self.k_proj = RWKV7Linear(hidden_size, hidden_size, bias=False)  # att.key
        self.v_proj = RWKV7Linear(hidden_size, hidden_size, bias=False)  # att.value
        self.o_proj = RWKV7Linear(hidden_size, hidden_size, bias=False)  # att.output

        self.w_lora = RWKV7LoRA(hidden_size, config.decay_low_rank_dim, nn.Tanh())  # decay
        self.a_lora = RWKV7LoRA(hidden_size, config.a_low_rank_dim, None)  # in-context learning rate
        if layer_idx > 0:
            self.v_lora = RWKV7LoRA(hidden_size, config.v_low_rank_dim, None)  # value residual mix
        self.g_lora = RWKV7LoRA(hidden_size, config.gate_low_rank_dim, nn.Sigmoid(), bias=False)  # output gate
        self.g_norm = nn.GroupNorm(self.num_heads, hidden_size, eps=config.head_dim * config.norm_eps)  # att.ln_x
        self.wkv = RWKV7WKV(config)  # the WKV operator, as a layer `kernels.kernelize` can swap

    def forward(
        self,
        hidden_states: torch.Tensor,
        v_first: Optional[torch.Tensor],
        shift_state: torch.Tensor,
        recurrent_state: Optional[torch.Tensor],
        mask: Optional[torch.Tensor] = None,
        reset: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states: [batch, seq_len, hidden] (after attn_norm). v_first: layer 0's values [batch, seq_len,
        hidden] (None in layer 0). shift_state: [batch, hidden]. recurrent_state: [batch, heads, head_dim, head_dim]
        float32 or None. Returns (output, v_first, new shift_state, new recurrent_state)."""
        batch_size, seq_len, hidden_size = hidden_states.shape
        heads_shape = (batch_size, seq_len, self.num_heads, self.head_dim)

        x_prev, shift_state = token_shift(hidden_states, shift_state, mask, reset)
        # the six interpolations between each token and the previous one, in one pass: [6, batch, seq_len, hidden]
        mix = torch.stack([self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g])
        x_r, x_w, x_k, x_v, x_a, x_g = hidden_states.addcmul(x_prev - hidden_states, mix).unbind(0)

        receptance = self.r_proj(x_r)
        log_decay = -DECAY_SCALE * torch.sigmoid(self.w_lora(x_w).float())
        key = self.k_proj(x_k)
        value = self.v_proj(x_v)
        learning_rate = torch.sigmoid(self.a_lora(x_a))
        gate = self.g_lora(x_g)

        removal_key = F.normalize((key * self.k_k).view(heads_shape), dim=-1, p=2.0)
        key = key * torch.addcmul(1 - self.k_a, learning_rate, self.k_a)  # key * (1 + (learning_rate - 1) * k_a)
        if self.layer_idx == 0:
            v_first = value
        else:
            value = torch.lerp(value, v_first, torch.sigmoid(self.v_lora(x_v)))

        wkv_key, wkv_value, replace_rate = key, value, learning_rate
        if mask is not None:
            # padded positions leave the state untouched: decay 1, nothing removed, nothing written
            keep = mask[..., None]
            wkv_key, wkv_value, replace_rate = key * keep, value * keep, learning_rate * keep
            log_decay = log_decay * keep
        output, recurrent_state = self.wkv(
            receptance.view(heads_shape),
            log_decay.view(heads_shape),
            wkv_key.view(heads_shape),
            wkv_value.view(heads_shape),
            -removal_key,
            removal_key * replace_rate.view(heads_shape),
            initial_state=recurrent_state,
            reset=reset,
        )

        # per-head norm, plus the bonus: each head's value again, weighted by (r * k) . r_k
        bonus = torch.linalg.vecdot((receptance * key).view(heads_shape), self.r_k)[..., None]
        output = self.g_norm(output.reshape(batch_size * seq_len, hidden_size)).view(heads_shape)
        output = self.o_proj(output.addcmul(value.view(heads_shape), bonus).view_as(gate) * gate)
        return output, v_first, shift_state, recurrent_state


class RWKV7FeedForward(nn.Module):
    """RWKV-7 channel mix (official `blocks.{i}.ffn`): `value(relu(key(lerp(x, x_prev, x_k)))^2)`."""

    def __init__(self, config: RWKV7Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.x_k = nn.Parameter(torch.zeros(config.hidden_size))
        self.key = RWKV7Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.value = RWKV7Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        shift_state: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        reset: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden_states: [batch, seq_len, hidden] (after ffn_norm); shift_state: [batch, hidden].
        Returns (output [batch, seq_len, hidden], new shift_state)."""
        x_prev, shift_state = token_shift(hidden_states, shift_state, mask, reset)
        key = self.key(hidden_states.addcmul(x_prev - hidden_states, self.x_k))
        # in place when no graph is recorded: no two more [tokens, intermediate] buffers to allocate and fill
        key = key.relu_().square_() if not torch.is_grad_enabled() else torch.relu(key).square()
        return self.value(key), shift_state


class RWKV7Block(GradientCheckpointingLayer):
    """One RWKV-7 block: `x += attn(attn_norm(x)); x += ffn(ffn_norm(x))`, with `pre_norm` (official `ln0`) on the
    embeddings in layer 0. Pure in its state: takes the layer's state and returns the new one."""

    def __init__(self, config: RWKV7Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        if layer_idx == 0:
            self.pre_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = RWKV7Attention(config, layer_idx)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.ffn = RWKV7FeedForward(config, layer_idx)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        v_first: Optional[torch.Tensor],
        attn_shift_state: torch.Tensor,
        recurrent_state: Optional[torch.Tensor],
        ffn_shift_state: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        reset: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, ...]:
        """Returns (hidden_states, v_first, attn_shift_state, recurrent_state, ffn_shift_state)."""
        if self.layer_idx == 0:
            hidden_states = self.pre_norm(hidden_states)
        attn_output, v_first, attn_shift_state, recurrent_state = self.attn(
            self.attn_norm(hidden_states), v_first, attn_shift_state, recurrent_state, mask, reset
        )
        hidden_states = hidden_states + self.dropout(attn_output)
        ffn_output, ffn_shift_state = self.ffn(self.ffn_norm(hidden_states), ffn_shift_state, mask, reset)
        hidden_states = hidden_states + self.dropout(ffn_output)
        return hidden_states, v_first, attn_shift_state, recurrent_state, ffn_shift_state


class RWKV7PreTrainedModel(PreTrainedModel):
    config: RWKV7Config
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RWKV7Block"]
    _is_stateful = True
    _can_compile_fullgraph = True
    # layer 0's value-residual LoRA, stored (unused) by official and native-layout checkpoints; layer 0 has none
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)layers\.0\.attn\.v_lora\."]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """generate() must not make a DynamicCache: the model makes its own `RWKV7Cache` (whatever the class name)."""
        return False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """The official RWKV-LM x070 initialisation for training from scratch. Children are initialised before
        their parents, so the time-mix and channel-mix modules set all of their own parameters last."""
        config = self.config
        if isinstance(module, RWKV7Attention):
            _init_attention(module, config)
        elif isinstance(module, RWKV7FeedForward):
            _init_feed_forward(module, config)
        elif isinstance(module, nn.Embedding):
            init.uniform_(module.weight, -1e-4, 1e-4)
        elif isinstance(module, nn.Linear):
            if module is getattr(self, "lm_head", None):
                vocab_size, hidden_size = module.weight.shape
                gain = 0.5 * math.sqrt(vocab_size / hidden_size) if vocab_size > hidden_size else 0.5
            elif module is getattr(self, "score", None):
                gain = 0.5
            else:
                gain = _orthogonal_gain(module.weight)
            init.orthogonal_(module.weight, gain=gain)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        """transformers' adjustment of the load report, then a refusal of weights whose blocks are not those of
        `config.num_hidden_layers`: from_pretrained would otherwise initialise the missing blocks randomly, or drop
        the extra ones, with only a warning."""
        super()._adjust_missing_and_unexpected_keys(loading_info)
        missing = sorted(filter(_BLOCK_KEY.search, loading_info.missing_keys))
        unexpected = sorted(filter(_BLOCK_KEY.search, loading_info.unexpected_keys))
        if missing or unexpected:
            raise ValueError(
                f"The weights do not fit config.num_hidden_layers={self.config.num_hidden_layers}: the checkpoint "
                f"lacks {len(missing)} block weights {missing[:2]} and holds {len(unexpected)} that the model has no "
                f"place for {unexpected[:2]}. The config.json does not describe these weights."
            )

    def init_cache(self, batch_size: int = 1) -> RWKV7Cache:
        """A fresh (zero) recurrent state for `batch_size` sequences, on the model's device."""
        return RWKV7Cache(self.config, batch_size, dtype=self.dtype, device=self.device)

    def post_init(self):
        super().post_init()
        self._apply_projection_implementation()

    @classmethod
    def from_pretrained(cls, *args, kernel_config=None, **kwargs):
        """transformers' `from_pretrained`, with a `kernel_config` checked first (`kernel_config_repository`):
        transformers loads the kernels it names while it builds the model, so a Hub kernel not pinned to a commit is
        refused before anything is fetched."""
        if kernel_config is not None:
            kernel_config_repository(kernel_config)
        return super().from_pretrained(*args, kernel_config=kernel_config, **kwargs)

    def set_use_kernels(self, use_kernels, kernel_config=None, mode=None, device_map=None):
        """transformers kernelizes every model it loads with its default Hub mapping, which has no kernel for this
        model's one hub layer (`RWKV7WKV`), and Hub code runs only on the user's own opt-in: without a
        `kernel_config` (now, or kept from an earlier call) nothing is kernelized. A `kernel_config` mapping
        "RWKV7WKV" to a local build or to a Hub repository pinned to a commit (`kernel_config_repository`) becomes the
        `kernels` mapping for the model's device here (transformers 5.25 refuses CPU and local entries in its own
        conversion), then transformers kernelizes, and re-kernelizes on `train()`/`eval()`."""
        if use_kernels and kernel_config is not None:
            repository = kernel_config_repository(kernel_config)
            kernel_config.kernel_mapping = {LAYER_NAME: {infer_device(self): repository}}
            self.kernel_config, kernel_config = kernel_config, None  # transformers' kernelize reads self.kernel_config
        elif use_kernels and self.kernel_config is None:
            return
        super().set_use_kernels(use_kernels, kernel_config, mode, device_map)

    def set_implementation(self, **implementation: str) -> None:
        """Force the implementation of ops (`dispatch_rwkv7`), e.g. `model.set_implementation(decode="eager",
        wkv="chunked")`; "auto" gives an op back to the default. Writes `config.implementation`."""
        self.config.implementation = resolve_implementation({**self.config.implementation, **implementation})
        self._apply_projection_implementation()

    def _apply_projection_implementation(self) -> None:
        projection = self.config.implementation["projection"]
        for module in self.modules():
            if isinstance(module, RWKV7Linear):
                module.forced_product = None if projection == "auto" else projection


def _orthogonal_gain(weight: torch.Tensor) -> float:
    """RWKV-LM's `ortho_init` gain: sqrt(rows / cols) for tall matrices, else 1."""
    rows, cols = weight.shape
    return math.sqrt(rows / cols) if rows > cols else 1.0


def _init_attention(attn: RWKV7Attention, config: RWKV7Config) -> None:
    hidden_size, num_layers, layer_idx = config.hidden_size, config.num_hidden_layers, attn.layer_idx
    device = attn.x_r.device
    ratio_0_to_1 = layer_idx / max(num_layers - 1, 1)
    ratio_1_to_almost_0 = 1.0 - layer_idx / num_layers
    ddd = torch.arange(hidden_size, device=device, dtype=torch.float32) / hidden_size
    linear = torch.arange(hidden_size, device=device, dtype=torch.float32) / (hidden_size - 1) - 0.5
    zigzag = ((torch.arange(hidden_size, device=device) % config.head_dim) - (config.head_dim - 1) / 2) / (
        (config.head_dim - 1) / 2
    )
    zigzag = zigzag * zigzag.abs()
    decay_speed = -6 + 6 * (torch.arange(hidden_size, device=device) / (hidden_size - 1)) ** (1 + ratio_0_to_1**0.3)

    def mix(power: float) -> torch.Tensor:
        return (1.0 - ddd.pow(power * ratio_1_to_almost_0)).view(1, 1, -1)

    init.copy_(attn.x_r, mix(0.2))
    init.copy_(attn.x_w, mix(0.9))
    init.copy_(attn.x_k, mix(0.7))
    init.copy_(attn.x_v, mix(0.7))
    init.copy_(attn.x_a, mix(0.9))
    init.copy_(attn.x_g, mix(0.2))
    init.copy_(attn.k_k, 0.71 - 0.1 * linear)
    init.constant_(attn.k_a, 1.02)
    init.constant_(attn.r_k, -0.04)

    loras = {"w_lora": decay_speed + 0.5 + 2.5 * zigzag, "a_lora": -0.19 + 0.3 * zigzag + 0.4 * linear, "g_lora": None}
    if layer_idx > 0:
        loras["v_lora"] = 0.73 - 0.4 * linear
    for name, bias in loras.items():
        lora = getattr(attn, name).lora
        init.zeros_(lora[0].weight)
        init.orthogonal_(lora[2].weight, gain=0.1)
        if bias is not None:
            init.copy_(lora[2].bias, bias)

    init.orthogonal_(attn.r_proj.weight, gain=1.0)
    init.orthogonal_(attn.k_proj.weight, gain=0.1)
    init.orthogonal_(attn.v_proj.weight, gain=1.0)
    init.zeros_(attn.o_proj.weight)
    init.constant_(attn.g_norm.weight, ((layer_idx + 1) / num_layers) ** 0.7)
    init.zeros_(attn.g_norm.bias)


def _init_feed_forward(ffn: RWKV7FeedForward, config: RWKV7Config) -> None:
    layer_ratio = 1.0 - ffn.layer_idx / config.num_hidden_layers
    ddd = torch.arange(config.hidden_size, device=ffn.x_k.device, dtype=torch.float32) / config.hidden_size
    init.copy_(ffn.x_k, 1.0 - ddd.pow(layer_ratio**4))
    init.orthogonal_(ffn.key.weight, gain=_orthogonal_gain(ffn.key.weight))
    init.zeros_(ffn.value.weight)


@dataclass
class RWKV7ModelOutput(ModelOutput):
    """
    last_hidden_state: [batch, seq_len, hidden], after the final norm.
    pooler_output: [batch, hidden], the last real (non-padded) position of each row: the sequence encoding; zeros
        for a row that the attention_mask pads entirely (no real position in this input).
    cache: the recurrent state after this input (`RWKV7Cache`), when `use_cache`.
    hidden_states: the input of every block and the final output, when `output_hidden_states`.
    """

    last_hidden_state: Optional[torch.FloatTensor] = None
    pooler_output: Optional[torch.FloatTensor] = None
    cache: Optional[RWKV7Cache] = None
    hidden_states: Optional[tuple[torch.FloatTensor, ...]] = None


class RWKV7Model(RWKV7PreTrainedModel):
    """The RWKV-7 stack: token ids (or continuous features) -> normalized hidden states and a pooled encoding."""

    def __init__(self, config: RWKV7Config):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size) if config.vocab_size else None
        if config.input_size is not None and config.input_size != config.hidden_size:
            self.input_proj = RWKV7Linear(config.input_size, config.hidden_size)
        else:
            self.input_proj = None
        self.layers = nn.ModuleList([RWKV7Block(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)  # official ln_out
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings

    def set_input_embeddings(self, value):
        self.embeddings = value

    def _embed(self, input_ids: Optional[torch.LongTensor], inputs_embeds: Optional[torch.Tensor]) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if input_ids is not None:
            if self.embeddings is None:
                raise ValueError(
                    f"This model has no token embedding (vocab_size=None): pass features of width "
                    f"{self.config.input_size} as inputs_embeds."
                )
            _check_token_ids(input_ids, self.config.vocab_size)
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}.")
            return self.embeddings(input_ids)
        width = self.config.input_size or self.config.hidden_size
        _check_is_tensor(inputs_embeds, "inputs_embeds", f"[batch, seq_len, {width}]")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != width:
            raise ValueError(
                f"inputs_embeds must be [batch, seq_len, {width}], got shape {tuple(inputs_embeds.shape)}."
            )
        if not inputs_embeds.is_floating_point():
            raise ValueError(f"inputs_embeds must be a floating-point tensor, got dtype {inputs_embeds.dtype}.")
        inputs_embeds = inputs_embeds.to(self.dtype)
        return self.input_proj(inputs_embeds) if self.input_proj is not None else inputs_embeds

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[RWKV7Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        cu_seq_lens_q: Optional[torch.Tensor] = None,
        cu_seq_lens_k: Optional[torch.Tensor] = None,
        max_length_q: Optional[int] = None,
        max_length_k: Optional[int] = None,
        seq_idx: Optional[torch.Tensor] = None,
    ) -> RWKV7ModelOutput:
        r"""
        input_ids: [batch, seq_len] token ids, or inputs_embeds: [batch, seq_len, input_size or hidden_size].
        attention_mask: [batch, past + seq_len] with 0 at padding; padded positions leave the state unchanged.
        position_ids: only read to find document starts in packed rows: a 0 after the first position starts a new
            document with a fresh state.
        cu_seq_lens_q / cu_seq_lens_k: [num_documents + 1] cumulative document lengths of one packed row (what
            `DataCollatorWithFlattening` and TRL's padding-free collator give): document starts, as with
            position_ids. seq_idx: [1, seq_len] document index of each token, likewise. max_length_q / max_length_k
            (the longest document, for attention kernels) are accepted and not needed.
        cache: an `RWKV7Cache` to continue from; the new state is written into it.
        output_attentions: RWKV-7 has no attention weights; only None / False are accepted.
        """
        if output_attentions:
            raise ValueError("output_attentions=True: RWKV-7 has no attention weights to return.")
        hidden_states = self._embed(input_ids, inputs_embeds)
        batch_size, seq_len = hidden_states.shape[:2]
        if batch_size == 0 or seq_len == 0:
            raise ValueError(
                f"The input is empty (batch, seq_len) = ({batch_size}, {seq_len}): pass at least one token per row."
            )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        mask = _padding_mask(attention_mask, batch_size, seq_len, continues_a_cache=cache is not None)
        reset = document_starts(batch_size, seq_len, position_ids, cu_seq_lens_q, cu_seq_lens_k, seq_idx, mask)

        if cache is not None:
            if not isinstance(cache, RWKV7Cache):
                raise TypeError(f"cache must be an RWKV7Cache (see model.init_cache), got {type(cache).__name__}.")
            cache.check_compatible(self.config, batch_size, hidden_states.dtype)
        elif use_cache:
            cache = RWKV7Cache(self.config, batch_size, dtype=hidden_states.dtype, device=hidden_states.device)

        all_hidden_states = () if output_hidden_states else None
        zeros = hidden_states.new_zeros(batch_size, self.config.hidden_size)
        v_first = None
        for layer_idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if cache is not None:
                state = cache.layers[layer_idx]
                # the WKV arithmetic is float32 whatever the dtype the state is kept in
                layer_state = (state.attn_shift_state, state.recurrent_state.float(), state.ffn_shift_state)
            else:
                layer_state = (zeros, None, zeros)
            hidden_states, v_first, attn_shift, recurrent_state, ffn_shift = layer(
                hidden_states, v_first, *layer_state, mask, reset
            )
            if cache is not None:
                state.update(recurrent_state, attn_shift, ffn_shift)

        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if cache is not None:
            cache.add_seen_tokens(seq_len)

        pooler_output = _pool_last_real(hidden_states, mask)
        return RWKV7ModelOutput(
            last_hidden_state=hidden_states,
            pooler_output=pooler_output,
            cache=cache if use_cache else None,
            hidden_states=all_hidden_states,
        )


def _padding_mask(
    attention_mask: Optional[torch.Tensor], batch_size: int, seq_len: int, continues_a_cache: bool
) -> Optional[torch.Tensor]:
    """The [batch, seq_len] bool mask of this chunk (the last seq_len columns), or None when nothing is padded.
    `attention_mask` holds 0 / 1 (or bools) over [batch, past + seq_len]; past positions exist only when the input
    `continues_a_cache`."""
    if attention_mask is None:
        return None
    _check_is_tensor(attention_mask, "attention_mask", "[batch, past + seq_len]")
    past_length = attention_mask.shape[-1] - seq_len
    if (
        attention_mask.dim() != 2
        or attention_mask.shape[0] != batch_size
        or past_length < 0
        or (not continues_a_cache and past_length > 0)
    ):
        expected = f"past + seq_len >= {seq_len}" if continues_a_cache else f"seq_len={seq_len} (no cache: no past)"
        raise ValueError(
            f"attention_mask must be [batch={batch_size}, {expected}], got shape {tuple(attention_mask.shape)}."
        )
    if not torch.compiler.is_compiling() and attention_mask.dtype != torch.bool:
        not_binary = (attention_mask != 0) & (attention_mask != 1)
        if not_binary.any():
            raise ValueError(
                f"attention_mask holds {attention_mask[not_binary][0].item()}; expected 1 for a token, 0 for padding "
                "(or bools)."
            )
    mask = attention_mask[:, -seq_len:].bool()
    # eager runs skip the masking work when nothing is padded; a traced graph never branches on the data
    if not torch.compiler.is_compiling() and bool(mask.all()):
        return None
    return mask


def _check_is_tensor(value, name: str, shape: str) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor {shape}, got a {type(value).__name__}: pass torch.tensor(...)."
        )


def _check_token_ids(input_ids: torch.LongTensor, vocab_size: int) -> None:
    """Raise a TypeError unless `input_ids` is an int64 / int32 tensor, and if a token id lies outside
    [0, vocab_size): a ValueError naming it when run eagerly, an asynchronous assertion inside a traced graph
    (torch.compile, torch.export), which must not branch on the data."""
    _check_is_tensor(input_ids, "input_ids", "[batch, seq_len]")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold int64 (or int32) token ids, got dtype {input_ids.dtype}.")
    out_of_range = (input_ids < 0) | (input_ids >= vocab_size)
    if torch.compiler.is_compiling():
        torch._assert_async(~out_of_range.any(), f"A token id is out of the vocabulary range [0, {vocab_size}).")
    elif out_of_range.any():
        bad = input_ids[out_of_range][0].item()
        raise ValueError(f"Token id {bad} is out of the vocabulary range [0, {vocab_size}).")


def document_starts(
    batch_size: int,
    seq_len: int,
    position_ids: Optional[torch.Tensor] = None,
    cu_seq_lens_q: Optional[torch.Tensor] = None,
    cu_seq_lens_k: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    padding_mask: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """[batch, seq_len] bool, True where a packed document starts after a row's first token, or None (no packing
    information, or, run eagerly, no document start). Documents are marked by position_ids [batch or 1, seq_len]
    (a 0), cu_seq_lens_q / cu_seq_lens_k [num_documents + 1] (cumulative lengths of the documents of one row) or
    seq_idx [1, seq_len] (a change of the document index); several of them are combined. A row's first token
    (the first position, or with `padding_mask` [batch, seq_len] the first one after left padding, where
    generate()'s position_ids are 0 too) continues from the state given: a cache, a tuned state or zeros."""
    reset = None
    if position_ids is not None:
        if (
            position_ids.dim() != 2
            or position_ids.shape[-1] != seq_len
            or position_ids.shape[0] not in (1, batch_size)
        ):
            raise ValueError(
                f"position_ids must be [batch={batch_size} or 1, seq_len={seq_len}], "
                f"got shape {tuple(position_ids.shape)}."
            )
        reset = (position_ids == 0).expand(batch_size, seq_len)
    if cu_seq_lens_q is not None or cu_seq_lens_k is not None:
        starts = _cu_seq_lens_starts(batch_size, seq_len, cu_seq_lens_q, cu_seq_lens_k)
        reset = starts if reset is None else reset | starts
    if seq_idx is not None:
        if seq_idx.shape != (1, seq_len) or batch_size != 1:
            raise ValueError(
                f"seq_idx must be [1, seq_len={seq_len}] for one packed row, got shape {tuple(seq_idx.shape)} "
                f"with batch size {batch_size}."
            )
        changes = torch.cat([torch.zeros_like(seq_idx[:, :1], dtype=torch.bool), seq_idx[:, 1:] != seq_idx[:, :-1]], 1)
        reset = changes if reset is None else reset | changes
    if reset is None:
        return None
    if padding_mask is None:
        reset = torch.cat([torch.zeros_like(reset[:, :1]), reset[:, 1:]], dim=1)
    else:
        reset = reset & ((padding_mask.cumsum(dim=1) - padding_mask.long()) > 0)  # a token of the row came before
    if not torch.compiler.is_compiling() and not bool(reset.any()):
        return None
    return reset


def _cu_seq_lens_starts(
    batch_size: int, seq_len: int, cu_seq_lens_q: Optional[torch.Tensor], cu_seq_lens_k: Optional[torch.Tensor]
) -> torch.Tensor:
    """The document starts [1, seq_len] bool that cu_seq_lens_q / cu_seq_lens_k (equal when both are given) mark."""
    cu_seq_lens = cu_seq_lens_q if cu_seq_lens_q is not None else cu_seq_lens_k
    if batch_size != 1 or cu_seq_lens.dim() != 1 or cu_seq_lens.shape[0] < 2:
        raise ValueError(
            f"cu_seq_lens_q / cu_seq_lens_k must be [num_documents + 1] for one packed row (batch size 1), got shape "
            f"{tuple(cu_seq_lens.shape)} with batch size {batch_size}."
        )
    if not torch.compiler.is_compiling():
        if cu_seq_lens_q is not None and cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_q, cu_seq_lens_k):
            raise ValueError(
                f"cu_seq_lens_q {cu_seq_lens_q.tolist()} differs from cu_seq_lens_k {cu_seq_lens_k.tolist()}: a "
                "recurrent model reads each packed document once, so the two must be the same."
            )
        lengths = cu_seq_lens.diff()
        if int(cu_seq_lens[0]) != 0 or int(cu_seq_lens[-1]) != seq_len or bool((lengths <= 0).any()):
            raise ValueError(
                f"cu_seq_lens {cu_seq_lens.tolist()} must rise from 0 to seq_len={seq_len} (cumulative document "
                "lengths; a document holds at least one token)."
            )
    positions = torch.arange(seq_len, device=cu_seq_lens.device)
    return (positions[:, None] == cu_seq_lens[None, :-1].to(positions.dtype)).any(dim=1)[None]


def _pool_last_real(hidden_states: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """hidden_states [batch, seq_len, hidden] at the last non-padded position of each row ([batch, hidden]); zeros
    for a row that is all padding (mask [batch, seq_len] bool, None when nothing is padded)."""
    if mask is None:
        return hidden_states[:, -1]
    batch_size, seq_len = mask.shape
    positions = torch.arange(seq_len, device=mask.device).expand(batch_size, seq_len)
    last_real = torch.where(mask, positions, -1).amax(dim=1)
    pooled = hidden_states[torch.arange(batch_size, device=mask.device), last_real.clamp_min(0)]
    return pooled.masked_fill(last_real[:, None] < 0, 0.0)


def _kept_positions(logits_to_keep: int | torch.Tensor) -> slice | torch.Tensor:
    """The positions the vocabulary head is computed for: the last `logits_to_keep` (0 = all), or an index tensor."""
    if isinstance(logits_to_keep, torch.Tensor):
        return logits_to_keep
    if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 0:
        raise ValueError(
            f"logits_to_keep must be an integer >= 0 (0 keeps every position) or a tensor of positions, got "
            f"{logits_to_keep!r}."
        )
    return slice(-logits_to_keep, None)


def _check_labels(labels, shift_labels, expected_shape: torch.Size) -> None:
    """Raise unless `labels` (and `shift_labels`, when given) are int64 tensors of the logits' [batch, positions]."""
    for name, value in (("labels", labels), ("shift_labels", shift_labels)):
        if value is None:
            continue
        _check_is_tensor(value, name, "[batch, seq_len]")
        if value.dtype != torch.int64:
            raise TypeError(f"{name} must hold int64 token ids (-100 to ignore), got dtype {value.dtype}.")
        if value.shape != expected_shape:
            raise ValueError(
                f"{name} must be [batch, seq_len] = {tuple(expected_shape)}, the positions with logits, got shape "
                f"{tuple(value.shape)}."
            )


def _counted_targets(labels: torch.Tensor, loss_kwargs: dict) -> dict:
    """`loss_kwargs` with `num_items_in_batch` (the number of targets that are not `ignore_index`, unless the
    Trainer gives it) raised to at least 1. The loss is then the mean over the counted targets, and 0.0 (with zero
    gradients) when there are none, where a plain mean would be NaN."""
    num_items = loss_kwargs.get("num_items_in_batch")
    if num_items is None:
        targets = loss_kwargs.get("shift_labels")
        targets = labels[:, 1:] if targets is None else targets
        num_items = (targets != loss_kwargs.get("ignore_index", -100)).sum()
    num_items = num_items.clamp_min(1) if isinstance(num_items, torch.Tensor) else max(num_items, 1)
    return {**loss_kwargs, "num_items_in_batch": num_items}


def _reads_in_chunks(
    input_ids, inputs_embeds, labels, logits_to_keep, output_hidden_states, position_ids, cu_seq_lens_q,
    cu_seq_lens_k, seq_idx,
) -> bool:  # fmt: skip
    """Whether RWKV7ForCausalLM.forward reads its input `PREFILL_CHUNK_SIZE` positions at a time: an input longer
    than that, of which only the last position's logits are kept, nothing else asked of the positions (labels,
    hidden states, documents packed by cu_seq_lens or seq_idx), and no gradient to record."""
    inputs = input_ids if input_ids is not None else inputs_embeds
    return (
        isinstance(inputs, torch.Tensor)
        and inputs.dim() >= 2
        and inputs.shape[1] > PREFILL_CHUNK_SIZE
        and isinstance(logits_to_keep, int)
        and logits_to_keep == 1
        and not torch.is_grad_enabled()
        and not output_hidden_states
        and all(x is None for x in (labels, cu_seq_lens_q, cu_seq_lens_k, seq_idx))
        and (position_ids is None or (position_ids.dim() == 2 and position_ids.shape[1] == inputs.shape[1]))
        and not torch.compiler.is_compiling()
    )


class RWKV7ForCausalLM(RWKV7PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: RWKV7Config):
        super().__init__(config)
        if config.vocab_size is None:
            raise ValueError("RWKV7ForCausalLM needs config.vocab_size; got None.")
        self.model = RWKV7Model(config)
        self.lm_head = RWKV7Linear(config.hidden_size, config.vocab_size, bias=False)  # official head
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[RWKV7Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        cu_seq_lens_q: Optional[torch.Tensor] = None,
        cu_seq_lens_k: Optional[torch.Tensor] = None,
        max_length_q: Optional[int] = None,
        max_length_k: Optional[int] = None,
        seq_idx: Optional[torch.Tensor] = None,
        **loss_kwargs,
    ) -> CausalLMOutputWithPast:
        r"""
        labels: [batch, seq_len] int64 next-token targets (shifted inside), -100 to ignore. The loss is the mean
            cross-entropy over the targets that are not ignored, and 0.0 when all are.
        logits_to_keep: compute logits only for the last `logits_to_keep` positions (0 = all), or for the positions
            in a 1-D index tensor; the vocabulary head is skipped for the others.
        loss_kwargs: only what the loss takes (`num_items_in_batch`, `ignore_index`, `shift_labels`, as the
            Trainer passes them); any other name is refused. See `RWKV7Model.forward` for the rest.
        """
        unknown = sorted(set(loss_kwargs) - set(LOSS_KWARGS))
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected keyword argument(s) {unknown}.")
        other_inputs = any(x is not None for x in (inputs_embeds, labels, cu_seq_lens_q, cu_seq_lens_k, seq_idx))
        other_inputs = other_inputs or bool(output_hidden_states) or use_cache is False
        if decode_implementation(self, input_ids, cache, attention_mask, logits_to_keep, other_inputs) == "native":
            # a decoding step through the package's native CPU ops (dispatch_rwkv7), unless the model holds a
            # module they cannot read (a PEFT adapter): then the eager modules below
            step = native_decode_step(self, native_ops())
            if step.readable():
                _check_token_ids(input_ids, self.config.vocab_size)
                _padding_mask(attention_mask, input_ids.shape[0], 1, continues_a_cache=True)  # refuses bad masks
                cache.check_compatible(self.config, input_ids.shape[0], self.dtype)
                return step(input_ids, cache)
        if _reads_in_chunks(input_ids, inputs_embeds, labels, logits_to_keep, output_hidden_states, position_ids,
                            cu_seq_lens_q, cu_seq_lens_k, seq_idx):  # fmt: skip
            return self._last_logits_in_chunks(
                input_ids, inputs_embeds, attention_mask, position_ids, cache, use_cache
            )
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            cu_seq_lens_q=cu_seq_lens_q,
            cu_seq_lens_k=cu_seq_lens_k,
            max_length_q=max_length_q,
            max_length_k=max_length_k,
            seq_idx=seq_idx,
        )
        hidden_states = outputs.last_hidden_state
        kept = hidden_states[:, _kept_positions(logits_to_keep), :]
        if labels is not None:
            _check_labels(labels, loss_kwargs.get("shift_labels"), kept.shape[:2])
        logits = self.lm_head(kept)

        loss = None
        if labels is not None:
            loss_kwargs = _counted_targets(labels, loss_kwargs)
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
        )

    def _last_logits_in_chunks(
        self,
        input_ids: Optional[torch.LongTensor],
        inputs_embeds: Optional[torch.FloatTensor],
        attention_mask: Optional[torch.Tensor],
        position_ids: Optional[torch.LongTensor],
        cache: Optional[RWKV7Cache],
        use_cache: Optional[bool],
    ) -> CausalLMOutputWithPast:
        """The last position's logits [batch, 1, vocab] of a long input, read `PREFILL_CHUNK_SIZE` positions at a
        time: the state carries everything from one chunk to the next, so the memory is that of one chunk's
        activations at any length (what generate() asks of a prompt: `logits_to_keep=1`). A document that starts
        (position 0) at a chunk's first position starts from a zeroed row of the state."""
        inputs = input_ids if input_ids is not None else inputs_embeds
        batch_size, seq_len = inputs.shape[:2]
        _padding_mask(attention_mask, batch_size, seq_len, continues_a_cache=cache is not None)  # refuses bad masks
        if cache is None:
            cache = self.init_cache(batch_size)
        mask = attention_mask[:, -seq_len:] if attention_mask is not None else None
        starts = document_starts(batch_size, seq_len, position_ids, padding_mask=None if mask is None else mask.bool())
        for start in range(0, seq_len, PREFILL_CHUNK_SIZE):
            chunk = slice(start, start + PREFILL_CHUNK_SIZE)
            if starts is not None:  # a document starting at the chunk's first position starts from a zeroed row
                for row in starts[:, start].nonzero()[:, 0].tolist():
                    cache.reset_row(row)
            outputs = self.model(
                input_ids=input_ids[:, chunk] if input_ids is not None else None,
                inputs_embeds=inputs_embeds[:, chunk] if inputs_embeds is not None else None,
                attention_mask=mask[:, chunk] if mask is not None else None,
                position_ids=position_ids[:, chunk] if position_ids is not None else None,
                cache=cache,
                use_cache=True,
            )
        logits = self.lm_head(outputs.last_hidden_state[:, -1:])
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return CausalLMOutputWithPast(logits=logits, cache=cache if use_cache else None)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        next_sequence_length: Optional[int] = None,
        cache: Optional[RWKV7Cache] = None,
        attention_mask: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        is_first_iteration: Optional[bool] = False,
        **kwargs,
    ):
        """GenerationMixin's, refusing a warm cache that the input cannot extend, and with no attention mask in a
        decoding step: the tokens generate() feeds after the prompt are never padding (it extends the mask with
        ones), so every step has the same inputs (no recompilation of a compiled step for a growing mask; two steps
        merged into one call, as transformers' exporter does, stay correct).

        With a warm cache (`cache` that has seen `n` tokens), generate() expects the FULL ids, the `n`
        tokens the cache has seen followed by the new ones, and feeds only the ids after the first `n`. (Or only
        the new ids together with an attention_mask over all `n + new` positions.) The cache keeps no tokens, so
        it cannot check that the first `n` ids are the ones it saw; an input not longer than `n` is refused.
        """
        # generate() hands its own arguments (the tokenizer for `stop_strings`, ...) to the decoding loop, which
        # passes whatever it does not name on to here; the model takes none of them
        for name in GENERATE_ONLY_KWARGS:
            kwargs.pop(name, None)
        if is_first_iteration and cache is not None and next_sequence_length is not None:
            seen = cache.get_seq_length()
            if seen + next_sequence_length <= 0:
                raise ValueError(
                    f"generate() got an empty prompt (input_ids of shape {tuple(input_ids.shape)}): pass at least "
                    "one token per row (e.g. 0, the end-of-document token)."
                )
            if next_sequence_length <= 0:
                raise ValueError(
                    f"generate() got {seen + next_sequence_length} input positions but cache has already "
                    f"seen {seen} tokens: with a warm cache, generate() expects the full ids (the {seen} tokens the "
                    f"cache has seen, then the new ones) and feeds only the ids after position {seen}. Pass the full "
                    "ids, or feed only the new ids with `model(new_ids, cache=cache)` and continue from there."
                )
        if cache is not None and not is_first_iteration:
            attention_mask = None
        return super().prepare_inputs_for_generation(
            input_ids,
            next_sequence_length=next_sequence_length,
            cache=cache,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )

    def _validate_generation_mode(self, generation_mode, generation_config, generation_mode_kwargs) -> None:
        """Refuse assisted and prompt-lookup decoding: both verify draft tokens and then undo the rejected ones,
        which a recurrent state cannot do (it keeps no per-token history to crop)."""
        if generation_mode == GenerationMode.ASSISTED_GENERATION:
            used = [f"{name}={getattr(generation_config, name)!r}" for name in ASSISTED_DECODING_SETTINGS]
            used = [setting for setting in used if not setting.endswith(("=None", "=False"))]
            if generation_mode_kwargs.get("assistant_model") is not None:
                used.insert(0, "assistant_model=...")
            raise ValueError(
                f"generate({', '.join(used)}) asks for assisted decoding, which RWKV-7 cannot do: it undoes "
                "rejected draft tokens by cropping the cache, and a recurrent state keeps no per-token history to "
                "crop. Generate without it (a decoding step costs the same at any length)."
            )
        super()._validate_generation_mode(generation_mode, generation_config, generation_mode_kwargs)

    def _valid_auto_compile_criteria(self, model_kwargs: dict, generation_config) -> bool:
        """GenerationMixin's; says once why `compile_config` does nothing on CPU."""
        can_compile = super()._valid_auto_compile_criteria(model_kwargs, generation_config)
        if generation_config.compile_config is not None and not can_compile and self.device.type == "cpu":
            logger.warning_once(
                "RWKV-7: compile_config is not used on CPU: transformers compiles generate()'s decoding step on "
                "accelerators only. On CPU, compile the forward pass yourself before generate(): "
                "`model.forward = torch.compile(model.forward, fullgraph=True)` (or decode with "
                "`modeling_rwkv7.decode_rwkv7.compile_decode_step`)."
            )
        return can_compile

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """generate() decodes into an `RWKV7Cache` made here, before the first forward pass (one row per beam and
        returned sequence), so that a compiled decoding step (`compile_config`) finds its state from the start."""
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )
        if model_kwargs.get("cache") is None and generation_config.use_cache:
            rows = batch_size * max(generation_config.num_beams, generation_config.num_return_sequences)
            model_kwargs["cache"] = self.init_cache(rows)

    def create_masks_for_generate(
        self,
        config: RWKV7Config,
        inputs_embeds: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        cache: Optional[RWKV7Cache],
        position_ids: Optional[torch.Tensor] = None,
        block_sequence_ids: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        mm_token_type_ids: Optional[torch.Tensor] = None,
        is_first_iteration: Optional[bool] = None,
    ) -> Optional[torch.Tensor]:
        """generate() asks a model with a compilable cache for 4-D attention masks; the recurrence needs only the
        2-D padding mask [batch, past + seq_len], which is returned as it is."""
        return attention_mask

    def init_continuous_batching(self, generation_config=None, continuous_batching_config=None, workload_hints=None):
        """A continuous batching manager over a pool of recurrent states (transformers' own one keeps a paged KV
        cache for attention layers): what `transformers serve --continuous-batching` and `generate_batch` run.
        See `RWKV7ContinuousBatchingManager.from_configs` for what it reads of `continuous_batching_config`."""
        from .continuous_batching_rwkv7 import RWKV7ContinuousBatchingManager

        return RWKV7ContinuousBatchingManager.from_configs(
            self, generation_config or self.generation_config, continuous_batching_config, workload_hints
        )


class RWKV7ForSequenceClassification(RWKV7PreTrainedModel):
    """RWKV-7 with a linear head on the last real position (`pooler_output`)."""

    def __init__(self, config: RWKV7Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = RWKV7Model(config)
        self.score = RWKV7Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embeddings

    def set_input_embeddings(self, value):
        self.model.embeddings = value

    @deprecate_kwarg("past_key_values", "6.0.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[RWKV7Cache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
    ) -> SequenceClassifierOutputWithPast:
        r"""labels: [batch] class ids (or floats for regression / multi-label, per `config.problem_type`)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        logits = self.score(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


__all__ = [
    "RWKV7PreTrainedModel",
    "RWKV7Model",
    "RWKV7ForCausalLM",
    "RWKV7ForSequenceClassification",
    "RWKV7Attention",
    "RWKV7FeedForward",
    "RWKV7Block",
]
