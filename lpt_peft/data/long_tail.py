"""Long-tailed subsampling and the container shared by every data set builder."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from lpt_peft._extras import requires_extras
from lpt_peft.checks import check_int

with requires_extras(__name__):
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable


@dataclass
class LongTailDataset:
    """
    The splits of a long-tailed classification benchmark and its class statistics.

    Every split has the columns `"image"` (a `datasets.Image` feature) and `"label"` (a `datasets.ClassLabel`).

    Args:
        train (`datasets.Dataset`): The (long-tailed) training split.
        val (`datasets.Dataset` or `None`): A validation split for checkpoint selection, or `None` when the benchmark
            has none (iNaturalist 2018, where the official val set is the test set).
        test (`datasets.Dataset`): The test split (balanced for all standard benchmarks).
        num_classes (`int`): Number of classes C.
        class_names (`list[str]`): Name of class `i` at index `i`.
        train_class_counts (`list[int]`): Number of training images of class `i` at index `i`; the A-GCL loss, the
            class-balanced sampler and the many/medium/few shot groups are computed from these.
        skipped_images (`dict[str, int]`): Per split, how many listed images were skipped as unreadable (only filled
            when a loader was called with `verify_images=True`).

    Example:

    ```py
    >>> from lpt_peft.data import load_fashion_mnist_lt
    >>> data = load_fashion_mnist_lt(n_max=500, imbalance=100)
    >>> data.train_class_counts[:3]
    [500, 299, 179]
    >>> data.save_class_info("outputs/class_info.json")
    ```
    """

    train: datasets.Dataset
    val: datasets.Dataset | None
    test: datasets.Dataset
    num_classes: int
    class_names: list[str]
    train_class_counts: list[int]
    skipped_images: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"`class_names` has {len(self.class_names)} entries but `num_classes` is {self.num_classes}."
            )
        if len(self.train_class_counts) != self.num_classes:
            raise ValueError(
                f"`train_class_counts` has {len(self.train_class_counts)} entries but `num_classes` is "
                f"{self.num_classes}."
            )

    def save_class_info(self, path: str | os.PathLike) -> None:
        """
        Write the class order, names and training counts as JSON, so that training and evaluation scripts (shot
        groups, loss weights) can use them without reloading the images.

        Example:

        ```py
        >>> data.save_class_info("outputs/class_info.json")
        >>> json.load(open("outputs/class_info.json"))["train_class_counts"][0]
        500
        ```
        """
        info = {
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "train_class_counts": [int(n) for n in self.train_class_counts],
            "split_sizes": {
                name: len(split)
                for name, split in (("train", self.train), ("val", self.val), ("test", self.test))
                if split is not None
            },
            "skipped_images": dict(self.skipped_images),
        }
        directory = os.path.dirname(os.fspath(path))
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2)


def long_tail_counts(num_classes: int, n_max: int, imbalance: float) -> list[int]:
    """
    Per-class image counts of an exponentially decaying long-tailed profile.

    Class `c` gets `floor(n_max * imbalance ** (-c / (C - 1)))` images, so class 0 has `n_max` and class `C - 1` has
    `n_max / imbalance` images. This is the CIFAR-100-LT profile (`n_max=500`, `imbalance=100`: 10,847 images).

    Args:
        num_classes (`int`): Number of classes C.
        n_max (`int`): Images of the most frequent class.
        imbalance (`float`): Imbalance ratio rho = n_max / n_min, at least 1 (1 gives a balanced set).

    Example:

    ```py
    >>> long_tail_counts(10, 500, 100)
    [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    ```
    """
    check_int(num_classes, "`num_classes`")
    check_int(n_max, "`n_max`")
    if not isinstance(imbalance, (int, float)) or not math.isfinite(imbalance) or imbalance < 1:
        raise ValueError(
            f"`imbalance` is n_max / n_min and must be a finite number >= 1, got {imbalance!r} "
            "(CIFAR-100-LT uses 100; pass 100 rather than 0.01)."
        )
    if num_classes == 1:
        return [n_max]
    # Written as (1 / rho) ** (c / (C - 1)) so the floating-point rounding is identical to the usual CIFAR-LT code.
    counts = [int(n_max * (1.0 / imbalance) ** (c / (num_classes - 1))) for c in range(num_classes)]
    if counts[-1] < 1:
        raise ValueError(
            f"With n_max={n_max} and imbalance={imbalance} the rarest class would get 0 images; "
            f"use n_max >= imbalance."
        )
    return counts


def labels_as_numpy(dataset: datasets.Dataset, label_column: str = "label") -> np.ndarray:
    """
    Return the labels of `dataset` as an int64 array without decoding any image.

    Example:

    ```py
    >>> labels_as_numpy(data.train)[:5]
    array([9, 0, 0, 3, 0])
    ```
    """
    if label_column not in dataset.column_names:
        raise ValueError(
            f"Column {label_column!r} not found; the dataset has columns {dataset.column_names}. "
            "Pass `label_column=` with the name of the integer class column."
        )
    # The arrow view reads one column and respects `select` indices; `dataset[col]` goes through Python objects.
    column = dataset.with_format("arrow", columns=[label_column])[:][label_column]
    if column.null_count:
        raise ValueError(f"Column {label_column!r} has {column.null_count} missing labels.")
    return np.asarray(column.to_numpy(), dtype=np.int64)


def count_labels(labels: Sequence[int] | np.ndarray, num_classes: int) -> list[int]:
    """
    Number of occurrences of each class `0..num_classes-1` in `labels`.

    Example:

    ```py
    >>> count_labels([0, 2, 2], 4)
    [1, 0, 2, 0]
    ```
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"Labels must lie in [0, {num_classes - 1}], found {labels.min()}..{labels.max()}.")
    return [int(n) for n in np.bincount(labels, minlength=num_classes)]


def infer_num_classes(dataset: datasets.Dataset, label_column: str = "label") -> int:
    """Number of classes from a `ClassLabel` feature, else the largest label + 1."""
    feature = dataset.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    labels = labels_as_numpy(dataset, label_column)
    if labels.size == 0:
        raise ValueError("Cannot infer the number of classes of an empty dataset.")
    return int(labels.max()) + 1


def make_long_tailed(
    dataset: datasets.Dataset,
    n_max: int,
    imbalance: float,
    seed: int = 0,
    label_column: str = "label",
    class_order: Sequence[int] | None = None,
    val_per_class: int = 0,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """
    Subsample a (balanced) dataset into a long-tailed training set and an optional balanced validation set.

    The i-th class of `class_order` keeps `long_tail_counts(C, n_max, imbalance)[i]` images: the first ones of a
    seeded shuffle of that class's images. The shuffles use one `numpy.random.RandomState(seed)`, one call per class
    in `class_order`, which is the procedure of the commonly used CIFAR-LT code. The validation set takes the next
    `val_per_class` images of the same shuffle, so it never overlaps the training set. Labels are not renumbered.

    Args:
        dataset (`datasets.Dataset`): Source dataset with an integer label column.
        n_max (`int`): Training images of the most frequent class.
        imbalance (`float`): n_max / n_min (>= 1).
        seed (`int`, defaults to 0): Seed of the per-class shuffles; the result is a deterministic function of it.
        label_column (`str`, defaults to `"label"`): Name of the label column.
        class_order (`Sequence[int]`, *optional*): Permutation of `range(C)` from the most to the least frequent
            class; defaults to `0..C-1`.
        val_per_class (`int`, defaults to 0): Validation images per class; 0 returns `None` as validation set.

    Returns:
        `tuple[datasets.Dataset, datasets.Dataset | None]`: `(train_lt, val)`, both in the original row order.

    Example:

    ```py
    >>> train_lt, val = make_long_tailed(train, n_max=500, imbalance=100, val_per_class=20)
    >>> len(train_lt), len(val)  # Fashion-MNIST: 10 classes
    (1236, 200)
    ```
    """
    check_int(val_per_class, "`val_per_class`", minimum=0)
    labels = labels_as_numpy(dataset, label_column)
    num_classes = infer_num_classes(dataset, label_column)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"Column {label_column!r} has labels outside [0, {num_classes - 1}] "
            f"(min {labels.min()}, max {labels.max()}); unlabeled rows (-1) must be removed first."
        )
    counts = long_tail_counts(num_classes, n_max, imbalance)
    if class_order is None:
        class_order = list(range(num_classes))
    else:
        class_order = [int(c) for c in class_order]
        if sorted(class_order) != list(range(num_classes)):
            raise ValueError(
                f"`class_order` must be a permutation of range({num_classes}) (every class exactly once), "
                f"got {len(class_order)} entries."
            )
    feature = dataset.features[label_column]
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None

    rng = np.random.RandomState(seed)
    train_indices, val_indices = [], []
    for rank, cls in enumerate(class_order):
        indices = np.flatnonzero(labels == cls)
        needed = counts[rank] + val_per_class
        if len(indices) < needed:
            name = f" ({names[cls]!r})" if names else ""
            raise ValueError(
                f"Class {cls}{name} has {len(indices)} images but {needed} are requested "
                f"({counts[rank]} train + {val_per_class} val); lower `n_max` or `val_per_class`."
            )
        rng.shuffle(indices)
        train_indices.append(indices[: counts[rank]])
        val_indices.append(indices[counts[rank] : needed])

    train = dataset.select(np.sort(np.concatenate(train_indices)))
    val = dataset.select(np.sort(np.concatenate(val_indices))) if val_per_class > 0 else None
    return train, val


def dataset_from_uint8_arrays(
    images: np.ndarray, labels: Sequence[int] | np.ndarray, class_names: Sequence[str]
) -> datasets.Dataset:
    """
    Build a `datasets.Dataset` with an `"image"` (`datasets.Image`) and a `"label"` (`ClassLabel`) column from a
    uint8 array of shape `(N, H, W)` (grayscale) or `(N, H, W, 3)` (RGB), in well under a second for 60k images.

    Each image is stored as an uncompressed PGM/PPM file in memory: its header is constant, so all files are made by
    one numpy concatenation instead of encoding N PNGs with PIL (about 10x slower). They decode to PIL `L` / `RGB`.

    Example:

    ```py
    >>> ds = dataset_from_uint8_arrays(np.zeros((2, 28, 28), np.uint8), [0, 1], ["a", "b"])
    >>> ds[0]["image"].mode, ds[0]["image"].size
    ('L', (28, 28))
    ```
    """
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3):
        raise ValueError(
            f"`images` must be uint8 of shape (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}."
        )
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (len(images),):
        raise ValueError(f"Got {len(images)} images but labels of shape {labels.shape}.")
    n, height, width = images.shape[:3]
    header = f"{'P5' if images.ndim == 3 else 'P6'}\n{width} {height}\n255\n".encode("ascii")
    records = np.concatenate(
        [np.broadcast_to(np.frombuffer(header, dtype=np.uint8), (n, len(header))), images.reshape(n, -1)], axis=1
    )
    offsets = np.arange(n + 1, dtype=np.int64) * records.shape[1]
    blobs = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(records.tobytes())]
    ).cast(pa.binary())
    image_column = pa.StructArray.from_arrays([blobs, pa.nulls(n, pa.string())], names=["bytes", "path"])
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))})
    table = pa.table({"image": image_column, "label": pa.array(labels)}).cast(features.arrow_schema)
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features))


def long_tail_from_splits(
    built: dict, class_names: Sequence[str], skipped_images: dict | None = None, hint: str = ""
) -> LongTailDataset:
    """A [`LongTailDataset`] from built `train` / `test` (and optional `val`) splits, its counts from `train`.

    Raises:
        ValueError: a class has no training image (LPT's loss, sampler and shot groups need every class); `hint`
            says where to look.
    """
    counts = count_labels(labels_as_numpy(built["train"]), len(class_names))
    empty = [i for i, n in enumerate(counts) if n == 0]
    if empty:
        shown = ", ".join(f"{i} ({class_names[i]!r})" for i in empty[:10])
        raise ValueError(
            f"{len(empty)} class(es) have no training images: {shown}. LPT's loss, sampler and shot groups need "
            f"every class in the training split{'; ' + hint if hint else ''}."
        )
    extra = {"skipped_images": skipped_images} if skipped_images is not None else {}
    return LongTailDataset(
        train=built["train"],
        val=built.get("val"),
        test=built["test"],
        num_classes=len(class_names),
        class_names=list(class_names),
        train_class_counts=counts,
        **extra,
    )
