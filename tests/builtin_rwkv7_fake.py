"""A stand-in for a transformers release that ships its own RWKV-7 (model_type "rwkv7", `Rwkv7Config`,
`Rwkv7ForCausalLM`, as in the "Add RWKV-7 (Goose)" pull request): `install()` makes it look built in (module
`transformers.models.rwkv7`, listed in transformers' own Auto mappings) before anything imports `modeling_rwkv7`.

Its model holds the native layout (the official tensors under `rwkv7.`, a top-level `head.weight`, layer 0's
v0/v1/v2) and computes its logits with the official `rwkv` package, so it is an independent truth as well."""

import sys
import tempfile
import types

import oracle
import torch
from torch import nn


def _define(module_name: str):
    from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class Rwkv7Config(PreTrainedConfig):
        model_type = "rwkv7"

        vocab_size: int = 65536
        hidden_size: int = 768
        num_hidden_layers: int = 12
        head_dim: int = 64
        num_heads: int = 12
        decay_low_rank_dim: int = 64
        a_low_rank_dim: int = 64
        v_low_rank_dim: int = 32
        gate_low_rank_dim: int = 128
        intermediate_size: int | None = None
        norm_eps: float = 1e-5
        norm_bias: bool = True
        tie_word_embeddings: bool = False
        use_cache: bool = True
        use_deep_embed: bool = False
        wkv_state_dtype: str = "float32"
        bos_token_id: int | None = 0
        eos_token_id: int | None = 0
        pad_token_id: int | None = 0

        def __post_init__(self, **kwargs):
            if self.num_heads != self.hidden_size // self.head_dim:
                raise ValueError(
                    f"num_heads must be hidden_size // head_dim = {self.hidden_size // self.head_dim}, "
                    f"got {self.num_heads}"
                )
            super().__post_init__(**kwargs)

    class Rwkv7ForCausalLM(PreTrainedModel, GenerationMixin):
        config: Rwkv7Config
        base_model_prefix = "rwkv7"

        def __init__(self, config):
            super().__init__(config)
            C, H, N = config.hidden_size, config.num_heads, config.head_dim
            F = config.intermediate_size or 4 * C
            ranks = {
                "w": config.decay_low_rank_dim,
                "a": config.a_low_rank_dim,
                "v": config.v_low_rank_dim,
                "g": config.gate_low_rank_dim,
            }
            self.rwkv7 = nn.Module()
            self.rwkv7.emb = nn.Embedding(config.vocab_size, C)
            self.rwkv7.blocks = nn.ModuleList()
            for layer in range(config.num_hidden_layers):
                block = nn.Module()
                norms = ("ln0", "ln1", "ln2") if layer == 0 else ("ln1", "ln2")
                for norm in norms:
                    setattr(block, norm, nn.LayerNorm(C))
                block.att, block.ffn = nn.Module(), nn.Module()
                for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
                    setattr(block.att, name, nn.Parameter(torch.zeros(1, 1, C)))
                for lora, rank in ranks.items():
                    setattr(block.att, f"{lora}1", nn.Parameter(torch.zeros(C, rank)))
                    setattr(block.att, f"{lora}2", nn.Parameter(torch.zeros(rank, C)))
                block.att.r_k = nn.Parameter(torch.zeros(H, N))
                for proj in ("receptance", "key", "value", "output"):
                    setattr(block.att, proj, nn.Linear(C, C, bias=False))
                block.att.ln_x = nn.GroupNorm(H, C)
                block.ffn.x_k = nn.Parameter(torch.zeros(1, 1, C))
                block.ffn.key = nn.Linear(C, F, bias=False)
                block.ffn.value = nn.Linear(F, C, bias=False)
                self.rwkv7.blocks.append(block)
            self.rwkv7.ln_out = nn.LayerNorm(C)
            self.head = nn.Linear(C, config.vocab_size, bias=False)
            self.post_init()

        def _init_weights(self, module):
            pass

        def forward(self, input_ids, **kwargs):
            """Logits `[batch, seq, vocab]` from the official `rwkv` package run on this model's weights."""
            official = {name.removeprefix("rwkv7."): t.detach().float() for name, t in self.state_dict().items()}
            for name in ("att.v0", "att.v1", "att.v2"):
                official.pop(f"blocks.0.{name}")
            with tempfile.TemporaryDirectory() as folder:
                path = oracle.write_official_checkpoint(official, folder)
                rwkv_model = oracle.load_oracle(path)
                logits = [oracle.oracle_logits(rwkv_model, row.tolist())[0] for row in input_ids]
            return CausalLMOutput(logits=torch.stack(logits))

    for cls in (Rwkv7Config, Rwkv7ForCausalLM):
        cls.__module__ = module_name
    return Rwkv7Config, Rwkv7ForCausalLM


def install() -> None:
    """Make transformers look as if it shipped model_type "rwkv7" (call before importing `modeling_rwkv7`)."""
    from transformers.models.auto import configuration_auto, modeling_auto

    module_name = "transformers.models.rwkv7"
    module = types.ModuleType(module_name)
    module.Rwkv7Config, module.Rwkv7ForCausalLM = _define(module_name)
    sys.modules[module_name] = module
    configuration_auto.CONFIG_MAPPING_NAMES["rwkv7"] = "Rwkv7Config"
    modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["rwkv7"] = "Rwkv7ForCausalLM"
    modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING._reverse_config_mapping["Rwkv7Config"] = "rwkv7"
