"""What LPT needs to know about a backbone, described per architecture instead of hard-coded.

LPT touches a Vision Transformer in few places: per layer, the pre-attention norm and the key/value projections of the
attention (prompts enter as extra keys and values); at the top, the final norm and the token that carries the class.
An [`LPTArchitecture`] names those places for one model family; supporting a new family means adding one entry to
[`ARCHITECTURES`].
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LPTArchitecture:
    """Where LPT finds its pieces in one model family.

    Args:
        model_classes: Names of the transformers classes this entry covers (the model passed to `get_peft_model`).
        backbone_attr: Attribute holding the encoder in task models (e.g. `"vit"` in `ViTForImageClassification`);
            `None` when the model is the encoder itself.
        layers_attr: Attribute of the encoder that holds the `nn.ModuleList` of transformer layers.
        attention_attr: Attribute of a layer holding the attention module that LPT wraps.
        norm_attr: Attribute of a layer holding the norm applied before attention; prompts go through it.
        key_attr / value_attr: Attributes of the attention module holding the key and value projections.
        final_norm_attr: Attribute of the encoder holding the final norm.
        cls_index: Position of the token whose final state is the image feature.
        embed: Callable `(encoder, pixel_values, **kwargs) -> hidden_states` running the embeddings.
        make_mask: Callable `(encoder, hidden_states, attention_mask) -> mask` that builds the attention mask the
            layers expect (may return None).
    """

    model_classes: tuple[str, ...]
    backbone_attr: str | None
    layers_attr: str
    attention_attr: str
    norm_attr: str
    key_attr: str
    value_attr: str
    final_norm_attr: str
    cls_index: int
    embed: Callable[..., torch.Tensor]
    make_mask: Callable[..., object]

    def encoder(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.backbone_attr) if self.backbone_attr else model

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.encoder(model), self.layers_attr)

    def attention_pattern(self) -> str:
        """Regex matching the module names of the attention modules that LPT replaces."""
        prefix = rf"{re.escape(self.backbone_attr)}\." if self.backbone_attr else ""
        return rf"{prefix}{re.escape(self.layers_attr)}\.(\d+)\.{re.escape(self.attention_attr)}"


def _vit_embed(encoder: nn.Module, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    expected_dtype = encoder.embeddings.patch_embeddings.projection.weight.dtype
    if pixel_values.dtype != expected_dtype:
        pixel_values = pixel_values.to(expected_dtype)
    return encoder.embeddings(
        pixel_values,
        bool_masked_pos=kwargs.get("bool_masked_pos"),
        interpolate_pos_encoding=kwargs.get("interpolate_pos_encoding") or False,
    )


def _bidirectional_mask(encoder: nn.Module, hidden_states: torch.Tensor, attention_mask):
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden_states, attention_mask=attention_mask)


_VIT_COMMON = {
    "layers_attr": "layers",
    "attention_attr": "attention",
    "norm_attr": "layernorm_before",
    "key_attr": "k_proj",
    "value_attr": "v_proj",
    "final_norm_attr": "layernorm",
    "cls_index": 0,
    "embed": _vit_embed,
    "make_mask": _bidirectional_mask,
}

ARCHITECTURES: list[LPTArchitecture] = [
    LPTArchitecture(model_classes=("ViTModel",), backbone_attr=None, **_VIT_COMMON),
    LPTArchitecture(model_classes=("ViTForImageClassification",), backbone_attr="vit", **_VIT_COMMON),
]


def register_architecture(architecture: LPTArchitecture) -> None:
    """Make LPT support another model family (checked before the built-in entries)."""
    ARCHITECTURES.insert(0, architecture)


def supported_model_classes() -> list[str]:
    return sorted(name for arch in ARCHITECTURES for name in arch.model_classes)


def get_architecture(model: nn.Module) -> LPTArchitecture:
    """Return the [`LPTArchitecture`] of `model`, or raise a `TypeError` that names the supported classes."""
    name = type(model).__name__
    for arch in ARCHITECTURES:
        if name in arch.model_classes:
            return arch
    raise TypeError(
        f"LPT does not support {name}. Supported base models: {', '.join(supported_model_classes())}. Load your "
        "backbone as one of these (e.g. `ViTModel.from_pretrained(...)`), or describe your architecture with an "
        "`lpt_peft.architectures.LPTArchitecture` passed to `lpt_peft.architectures.register_architecture`."
    )
