"""Image classification with a saved LPT adapter, shaped like `transformers.pipeline("image-classification")`.

```python
>>> import lpt_peft
>>> from lpt_peft.inference import load_classifier

>>> classifier = load_classifier("converted/base", "converted/adapter")  # folders or Hub ids
>>> classifier("photo.jpg", top_k=3)
[{'label': 'airfield', 'score': 0.71}, {'label': 'runway', 'score': 0.12}, {'label': 'hangar', 'score': 0.05}]
```

Why not the transformers pipeline itself: it reads labels and the number of classes from the *base* model's config
(a `ViTModel` has none, so it fails with `KeyError`), and it turns the logits into scores with a plain softmax. LPT's
logits are cosines in [-1, 1], so a plain softmax gives nearly uniform scores; this module applies the adapter's
`logit_scale` (20 by default, the scale of LPT's training loss) first. See docs/interop.md.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import nn

from lpt_peft.data.transforms import LPTImageTransform, decode_image

__all__ = [
    "PREPROCESSOR_FILE",
    "LPTImageClassifier",
    "load_classifier",
    "load_preprocessing",
    "save_preprocessing",
]

PREPROCESSOR_FILE = "preprocessor_config.json"
_RESAMPLE_NAMES = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_CODES = {name: code for code, name in _RESAMPLE_NAMES.items()}
_DEFAULT_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_STD = (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------------------------- preprocessing
def save_preprocessing(
    directory: str | os.PathLike,
    image_size: int = 224,
    resize_size: int | None = None,
    mean: Sequence[float] = _DEFAULT_MEAN,
    std: Sequence[float] = _DEFAULT_STD,
    interpolation: str = "bilinear",
) -> Path:
    """Write LPT's evaluation preprocessing as a HF `preprocessor_config.json` into `directory`.

    The file uses the `DeiTImageProcessor` format, which expresses exactly LPT's evaluation transform: resize to a
    `resize_size` square (aspect ratio ignored), centre crop `image_size`, scale to [0, 1], normalise. So both
    [`load_classifier`] and `transformers.AutoImageProcessor.from_pretrained(directory)` read it. (transformers'
    PIL backend gives identical pixels; its torchvision backend resizes in torch and differs slightly.)

    Args:
        directory: Folder to write into (created if missing), e.g. an adapter folder after `save_pretrained`.
        image_size: Crop size = input resolution of the backbone.
        resize_size: Square size before the crop; default `round(image_size * 256 / 224)`.
        mean / std: Per-channel normalisation (LPT: 0.5, 0.5, 0.5).
        interpolation: `"bilinear"` (LPT), `"bicubic"` or `"nearest"`.

    Returns:
        The path of the written `preprocessor_config.json`.

    Raises:
        ValueError: a size, mean/std or interpolation `LPTImageTransform` refuses (nothing is written).

    Example:

    ```python
    >>> model.save_pretrained("out/adapter")
    >>> save_preprocessing("out/adapter", image_size=224)  # resize 256, crop 224, mean = std = 0.5
    ```
    """
    transform = LPTImageTransform(image_size, resize_size=resize_size, mean=mean, std=std, interpolation=interpolation)
    processor = {
        "image_processor_type": "DeiTImageProcessor",
        "do_resize": True,
        "size": {"height": transform.resize_size, "width": transform.resize_size},
        "resample": _RESAMPLE_CODES[transform.interpolation],
        "do_center_crop": True,
        "crop_size": {"height": transform.image_size, "width": transform.image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(transform.mean),
        "image_std": list(transform.std),
    }
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    path = path / PREPROCESSOR_FILE
    path.write_text(json.dumps(processor, indent=2) + "\n")
    return path


def _square(value: Any, field: str, source: str) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping) and "height" in value and value.get("height") == value.get("width"):
        return int(value["height"])
    raise ValueError(
        f"{source}: {field}={value!r} is not a square {{'height': n, 'width': n}} size. LPT's evaluation transform "
        "resizes to a square and crops a square; pass image_size / resize_size explicitly instead."
    )


def _preprocessing_from_dict(processor: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The `LPTImageTransform` arguments equivalent to a DeiT- or ViT-style image processor config."""
    if not processor.get("do_resize", True) or "size" not in processor:
        raise ValueError(f"{source} does not resize images; LPT needs a fixed input size. Pass image_size explicitly.")
    if not processor.get("do_rescale", True) or abs(float(processor.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ValueError(
            f"{source} does not rescale pixels by 1/255; that is not supported. Pass mean/std explicitly."
        )
    resize = _square(processor["size"], "size", source)
    crop = _square(processor["crop_size"], "crop_size", source) if processor.get("do_center_crop") else resize
    resample = processor.get("resample", 2)
    if resample not in _RESAMPLE_NAMES:
        raise ValueError(f"{source}: resample={resample!r} is not supported (use 0 nearest, 2 bilinear, 3 bicubic).")
    normalize = processor.get("do_normalize", True)
    return {
        "image_size": crop,
        "resize_size": resize,
        "mean": tuple(processor.get("image_mean", _DEFAULT_MEAN)) if normalize else (0.0, 0.0, 0.0),
        "std": tuple(processor.get("image_std", _DEFAULT_STD)) if normalize else (1.0, 1.0, 1.0),
        "interpolation": _RESAMPLE_NAMES[resample],
    }


def _resolve_file(name_or_path: str | os.PathLike, filename: str, revision: str | None = None) -> str | None:
    """A file of a local folder or Hub repo, or None when it has none (or the Hub cannot be reached)."""
    local = Path(name_or_path)
    if local.is_dir():
        return str(local / filename) if (local / filename).is_file() else None
    from transformers.utils import cached_file

    return cached_file(
        str(name_or_path),
        filename,
        revision=revision,
        _raise_exceptions_for_missing_entries=False,
        _raise_exceptions_for_connection_errors=False,
        _raise_exceptions_for_gated_repo=False,
    )


def load_preprocessing(name_or_path: str | os.PathLike, revision: str | None = None) -> LPTImageTransform | None:
    """The evaluation transform stored in a folder or Hub repo's `preprocessor_config.json`, or None without one.

    Args:
        name_or_path: A local folder or a Hub repo id.
        revision: Hub revision (ignored for folders).

    Raises:
        ValueError: the file is not valid JSON, or describes preprocessing LPT's transform cannot express.

    Example:

    ```python
    >>> load_preprocessing("converted/adapter")
    LPTImageTransform(image_size=224, train=False, resize_size=256, mean=(0.5, 0.5, 0.5), ...)
    ```
    """
    path = _resolve_file(name_or_path, PREPROCESSOR_FILE, revision)
    if path is None:
        return None
    try:
        processor = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); fix or delete it.") from err
    return LPTImageTransform(train=False, **_preprocessing_from_dict(processor, path))


# ---------------------------------------------------------------------------------------------------- classifier
class LPTImageClassifier:
    """Classify images with an LPT `PeftModel`; called like `transformers.pipeline("image-classification")`.

    `classifier(image)` returns the top-k `[{"label": str, "score": float}, ...]` of one image (highest first);
    `classifier([image, ...])` returns one such list per image. Images may be PIL images, file paths, `http(s)://`
    URLs or `(H, W, 3)` uint8 arrays; they are preprocessed with `transform` and run in batches of `batch_size`.

    Scores are `softmax(logit_scale * logits)` over all classes, where the logits are LPT's cosine similarities in
    [-1, 1] and `logit_scale` is the adapter config's (20 by default, the scale of LPT's training loss). The ranking
    is the ranking of the cosines; the scores are a calibrated-by-convention, not a calibrated-by-validation,
    probability. [`LPTImageClassifier.logits`] returns the raw cosines.

    Args:
        model: A `PeftModel` with an LPT adapter (put in eval mode and moved to `device` here).
        transform: Preprocessing; default LPT's evaluation transform at the base model's image size.
        id2label: Class names; default the adapter config's `id2label`, else `"LABEL_i"`.
        device: `"cuda"`, `"cpu"`, a `torch.device`, or None for cuda when available.
        batch_size: Images per forward pass.
        logit_scale: Overrides the adapter's logit scale for the scores.
        compile: Run the forward through `torch.compile`: `False` (default, eager), `True` (default mode) or a mode
            name (`"default"`, `"reduce-overhead"`: CUDA graphs, for small batches on a GPU; `"max-autotune"`,
            `"max-autotune-no-cudagraphs"`). Compiled with static shapes: the first batch of each size compiles once
            (seconds to a minute), later batches of that size reuse the graph, whatever phase 2's per-image group
            choice (it is a tensor in the graph, not a guard). Logits equal eager to float32 rounding (1e-5).

    Raises:
        ValueError: an unknown `compile` mode (the modes are listed), a bad batch size or `id2label`.

    Example:

    ```python
    >>> classifier = LPTImageClassifier(peft_model, batch_size=16)
    >>> classifier(["a.jpg", "b.jpg"], top_k=1)
    [[{'label': 'beach', 'score': 0.93}], [{'label': 'forest_path', 'score': 0.64}]]
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        transform: LPTImageTransform | None = None,
        id2label: Mapping[int, str] | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        logit_scale: float | None = None,
        compile: bool | str = False,
    ) -> None:
        from lpt_peft.tuner.config import LPTConfig

        config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
        if not isinstance(config, LPTConfig):
            raise TypeError(
                f"LPTImageClassifier needs a PeftModel with an active LPT adapter, got {type(model).__name__}. Load "
                "one with `lpt_peft.inference.load_classifier(base, adapter)` or `PeftModel.from_pretrained`."
            )
        _check_batch_size(batch_size)
        compile_mode = _check_compile(compile)
        self.config = config
        self.device = _resolve_device(device)
        self.model = model.to(self.device).eval()
        self.compile_mode = compile_mode
        # The compiled wrapper shares the model's parameters; dynamic=False: one graph per batch size, no guards on
        # sizes that would make a later batch of the same size recompile.
        self._forward = (
            self.model if compile_mode is None else torch.compile(self.model, mode=compile_mode, dynamic=False)
        )
        if transform is None:
            from lpt_peft.backbones import backbone_image_size

            image_size = backbone_image_size(model.get_base_model())
            if image_size is None:
                raise ValueError("The base model's config records no image size; pass a `transform`.")
            transform = LPTImageTransform(image_size, train=False)
        if not isinstance(transform, LPTImageTransform) or transform.train:
            raise TypeError("`transform` must be an evaluation LPTImageTransform (train=False).")
        self.transform = transform
        labels = id2label if id2label is not None else config.id2label
        self.id2label = {int(k): str(v) for k, v in labels.items()} if labels else None
        if self.id2label is not None and sorted(self.id2label) != list(range(config.num_labels)):
            raise ValueError(f"id2label must have the keys 0..{config.num_labels - 1}, got {len(self.id2label)} keys.")
        self.batch_size = batch_size
        self.logit_scale = float(config.logit_scale if logit_scale is None else logit_scale)
        self.last_errors: dict[int, str] = {}

    @property
    def num_labels(self) -> int:
        """Number of classes of the adapter."""
        return int(self.config.num_labels)

    def label(self, index: int) -> str:
        """Class name of class `index` (`"LABEL_i"` without `id2label`)."""
        return self.id2label[index] if self.id2label is not None else f"LABEL_{index}"

    def preprocess(self, image: Any) -> torch.Tensor:
        """One image (PIL, path, URL, uint8 array) -> `(3, H, W)` float tensor. Errors name the file."""
        if isinstance(image, (str, os.PathLike)):
            text = os.fspath(image)
            if text.startswith(("http://", "https://")):
                from transformers.image_utils import load_image

                image = load_image(text)
            elif not os.path.isfile(text):
                raise FileNotFoundError(f"Image file {text!r} does not exist.")
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ValueError(
                    f"Array images must be uint8 (H, W) or (H, W, C), got {image.dtype} {image.shape}. Convert with "
                    "PIL.Image.fromarray(...) first if it is another format."
                )
        elif not isinstance(image, PIL.Image.Image):
            raise TypeError(
                f"Cannot classify a {type(image).__name__}: pass PIL images, file paths, URLs or uint8 arrays. For "
                "already preprocessed tensors call the model directly: model(pixel_values=...).logits."
            )
        try:
            return self.transform(decode_image(image))
        except ValueError as err:
            cause = err.__cause__
            if cause is None:
                raise
            # decode_image's advice is for data sets (verify_images); here the fix is to skip or replace the file.
            from lpt_peft.cli import LPTUsageError

            where = f"image file {_describe(image)}" if isinstance(image, (str, os.PathLike)) else "an image"
            reason = f"{type(cause).__name__}: {cause}".replace("{", "{{").replace("}", "}}")
            where = where.replace("{", "{{").replace("}", "}}")
            raise LPTUsageError(
                f"Could not decode {where}: {reason}. The file is corrupt, truncated or not an image; replace it, or "
                "pass {on_error} to skip unreadable images with a warning.",
                on_error="on_error='skip'",
            ) from cause

    def _iter_batches(self, items: list, on_error: str, batch_size: int):
        batch: list[tuple[int, torch.Tensor]] = []
        for index, item in enumerate(items):
            try:
                tensor = self.preprocess(item)
            except (ValueError, FileNotFoundError, OSError) as err:
                if on_error == "raise":
                    raise
                self.last_errors[index] = str(err)
                warnings.warn(f"Skipping input {index} ({_describe(item)}): {err}", stacklevel=3)
                continue
            batch.append((index, tensor))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    @torch.inference_mode()
    def _logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self._forward(pixel_values=pixel_values.to(self.device))
        return out.logits.float().cpu()

    def logits(self, images: Any, batch_size: int | None = None) -> torch.Tensor:
        """Cosine logits `(num_images, num_labels)` of one image or a list (any unreadable image raises).

        Args:
            images: One image or a list (PIL, path, URL, uint8 array).
            batch_size: Images per forward pass (default: the classifier's).
        """
        items = _as_list(images)[0]
        batch_size = self.batch_size if batch_size is None else batch_size
        _check_batch_size(batch_size)
        rows = [
            self._logits(torch.stack([t for _, t in batch]))
            for batch in self._iter_batches(items, "raise", batch_size)
        ]
        return torch.cat(rows) if rows else torch.empty(0, self.num_labels)

    def __call__(
        self, images: Any, top_k: int | None = 5, batch_size: int | None = None, on_error: str = "raise"
    ) -> list:
        """Top-k labels and scores per image.

        Args:
            images: One image or a list of images (PIL, path, URL, uint8 array).
            top_k: Labels to return per image (capped at the number of classes); None returns all.
            batch_size: Overrides the classifier's batch size for this call.
            on_error: `"raise"`: an unreadable or missing image raises an error naming it. `"skip"`: it is skipped
                with a warning, its result is None, and `self.last_errors[index]` holds the message.

        Returns:
            For one image, a list of `{"label", "score"}` dicts; for a list, one such list (or None) per image.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
        if top_k is None:
            top_k = self.num_labels
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}.")
        top_k = min(top_k, self.num_labels)
        batch_size = self.batch_size if batch_size is None else batch_size
        _check_batch_size(batch_size)
        items, single = _as_list(images)
        self.last_errors = {}
        results: list[list[dict[str, Any]] | None] = [None] * len(items)
        for batch in self._iter_batches(items, on_error, batch_size):
            logits = self._logits(torch.stack([t for _, t in batch]))
            scores = torch.softmax(self.logit_scale * logits, dim=-1)
            top = scores.topk(top_k, dim=-1)
            for row, (index, _) in enumerate(batch):
                results[index] = [
                    {"label": self.label(int(c)), "score": float(s)}
                    for s, c in zip(top.values[row].tolist(), top.indices[row].tolist())
                ]
        return results[0] if single else results

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_labels={self.num_labels}, phase={self.config.phase}, device={self.device}, "
            f"batch_size={self.batch_size}, logit_scale={self.logit_scale}, transform={self.transform!r})"
        )


def _describe(item: Any) -> str:
    if isinstance(item, (str, os.PathLike)):
        return repr(os.fspath(item))
    return type(item).__name__


def _as_list(images: Any) -> tuple[list, bool]:
    if isinstance(images, (str, os.PathLike, PIL.Image.Image, np.ndarray)):
        return [images], True
    if isinstance(images, torch.Tensor):
        raise TypeError(
            "Tensors are not accepted as images (they may or may not be preprocessed already). For pixel_values call "
            "the model directly: classifier.model(pixel_values=...).logits."
        )
    if isinstance(images, Iterable):
        return list(images), False
    raise TypeError(f"Expected an image or a list of images, got {type(images).__name__}.")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_compile(compile: Any) -> str | None:
    """The `torch.compile` mode of a `compile=` argument (None: eager); a clear error for anything else."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "default"
    if isinstance(compile, str) and compile in COMPILE_MODES:
        return compile
    raise ValueError(f"compile must be False, True or a torch.compile mode {COMPILE_MODES}, got {compile!r}.")


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Unknown device {device!r}; use 'cpu', 'cuda', 'cuda:1', ... or None for auto.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was requested but CUDA is not available; use device='cpu'.")
    return device


# ---------------------------------------------------------------------------------------------------- loading
def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}
    return bool(constants.HF_HUB_OFFLINE) or flag


def _looks_like_path(name: str) -> bool:
    """True when `name` can only be a file-system path (a Hub id is `name` or `owner/name`, nothing more)."""
    from lpt_peft.evaluation.model_card import looks_like_hub_id

    return os.path.isabs(name) or name.startswith(("~", ".")) or "\\" in name or not looks_like_hub_id(name)


def check_base_reference(base: str, recorded_in: str | None = None) -> None:
    """Check, without any network access, that a base model reference can be loaded here.

    A built-in backbone name (`"demo"`, `"tiny-random"`) and a folder with a `config.json` pass. A name that can only
    be a path (absolute, `./`, `~`, more than one `/`) must exist. A Hub id must be in the local Hugging Face cache
    when `HF_HUB_OFFLINE` is set; otherwise loading will download it.

    Args:
        base: The reference: a built-in name, a folder, or a Hub id.
        recorded_in: The adapter folder when `base` is the adapter's record (named in the error), else None.

    Raises:
        LPTUsageError: naming the reference, where it came from, and `base_model=` (a script's base flag) to override.
    """
    from lpt_peft.backbones import BUILTIN_BACKBONES
    from lpt_peft.cli import LPTUsageError

    if base in BUILTIN_BACKBONES:
        return
    source = f"The adapter {recorded_in!r} records its base model as {base!r}" if recorded_in else f"Base {base!r}"
    folder = Path(base).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise LPTUsageError(
                f"{source}, a folder without config.json (not a saved model). Pass {{base_model}} with the folder "
                "written by the base model's save_pretrained.",
                "base_model",
            )
        return
    here = f"is not a folder here (working directory {os.getcwd()})"
    fix = (
        "If the adapter was trained from a folder given by a relative path, that path only holds from the directory "
        "it was trained in: pass {base_model} with the base model's folder (or its Hub id)."
    )
    if _looks_like_path(base):
        raise LPTUsageError(f"{source}, which {here}. {fix}", "base_model")
    if _hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(base, "config.json"), str):
            raise LPTUsageError(
                f"{source}, which {here} and is not in the local Hugging Face cache; HF_HUB_OFFLINE is set, so it "
                f"cannot be downloaded. {fix} Or unset HF_HUB_OFFLINE to download it from the Hub.",
                "base_model",
            )


def _preprocessing_settings(adapter: str, revision: str | None, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Preprocessing field by field: explicit values, else the adapter's preprocessor file (may lack image_size)."""
    stored = load_preprocessing(adapter, revision=revision)
    settings: dict[str, Any] = {}
    if stored is not None:
        settings = {
            "image_size": stored.image_size,
            "resize_size": stored.resize_size,
            "mean": stored.mean,
            "std": stored.std,
            "interpolation": stored.interpolation,
        }
    if overrides.get("image_size") is not None and overrides.get("resize_size") is None and stored is not None:
        settings.pop("resize_size")  # a new crop size with the stored resize would change the crop fraction
    settings.update({key: value for key, value in overrides.items() if value is not None})
    return settings


def _check_module_base(base: nn.Module, adapter: str) -> None:
    """A loaded base must be a plain backbone: wrapping a PeftModel or a model with LPT layers would stack adapters."""
    from peft import PeftModel

    from lpt_peft.tuner.layer import LPTAttention

    if isinstance(base, PeftModel):
        raise ValueError(
            f"base_model is already a PeftModel; load_classifier adds the adapter {adapter!r} to a plain base model. "
            "Pass model.get_base_model() after model.unload(), or wrap the PeftModel with LPTImageClassifier(model)."
        )
    if any(isinstance(module, LPTAttention) for module in base.modules()):
        raise ValueError(
            "base_model already carries LPT prompt layers (it was wrapped by get_peft_model or "
            "PeftModel.from_pretrained). Pass a fresh base model, or wrap the existing PeftModel with "
            "LPTImageClassifier(peft_model)."
        )


def _resolve_base(base_model, config, adapter: str, image_size, attn_implementation: str, dtype) -> nn.Module:
    """The base to load the adapter into: checked if passed, else loaded from the given or recorded reference."""
    from lpt_peft.cli import LPTUsageError

    if isinstance(base_model, nn.Module):
        _check_module_base(base_model, adapter)
        return base_model
    recorded = base_model is None
    base_model = config.base_model_name_or_path if recorded else os.fspath(base_model)
    if not base_model:
        raise LPTUsageError(
            f"The adapter {adapter!r} records no base model; pass {{base_model}} (a folder, a Hub id, or the "
            "built-in 'demo' / 'tiny-random' backbone it was trained on).",
            "base_model",
        )
    check_base_reference(base_model, adapter if recorded else None)
    from lpt_peft.backbones import load_backbone

    return load_backbone(base_model, image_size=image_size, attn_implementation=attn_implementation, dtype=dtype)


def _check_adapter_folder(adapter: str) -> None:
    folder = Path(adapter)
    if not folder.exists():
        return  # a Hub id: peft fetches and checks it
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{adapter!r} has no adapter_config.json; pass the folder written by PeftModel.save_pretrained."
        )
    if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FileNotFoundError(
            f"{adapter!r} has an adapter_config.json but no adapter_model.safetensors: the adapter's weights are "
            "missing (an interrupted save or copy?). Save or copy the adapter again."
        )


def load_classifier(
    base_model: str | os.PathLike | nn.Module | None,
    adapter: str | os.PathLike,
    device: str | torch.device | None = None,
    image_size: int | None = None,
    resize_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 32,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    revision: str | None = None,
    compile: bool | str = False,
) -> LPTImageClassifier:
    """Load a base backbone and an LPT adapter (folders or Hub ids) into an [`LPTImageClassifier`].

    The base is loaded by [`lpt_peft.backbones.load_backbone`], the loader training uses, so an adapter of every
    registered family (ViT, DeiT, DINOv2, DINOv2 with registers, CLIP's vision tower) loads onto the class it was
    trained on.

    Preprocessing, field by field: the explicit arguments; else the adapter's `preprocessor_config.json` (written by
    [`save_preprocessing`] and by the authors' checkpoint converter); else LPT's defaults: the base model's image
    size, resize to `image_size * 256 / 224`, mean = std = 0.5.

    Everything is checked before anything is loaded into `base_model`: a failing call leaves a passed model as it was.

    Args:
        base_model: A built-in backbone name (`"demo"`, `"tiny-random"`), a folder / Hub id of the checkpoint the
            adapter was trained on, an already loaded model, or None to use the `base_model_name_or_path` recorded in
            the adapter config.
        adapter: Folder / Hub id of the adapter (`adapter_config.json` + `adapter_model.safetensors`).
        device: `"cuda"`, `"cpu"`, ... or None for cuda when available.
        image_size / resize_size / mean / std: Preprocessing overrides.
        batch_size: Images per forward pass.
        dtype: Load the base in this dtype (e.g. `torch.float16` on GPU); prompts stay float32.
        attn_implementation: `"sdpa"` (default) or `"eager"`.
        revision: Hub revision of the adapter.
        compile: `torch.compile` the forward: `False` (eager), `True` or a mode such as `"reduce-overhead"` (see
            [`LPTImageClassifier`]).

    Raises:
        FileNotFoundError: the adapter folder lacks its config or weights.
        lpt_peft.cli.LPTUsageError: the base cannot be found (the message names the recorded reference; with
            `HF_HUB_OFFLINE` set this is decided without any network access) or the preprocessing does not fit it.
        ValueError / TypeError: a bad device, batch size, adapter type, or a `base_model` that already has adapters.

    Example:

    ```python
    >>> from lpt_peft.inference import load_classifier
    >>> classifier = load_classifier("converted/base", "converted/adapter", device="cpu")
    >>> classifier(["img1.jpg", "img2.jpg"], top_k=5)
    ```
    """
    from peft import PeftConfig, PeftModel

    from lpt_peft.backbones import backbone_image_size, check_image_size
    from lpt_peft.cli import LPTUsageError
    from lpt_peft.tuner.config import LPTConfig

    adapter = os.fspath(adapter)
    _check_adapter_folder(adapter)
    config = PeftConfig.from_pretrained(adapter, revision=revision)
    if not isinstance(config, LPTConfig):
        raise TypeError(f"{adapter!r} holds a {type(config).__name__} adapter, not an LPT adapter.")
    torch_device = _resolve_device(device)
    _check_batch_size(batch_size)
    _check_compile(compile)
    overrides = {"image_size": image_size, "resize_size": resize_size, "mean": mean, "std": std}
    settings = _preprocessing_settings(adapter, revision, overrides)

    base = _resolve_base(base_model, config, adapter, settings.get("image_size"), attn_implementation, dtype)
    check_image_size(base, settings.get("image_size"))
    settings.setdefault("image_size", backbone_image_size(base))
    if settings["image_size"] is None:
        raise LPTUsageError(
            "The base model's config records no image size and the adapter no preprocessor_config.json; pass "
            "{image_size}.",
            "image_size",
        )
    transform = LPTImageTransform(train=False, **settings)  # checks the values before the base is touched
    model = PeftModel.from_pretrained(base, adapter, revision=revision)
    return LPTImageClassifier(
        model, transform=transform, device=torch_device, batch_size=batch_size, compile=compile
    )


def adapter_record(adapter: str | os.PathLike) -> dict[str, Any]:
    """What a local adapter folder records about how it was trained, as training options.

    Read from the folder only (no network): `model_name_or_path` (the base) and `num_classes` (`num_labels`) from
    `adapter_config.json`; `image_size`, `resize_size`, `mean`, `std` from `preprocessor_config.json`; `dataset` and
    the data-set options (`lpt_data`) from the model card's metadata. Absent facts are left out.
    `examples/evaluate_lpt.py` uses them as its defaults.

    Args:
        adapter: The adapter folder (written by `save_pretrained` during training).

    Returns:
        `dict` of training-option names to values.

    Example:

    ```python
    >>> adapter_record("outputs/demo/phase2")
    {'model_name_or_path': 'demo', 'image_size': 56, 'resize_size': 64, 'mean': [...], 'std': [...],
     'dataset': 'fashion_mnist_lt', ...}
    ```
    """
    from huggingface_hub import ModelCard

    folder = Path(adapter)
    record: dict[str, Any] = {}
    config_file = folder / "adapter_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        if config.get("base_model_name_or_path"):
            record["model_name_or_path"] = config["base_model_name_or_path"]
        if config.get("num_labels"):
            record["num_classes"] = int(config["num_labels"])  # the class count of a synthetic data set
    transform = load_preprocessing(folder) if folder.is_dir() else None
    if transform is not None:
        record.update(image_size=transform.image_size, resize_size=transform.resize_size)
        record.update(mean=list(transform.mean), std=list(transform.std))
    card_file = folder / "README.md"
    if card_file.is_file():
        metadata = ModelCard.load(card_file).data.to_dict()
        datasets = metadata.get("datasets") or []
        if len(datasets) == 1:
            record["dataset"] = datasets[0]
        if isinstance(metadata.get("lpt_data"), Mapping):
            record.update({k: v for k, v in metadata["lpt_data"].items() if v is not None})
    return record
