"""RWKV-7 "Goose" for Hugging Face transformers. Importing this package registers the `rwkv7` model type with
the Auto classes."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from .cache_rwkv7 import RWKV7Cache
from .configuration_rwkv7 import RWKV7Config
from .modeling_rwkv7 import (
    RWKV7ForCausalLM,
    RWKV7ForSequenceClassification,
    RWKV7Model,
    RWKV7PreTrainedModel,
)
from .tokenization_rwkv7 import RWKV7Tokenizer

AutoConfig.register("rwkv7", RWKV7Config, exist_ok=True)
AutoModel.register(RWKV7Config, RWKV7Model, exist_ok=True)
AutoModelForCausalLM.register(RWKV7Config, RWKV7ForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(RWKV7Config, RWKV7ForSequenceClassification, exist_ok=True)
AutoTokenizer.register(RWKV7Config, slow_tokenizer_class=RWKV7Tokenizer, exist_ok=True)

# save_pretrained writes `auto_map` and copies the code, so published folders load with trust_remote_code=True
RWKV7Config.register_for_auto_class()
RWKV7Model.register_for_auto_class("AutoModel")
RWKV7ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
RWKV7ForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
RWKV7Tokenizer.register_for_auto_class("AutoTokenizer")

__all__ = [
    "RWKV7Cache",
    "RWKV7Config",
    "RWKV7ForCausalLM",
    "RWKV7ForSequenceClassification",
    "RWKV7Model",
    "RWKV7PreTrainedModel",
    "RWKV7Tokenizer",
]
