"""The Baichuan-M1 hybrid-attention model on the transformers side.

Importing this package registers model_type "baichuan_m1" with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(path)` loads in-repo checkpoints and the released
Baichuan-M1-14B weights without remote code.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)

from .configuration import BaichuanM1Config
from .modeling import (
    BaichuanM1Cache,
    BaichuanM1ForCausalLM,
    BaichuanM1ForSequenceClassification,
    BaichuanM1Model,
    BaichuanM1PreTrainedModel,
)
from .presets import PRESETS, preset_config


def register() -> None:
    """Register baichuan_m1 with AutoConfig and the Auto model classes; safe to call more than once."""
    AutoConfig.register(BaichuanM1Config.model_type, BaichuanM1Config, exist_ok=True)
    for auto_class, model_class in (
        (AutoModel, BaichuanM1Model),
        (AutoModelForCausalLM, BaichuanM1ForCausalLM),
        (AutoModelForSequenceClassification, BaichuanM1ForSequenceClassification),
    ):
        auto_class.register(BaichuanM1Config, model_class, exist_ok=True)


register()

__all__ = [
    "BaichuanM1Cache",
    "BaichuanM1Config",
    "BaichuanM1ForCausalLM",
    "BaichuanM1ForSequenceClassification",
    "BaichuanM1Model",
    "BaichuanM1PreTrainedModel",
    "PRESETS",
    "preset_config",
    "register",
]
