"""Long-tailed Prompt Tuning (LPT, Dong et al., ICLR 2023) as a HuggingFace PEFT method for Vision Transformers.

Importing this package registers the "LPT" PEFT type with peft; do it before `PeftModel.from_pretrained`.

Layout: `lpt_peft.tuner` is the PEFT method itself (config, layer, model, backbone families); `lpt_peft.training`
the two-phase recipe (arguments, data loaders, checkpointing, the loop, losses, samplers, baselines);
`lpt_peft.data` the long-tailed data sets; `lpt_peft.evaluation` metrics, plots, reports and the model card;
`lpt_peft.interop` converters (timm ViTs, the authors' checkpoints, the offline demo backbone);
`lpt_peft.inference` loading a trained adapter as a classifier (`lpt_peft.load_classifier`).

`pip install lpt-peft` is enough for all of the above except training, data sets, metrics and plots, which need
`pip install 'lpt-peft[train]'`: this package imports only the method itself; the rest loads on first use.
"""

from lpt_peft._extras import lazy_exports
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

# Loaded on first access: the classifier imports PIL and the preprocessing, which `get_peft_model` does not need.
__getattr__, __dir__, _lazy_names = lazy_exports(
    __name__, {"lpt_peft.inference": ["LPTImageClassifier", "load_classifier"]}
)

__all__ = [
    *_lazy_names,
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
