"""RWKV-7 "Goose" for Hugging Face transformers. Importing this package registers our classes with the Auto
classes (`register_auto_classes`).

Coexistence with a transformers release that ships its own RWKV-7 (model_type "rwkv7" too, `Rwkv7Config` /
`Rwkv7ForCausalLM`): importing this package never replaces it. `AutoConfig` / `AutoModel*` keep resolving "rwkv7"
folders to transformers' classes, and a warning says so; our classes load both layouts by name
(`RWKV7ForCausalLM.from_pretrained(folder)`), a folder we wrote loads ours through its `auto_map` with
`trust_remote_code=True`, and `register_auto_classes(replace_builtin=True)` makes the Auto classes resolve "rwkv7" to
ours. Transformers' class cannot read our layout (other tensor names): convert a folder for it with
`rwkv7-convert FOLDER OUT --layout native`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.utils import logging

from .cache_rwkv7 import RWKV7Cache
from .configuration_rwkv7 import RWKV7Config
from .conversion_mapping_rwkv7 import native_weight_conversions
from .modeling_rwkv7 import (
    RWKV7ForCausalLM,
    RWKV7ForSequenceClassification,
    RWKV7Model,
    RWKV7PreTrainedModel,
)
from .tokenization_rwkv7 import RWKV7Tokenizer, RWKV7TokenizerFast

logger = logging.get_logger(__name__)


def transformers_ships_rwkv7() -> bool:
    """Whether the installed transformers has its own model_type "rwkv7" (not one registered at run time)."""
    return RWKV7Config.model_type in CONFIG_MAPPING_NAMES


def register_auto_classes(replace_builtin: bool = False) -> None:
    """Register our config, models and tokenizer with the Auto classes (done on import with the default).

    replace_builtin: when transformers ships its own "rwkv7", make `AutoConfig` (and so `AutoModel*`) resolve
        "rwkv7" folders to our classes instead of its; without it, its classes stay and a warning says how to
        reach ours. Ignored when transformers has no "rwkv7" of its own.
    """
    if transformers_ships_rwkv7() and not replace_builtin:
        logger.warning(
            "This transformers ships its own RWKV-7 (model_type 'rwkv7'): AutoConfig and AutoModel* keep loading "
            "'rwkv7' folders with its classes. modeling_rwkv7's classes load both layouts by name "
            "(modeling_rwkv7.RWKV7ForCausalLM.from_pretrained(folder)); "
            "modeling_rwkv7.register_auto_classes(replace_builtin=True) makes the Auto classes use them."
        )
    else:
        AutoConfig.register(RWKV7Config.model_type, RWKV7Config, exist_ok=True)
    # keyed by our config class: these shadow nothing
    AutoModel.register(RWKV7Config, RWKV7Model, exist_ok=True)
    AutoModelForCausalLM.register(RWKV7Config, RWKV7ForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(RWKV7Config, RWKV7ForSequenceClassification, exist_ok=True)
    AutoTokenizer.register(
        RWKV7Config, slow_tokenizer_class=RWKV7Tokenizer, fast_tokenizer_class=RWKV7TokenizerFast, exist_ok=True
    )


register_auto_classes()

# from_pretrained of our classes also reads the layout of transformers' own RWKV-7 (`rwkv7.*` names, `head.weight`)
for _model_class in (RWKV7Model, RWKV7ForCausalLM, RWKV7ForSequenceClassification):
    register_checkpoint_conversion_mapping(_model_class.__name__, native_weight_conversions(), overwrite=True)

# save_pretrained writes `auto_map` and copies the code, so published folders load with trust_remote_code=True
RWKV7Config.register_for_auto_class()
RWKV7Model.register_for_auto_class("AutoModel")
RWKV7ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
RWKV7ForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
RWKV7Tokenizer.register_for_auto_class("AutoTokenizer")
RWKV7TokenizerFast.register_for_auto_class("AutoTokenizer")

__all__ = [
    "RWKV7Cache",
    "RWKV7Config",
    "RWKV7ForCausalLM",
    "RWKV7ForSequenceClassification",
    "RWKV7Model",
    "RWKV7PreTrainedModel",
    "RWKV7Tokenizer",
    "RWKV7TokenizerFast",
    "register_auto_classes",
    "transformers_ships_rwkv7",
]
