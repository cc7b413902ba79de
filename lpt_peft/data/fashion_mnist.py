"""Fashion-MNIST from local IDX files (Debian's `dataset-fashion-mnist`) and its long-tailed variant."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from lpt_peft._extras import requires_extras
from lpt_peft.data.long_tail import (
    LongTailDataset,
    count_labels,
    dataset_from_uint8_arrays,
    labels_as_numpy,
    make_long_tailed,
)
from lpt_peft.data.registry import register_dataset

with requires_extras(__name__):
    import datasets

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGE_MAGIC, _LABEL_MAGIC = 2051, 2049


def _find(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """
    Read an IDX file (the MNIST format; gzip-compressed when the name ends in `.gz`) into a uint8 array.

    Example:

    ```py
    >>> read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz").shape
    (10000, 28, 28)
    ```
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4:
        raise ValueError(f"{path} is too short to be an IDX file.")
    magic = int.from_bytes(raw[:4], "big")
    dtype_code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if dtype_code != 0x08 or ndim < 1:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic number {magic}).")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path} is truncated or corrupt: header announces shape {shape} ({expected} bytes) but "
            f"{len(raw) - header} bytes follow."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _load_from_idx(directory: Path) -> datasets.DatasetDict:
    splits = {}
    for split, (image_name, label_name) in _FILES.items():
        image_path, label_path = _find(directory, image_name), _find(directory, label_name)
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{image_path} / {label_path}: expected images (N, 28, 28) and N labels, got {images.shape} and "
                f"{labels.shape}."
            )
        splits[split] = dataset_from_uint8_arrays(images, labels, FASHION_MNIST_CLASSES)
    return datasets.DatasetDict(splits)


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> datasets.DatasetDict:
    """
    Fashion-MNIST as a `DatasetDict` with `"train"` (60,000) and `"test"` (10,000) splits; columns `"image"` (PIL
    grayscale 28x28, decoded lazily) and `"label"` (`ClassLabel` with the 10 class names).

    Reads the four IDX files (`train-images-idx3-ubyte.gz`, ...) from `data_dir`, by default the directory installed
    by Debian's `dataset-fashion-mnist` package (`/usr/share/datasets/fashion-mnist`). When they are absent it falls
    back to the Hub copy `zalando-datasets/fashion_mnist`.

    Example:

    ```py
    >>> data = load_fashion_mnist()
    >>> len(data["train"]), data["train"].features["label"].names[0]
    (60000, 'T-shirt/top')
    ```
    """
    directory = Path(data_dir) if data_dir is not None else Path(FASHION_MNIST_DIR)
    names = [name for pair in _FILES.values() for name in pair]
    if all(_find(directory, name) is not None for name in names):
        return _load_from_idx(directory)
    if data_dir is not None:
        missing = [name for name in names if _find(directory, name) is None]
        raise FileNotFoundError(
            f"Fashion-MNIST IDX file(s) {missing} (optionally .gz) not found in {directory}. Install them with "
            f"`apt-get install dataset-fashion-mnist` (they go to {FASHION_MNIST_DIR}) or pass the right `data_dir`."
        )
    try:
        data = datasets.load_dataset(FASHION_MNIST_HUB_ID)
    except Exception as err:  # offline, no cache, Hub unreachable: all surface differently
        raise FileNotFoundError(
            f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} and could not be loaded from the Hub "
            f"({FASHION_MNIST_HUB_ID}: {type(err).__name__}: {err}). Install it with "
            "`apt-get install dataset-fashion-mnist`, or pass `data_dir=` to a folder with the four IDX files."
        ) from err
    # Same class names whichever source was used.
    label_feature = datasets.ClassLabel(names=FASHION_MNIST_CLASSES)
    return datasets.DatasetDict(
        {
            split: data[split].select_columns(["image", "label"]).cast_column("label", label_feature)
            for split in ("train", "test")
        }
    )


def load_fashion_mnist_lt(
    n_max: int = 500,
    imbalance: float = 100,
    seed: int = 0,
    val_per_class: int = 20,
    data_dir: str | os.PathLike | None = None,
) -> LongTailDataset:
    """
    Long-tailed Fashion-MNIST: class `c` keeps `floor(n_max * imbalance ** (-c / 9))` training images
    (500, 299, 179, 107, 64, 38, 23, 13, 8, 5 by default), a balanced validation set of `val_per_class` images per
    class is drawn from the remaining training images, and the test set is the full balanced 10,000 images.

    A small, quick benchmark for smoke tests and CPU experiments; see [`make_long_tailed`] for the selection.

    Example:

    ```py
    >>> data = load_fashion_mnist_lt()
    >>> len(data.train), len(data.val), len(data.test)
    (1236, 200, 10000)
    ```
    """
    data = load_fashion_mnist(data_dir)
    train, val = make_long_tailed(data["train"], n_max, imbalance, seed=seed, val_per_class=val_per_class)
    class_names = list(data["train"].features["label"].names)
    return LongTailDataset(
        train=train,
        val=val,
        test=data["test"],
        num_classes=len(class_names),
        class_names=class_names,
        train_class_counts=count_labels(labels_as_numpy(train), len(class_names)),
    )


@register_dataset("fashion_mnist_lt")
def fashion_mnist_lt(
    n_max: int = 500,
    imbalance: float = 100,
    data_seed: int = 0,
    val_per_class: int = 20,
    data_root: str | os.PathLike | None = None,
) -> LongTailDataset:
    """Fashion-MNIST-LT: it has 10 classes, subsampled into the exponential profile of n_max / imbalance.

    [`load_fashion_mnist_lt`] under the names of the command line (`data_root` is its `data_dir`).
    """
    return load_fashion_mnist_lt(
        n_max=n_max, imbalance=imbalance, seed=data_seed, val_per_class=val_per_class, data_dir=data_root
    )
