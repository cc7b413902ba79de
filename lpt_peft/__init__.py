"""Long-tailed Prompt Tuning (LPT, Dong et al., ICLR 2023) as a HuggingFace PEFT method for Vision Transformers.

Importing this package registers the "LPT" PEFT type with peft; do it before `PeftModel.from_pretrained`.

Layout: `lpt_peft.tuner` is the PEFT method itself (config, layer, model, backbone families); `lpt_peft.training`
the two-phase recipe (arguments, data loaders, checkpointing, the loop, losses, samplers, baselines);
`lpt_peft.data` the long-tailed data sets; `lpt_peft.evaluation` metrics, plots, reports and the model card;
`lpt_peft.interop` converters (timm ViTs, the authors' checkpoints, the offline demo backbone);
`lpt_peft.inference` loading a trained adapter as a classifier.
"""

from lpt_peft.tuner import (
    ARCHITECTURES,
    AttentionSpec,
    LPTArchitecture,
    LPTAttention,
    LPTConfig,
    LPTModel,
    LPTOutput,
    LPTPeftType,
    LptPeftType,
    cosine_logits,
    register_architecture,
    register_lpt,
)

__version__ = "0.1.0"

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
