"""The LPT PEFT method, laid out like peft's own method folders (`peft/tuners/lora`, `vera`).

- `config.py`: [`LPTConfig`], the adapter's hyper-parameters (paper defaults);
- `layer.py`: [`LPTAttention`], a ViT attention module that also attends to prompts given as extra keys/values;
- `model.py`: [`LPTModel`], the `BaseTuner` that injects the layers and runs LPT's one- or two-pass forward;
- `architectures.py`: the registry of backbone families (ViT, DeiT, DINOv2, CLIP vision) LPT can wrap;
- `registration.py`: makes peft know the "LPT" type; importing this package runs it (idempotent).
"""

from lpt_peft.tuner.architectures import ARCHITECTURES, AttentionSpec, LPTArchitecture, register_architecture
from lpt_peft.tuner.config import LPTConfig, LPTPeftType, LptPeftType
from lpt_peft.tuner.layer import LPTAttention
from lpt_peft.tuner.model import LPTModel, LPTOutput, cosine_logits
from lpt_peft.tuner.registration import register_lpt

register_lpt()

__all__ = [
    "ARCHITECTURES",
    "AttentionSpec",
    "LPTArchitecture",
    "LPTAttention",
    "LPTConfig",
    "LPTModel",
    "LPTOutput",
    "LPTPeftType",
    "LptPeftType",
    "cosine_logits",
    "register_architecture",
    "register_lpt",
]
