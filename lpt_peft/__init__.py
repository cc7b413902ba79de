"""Long-tailed Prompt Tuning (LPT, Dong et al., ICLR 2023) as a HuggingFace PEFT method for Vision Transformers.

Importing this package registers the "LPT" PEFT type with peft; do it before `PeftModel.from_pretrained`.
"""

from .architectures import ARCHITECTURES, AttentionSpec, LPTArchitecture, register_architecture
from .config import LPTConfig, LptPeftType
from .layer import LPTAttention
from .model import LPTModel, LPTOutput, cosine_logits
from .registration import register_lpt

register_lpt()

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "AttentionSpec",
    "LPTArchitecture",
    "LPTAttention",
    "LPTConfig",
    "LPTModel",
    "LPTOutput",
    "LptPeftType",
    "cosine_logits",
    "register_architecture",
    "register_lpt",
]
