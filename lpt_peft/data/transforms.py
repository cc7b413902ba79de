"""LPT image preprocessing written with PIL and torch only (torchvision is not a dependency)."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch

from lpt_peft.checks import check_int
from lpt_peft.data.seeding import torch_generator

if TYPE_CHECKING:  # imported where used: inference needs this module without the training extras
    import datasets

_RESAMPLING = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
}

# Errors PIL raises for unreadable, truncated or hostile files.
IMAGE_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, PIL.Image.DecompressionBombError)


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """
    Convert any PIL image to 8-bit RGB.

    Grayscale (`L`, `1`) is replicated to three channels; `RGBA`, `LA` and `PA` lose their alpha channel (the colour
    values are kept as stored, not composited on a background); palette images (`P`) are expanded, through RGBA when
    they carry transparency; `CMYK` and `YCbCr` use PIL's conversion; 16-bit and 32-bit integer grayscale (`I;16`,
    `I`) is scaled from [0, 65535] to [0, 255] when it uses more than 8 bits, and float (`F`) images are clipped to
    [0, 255].
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        # Converting such palettes straight to RGB makes PIL warn; going through RGBA is the lossless route.
        image = image.convert("RGBA")
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if image.mode != "F" and array.size and array.max() > 255:
            array = array / 257.0
        image = PIL.Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ValueError(f"Cannot convert an image of PIL mode {image.mode!r} to RGB: {err}.") from err


def _check_pair(name: str, value: Sequence[float], low: float, high: float | None) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"`{name}` must be a (min, max) pair, got {value!r}.")
    a, b = float(value[0]), float(value[1])
    if not (low < a <= b and (high is None or b <= high)):
        upper = f" and max <= {high}" if high is not None else ""
        raise ValueError(f"`{name}` must satisfy {low} < min <= max{upper}, got {value!r}.")
    return a, b


class LPTImageTransform:
    """
    The LPT preprocessing: RandomResizedCrop + horizontal flip for training, Resize + CenterCrop for evaluation,
    then a float tensor `(3, H, W)` normalised with `mean` and `std`.

    The training branch draws its crop like torchvision's `RandomResizedCrop` (area fraction uniform in `scale`,
    log aspect ratio uniform in `ratio`, up to 10 tries, then a central crop with the aspect ratio clamped into
    `ratio`) and flips with probability 0.5. The evaluation branch resizes to `(resize_size, resize_size)`, ignoring
    the aspect ratio as the LPT code does, and crops the centre `image_size` square. Input images of any PIL mode are
    converted to RGB first (see [`to_rgb`]: alpha is dropped, grayscale replicated).

    Args:
        image_size (`int`, defaults to 224): Output height and width.
        train (`bool`): Training (random) or evaluation (deterministic) branch.
        resize_size (`int`, *optional*): Square size before the evaluation centre crop; defaults to
            `round(image_size * 256 / 224)` (256 for 224).
        mean (`Sequence[float]`, defaults to `(0.5, 0.5, 0.5)`): Per-channel mean subtracted after scaling to [0, 1].
        std (`Sequence[float]`, defaults to `(0.5, 0.5, 0.5)`): Per-channel std divided by.
        scale (`tuple[float, float]`, defaults to `(0.08, 1.0)`): Range of the crop area as a fraction of the image.
        ratio (`tuple[float, float]`, defaults to `(3/4, 4/3)`): Range of the crop aspect ratio (width / height).
        interpolation (`str`, defaults to `"bilinear"`): `"bilinear"`, `"bicubic"` or `"nearest"`.
        seed (`int`, *optional*): Seed of a private generator for reproducible crops and flips. When `None` the
            global torch RNG is used, which `DataLoader` reseeds in every worker. With a seed, the main process draws
            from [`torch_generator`]`(seed)` and worker `w` of a `DataLoader` from `torch_generator(seed, w + 1)`, so
            workers do not repeat each other's augmentations. Training does not rely on it: [`TransformedImageDataset`]
            passes each image its own generator.

    Example:

    ```py
    >>> from PIL import Image
    >>> transform = LPTImageTransform(224, train=False)
    >>> transform(Image.new("RGB", (500, 375))).shape
    torch.Size([3, 224, 224])
    ```
    """

    def __init__(
        self,
        image_size: int = 224,
        train: bool = False,
        resize_size: int | None = None,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
        seed: int | None = None,
    ):
        check_int(image_size, "`image_size`")
        if resize_size is None:
            resize_size = round(image_size * 256 / 224)
        if isinstance(resize_size, bool) or not isinstance(resize_size, int) or resize_size < image_size:
            raise ValueError(
                f"`resize_size` must be an integer >= image_size ({image_size}) so the centre crop fits, "
                f"got {resize_size!r}."
            )
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"`mean` and `std` need one value per RGB channel, got {mean!r} and {std!r}.")
        if any(s <= 0 for s in std):
            raise ValueError(f"`std` values must be positive, got {std!r}.")
        if interpolation not in _RESAMPLING:
            raise ValueError(f"`interpolation` must be one of {sorted(_RESAMPLING)}, got {interpolation!r}.")
        self.image_size = image_size
        self.train = bool(train)
        self.resize_size = resize_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.scale = _check_pair("scale", scale, 0.0, 1.0)
        self.ratio = _check_pair("ratio", ratio, 0.0, None)
        self.interpolation = interpolation
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._generator_owner: tuple[int, int] | None = None

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(image_size={self.image_size}, train={self.train}, "
            f"resize_size={self.resize_size}, mean={self.mean}, std={self.std}, scale={self.scale}, "
            f"ratio={self.ratio}, interpolation={self.interpolation!r}, seed={self.seed})"
        )

    def __getstate__(self) -> dict[str, Any]:
        # Generators are rebuilt per process/worker (see `_get_generator`), never pickled.
        state = self.__dict__.copy()
        state["_generator"] = None
        state["_generator_owner"] = None
        return state

    def _get_generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else -1
        owner = (os.getpid(), worker_id)
        if self._generator is None or self._generator_owner != owner:
            keys = (self.seed,) if worker_id < 0 else (self.seed, worker_id + 1)
            self._generator = torch_generator(*keys)
            self._generator_owner = owner
        return self._generator

    def get_crop_params(
        self, width: int, height: int, generator: torch.Generator | None = None
    ) -> tuple[int, int, int, int]:
        """Draw a random crop `(top, left, height, width)` for an image of the given size."""
        generator = generator or self._get_generator()
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1], generator=generator).item()
            aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator).item())
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
                left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
                return top, left, h, w
        # Fallback: the largest central crop whose aspect ratio lies in `ratio`.
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def _flip(self, generator: torch.Generator | None = None) -> bool:
        return bool(torch.rand(1, generator=generator or self._get_generator()).item() < 0.5)

    def to_tensor(self, image: PIL.Image.Image) -> torch.Tensor:
        """Scale an RGB image to [0, 1], normalise, and return it as float32 `(3, H, W)`."""
        array = np.asarray(image, dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return tensor.sub_(mean).div_(std)

    def __call__(self, image: PIL.Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """Transform one image; `generator`, when given, is the source of this call's randomness (training only)."""
        if not isinstance(image, PIL.Image.Image):
            raise TypeError(
                f"LPTImageTransform expects a PIL image, got {type(image).__name__}; decode it first or use "
                "`TransformedImageDataset`, which decodes dataset rows."
            )
        image = to_rgb(image)
        resample = _RESAMPLING[self.interpolation]
        size = (self.image_size, self.image_size)
        if self.train:
            top, left, h, w = self.get_crop_params(*image.size, generator=generator)
            image = image.crop((left, top, left + w, top + h)).resize(size, resample)
            if self._flip(generator):
                image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            image = image.resize((self.resize_size, self.resize_size), resample)
            offset = int(round((self.resize_size - self.image_size) / 2.0))
            image = image.crop((offset, offset, offset + self.image_size, offset + self.image_size))
        return self.to_tensor(image)


def decode_image(value: Any) -> PIL.Image.Image:
    """
    Decode one value of a `datasets.Image(decode=False)` column (`{"path": ..., "bytes": ...}`), a file path, a PIL
    image or a uint8 numpy array into a fully loaded PIL image (EXIF orientation applied, as `datasets` does).

    Raises a `ValueError` naming the file when the image cannot be decoded.
    """
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, np.ndarray):
        return PIL.Image.fromarray(value)
    path, data = None, None
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
    elif isinstance(value, dict):
        path, data = value.get("path"), value.get("bytes")
    else:
        raise TypeError(f"Cannot decode an image from a value of type {type(value).__name__}.")
    if path is None and data is None:
        raise ValueError("An image row has neither a 'path' nor 'bytes'; the dataset is malformed.")
    try:
        image = PIL.Image.open(io.BytesIO(data) if data is not None else path)
        image.load()
        if image.getexif().get(PIL.Image.ExifTags.Base.Orientation) is not None:
            image = PIL.ImageOps.exif_transpose(image)
    except IMAGE_DECODE_ERRORS as err:
        where = f"image file {path!r}" if path else "an in-memory image (no file path recorded)"
        raise ValueError(
            f"Could not decode {where}: {type(err).__name__}: {err}. The file is corrupt, truncated or not an image: "
            "replace or remove it, or skip unreadable images with `--verify_images true` (train_lpt.py) / "
            "`verify_images=True` (the data loaders), which decodes every image once before training and counts and "
            "logs those it skips."
        ) from err
    return image


class TransformedImageDataset(torch.utils.data.Dataset):
    """
    A `datasets.Dataset` with an image and a label column seen through an [`LPTImageTransform`]: item `i` is
    `{"pixel_values": float32 (3, H, W), "labels": int64 scalar}`, so `torch.utils.data.default_collate` (the
    `DataLoader` default) stacks a batch into `pixel_values` `(B, 3, H, W)` and `labels` `(B,)`.

    Random augmentation of item `i` in epoch `e` is drawn from its own generator, [`torch_generator`]`(seed, e, i)`
    (numpy `SeedSequence`), so the images of a step depend neither on the number of workers nor on when an iterator
    was created: a resumed run sees exactly the crops of an uninterrupted one. Images are decoded here rather than by
    `datasets`, so an unreadable file raises a `ValueError` naming it instead of an opaque error in a worker.

    Args:
        dataset (`datasets.Dataset`): Rows with `image_column` (`datasets.Image`, paths or bytes) and `label_column`.
        transform (`LPTImageTransform`): The training (random) or evaluation (deterministic) preprocessing.
        seed (`int` or `Sequence[int]`, defaults to 0): Key(s) of the augmentation streams, e.g. `(run_seed, phase)`
            (unused by an evaluation transform); image `i` in epoch `e` uses `torch_generator(*seed, e, i)`.
        image_column, label_column (`str`, default `"image"`, `"label"`): Column names.

    Raises:
        ValueError: a column is missing (the message lists the columns), or an image cannot be decoded.

    Example:

    ```py
    >>> train = TransformedImageDataset(data.train, LPTImageTransform(224, train=True), seed=42)
    >>> train.set_epoch(3)
    >>> loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    >>> batch = next(iter(loader))
    >>> batch["pixel_values"].shape, batch["labels"].dtype
    (torch.Size([64, 3, 224, 224]), torch.int64)
    ```
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        transform: Callable[..., torch.Tensor],
        seed: int | Sequence[int] = 0,
        image_column: str = "image",
        label_column: str = "label",
    ) -> None:
        for column, name in ((image_column, "image_column"), (label_column, "label_column")):
            if column not in dataset.column_names:
                raise ValueError(
                    f"Column {column!r} not found; the dataset has columns {dataset.column_names}. Pass `{name}=`."
                )
        import datasets  # a `datasets.Dataset` was passed in, so the package is installed

        if isinstance(dataset.features[image_column], datasets.Image):
            dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
        self.dataset = dataset.select_columns([image_column, label_column])
        self.transform = transform
        self.seed = (int(seed),) if isinstance(seed, int) else tuple(int(k) for k in seed)
        self.epoch = 0
        self.image_column, self.label_column = image_column, label_column

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of epoch `epoch` (call it before each epoch, like a sampler's `set_epoch`)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.dataset[int(index)]
        generator = None
        if getattr(self.transform, "train", False):
            generator = torch_generator(*self.seed, self.epoch, int(index))
        image = decode_image(row[self.image_column])
        pixel_values = self.transform(image, generator=generator) if generator is not None else self.transform(image)
        return {"pixel_values": pixel_values, "labels": torch.tensor(int(row[self.label_column]), dtype=torch.long)}
