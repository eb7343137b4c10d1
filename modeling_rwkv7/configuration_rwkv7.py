"""RWKV-7 "Goose" (x070) configuration."""

import math

from transformers import PreTrainedConfig
from transformers.generation import GenerationConfig

WKV_BACKENDS = ("auto", "recurrent", "chunked", "kernel")
WKV_STATE_DTYPES = ("float32", "bfloat16", "float16")

# Keys the base `PreTrainedConfig.__post_init__` consumes itself.
_BASE_CONFIG_KEYS = {
    "model_type",
    "torch_dtype",
    "name_or_path",
    "_name_or_path",
    "_commit_hash",
    "output_attentions",
    "attn_implementation",
    "experts_implementation",
    "per_layer_config",
    "num_labels",
    "auto_map",
    "tokenizer_class",
    "_attn_implementation_internal",
    "_experts_implementation_internal",
}

# Keys written by flash-linear-attention (fla-hub) RWKV-7 configs that have no effect on the math
# (kernel choices, training tricks, fixed architecture choices). They are accepted and dropped, after
# checking that the fixed choices hold.
_FLA_IGNORED_KEYS = {
    "attn_mode",
    "fuse_norm",
    "fuse_cross_entropy",
    "fuse_linear_cross_entropy",
    "use_l2warp",
    "max_position_embeddings",
    "initializer_range",
    "attn",
}
_FLA_FIXED_VALUES = {"hidden_act": "sqrelu", "norm_first": True, "norm_bias": True}

# Keys of transformers' own RWKV-7 config (`Rwkv7Config`) that are not ours: `use_deep_embed` must be False (the
# RWKV-8 DeepEmbed vectors are a forward input this model does not take); `wkv_implementation` names one of its WKV
# functions, which all compute the same recurrence (ours is chosen with `wkv_backend`). `num_heads`, `norm_bias` and
# `max_position_embeddings` are handled with the fla-hub keys.
_NATIVE_WKV_IMPLEMENTATIONS = ("eager", "chunked")


def default_low_rank_dim(hidden_size: int, factor: float) -> int:
    """The official RWKV-LM x070 default LoRA width: ``max(32, round(factor * sqrt(C) / 32) * 32)``."""
    return max(32, round(factor * math.sqrt(hidden_size) / 32) * 32)


class RWKV7Config(PreTrainedConfig):
    r"""
    Configuration of an RWKV-7 "Goose" (x070) model.

    Args:
        vocab_size (`int` or `None`, defaults to 65536):
            Size of the token vocabulary (65536 for the RWKV World / G1 tokenizer). `None` builds a pure feature
            encoder without a token embedding (requires `input_size`).
        hidden_size (`int`, defaults to 768):
            Width C of the residual stream.
        num_hidden_layers (`int`, defaults to 12):
            Number of RWKV-7 blocks.
        head_dim (`int`, defaults to 64):
            Size N of one WKV head; `hidden_size` must be a multiple of it. `num_heads = hidden_size // head_dim`.
        intermediate_size (`int`, *optional*):
            Width of the channel-mix (FFN). Defaults to `4 * hidden_size`, as in all released models.
        decay_low_rank_dim, a_low_rank_dim, v_low_rank_dim, gate_low_rank_dim (`int`, *optional*):
            Ranks of the decay / in-context-learning-rate / value-residual / output-gate LoRAs. Default to the
            official formula `max(32, round(k * sqrt(C) / 32) * 32)` with k = 2.5, 2.5, 1.7, 5.
        norm_eps (`float`, defaults to 1e-5):
            Epsilon of every LayerNorm; the per-head GroupNorm uses `head_dim * norm_eps` (64e-5 for N = 64).
        input_size (`int`, *optional*):
            Width of continuous input features passed as `inputs_embeds` (the sequence-encoder use case). When it
            differs from `hidden_size`, a linear projection `input_proj` maps the features to `hidden_size`.
        dropout (`float`, defaults to 0.0):
            Dropout on the output of each time-mix and channel-mix sub-block, before the residual add.
        window_size (`int`, *optional*):
            Typical sequence length of the encoder's feature windows. Informational: the recurrence accepts any
            length; the demo and `init_cache` examples use it.
        wkv_backend (`str`, defaults to `"auto"`):
            WKV implementation: `"auto"` (the CUDA kernel when it loads, else the chunked form for long sequences and
            the recurrence for short ones), `"recurrent"`, `"chunked"` or `"kernel"` (error if it cannot load).
        wkv_state_dtype (`str`, defaults to `"float32"`):
            Dtype the recurrent WKV state (`[batch, heads, head_dim, head_dim]` per layer) is carried in between tokens
            and calls, whatever the activation dtype: `"float32"` (the reference), or `"bfloat16"` / `"float16"` to
            halve the state's memory. A narrow state is rounded at every token. Measured on the WKV operator (12
            heads of 64, the 0.1B shape; 4096 tokens of RWKV-7-like random inputs; state rounded after every
            token), the outputs differ from the float32 run by 1.8e-3 (bfloat16) and 2.2e-4 (float16) relative
            error, the same at tokens 0-64, 960-1024 and 4032-4096: the decay forgets old rounding errors, so the
            drift does not grow with length. float16 overflows where a state entry passes 65504.
        kernel_repo (`str`, *optional*):
            Kernel-hub repository this checkpoint suggests for the CUDA WKV kernel. A hint only: it is never fetched
            because a config names it. Hub kernels run only after the user's own opt-in, pinned to a commit
            (`modeling_rwkv7.wkv_kernel.trust_hub_kernel(repo_id, revision)` or `RWKV7_HUB_KERNEL`); a different
            repository named here is ignored with a warning.
    """

    model_type = "rwkv7"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int | None = 65536
    hidden_size: int = 768
    num_hidden_layers: int = 12
    head_dim: int = 64
    intermediate_size: int | None = None
    decay_low_rank_dim: int | None = None
    a_low_rank_dim: int | None = None
    v_low_rank_dim: int | None = None
    gate_low_rank_dim: int | None = None
    norm_eps: float = 1e-5
    input_size: int | None = None
    dropout: float = 0.0
    window_size: int | None = None
    wkv_backend: str = "auto"
    wkv_state_dtype: str = "float32"
    kernel_repo: str | None = None
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        kwargs = self._absorb_fla_keys(kwargs)
        generation_keys = set(GenerationConfig._get_default_generation_params())
        unknown = sorted(key for key in kwargs if key not in _BASE_CONFIG_KEYS and key not in generation_keys)
        if unknown:
            raise ValueError(
                f"Unknown RWKV7Config field(s) {unknown}. Known fields: {sorted(self._own_fields())}."
            )
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        for name, factor in (("decay", 2.5), ("a", 2.5), ("v", 1.7), ("gate", 5.0)):
            if getattr(self, f"{name}_low_rank_dim") is None and isinstance(self.hidden_size, int) and self.hidden_size > 0:
                setattr(self, f"{name}_low_rank_dim", default_low_rank_dim(self.hidden_size, factor))
        self._validate()
        super().__post_init__(**kwargs)

    @classmethod
    def _own_fields(cls) -> set[str]:
        return set(cls.__annotations__)

    def _absorb_fla_keys(self, kwargs: dict) -> dict:
        """Translate the keys of fla-hub RWKV-7 configs (hidden_ratio, num_heads, value_dim, ...) and of transformers'
        own RWKV-7 config (use_deep_embed, wkv_implementation) into ours."""
        kwargs = dict(kwargs)
        deep_embed = kwargs.pop("use_deep_embed", False)
        if deep_embed is not False:
            raise ValueError(
                f"use_deep_embed={deep_embed!r} is not supported: this model has no RWKV-8 DeepEmbed input "
                "(`deep_embeds`); only use_deep_embed=False configs load."
            )
        implementation = kwargs.pop("wkv_implementation", None)
        if implementation is not None and implementation not in _NATIVE_WKV_IMPLEMENTATIONS:
            raise ValueError(
                f"wkv_implementation={implementation!r} is not a WKV function this model knows "
                f"({_NATIVE_WKV_IMPLEMENTATIONS}); choose its WKV implementation with wkv_backend={WKV_BACKENDS}."
            )
        for key in _FLA_IGNORED_KEYS:
            kwargs.pop(key, None)
        for key, expected in _FLA_FIXED_VALUES.items():
            if key in kwargs and kwargs.pop(key) != expected:
                raise ValueError(f"RWKV-7 requires {key}={expected!r}; this config sets another value.")
        hidden_ratio = kwargs.pop("hidden_ratio", None)
        if hidden_ratio is not None and self.intermediate_size is None:
            self.intermediate_size = int(hidden_ratio * self.hidden_size)
        num_heads = kwargs.pop("num_heads", None)
        if num_heads is not None and num_heads * self.head_dim != self.hidden_size:
            raise ValueError(
                f"num_heads={num_heads} with head_dim={self.head_dim} does not cover hidden_size={self.hidden_size}."
            )
        value_dim = kwargs.pop("value_dim", None)
        for width in value_dim if isinstance(value_dim, list) else [value_dim]:
            if width is not None and width != self.hidden_size:
                raise ValueError(f"value_dim={value_dim} is not supported: RWKV-7 needs value_dim == hidden_size.")
        return kwargs

    def _validate(self):
        positive = [
            "hidden_size",
            "num_hidden_layers",
            "head_dim",
            "intermediate_size",
            "decay_low_rank_dim",
            "a_low_rank_dim",
            "v_low_rank_dim",
            "gate_low_rank_dim",
        ]
        optional_positive = ["vocab_size", "input_size", "window_size"]
        for name in positive + optional_positive:
            value = getattr(self, name)
            if value is None and name in optional_positive:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"RWKV7Config.{name} must be a positive integer, got {value!r}.")
        if self.hidden_size % self.head_dim != 0:
            raise ValueError(
                f"RWKV7Config.hidden_size={self.hidden_size} must be divisible by head_dim={self.head_dim}."
            )
        if self.vocab_size is None and self.input_size is None:
            raise ValueError("RWKV7Config needs vocab_size (token ids) or input_size (continuous features); both are None.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RWKV7Config.dropout must be in [0, 1), got {self.dropout!r}.")
        if not self.norm_eps > 0:
            raise ValueError(f"RWKV7Config.norm_eps must be > 0, got {self.norm_eps!r}.")
        if self.wkv_backend not in WKV_BACKENDS:
            raise ValueError(f"RWKV7Config.wkv_backend must be one of {WKV_BACKENDS}, got {self.wkv_backend!r}.")
        if self.wkv_state_dtype not in WKV_STATE_DTYPES:
            raise ValueError(
                f"RWKV7Config.wkv_state_dtype must be one of {WKV_STATE_DTYPES}, got {self.wkv_state_dtype!r}."
            )

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim

    @property
    def output_size(self) -> int:
        """Width of the encoder output (`pooler_output` is `[batch, output_size]`)."""
        return self.hidden_size

    @classmethod
    def recommended_defaults(cls) -> dict:
        """The sequence-encoder defaults of the Edifice seed (`Edifice.Attention.RWKV.recommended_defaults/0`)."""
        return {"hidden_size": 256, "num_hidden_layers": 6, "head_dim": 64, "dropout": 0.1, "window_size": 60}

    def param_count(self, head: str = "auto") -> int:
        """Exact number of parameters of the model this config builds.

        `head`: `"lm"` (`RWKV7ForCausalLM`), `"none"` (`RWKV7Model`), `"classification"`
        (`RWKV7ForSequenceClassification`), or `"auto"`: `"lm"` for token models, `"none"` for feature encoders.
        """
        if head == "auto":
            head = "lm" if self.vocab_size is not None and self.input_size is None else "none"
        if head not in ("lm", "none", "classification"):
            raise ValueError(f"head must be 'auto', 'lm', 'none' or 'classification', got {head!r}.")
        C, L = self.hidden_size, self.num_hidden_layers
        count = 0
        if self.vocab_size is not None:
            count += self.vocab_size * C
        if self.input_size is not None and self.input_size != C:
            count += self.input_size * C + C
        time_mix = (
            6 * C  # x_r, x_w, x_k, x_v, x_a, x_g
            + 3 * C  # k_k, k_a, r_k
            + 4 * C * C  # r_proj, k_proj, v_proj, o_proj
            + 2 * C * self.decay_low_rank_dim + C
            + 2 * C * self.a_low_rank_dim + C
            + 2 * C * self.gate_low_rank_dim
            + 2 * C  # g_norm
        )
        value_residual = 2 * C * self.v_low_rank_dim + C  # layers >= 1 only
        channel_mix = C + 2 * C * self.intermediate_size
        norms = 4 * C  # attn_norm, ffn_norm
        count += L * (time_mix + channel_mix + norms) + (L - 1) * value_residual
        count += 2 * C  # pre_norm (layer 0)
        count += 2 * C  # final norm
        if head == "lm" and not self.tie_word_embeddings:
            count += self.vocab_size * C
        elif head == "classification":
            count += C * self.num_labels
        return count


__all__ = ["RWKV7Config"]
