"""The timm ViT converter: a timm `VisionTransformer` state dict into a HF `ViTModel`.

[`timm_vit_to_hf`] maps a timm `VisionTransformer` state dict (e.g. `vit_base_patch16_224.augreg_in21k`, the
backbone the LPT authors used) to a HF `ViTModel` with LayerNorm eps 1e-5 (the authors' value; timm uses 1e-6),
built by the one backbone builder ([`lpt_peft.backbones.build_backbone`]), so it has the layout `load_backbone` gives.
The LPT authors' checkpoint converter ([`lpt_peft.interop.authors`]) reuses the mapping for their backbone.

Every dimension is read from the tensor shapes; the number of attention heads cannot be, and defaults to
`hidden_size / 64` (ViT-S/B/L/H all use 64-wide heads).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping

import torch

from lpt_peft.cli import LPTUsageError

__all__ = ["infer_vit_config", "strip_wrapper_prefixes", "timm_vit_to_hf"]

# timm keys that carry no backbone weight LPT needs: the (ImageNet-21k) classifier of timm's model.
_TIMM_IGNORED = re.compile(r"head\.(weight|bias)")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
_AUTHORS_LAYER_NORM_EPS = 1e-5


def strip_wrapper_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the `module.` (DataParallel / DDP) and `_orig_mod.` (torch.compile) prefixes from every key."""
    out = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise ValueError(f"Key {key!r} collides with another key after removing the 'module.' prefix.")
        out[name] = value
    return out


def _get(state_dict: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(
            f"The {what} lacks the key {key!r}. Expected a timm-style ViT (keys like 'cls_token', 'pos_embed', "
            "'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight', 'norm.weight'); the first keys found are "
            f"{sorted(state_dict)[:6]}."
        )
    value = state_dict[key]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"Entry {key!r} of the {what} is a {type(value).__name__}, not a tensor.")
    return value

def _check_shape(key: str, tensor: torch.Tensor, expected: tuple[int, ...], why: str = "") -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(
            f"Unexpected shape for {key!r}: got {list(tensor.shape)}, expected {list(expected)}"
            + (f" ({why})." if why else ".")
        )


def infer_vit_config(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    layer_norm_eps: float = _AUTHORS_LAYER_NORM_EPS,
):
    """Read a `ViTConfig` off the shapes of a timm-style ViT state dict.

    Hidden size, depth, MLP width, patch size, channels and image size (from the position grid, which must be square
    and include one class token) come from the tensors; heads default to `hidden_size // 64`.

    Args:
        state_dict: timm-style keys (`cls_token`, `pos_embed`, `patch_embed.proj.*`, `blocks.N.*`, `norm.*`).
        num_attention_heads: Heads per layer; required when the hidden size is not a multiple of 64.
        layer_norm_eps: Eps of every LayerNorm (1e-5 reproduces the LPT authors' backbone).

    Example:

    ```python
    >>> config = infer_vit_config(timm_state_dict)
    >>> config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.image_size
    (768, 12, 12, 224)
    ```
    """
    from transformers import ViTConfig

    what = "ViT state dict"
    proj = _get(state_dict, "patch_embed.proj.weight", what)
    if proj.dim() != 4 or proj.shape[-1] != proj.shape[-2]:
        raise ValueError(
            f"Unexpected shape for 'patch_embed.proj.weight': got {list(proj.shape)}, expected "
            "[hidden, channels, patch, patch] with square patches."
        )
    hidden, channels, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[-1])
    _check_shape("cls_token", _get(state_dict, "cls_token", what), (1, 1, hidden), "one class token")
    pos = _get(state_dict, "pos_embed", what)
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != hidden:
        raise ValueError(
            f"Unexpected shape for 'pos_embed': got {list(pos.shape)}, expected [1, 1 + patches, {hidden}]."
        )
    num_patches = int(pos.shape[1]) - 1
    grid = math.isqrt(max(num_patches, 0))
    if num_patches < 1 or grid * grid != num_patches:
        raise ValueError(
            f"'pos_embed' has {pos.shape[1]} positions; expected 1 class token + a square grid of patches (e.g. "
            "1 + 14 * 14 = 197). Models without a class token or with register tokens are not supported."
        )
    indices = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not indices:
        raise ValueError("The ViT state dict has no 'blocks.N.*' keys: it holds no transformer layers.")
    if indices != list(range(len(indices))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise ValueError(f"The ViT state dict lacks the layers {missing} (found blocks {indices}).")
    intermediate = int(_get(state_dict, "blocks.0.mlp.fc1.weight", what).shape[0])
    if num_attention_heads is None:
        if hidden % 64:
            raise LPTUsageError(
                f"Cannot infer the number of attention heads for hidden size {hidden} (not a multiple of the usual "
                "head width 64). Pass {num_attention_heads}.",
                "num_attention_heads",
            )
        num_attention_heads = hidden // 64
    if isinstance(num_attention_heads, bool) or not isinstance(num_attention_heads, int) or num_attention_heads < 1:
        raise ValueError(f"num_attention_heads must be a positive integer, got {num_attention_heads!r}.")
    if hidden % num_attention_heads:
        raise ValueError(f"num_attention_heads={num_attention_heads} does not divide the hidden size {hidden}.")
    return ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=len(indices),
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate,
        hidden_act="gelu",  # timm's nn.GELU is the exact (erf) GELU, as HF's "gelu"
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=float(layer_norm_eps),
        image_size=grid * patch,
        patch_size=patch,
        num_channels=channels,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
    )


def _timm_to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], config) -> tuple[dict[str, torch.Tensor], set]:
    """Map timm keys to `ViTModel` keys, checking every shape. Returns the new dict and the timm keys used."""
    what = "ViT state dict"
    d, inner = config.hidden_size, config.intermediate_size
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}

    def take(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = _get(state_dict, key, what)
        _check_shape(key, tensor, shape)
        used.add(key)
        return tensor.detach().to(torch.float32).clone()

    patch, channels = config.patch_size, config.num_channels
    grid = config.image_size // patch
    out["embeddings.cls_token"] = take("cls_token", (1, 1, d))
    out["embeddings.position_embeddings"] = take("pos_embed", (1, 1 + grid * grid, d))
    out["embeddings.patch_embeddings.projection.weight"] = take("patch_embed.proj.weight", (d, channels, patch, patch))
    out["embeddings.patch_embeddings.projection.bias"] = take("patch_embed.proj.bias", (d,))
    for i in range(config.num_hidden_layers):
        src, dst = f"blocks.{i}.", f"layers.{i}."
        # timm fuses q, k and v in one projection whose rows are [q; k; v].
        q, k, v = take(src + "attn.qkv.weight", (3 * d, d)).chunk(3, dim=0)
        names = ("q_proj", "k_proj", "v_proj")
        for name, tensor in zip(names, (q, k, v)):
            out[f"{dst}attention.{name}.weight"] = tensor.contiguous()
        if config.qkv_bias:
            for name, tensor in zip(names, take(src + "attn.qkv.bias", (3 * d,)).chunk(3)):
                out[f"{dst}attention.{name}.bias"] = tensor.contiguous()
        pairs = (
            ("norm1", "layernorm_before", (d,), (d,)),
            ("attn.proj", "attention.o_proj", (d, d), (d,)),
            ("norm2", "layernorm_after", (d,), (d,)),
            ("mlp.fc1", "mlp.fc1", (inner, d), (inner,)),
            ("mlp.fc2", "mlp.fc2", (d, inner), (d,)),
        )
        for timm_name, hf_name, weight_shape, bias_shape in pairs:
            out[f"{dst}{hf_name}.weight"] = take(f"{src}{timm_name}.weight", weight_shape)
            out[f"{dst}{hf_name}.bias"] = take(f"{src}{timm_name}.bias", bias_shape)
    out["layernorm.weight"] = take("norm.weight", (d,))
    out["layernorm.bias"] = take("norm.bias", (d,))
    return out, used


def _check_leftovers(leftover: list[str], strict: bool, what: str, hint: str) -> None:
    if not leftover:
        return
    message = f"The {what} has {len(leftover)} key(s) that the converter does not know: {leftover[:10]}. {hint}"
    if strict:
        escaped = message.replace("{", "{{").replace("}", "}}")
        raise LPTUsageError(escaped + " Pass {strict} to ignore them.", strict="strict=False")
    warnings.warn(message + " They are ignored (strict=False).", stacklevel=3)


def timm_vit_to_hf(
    state_dict: Mapping[str, torch.Tensor],
    num_attention_heads: int | None = None,
    layer_norm_eps: float = _AUTHORS_LAYER_NORM_EPS,
    strict: bool = True,
    attn_implementation: str = "sdpa",
):
    """Convert a timm `VisionTransformer` state dict into a HF `ViTModel` (no pooler, dropouts 0, eval mode).

    Handles the classic timm ViT layout (class token, learned absolute positions, fused `qkv`, pre-norm blocks,
    final `norm`). timm's classifier `head.*` is dropped. Variants with LayerScale, register tokens, q/k norms or
    global-average pooling have other keys and are rejected (with `strict=True`) instead of silently mis-converted.

    Args:
        state_dict: The timm state dict; `module.` prefixes are removed.
        num_attention_heads: Heads per layer (default `hidden_size // 64`: 12 for ViT-B).
        layer_norm_eps: LayerNorm eps of the HF model. 1e-5 reproduces the LPT authors' backbone; timm's own
            ViTs use 1e-6.
        strict: Raise on keys the converter does not map (other than `head.*`).
        attn_implementation: `"sdpa"` or `"eager"`.

    Returns:
        A `transformers.ViTModel`; call `.save_pretrained(folder)` to get a checkpoint folder.

    Example:

    ```python
    >>> import timm  # only needed to obtain the weights
    >>> from lpt_peft.interop.timm import timm_vit_to_hf

    >>> timm_model = timm.create_model("vit_base_patch16_224.augreg_in21k", pretrained=True)
    >>> vit = timm_vit_to_hf(timm_model.state_dict())  # LayerNorm eps 1e-5, as the LPT authors ran it
    >>> vit.save_pretrained("vit-b16-augreg-in21k-hf")
    ```
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    config = infer_vit_config(state_dict, num_attention_heads=num_attention_heads, layer_norm_eps=layer_norm_eps)
    hf_state, used = _timm_to_hf_state_dict(state_dict, config)
    leftover = sorted(k for k in state_dict if k not in used and not _TIMM_IGNORED.fullmatch(k))
    _check_leftovers(
        leftover,
        strict,
        "ViT state dict",
        "Only the classic timm ViT (class token, fused qkv, no LayerScale / registers / q-k norm) is supported.",
    )
    return _build_vit(config, hf_state, attn_implementation)


def _build_vit(config, hf_state: dict[str, torch.Tensor], attn_implementation: str):
    """The `ViTModel` of `config` (built as `load_backbone` loads it: no pooler) holding `hf_state`, in eval mode."""
    from lpt_peft.backbones import build_backbone

    model = build_backbone(config, attn_implementation=attn_implementation)
    result = model.load_state_dict(hf_state, strict=False)
    # The optional mask token (masked image modelling) is the only weight a timm ViT does not provide.
    missing = [k for k in result.missing_keys if k != "embeddings.mask_token"]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"Internal mapping error (transformers' ViT layout may have changed): missing {missing[:5]}, unexpected "
            f"{result.unexpected_keys[:5]}. This lpt_peft version supports transformers>=5.9,<6."
        )
    return model.eval()
