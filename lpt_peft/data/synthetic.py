"""A small synthetic long-tailed image data set, learnable in seconds, for tests and smoke runs."""

from __future__ import annotations

import numpy as np

from lpt_peft.data.long_tail import LongTailDataset, dataset_from_uint8_arrays, long_tail_counts
from lpt_peft.data.registry import register_dataset


def make_synthetic_long_tail(
    num_classes: int = 10,
    n_max: int = 40,
    imbalance: float = 10.0,
    image_size: int = 32,
    val_per_class: int = 4,
    test_per_class: int = 8,
    noise: float = 40.0,
    seed: int = 0,
) -> LongTailDataset:
    """Images whose class is a coarse colour pattern under pixel noise; class sizes follow the exponential profile.

    Example:

    ```python
    >>> data = make_synthetic_long_tail(num_classes=5, n_max=20, imbalance=10)
    >>> data.train_class_counts
    [20, 11, 6, 3, 2]
    ```
    """
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, size=(num_classes, 4, 4, 3)).astype(np.float32)
    counts = long_tail_counts(num_classes, n_max, imbalance)

    def draw(per_class: list[int]) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(num_classes), per_class)
        cell = image_size // 4
        base = patterns[labels].repeat(cell, axis=1).repeat(cell, axis=2)
        pad = image_size - base.shape[1]
        base = np.pad(base, ((0, 0), (0, pad), (0, pad), (0, 0)), mode="edge")
        images = np.clip(base + rng.normal(0.0, noise, size=base.shape), 0, 255).astype(np.uint8)
        return images, labels

    names = [f"class_{i}" for i in range(num_classes)]
    train = dataset_from_uint8_arrays(*draw(counts), names)
    val = dataset_from_uint8_arrays(*draw([val_per_class] * num_classes), names) if val_per_class else None
    test = dataset_from_uint8_arrays(*draw([test_per_class] * num_classes), names)
    return LongTailDataset(
        train=train, val=val, test=test, num_classes=num_classes, class_names=names, train_class_counts=counts
    )


@register_dataset("synthetic")
def synthetic(
    num_classes: int = 10,
    n_max: int = 40,
    imbalance: float = 10.0,
    image_size: int = 32,
    val_per_class: int = 4,
    data_seed: int = 0,
) -> LongTailDataset:
    """Synthetic: it is generated in memory (coloured patterns under noise, exponential class sizes).

    The options of [`make_synthetic_long_tail`] under the names of the command line (`data_seed` is its `seed`).
    """
    return make_synthetic_long_tail(
        num_classes=num_classes,
        n_max=n_max,
        imbalance=imbalance,
        image_size=image_size,
        val_per_class=val_per_class,
        seed=data_seed,
    )
