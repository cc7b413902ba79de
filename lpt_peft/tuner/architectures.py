"""What LPT needs to know about a backbone, described per architecture instead of hard-coded.

LPT touches a Vision Transformer in few places: per layer, the pre-attention norm and the attention module (prompts
enter as extra keys and values, so LPT recomputes the attention with the module's own projections); at the top, the
embeddings, the final norm and the token that carries the class. An [`LPTArchitecture`] names those places for one
model family, and its [`AttentionSpec`] names the parts of the attention module. Supporting a new family means
registering one entry with [`register_architecture`] (see `docs/architectures.md`).

Built in: ViT, DeiT (CLS token by default, see [`deit_architectures`]), DINOv2 (with and without registers) and the
CLIP vision tower, each as a bare encoder and with the task heads transformers offers.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

DOCS_HINT = "docs/architectures.md"


def _resolve(root: nn.Module, path: str, what: str, owner: str) -> nn.Module:
    """`root.a.b` for `path="a.b"`, or a ValueError naming the missing step and the field to fix."""
    obj = root
    for part in path.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"The LPT architecture entry for {owner} says the {what} is at `{path}`, but "
                f"{type(obj).__name__} has no attribute {part!r}. Fix that field of the LPTArchitecture "
                f"(see {DOCS_HINT})."
            )
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class AttentionSpec:
    """The parts of a family's attention module that [`LPTAttention`] uses.

    `LPTAttention` replaces the module's forward: it projects queries, keys and values with the module's own
    projections, prepends the prompts' keys and values, calls the attention function of
    `config._attn_implementation` (eager or sdpa) with the module's scaling and dropout, and applies the output
    projection. The module must therefore hold separate query/key/value projections that map `hidden` to
    `heads * head_dim` features (a fused `qkv` projection is not supported), a `config`, and be called by its layer as
    `attention(hidden_states, attention_mask, **kwargs)` (positionally or by keyword).

    Args:
        query_attr / key_attr / value_attr / output_attr: Attribute names of the four projections.
        scaling_attr: Attribute holding the softmax scale (`"scaling"` in ViT, `"scale"` in CLIP); `None` lets the
            attention function use `head_dim ** -0.5`.
        dropout_attr: Attribute holding the attention-probability dropout rate (used in training only); `None` for no
            dropout.
        head_dim: Attribute name holding the per-head width, or a callable `(attention_module) -> int`.
        returns_weights: Whether the module returns `(attn_output, attn_weights)` (transformers' convention) rather
            than the output tensor alone.
        eager_attention: The eager attention function to fall back to. `None` uses the `eager_attention_forward` of
            the module's own modeling file, so each family keeps its exact eager semantics.

    Example:

    ```python
    >>> from lpt_peft.tuner.architectures import AttentionSpec

    >>> clip_attention = AttentionSpec(output_attr="out_proj", scaling_attr="scale", dropout_attr="dropout")
    ```
    """

    query_attr: str = "q_proj"
    key_attr: str = "k_proj"
    value_attr: str = "v_proj"
    output_attr: str = "o_proj"
    scaling_attr: str | None = "scaling"
    dropout_attr: str | None = "attention_dropout"
    head_dim: str | Callable[[nn.Module], int] = "head_dim"
    returns_weights: bool = True
    eager_attention: Callable | None = None

    def projection(self, module: nn.Module, which: str) -> nn.Module:
        """The `"query"`, `"key"`, `"value"` or `"output"` projection of `module`."""
        return getattr(module, getattr(self, f"{which}_attr"))

    def get_head_dim(self, module: nn.Module) -> int:
        """Per-head width of `module` (features per head)."""
        return int(self.head_dim(module) if callable(self.head_dim) else getattr(module, self.head_dim))

    def get_scaling(self, module: nn.Module) -> float | None:
        """Softmax scale of `module`, or None for the attention function's `head_dim ** -0.5`."""
        return None if self.scaling_attr is None else getattr(module, self.scaling_attr)

    def get_dropout(self, module: nn.Module) -> float:
        """Attention-probability dropout rate of `module` in training mode; 0.0 in eval mode or without one."""
        if self.dropout_attr is None or not module.training:
            return 0.0
        return float(getattr(module, self.dropout_attr))

    def validate(self, module: nn.Module) -> None:
        """Raise a ValueError naming the field to fix if `module` lacks something this spec points at."""
        owner = type(module).__name__
        names = {
            "query_attr": self.query_attr,
            "key_attr": self.key_attr,
            "value_attr": self.value_attr,
            "output_attr": self.output_attr,
            "scaling_attr": self.scaling_attr,
            "dropout_attr": self.dropout_attr,
        }
        if not callable(self.head_dim):
            names["head_dim"] = self.head_dim
        missing = [
            f"{key}={value!r}" for key, value in names.items() if value is not None and not hasattr(module, value)
        ]
        if not hasattr(module, "config"):
            missing.append("config (needed for config._attn_implementation)")
        if missing:
            raise ValueError(
                f"LPT cannot wrap {owner}: its AttentionSpec names attributes the module does not have: "
                f"{', '.join(missing)}. Module children: {[name for name, _ in module.named_children()]}. Pass an "
                f"AttentionSpec with the right names in the LPTArchitecture entry (see {DOCS_HINT})."
            )
        key = self.projection(module, "key")
        if not isinstance(getattr(key, "weight", None), torch.Tensor):
            raise ValueError(
                f"LPT cannot wrap {owner}: its key projection `{self.key_attr}` has no `weight` tensor; LPT needs "
                "separate Linear-like query/key/value projections (fused qkv layouts are not supported)."
            )
        head_dim = self.get_head_dim(module)
        if head_dim <= 0 or key.weight.shape[0] % head_dim:
            raise ValueError(
                f"LPT cannot wrap {owner}: head_dim={head_dim} does not divide the key projection's "
                f"{key.weight.shape[0]} output features. Fix AttentionSpec.head_dim."
            )


def default_embed(encoder: nn.Module, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    """Run `encoder.embeddings(pixel_values, ...)` the way ViT-style encoders do.

    Casts `pixel_values` to the embeddings' dtype and forwards `bool_masked_pos` / `interpolate_pos_encoding` when the
    embeddings accept them. An option that is set but not accepted raises a ValueError instead of being dropped.

    Args:
        encoder: The encoder (holding `embeddings`).
        pixel_values: `(batch, channels, height, width)` images.
        **kwargs: `bool_masked_pos` / `interpolate_pos_encoding`.

    Returns:
        `(batch, tokens, hidden)`: the input of the first layer.
    """
    embeddings = encoder.embeddings
    dtype = next(embeddings.parameters()).dtype
    if pixel_values.dtype != dtype:
        pixel_values = pixel_values.to(dtype)
    accepted = inspect.signature(embeddings.forward).parameters
    call_kwargs = {}
    for name, value in kwargs.items():
        if name in accepted:
            call_kwargs[name] = value if name != "interpolate_pos_encoding" else bool(value)
        elif value is not None and value is not False:
            raise ValueError(f"{type(encoder).__name__} does not support `{name}`; call the LPT model without it.")
    return embeddings(pixel_values, **call_kwargs)


def _dinov2_embed(encoder: nn.Module, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    # DINOv2 always resamples its position grid to the input size, so the flag has nothing left to switch on.
    kwargs.pop("interpolate_pos_encoding", None)
    return default_embed(encoder, pixel_values, **kwargs)


def _clip_embed(encoder: nn.Module, pixel_values: torch.Tensor, **kwargs) -> torch.Tensor:
    # CLIPVisionModel normalises the embeddings (`pre_layrnorm`, sic) before the first layer.
    return encoder.pre_layrnorm(default_embed(encoder, pixel_values, **kwargs))


def bidirectional_mask(encoder: nn.Module, hidden_states: torch.Tensor, attention_mask):
    """The (usually absent) padding mask in the form the encoder's attention implementation expects."""
    from transformers.masking_utils import create_bidirectional_mask

    return create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden_states, attention_mask=attention_mask)


@dataclass(frozen=True)
class LPTArchitecture:
    """Where LPT finds its pieces in one model family.

    LPT's forward runs `embed` -> `make_mask` -> each layer of `layers_attr` -> the final norm -> the token at
    `cls_index`; each layer's attention module (`attention_attr`) is wrapped by an [`LPTAttention`] that prepends the
    prompts' keys and values, computed through the layer's pre-attention norm (`norm_attr`).

    Args:
        model_classes: Names of the transformers classes this entry covers (the model passed to `get_peft_model`).
        backbone_attr: Attribute holding the encoder in task models (e.g. `"vit"` in `ViTForImageClassification`);
            `None` when the model is the encoder itself. The model's own head is not used: LPT's cosine head
            replaces it.
        layers_attr: Path from the encoder to the `nn.ModuleList` of transformer layers; dots allowed
            (`"encoder.layer"` in DINOv2).
        attention_attr: Attribute of a layer holding the attention module that LPT wraps.
        norm_attr: Attribute of a layer holding the norm applied before attention; prompts go through it. The layer
            must be pre-norm (`x + attention(norm(x))`): that is what makes prompts-as-keys exact.
        final_norm_attr: Attribute of the encoder holding the final norm (applied per token, so applying it to the
            whole sequence or to the CLS token alone is the same).
        embed: Callable `(encoder, pixel_values, **kwargs) -> hidden_states` running everything before the first
            layer; `kwargs` are `bool_masked_pos` / `interpolate_pos_encoding` when the caller passed them.
        make_mask: Callable `(encoder, hidden_states, attention_mask) -> mask` that builds the attention mask the
            layers expect (may return None).
        cls_index: Position of the token whose final state is the image feature (and the phase-2 query).
        attention: The [`AttentionSpec`] of the attention module.
        cls_only_last_layer: Whether the last layer of each pass may be computed for the class token's row only
            (keys and values still come from every token). Exact when everything in a layer but attention works
            token by token, as in all built-in families; set False for a layer that mixes tokens elsewhere.

    Example (the entry of `CLIPVisionModel`):

    ```python
    >>> from lpt_peft.tuner.architectures import AttentionSpec, LPTArchitecture, register_architecture

    >>> entry = LPTArchitecture(
    ...     model_classes=("CLIPVisionModel",),
    ...     backbone_attr=None,
    ...     layers_attr="encoder.layers",
    ...     attention_attr="self_attn",
    ...     norm_attr="layer_norm1",
    ...     final_norm_attr="post_layernorm",
    ...     embed=lambda encoder, pixel_values, **kw: encoder.pre_layrnorm(encoder.embeddings(pixel_values)),
    ...     attention=AttentionSpec(output_attr="out_proj", scaling_attr="scale", dropout_attr="dropout"),
    ... )
    ```
    """

    model_classes: tuple[str, ...]
    backbone_attr: str | None
    layers_attr: str
    attention_attr: str
    norm_attr: str
    final_norm_attr: str
    embed: Callable[..., torch.Tensor] = default_embed
    make_mask: Callable[..., object] = bidirectional_mask
    cls_index: int = 0
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    cls_only_last_layer: bool = True

    def __post_init__(self) -> None:
        classes = self.model_classes
        if isinstance(classes, str):
            classes = (classes,)
            object.__setattr__(self, "model_classes", classes)
        if not classes or not all(isinstance(name, str) and name for name in classes):
            raise TypeError(
                "LPTArchitecture.model_classes must be a non-empty tuple of class names, e.g. ('ViTModel',); got "
                f"{self.model_classes!r}."
            )
        for name in ("layers_attr", "attention_attr", "norm_attr", "final_norm_attr"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TypeError(
                    f"LPTArchitecture.{name} must be a non-empty attribute name, got {getattr(self, name)!r}."
                )
        if self.backbone_attr is not None and (not isinstance(self.backbone_attr, str) or not self.backbone_attr):
            raise TypeError(
                f"LPTArchitecture.backbone_attr must be an attribute name or None, got {self.backbone_attr!r}."
            )
        if isinstance(self.cls_index, bool) or not isinstance(self.cls_index, int) or self.cls_index < 0:
            raise TypeError(f"LPTArchitecture.cls_index must be an integer >= 0, got {self.cls_index!r}.")
        if not callable(self.embed) or not callable(self.make_mask):
            raise TypeError("LPTArchitecture.embed and LPTArchitecture.make_mask must be callables.")
        if not isinstance(self.attention, AttentionSpec):
            raise TypeError(
                f"LPTArchitecture.attention must be an AttentionSpec, got {type(self.attention).__name__}."
            )

    # Kept for code written against the first version of this class.
    @property
    def key_attr(self) -> str:
        return self.attention.key_attr

    @property
    def value_attr(self) -> str:
        return self.attention.value_attr

    def _owner(self, model: nn.Module | None = None) -> str:
        return type(model).__name__ if model is not None else self.model_classes[0]

    def encoder(self, model: nn.Module) -> nn.Module:
        """The encoder of `model`: `model.<backbone_attr>`, or `model` itself. Raises ValueError naming a bad path."""
        if not self.backbone_attr:
            return model
        return _resolve(model, self.backbone_attr, "encoder (backbone_attr)", self._owner(model))

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The transformer layers of `model` (length: depth). Raises ValueError naming a bad `layers_attr`."""
        layers = _resolve(self.encoder(model), self.layers_attr, "layer list (layers_attr)", self._owner(model))
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(
                f"The LPT architecture entry for {self._owner(model)} says the layers are at `{self.layers_attr}`, "
                f"but that is a {type(layers).__name__}, not an nn.ModuleList."
            )
        return layers

    def pre_attention_norm(self, layer: nn.Module) -> nn.Module:
        """The norm `layer` applies before attention (the prompts go through it)."""
        return _resolve(layer, self.norm_attr, "pre-attention norm (norm_attr)", type(layer).__name__)

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The encoder's final norm (applied to the feature token)."""
        return _resolve(self.encoder(model), self.final_norm_attr, "final norm (final_norm_attr)", self._owner(model))

    def image_features(
        self, model: nn.Module, pixel_values: torch.Tensor, attention_mask: torch.Tensor | None = None, **embed_kwargs
    ) -> torch.Tensor:
        """The feature LPT classifies, computed by the backbone's own modules: final norm of token `cls_index`.

        Without an active LPT adapter this is the frozen backbone's feature (what a linear probe sees); it is the
        same for every family, whereas `last_hidden_state` is normalised in ViT, DeiT and DINOv2 but not in CLIP.

        Args:
            model: A model of a class this entry covers.
            pixel_values: `(batch, channels, height, width)` float images.
            attention_mask: Optional padding mask (None for images).
            **embed_kwargs: `bool_masked_pos` / `interpolate_pos_encoding`, passed to `embed`.

        Returns:
            `(batch, hidden)` features.

        Example:

        ```python
        >>> from lpt_peft.tuner.architectures import get_architecture

        >>> features = get_architecture(backbone).image_features(backbone, pixel_values)  # (batch, hidden)
        ```
        """
        encoder = self.encoder(model)
        hidden = self.embed(encoder, pixel_values, **embed_kwargs)
        mask = self.make_mask(encoder, hidden, attention_mask)
        for layer in self.layers(model):
            hidden = layer(hidden, mask)
        return self.final_norm(model)(hidden[:, self.cls_index])

    def attention_pattern(self) -> str:
        """Regex matching the module names of the attention modules that LPT replaces."""
        prefix = rf"{re.escape(self.backbone_attr)}\." if self.backbone_attr else ""
        return rf"{prefix}{re.escape(self.layers_attr)}\.(\d+)\.{re.escape(self.attention_attr)}"


_VIT_LAYOUT = {
    "layers_attr": "layers",
    "attention_attr": "attention",
    "norm_attr": "layernorm_before",
    "final_norm_attr": "layernorm",
}
_DINOV2_LAYOUT = {
    "layers_attr": "encoder.layer",
    "attention_attr": "attention",
    "norm_attr": "norm1",
    "final_norm_attr": "layernorm",
    "embed": _dinov2_embed,
}
# CLIP's pooled output is post_layernorm(last_hidden_state[:, 0]); its last_hidden_state is *not* normalised.
_CLIP_LAYOUT = {
    "layers_attr": "encoder.layers",
    "attention_attr": "self_attn",
    "norm_attr": "layer_norm1",
    "final_norm_attr": "post_layernorm",
    "embed": _clip_embed,
    "attention": AttentionSpec(output_attr="out_proj", scaling_attr="scale", dropout_attr="dropout"),
}

DEIT_FEATURE_TOKENS = {"cls": 0, "distillation": 1}


def deit_architectures(feature_token: str = "cls") -> list[LPTArchitecture]:
    """The DeiT entries, with LPT's image feature (and phase-2 query) taken from the chosen token.

    DeiT's sequence starts with a CLS token and a distillation token. The built-in entries use the CLS token, the one
    `DeiTForImageClassification` classifies; the distillation token was trained to match a CNN teacher and is the
    other half of `DeiTForImageClassificationWithTeacher`'s prediction. The choice is not saved with the adapter:
    register the same entries before loading one trained on the distillation token.

    Args:
        feature_token: `"cls"` (default) or `"distillation"`.

    Example:

    ```python
    >>> from lpt_peft.tuner.architectures import deit_architectures, register_architecture

    >>> register_architecture(*deit_architectures("distillation"))
    ```
    """
    if feature_token not in DEIT_FEATURE_TOKENS:
        raise ValueError(f"feature_token must be one of {sorted(DEIT_FEATURE_TOKENS)}, got {feature_token!r}.")
    index = DEIT_FEATURE_TOKENS[feature_token]
    return [
        LPTArchitecture(model_classes=("DeiTModel",), backbone_attr=None, cls_index=index, **_VIT_LAYOUT),
        LPTArchitecture(
            model_classes=("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"),
            backbone_attr="deit",
            cls_index=index,
            **_VIT_LAYOUT,
        ),
    ]


ARCHITECTURES: list[LPTArchitecture] = [
    LPTArchitecture(model_classes=("ViTModel",), backbone_attr=None, **_VIT_LAYOUT),
    LPTArchitecture(model_classes=("ViTForImageClassification",), backbone_attr="vit", **_VIT_LAYOUT),
    *deit_architectures("cls"),
    LPTArchitecture(model_classes=("Dinov2Model", "Dinov2WithRegistersModel"), backbone_attr=None, **_DINOV2_LAYOUT),
    LPTArchitecture(model_classes=("Dinov2ForImageClassification",), backbone_attr="dinov2", **_DINOV2_LAYOUT),
    LPTArchitecture(
        model_classes=("Dinov2WithRegistersForImageClassification",),
        backbone_attr="dinov2_with_registers",
        **_DINOV2_LAYOUT,
    ),
    LPTArchitecture(model_classes=("CLIPVisionModel",), backbone_attr=None, **_CLIP_LAYOUT),
    LPTArchitecture(
        model_classes=("CLIPForImageClassification", "CLIPVisionModelWithProjection"),
        backbone_attr="vision_model",
        **_CLIP_LAYOUT,
    ),
]


def register_architecture(*architectures: LPTArchitecture) -> None:
    """Make LPT support another model family, or change how it handles a built-in one.

    Entries registered later are checked first, so an entry for a class that is already supported overrides it. The
    registry lives in this process only: register again (before `PeftModel.from_pretrained`) in every process that
    builds or loads an adapter.

    Example:

    ```python
    >>> from lpt_peft.tuner.architectures import LPTArchitecture, register_architecture

    >>> register_architecture(
    ...     LPTArchitecture(
    ...         model_classes=("ViTMSNModel",),
    ...         backbone_attr=None,
    ...         layers_attr="layers",
    ...         attention_attr="attention",
    ...         norm_attr="layernorm_before",
    ...         final_norm_attr="layernorm",
    ...     )
    ... )
    ```
    """
    if not architectures:
        raise TypeError("register_architecture needs at least one LPTArchitecture.")
    for architecture in architectures:
        if not isinstance(architecture, LPTArchitecture):
            raise TypeError(
                f"register_architecture expects LPTArchitecture entries, got {type(architecture).__name__}. Build "
                f"one with lpt_peft.tuner.architectures.LPTArchitecture(...) (see {DOCS_HINT})."
            )
    ARCHITECTURES[0:0] = architectures


def supported_model_classes() -> list[str]:
    """Sorted names of every class `get_peft_model` accepts (all registered `LPTArchitecture.model_classes`)."""
    return sorted({name for arch in ARCHITECTURES for name in arch.model_classes})


def get_architecture(model: nn.Module) -> LPTArchitecture:
    """Return the [`LPTArchitecture`] of `model`, or raise a `TypeError` that names the supported classes."""
    name = type(model).__name__
    for arch in ARCHITECTURES:
        if name in arch.model_classes:
            return arch
    raise TypeError(
        f"LPT does not support {name}. Supported base models: {', '.join(supported_model_classes())}. Load your "
        "backbone as one of these (e.g. `ViTModel.from_pretrained(...)`), or, for another pre-norm ViT with a CLS "
        "token, describe it with an `lpt_peft.tuner.architectures.LPTArchitecture` and pass it to "
        f"`lpt_peft.tuner.architectures.register_architecture` (worked example in {DOCS_HINT})."
    )


@dataclass(frozen=True)
class BackboneFamily:
    """How to load one model family's checkpoints as an LPT backbone: the facts the loader, inference and card share.

    [`LPTArchitecture`] says where LPT finds its pieces inside a loaded model; a `BackboneFamily` says how to get that
    model from a checkpoint folder or Hub id. [`lpt_peft.backbones.load_backbone`] (used by training, by
    [`lpt_peft.inference.load_classifier`] and by the converters) and the model card read these facts from
    [`BACKBONE_FAMILIES`] and nowhere else.

    Args:
        model_type: The transformers `config.model_type` of the family's checkpoints (e.g. `"vit"`).
        base_class: Name of the transformers class holding the bare encoder (e.g. `"ViTModel"`); a checkpoint whose
            `config.architectures` names another supported class of the family (e.g. `ViTForImageClassification`)
            is loaded as that class, so an adapter trained on it finds its layers at the same names.
        name: Human-readable family name shown in the model card (default: `model_type`).
        base_kwargs: Keyword arguments `base_class` is built or loaded with (e.g. `{"add_pooling_layer": False}`:
            LPT reads the CLS token after the final norm, so the pooler would only be an unused, randomly initialised
            layer). Not passed to the task classes.
        any_image_size: Whether the encoder runs on images of any size without being told (DINOv2 always resamples
            its position grid to the input). When False, the loader refuses an image size other than
            `config.image_size`.
        config_model_types: Other `model_type`s whose checkpoints hold this family's encoder and load into
            `base_class` (e.g. `"clip"`: a full CLIP checkpoint loads into `CLIPVisionModel`).

    Example:

    ```python
    >>> from lpt_peft.tuner.architectures import BackboneFamily, register_backbone_family

    >>> register_backbone_family(
    ...     BackboneFamily(model_type="vit_msn", base_class="ViTMSNModel", name="ViT-MSN")
    ... )
    ```
    """

    model_type: str
    base_class: str
    name: str = ""
    base_kwargs: dict = field(default_factory=dict)
    any_image_size: bool = False
    config_model_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("model_type", "base_class"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TypeError(f"BackboneFamily.{name} must be a non-empty string, got {getattr(self, name)!r}.")
        if not self.name:
            object.__setattr__(self, "name", self.model_type)
        object.__setattr__(self, "base_kwargs", dict(self.base_kwargs))
        object.__setattr__(self, "config_model_types", tuple(self.config_model_types))

    @property
    def model_types(self) -> tuple[str, ...]:
        """Every `config.model_type` this family loads."""
        return (self.model_type, *self.config_model_types)

    def load_kwargs(self, class_name: str) -> dict:
        """Keyword arguments to build or load `class_name` with: `base_kwargs` for the base class, none otherwise."""
        return dict(self.base_kwargs) if class_name == self.base_class else {}


BACKBONE_FAMILIES: list[BackboneFamily] = [
    BackboneFamily("vit", "ViTModel", "ViT", base_kwargs={"add_pooling_layer": False}),
    BackboneFamily("deit", "DeiTModel", "DeiT", base_kwargs={"add_pooling_layer": False}),
    BackboneFamily("dinov2", "Dinov2Model", "DINOv2", any_image_size=True),
    BackboneFamily("dinov2_with_registers", "Dinov2WithRegistersModel", "DINOv2 with registers", any_image_size=True),
    BackboneFamily("clip_vision_model", "CLIPVisionModel", "CLIP vision tower", config_model_types=("clip",)),
]


def register_backbone_family(*families: BackboneFamily) -> None:
    """Let [`lpt_peft.backbones.load_backbone`] (and so training, `load_classifier` and the card) load a family.

    Entries registered later are checked first, so a family registered for a built-in `model_type` overrides it.
    Register the family's [`LPTArchitecture`] entries too ([`register_architecture`]): the family says how to load
    a checkpoint, the architecture where LPT finds the layers. Like the architecture registry, this one lives in this
    process only.

    Raises:
        TypeError: an entry is not a `BackboneFamily`.
    """
    if not families:
        raise TypeError("register_backbone_family needs at least one BackboneFamily.")
    for family in families:
        if not isinstance(family, BackboneFamily):
            raise TypeError(
                f"register_backbone_family expects BackboneFamily entries, got {type(family).__name__} (see "
                f"{DOCS_HINT})."
            )
    BACKBONE_FAMILIES[0:0] = families


def supported_model_types() -> list[str]:
    """The `config.model_type`s the backbone loader accepts."""
    return sorted({model_type for family in BACKBONE_FAMILIES for model_type in family.model_types})


def get_backbone_family(model_type: str) -> BackboneFamily:
    """The [`BackboneFamily`] loading checkpoints of `model_type`.

    Raises:
        ValueError: no registered family loads `model_type`; the message lists those that do.
    """
    for family in BACKBONE_FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(
        f"LPT cannot load a {model_type!r} checkpoint as a backbone. Supported model types: "
        f"{', '.join(supported_model_types())}. For another pre-norm ViT with a CLS token, register a "
        f"BackboneFamily and its LPTArchitecture entries (see {DOCS_HINT})."
    )


def family_of(model: nn.Module) -> BackboneFamily:
    """The [`BackboneFamily`] of a loaded model (a supported class), read from its encoder's `config.model_type`.

    Raises:
        TypeError: `model` is not of a supported class (see [`get_architecture`]).
        ValueError: its model type has no registered family.
    """
    config = get_architecture(model).encoder(model).config
    return get_backbone_family(getattr(config, "model_type", None) or type(model).__name__)


# What an adapter records about its backbone (LPTConfig.base_fingerprint); hidden size and depth are LPTConfig fields.
FINGERPRINT_FIELDS = ("model_type", "num_attention_heads", "patch_size", "image_size", "weights_sample")
_SAMPLES_PER_TENSOR = 8
# bf16 keeps 8 significant bits (relative error <= 2**-9), so the same weights loaded in fp32, fp16 or bf16 agree
# within this tolerance, while two different checkpoints (or a random init) differ far more at these positions.
_SAMPLE_RTOL, _SAMPLE_ATOL = 1e-2, 1e-5


def _plain(value):
    """JSON-stable form of a config value (tuples become lists, as they come back from adapter_config.json)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _weights_sample(model: nn.Module, architecture: LPTArchitecture) -> list[float] | None:
    layers = architecture.layers(model)
    tensors = []
    for layer in (layers[0], layers[-1]):
        attention = getattr(layer, architecture.attention_attr)
        attention = getattr(attention, "base_layer", attention)  # already wrapped by LPTAttention
        tensors.append(architecture.attention.projection(attention, "key").weight)
    tensors.append(getattr(architecture.final_norm(model), "weight", None))
    values = []
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.is_meta or tensor.numel() == 0:
            return None
        flat = tensor.detach().reshape(-1)
        index = torch.linspace(0, flat.numel() - 1, _SAMPLES_PER_TENSOR).round().long().to(flat.device)
        values += [float(f"{v:.6g}") for v in flat[index].float().cpu().tolist()]
    return values


def base_fingerprint(model: nn.Module) -> dict:
    """What an LPT adapter depends on in its backbone, beyond the hidden size and depth.

    Recorded in `LPTConfig.base_fingerprint` when the adapter is created and compared by [`fingerprint_differences`]
    whenever it is loaded. Fields (a field that is None on either side is not compared):

    - `model_type`, `num_attention_heads`, `patch_size`, `image_size`: from the encoder's transformers config.
    - `weights_sample`: 24 float values, 8 at evenly spaced fixed positions of each of the first layer's key
      projection weight, the last layer's key projection weight, and the final norm's weight. A sample rather than a
      hash, compared with a relative tolerance of 1e-2: a hash of the bytes would reject the same checkpoint loaded in
      bfloat16 or float16, and reading the full weights would cost as much as loading them again.

    Args:
        model: The base model (a supported class, plain or already wrapped by LPT).

    Returns:
        `dict` with the keys of `FINGERPRINT_FIELDS`.
    """
    architecture = get_architecture(model)
    config = architecture.encoder(model).config
    return {
        "model_type": getattr(config, "model_type", None) or None,
        "num_attention_heads": _plain(getattr(config, "num_attention_heads", None)),
        "patch_size": _plain(getattr(config, "patch_size", None)),
        "image_size": _plain(getattr(config, "image_size", None)),
        "weights_sample": _weights_sample(model, architecture),
    }


def _short(values, limit: int = 4) -> str:
    if isinstance(values, list) and len(values) > limit and all(isinstance(v, float) for v in values):
        return "[" + ", ".join(f"{v:.4g}" for v in values[:limit]) + f", ...] ({len(values)} values)"
    return repr(values)


def fingerprint_differences(recorded: dict | None, current: dict) -> list[str]:
    """`"field: adapter X, base Y"` for each field of an adapter's fingerprint `recorded` contradicted by `current`.

    Args:
        recorded: The adapter's `LPTConfig.base_fingerprint` (None: nothing to compare).
        current: [`base_fingerprint`] of the base it is loaded into.

    Returns:
        One line per contradicted field; empty when they agree (a field None on either side is not compared).
    """
    differences = []
    for name in FINGERPRINT_FIELDS:
        old, new = (recorded or {}).get(name), current.get(name)
        if old is None or new is None:
            continue
        if name == "weights_sample":
            same = len(old) == len(new) and torch.allclose(
                torch.tensor(old, dtype=torch.float64),
                torch.tensor(new, dtype=torch.float64),
                rtol=_SAMPLE_RTOL,
                atol=_SAMPLE_ATOL,
            )
            if not same:
                differences.append(
                    f"weights_sample (key projections of the first and last layer, final norm): adapter "
                    f"{_short(old)}, base {_short(new)} -- the backbone's weights are not the ones it was trained on"
                )
        elif _plain(old) != _plain(new):
            differences.append(f"{name}: adapter {old!r}, base {new!r}")
    return differences


__all__ = [
    "ARCHITECTURES",
    "AttentionSpec",
    "BACKBONE_FAMILIES",
    "BackboneFamily",
    "FINGERPRINT_FIELDS",
    "LPTArchitecture",
    "base_fingerprint",
    "bidirectional_mask",
    "deit_architectures",
    "default_embed",
    "family_of",
    "fingerprint_differences",
    "get_architecture",
    "get_backbone_family",
    "register_architecture",
    "register_backbone_family",
    "supported_model_classes",
    "supported_model_types",
]
