"""RWKV-7 "Goose" (x070) configuration."""

import json
import math

from transformers import PreTrainedConfig
from transformers.generation import GenerationConfig

from .dispatch_rwkv7 import IMPLEMENTATIONS, resolve_implementation

WKV_STATE_DTYPES = ("float32", "bfloat16", "float16")

# No config nests this deep (transformers' own nest three levels); deeper JSON is refused before any recursive walk.
MAX_CONFIG_DEPTH = 32
# The most labels a sequence-classification config may name (transformers builds an id2label dict of that size).
MAX_NUM_LABELS = 2**20

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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_torch_dtype(value) -> bool:
    """A `torch.dtype`, or the name of one ("bfloat16"), as transformers reads `getattr(torch, name)`."""
    import torch

    if isinstance(value, str):
        value = getattr(torch, value, None)
    return isinstance(value, torch.dtype)


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
        implementation (`dict`, *optional*):
            Forces the implementation of an op (`modeling_rwkv7.dispatch_rwkv7`, the one dispatch point): `"wkv"`
            (`"recurrent"`, `"chunked"`, `"kernel"`), `"projection"` (`"linear"`, `"row_blocks"`, `"int8_rows"`) and
            `"decode"` (`"eager"`, `"native"`). Every op not named is `"auto"`: the fastest correct path on the
            machine. `config.wkv_backend` (older configs) reads and sets `implementation["wkv"]`.
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
    keys_to_ignore_at_inference = ["cache"]

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
    implementation: dict | None = None
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
            raise ValueError(f"Unknown RWKV7Config field(s) {unknown}. Known fields: {sorted(self._own_fields())}.")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if _is_int(self.hidden_size) and self.hidden_size >= 2**63:  # no tensor dimension; sqrt() would overflow
            raise ValueError(f"RWKV7Config.hidden_size must be a positive integer < 2**63, got {self.hidden_size}.")
        for name, factor in (("decay", 2.5), ("a", 2.5), ("v", 1.7), ("gate", 5.0)):
            if (
                getattr(self, f"{name}_low_rank_dim") is None
                and isinstance(self.hidden_size, int)
                and self.hidden_size > 0
            ):
                setattr(self, f"{name}_low_rank_dim", default_low_rank_dim(self.hidden_size, factor))
        self._validate()
        for value in (getattr(self, "dtype", None), kwargs.get("torch_dtype")):  # transformers: getattr(torch, name)
            if value is not None and not _is_torch_dtype(value):
                raise ValueError(f"RWKV7Config.dtype must be a torch dtype or its name ('bfloat16'), got {value!r}.")
        if getattr(self, "id2label", None) is not None and not isinstance(self.id2label, dict):
            raise ValueError(f"RWKV7Config.id2label must be a dict label id -> name, got {self.id2label!r}.")
        num_labels = kwargs.get("num_labels")  # checked first: transformers builds a dict of that many labels
        if num_labels is not None and not (type(num_labels) is int and 1 <= num_labels <= MAX_NUM_LABELS):
            raise ValueError(
                f"RWKV7Config.num_labels must be an integer in [1, {MAX_NUM_LABELS}], got {num_labels!r}."
            )
        super().__post_init__(**kwargs)
        if not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ValueError(f"RWKV7Config.num_labels must be a positive integer, got {self.num_labels!r}.")

    def __setattr__(self, name, value):
        if name == "implementation":  # however it is set (from_pretrained sets its keyword arguments afterwards)
            value = resolve_implementation(value)
        super().__setattr__(name, value)

    @property
    def wkv_backend(self) -> str:
        """`implementation["wkv"]` (the name older configs and code use)."""
        return self.implementation["wkv"]

    @wkv_backend.setter
    def wkv_backend(self, value: str) -> None:
        self.implementation = resolve_implementation({**self.implementation, "wkv": value})

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
        native_wkv = kwargs.pop("wkv_implementation", None)
        if native_wkv is not None and native_wkv not in _NATIVE_WKV_IMPLEMENTATIONS:
            raise ValueError(
                f"wkv_implementation={native_wkv!r} is not a WKV function this model knows "
                f"({_NATIVE_WKV_IMPLEMENTATIONS}); choose its WKV implementation with "
                f"implementation={{'wkv': one of {IMPLEMENTATIONS['wkv']}}}."
            )
        if "wkv_backend" in kwargs:  # the field of older configs
            self.implementation = {**(self.implementation or {}), "wkv": kwargs.pop("wkv_backend")}
        for key in _FLA_IGNORED_KEYS:
            kwargs.pop(key, None)
        for key, expected in _FLA_FIXED_VALUES.items():
            if key in kwargs and kwargs.pop(key) != expected:
                raise ValueError(f"RWKV-7 requires {key}={expected!r}; this config sets another value.")
        hidden_ratio = kwargs.pop("hidden_ratio", None)
        if hidden_ratio is not None and not (_is_number(hidden_ratio) and 0 < hidden_ratio < math.inf):
            raise ValueError(f"hidden_ratio must be a positive finite number, got {hidden_ratio!r}.")
        if hidden_ratio is not None and self.intermediate_size is None and _is_int(self.hidden_size):
            try:
                self.intermediate_size = int(hidden_ratio * self.hidden_size)
            except OverflowError as error:
                raise ValueError(f"hidden_ratio={hidden_ratio!r} * hidden_size is too large ({error}).") from None
        num_heads = kwargs.pop("num_heads", None)
        if num_heads is not None and (
            not _is_int(num_heads)
            or (_is_int(self.head_dim) and _is_int(self.hidden_size) and num_heads * self.head_dim != self.hidden_size)
        ):
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
            raise ValueError(
                "RWKV7Config needs vocab_size (token ids) or input_size (continuous features); both are None."
            )
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RWKV7Config.dropout must be in [0, 1), got {self.dropout!r}.")
        if not _is_number(self.norm_eps) or not self.norm_eps > 0:
            raise ValueError(f"RWKV7Config.norm_eps must be > 0, got {self.norm_eps!r}.")
        for name in ("tie_word_embeddings", "use_cache"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RWKV7Config.{name} must be True or False, got {getattr(self, name)!r}.")
        self._validate_token_ids()
        if self.wkv_state_dtype not in WKV_STATE_DTYPES:
            raise ValueError(
                f"RWKV7Config.wkv_state_dtype must be one of {WKV_STATE_DTYPES}, got {self.wkv_state_dtype!r}."
            )

    def _validate_token_ids(self):
        """bos / eos / pad token ids are None or ids of the vocabulary (eos may be a list of them)."""
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            for token_id in value if isinstance(value, list) else [value]:
                if token_id is None and not isinstance(value, list):
                    continue
                if not isinstance(token_id, int) or isinstance(token_id, bool):
                    raise ValueError(f"RWKV7Config.{name} must be None or an integer token id, got {value!r}.")
                if self.vocab_size is not None and not 0 <= token_id < self.vocab_size:
                    raise ValueError(
                        f"RWKV7Config.{name}={value!r} lies outside the vocabulary [0, vocab_size={self.vocab_size})."
                    )

    @property
    def num_heads(self) -> int:
        return self.hidden_size // self.head_dim

    @property
    def output_size(self) -> int:
        """Width of the encoder output (`pooler_output` is `[batch, output_size]`)."""
        return self.hidden_size

    @classmethod
    def _dict_from_json_file(cls, json_file):
        """transformers' reader, refusing JSON nested deeper than any config (`MAX_CONFIG_DEPTH`) before its recursive
        walk, so the outcome does not depend on the interpreter's recursion limit."""
        with open(json_file, encoding="utf-8") as reader:
            text = reader.read()
        too_deep = ValueError(
            f"{json_file} nests its JSON more than {MAX_CONFIG_DEPTH} levels deep: too deeply to be a config."
        )
        try:
            config_dict = json.loads(text)
        except RecursionError:
            raise too_deep from None
        if _json_depth(config_dict) > MAX_CONFIG_DEPTH:
            raise too_deep
        return cls._decode_special_floats(config_dict)

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
            + 2 * C * self.decay_low_rank_dim
            + C
            + 2 * C * self.a_low_rank_dim
            + C
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


# RWKV's recommended chat sampling, and the World vocabulary (rwkv_vocab_v20230424.txt) with its "\n\n", which ends
# every chat turn ("User: ...\n\nAssistant: ...\n\n")
CHAT_SAMPLING = {"do_sample": True, "temperature": 1.0, "top_p": 0.3, "top_k": 0}
WORLD_VOCAB_SIZE = 65536
WORLD_TURN_END_TOKEN_ID = 261


def default_generation_config(config: RWKV7Config) -> GenerationConfig:
    """The generation_config.json of the folders we publish: samples (temperature 1.0, top_p 0.3), so that a
    request's temperature and top_p apply (a server drops them when `do_sample` is False; temperature 0 asks for
    greedy), and stops at the end of sequence and, with the World vocabulary, at the end of a chat turn ("\n\n")."""
    eos_token_id = config.eos_token_id
    if config.vocab_size == WORLD_VOCAB_SIZE and eos_token_id is not None:
        eos_token_ids = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
        eos_token_id = list(dict.fromkeys([*eos_token_ids, WORLD_TURN_END_TOKEN_ID]))
    return GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos_token_id, pad_token_id=config.pad_token_id, **CHAT_SAMPLING
    )


def _json_depth(value) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), walked without recursion."""
    depth, level = 0, [value]
    while level:
        level = [
            child
            for node in level
            if isinstance(node, (dict, list))
            for child in (node.values() if isinstance(node, dict) else node)
        ]
        depth += 1
    return depth - 1


__all__ = ["RWKV7Config", "default_generation_config"]
