"""Tests of lpt_peft.data: long-tailed profiles, benchmark loaders, Fashion-MNIST and the LPT transforms."""

import gzip
import json
import logging
import pickle
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import places_lt_split_dir

from lpt_peft.data import (
    LongTailDataset,
    LPTImageTransform,
    TransformedImageDataset,
    benchmarks,
    count_labels,
    dataset_from_uint8_arrays,
    labels_as_numpy,
    load_fashion_mnist,
    load_fashion_mnist_lt,
    load_imagefolder_lt,
    load_inaturalist2018,
    load_places_lt,
    load_split_file_dataset,
    long_tail_counts,
    make_long_tailed,
    read_split_file,
    to_rgb,
)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Colour of the synthetic images of class `c`, so that a decoded image reveals its label.
COLOURS = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (120, 120, 0)]


def _write_png(path: Path, colour=(0, 0, 0), size=(6, 5), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new(mode, size, colour).save(path, format="PNG")  # lossless, whatever the extension


def _labelled_dataset(per_class: list[int]) -> datasets.Dataset:
    labels = [c for c, n in enumerate(per_class) for _ in range(n)]
    features = datasets.Features(
        {"id": datasets.Value("int64"), "label": datasets.ClassLabel(names=[f"c{i}" for i in range(len(per_class))])}
    )
    return datasets.Dataset.from_dict({"id": list(range(len(labels))), "label": labels}, features=features)


# ----------------------------------------------------------------------------------------------- long-tail profile


def test_long_tail_counts_hand_computed():
    # 500 * 100 ** (-c / 9), floored, computed by hand.
    assert long_tail_counts(10, 500, 100) == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    # 30 * 10 ** (-c / 4): 30, 16.87, 9.49, 5.33, 3.
    assert long_tail_counts(5, 30, 10) == [30, 16, 9, 5, 3]
    assert long_tail_counts(4, 7, 1) == [7, 7, 7, 7]
    assert long_tail_counts(1, 9, 50) == [9]


def test_long_tail_counts_cifar100_lt():
    counts = long_tail_counts(100, 500, 100)
    assert len(counts) == 100 and sum(counts) == 10_847 and max(counts) == 500 and min(counts) == 5
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    assert sum(long_tail_counts(100, 500, 50)) == 12_608 and sum(long_tail_counts(100, 500, 10)) == 19_573


@pytest.mark.parametrize(
    "args, match",
    [
        ((10, 500, 0.01), "imbalance"),
        ((10, 50, 100), "0 images"),
        ((0, 500, 100), "num_classes"),
        ((3, 0, 2), "n_max"),
    ],
)
def test_long_tail_counts_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        long_tail_counts(*args)


def test_make_long_tailed_counts_val_and_determinism():
    ds = _labelled_dataset([40] * 5)
    train, val = make_long_tailed(ds, n_max=30, imbalance=10, seed=3, val_per_class=4)
    assert count_labels(labels_as_numpy(train), 5) == [30, 16, 9, 5, 3]
    assert count_labels(labels_as_numpy(val), 5) == [4] * 5
    train_ids, val_ids = set(train["id"]), set(val["id"])
    assert len(train_ids) == len(train) and not train_ids & val_ids
    # Every kept row still carries its original label.
    original = dict(zip(ds["id"], ds["label"]))
    assert all(original[i] == label for i, label in zip(train["id"], train["label"]))

    again, again_val = make_long_tailed(ds, n_max=30, imbalance=10, seed=3, val_per_class=4)
    assert list(again["id"]) == list(train["id"]) and list(again_val["id"]) == list(val["id"])
    other, _ = make_long_tailed(ds, n_max=30, imbalance=10, seed=4, val_per_class=4)
    assert list(other["id"]) != list(train["id"])
    assert make_long_tailed(ds, n_max=30, imbalance=10)[1] is None


def test_make_long_tailed_matches_cifar_lt_procedure():
    # Reference: the usual CIFAR-LT construction, one RandomState shuffling each class's indices in turn.
    ds = _labelled_dataset([25, 25, 25, 25])
    labels = np.asarray(ds["label"])
    rng = np.random.RandomState(0)
    expected = []
    for cls, n in enumerate([20, 7, 2, 1]):  # floor(20 * 20 ** (-c / 3)): 20, 7.37, 2.71, 1
        idx = np.where(labels == cls)[0]
        rng.shuffle(idx)
        expected.extend(idx[:n].tolist())
    train, _ = make_long_tailed(ds, n_max=20, imbalance=20, seed=0)
    assert sorted(train["id"]) == sorted(expected)


def test_make_long_tailed_class_order_and_errors():
    ds = _labelled_dataset([40] * 5)
    train, _ = make_long_tailed(ds, n_max=30, imbalance=10, class_order=[4, 3, 2, 1, 0])
    assert count_labels(labels_as_numpy(train), 5) == [3, 5, 9, 16, 30]
    with pytest.raises(ValueError, match="permutation"):
        make_long_tailed(ds, n_max=30, imbalance=10, class_order=[0, 1, 2, 3, 3])
    small = _labelled_dataset([40, 12, 40])
    with pytest.raises(ValueError, match=r"Class 1 \('c1'\) has 12 images but 14 are requested \(9 train \+ 5 val\)"):
        make_long_tailed(small, n_max=30, imbalance=10, val_per_class=5)  # counts 30, 9, 3


def test_save_class_info(tmp_path):
    ds = _labelled_dataset([3, 1])
    data = LongTailDataset(ds, None, ds, 2, ["a", "b"], [3, 1])
    data.save_class_info(tmp_path / "out" / "info.json")
    info = json.loads((tmp_path / "out" / "info.json").read_text())
    assert info["class_names"] == ["a", "b"] and info["train_class_counts"] == [3, 1] and info["num_classes"] == 2
    assert info["split_sizes"] == {"train": 4, "test": 4}
    with pytest.raises(ValueError, match="class_names"):
        LongTailDataset(ds, None, ds, 3, ["a", "b"], [3, 1, 0])


# ----------------------------------------------------------------------------------------------- Places-LT splits


def test_places_lt_shot_groups_from_split_files():
    PLACES_LT_DIR = places_lt_split_dir()
    paths, labels = read_split_file(PLACES_LT_DIR / "Places_LT_train.txt")
    assert len(paths) == 62_500 and paths[0] == "train/airfield/00004851.jpg" and labels[0] == 0
    counts = np.bincount(labels)
    assert len(counts) == 365 and counts.max() == 4980 and counts.min() == 5
    many, few = (counts > 100).sum(), (counts < 20).sum()
    assert (many, len(counts) - many - few, few) == (131, 163, 71)  # standard: many > 100, few < 20
    few_author = (counts <= 20).sum()
    assert (many, len(counts) - many - few_author, few_author) == (131, 157, 77)  # the authors' code: n <= 20 few
    _, val_labels = read_split_file(PLACES_LT_DIR / "Places_LT_val.txt")
    _, test_labels = read_split_file(PLACES_LT_DIR / "Places_LT_test.txt")
    assert np.bincount(val_labels).tolist() == [20] * 365 and np.bincount(test_labels).tolist() == [100] * 365
    names = benchmarks._derive_class_names(paths, labels, 365)
    assert names[0] == "airfield" and names[3] == "alcove" and len(set(names)) == 365


def test_load_places_lt_reports_missing_images(tmp_path):
    PLACES_LT_DIR = places_lt_split_dir()
    with pytest.raises(FileNotFoundError, match=r"62500 of 62500 images .*Places_LT_train.txt.*places365standard"):
        load_places_lt(tmp_path, PLACES_LT_DIR)
    with pytest.raises(FileNotFoundError, match=r"Image root .* does not exist.*train/airfield/00004851.jpg"):
        load_places_lt(tmp_path / "nowhere", PLACES_LT_DIR)
    with pytest.raises(FileNotFoundError, match="Places_LT_train.txt"):
        load_places_lt(tmp_path, tmp_path)


# ----------------------------------------------------------------------------------------------- split-file loader


def _split_file_tree(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    root = tmp_path / "root"
    names = ["cat", "dog", "eel"]
    lines = {"train": [], "val": [], "test": []}
    for split, per_class in (("train", [5, 2, 1]), ("val", [1, 1, 1]), ("test", [2, 2, 2])):
        folder = "val" if split == "test" else "train"
        for label, n in enumerate(per_class):
            for i in range(n):
                rel = f"{folder}/{names[label]}/{split}_{i}.png"
                _write_png(root / rel, COLOURS[label])
                lines[split].append(f"{rel} {label}")
    files = {}
    for split, split_lines in lines.items():
        files[split] = tmp_path / f"{split}.txt"
        files[split].write_text("\n".join(split_lines) + "\n\n")  # trailing blank lines are allowed
    return root, files


def test_split_file_loader_reads_labels_and_images(tmp_path):
    root, files = _split_file_tree(tmp_path)
    data = load_split_file_dataset(root, files)
    assert data.num_classes == 3 and data.class_names == ["cat", "dog", "eel"]
    assert data.train_class_counts == [5, 2, 1]
    assert (len(data.train), len(data.val), len(data.test)) == (8, 3, 6)
    assert data.skipped_images == {}
    for split in (data.train, data.val, data.test):
        assert isinstance(split.features["image"], datasets.Image)
        assert split.features["label"].names == ["cat", "dog", "eel"]
        for row in split:
            assert row["image"].getpixel((0, 0)) == COLOURS[row["label"]]


def test_split_file_loader_without_val_and_with_given_names(tmp_path):
    root, files = _split_file_tree(tmp_path)
    data = load_split_file_dataset(root, {"train": files["train"], "test": files["test"]}, class_names=["a", "b", "c"])
    assert data.val is None and data.class_names == ["a", "b", "c"] and len(data.test) == 6


def test_split_file_loader_errors(tmp_path):
    root, files = _split_file_tree(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Image root .*missing_root does not exist.*train/cat/train_0.png"):
        load_split_file_dataset(tmp_path / "missing_root", files)

    (root / "train/dog/train_1.png").unlink()
    (root / "train/cat/train_3.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 8 images listed in .*train.txt are missing.*train_3.png"):
        load_split_file_dataset(root, files)

    root, files = _split_file_tree(tmp_path / "fresh")
    bad = tmp_path / "bad.txt"
    bad.write_text("train/cat/train_0.png 0\ntrain/cat/train_1.png zero\n")
    with pytest.raises(ValueError, match=r"bad.txt, line 2: expected '<relative/image/path> <integer label>'"):
        load_split_file_dataset(root, {"train": bad, "test": files["test"]})
    bad.write_text("train/cat/train_0.png\n")
    with pytest.raises(ValueError, match="line 1"):
        read_split_file(bad)

    out_of_range = tmp_path / "range.txt"
    out_of_range.write_text("train/cat/train_0.png 0\ntrain/cat/train_1.png 3\n")
    with pytest.raises(ValueError, match=r"range.txt, line 2: label 3 is out of range for num_classes=3"):
        load_split_file_dataset(root, {"train": out_of_range, "test": files["test"]}, num_classes=3)
    with pytest.raises(ValueError, match="needs a 'test' entry"):
        load_split_file_dataset(root, {"train": files["train"]})
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_split_file_dataset(root, {"train": tmp_path / "nope.txt", "test": files["test"]})
    with pytest.raises(ValueError, match="no training images"):
        load_split_file_dataset(root, files, num_classes=4)


def _corrupt_tree(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    root, files = _split_file_tree(tmp_path)
    # A truncated PNG (header intact, pixel data cut) and a text file posing as an image.
    noisy = root / "train/cat/train_1.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noisy)
    noisy.write_bytes(noisy.read_bytes()[:300])
    (root / "train/cat/train_2.png").write_text("not an image")
    return root, files


def test_verify_images_skips_and_counts_unreadable(tmp_path, caplog):
    root, files = _corrupt_tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lpt_peft.data.benchmarks"):
        data = load_split_file_dataset(root, files, verify_images=True)
    assert data.skipped_images == {"train": 2, "val": 0, "test": 0}
    assert len(data.train) == 6 and data.train_class_counts == [3, 2, 1]
    assert "Skipped 2 unreadable" in caplog.text
    batch = next(iter(torch.utils.data.DataLoader(TransformedImageDataset(data.train, LPTImageTransform(4)), 8)))
    assert batch["pixel_values"].shape == (6, 3, 4, 4)


def test_unreadable_image_without_verify_raises_clear_error(tmp_path):
    root, files = _corrupt_tree(tmp_path)
    data = load_split_file_dataset(root, files)
    ds = TransformedImageDataset(data.train, LPTImageTransform(4, train=False))
    broken = [
        i
        for i, path in enumerate(data.train.cast_column("image", datasets.Image(decode=False))["image"])
        if path["path"].endswith(("train_1.png", "train_2.png")) and "/cat/" in path["path"]
    ]
    assert len(broken) == 2
    for i in broken:
        expected = r"Could not decode image file '.*cat/train_[12].png'.*verify_images=True"
        with pytest.raises(ValueError, match=expected):
            ds[i]
    readable = next(i for i in range(len(ds)) if i not in broken)
    assert ds[readable]["pixel_values"].shape == (3, 4, 4)  # the other rows still work


# ----------------------------------------------------------------------------------------------- transforms


def _normalise(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1).sub(0.5).div(0.5)


def test_eval_transform_defaults_shape_range_and_determinism():
    image = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    transform = LPTImageTransform(224, train=False)
    assert transform.resize_size == 256 and LPTImageTransform(32).resize_size == 37  # round(32 * 256 / 224)
    out = transform(image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert torch.equal(out, transform(image))
    grey = transform(PIL.Image.new("RGB", (50, 70), (51, 102, 255)))
    expected = torch.tensor([51 / 255 * 2 - 1, 102 / 255 * 2 - 1, 1.0]).view(3, 1, 1).expand(3, 224, 224)
    assert torch.allclose(grey, expected, atol=1e-6)


def test_eval_transform_equals_hand_computed_resize_and_centre_crop():
    pixels = np.random.default_rng(2).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    # Resize to the same 4x4 is the identity; the centre 2x2 crop starts at offset (4 - 2) / 2 = 1.
    out = LPTImageTransform(2, train=False, resize_size=4)(PIL.Image.fromarray(pixels))
    assert torch.allclose(out, _normalise(pixels[1:3, 1:3]), atol=1e-6)

    pixels = np.random.default_rng(3).integers(0, 256, (9, 13, 3), dtype=np.uint8)
    resized = np.asarray(PIL.Image.fromarray(pixels).resize((8, 8), PIL.Image.Resampling.BILINEAR))
    out = LPTImageTransform(6, train=False, resize_size=8)(PIL.Image.fromarray(pixels))
    assert torch.allclose(out, _normalise(resized[1:7, 1:7]), atol=1e-6)


def test_mode_conversion_to_rgb():
    transform = LPTImageTransform(4, train=False, resize_size=4)
    grey = PIL.Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 10)
    out = transform(grey)
    assert out.shape == (3, 4, 4) and torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    assert torch.allclose(out[0], torch.from_numpy(np.arange(16).reshape(4, 4) * 10 / 255.0).float() * 2 - 1)

    rgba = np.random.default_rng(4).integers(0, 256, (4, 4, 4), dtype=np.uint8)
    out = transform(PIL.Image.fromarray(rgba))
    assert PIL.Image.fromarray(rgba).mode == "RGBA"
    assert torch.allclose(out, _normalise(rgba[..., :3]), atol=1e-6)  # alpha dropped, colours kept

    palette = PIL.Image.fromarray(rgba[..., :3]).convert("P")
    assert torch.allclose(transform(palette), _normalise(np.asarray(palette.convert("RGB"))), atol=1e-6)
    assert transform(PIL.Image.new("CMYK", (4, 4), (0, 0, 0, 0))).allclose(torch.ones(3, 4, 4))  # white

    deep = PIL.Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(deep).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(TypeError, match="PIL image"):
        transform(np.zeros((4, 4, 3), dtype=np.uint8))


def test_train_transform_seeded_and_flip():
    image = PIL.Image.fromarray(np.random.default_rng(5).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    a, b = LPTImageTransform(8, train=True, seed=7), LPTImageTransform(8, train=True, seed=7)
    assert all(torch.equal(a(image), b(image)) for _ in range(5))
    c = LPTImageTransform(8, train=True, seed=8)
    assert any(not torch.equal(a(image), c(image)) for _ in range(5))

    # With a full-image square crop only the flip is random: outputs are the image or its mirror.
    flip_only = LPTImageTransform(8, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), seed=0)
    plain = _normalise(np.asarray(image))
    mirrored = plain.flip(-1)
    outs = [flip_only(image) for _ in range(40)]
    n_plain = sum(torch.allclose(o, plain) for o in outs)
    n_mirror = sum(torch.allclose(o, mirrored) for o in outs)
    assert n_plain + n_mirror == 40 and 8 <= n_plain <= 32


def test_train_transform_crop_is_a_window_of_the_image():
    # Each pixel encodes its (row, column), so a crop reveals where it came from.
    rows, cols = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    pixels = np.stack([rows * 10, cols * 10, np.full_like(rows, 7)], axis=-1).astype(np.uint8)
    transform = LPTImageTransform(8, train=True, scale=(0.25, 0.25), ratio=(1.0, 1.0), seed=1)
    offsets = set()
    for _ in range(30):
        out = transform(PIL.Image.fromarray(pixels))
        matches = [
            (top, left)
            for top in range(9)
            for left in range(9)
            for window in (pixels[top : top + 8, left : left + 8],)
            if torch.allclose(out, _normalise(window)) or torch.allclose(out, _normalise(window[:, ::-1]))
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 5

    # No 10x10 square fits a 20x5 image, so the fallback takes the centred 5x5 square (left = (20 - 5) // 2).
    wide = np.random.default_rng(6).integers(0, 256, (5, 20, 3), dtype=np.uint8)
    fallback = LPTImageTransform(5, train=True, scale=(1.0, 1.0), ratio=(1.0, 1.0), seed=0)
    out = fallback(PIL.Image.fromarray(wide))
    window = wide[:, 7:12]
    assert torch.allclose(out, _normalise(window)) or torch.allclose(out, _normalise(window[:, ::-1]))


def test_global_rng_when_unseeded():
    image = PIL.Image.fromarray(np.random.default_rng(9).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    transform = LPTImageTransform(8, train=True)
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(0)
    assert torch.equal(first, transform(image))


def test_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="resize_size"):
        LPTImageTransform(224, resize_size=200)
    with pytest.raises(ValueError, match="scale"):
        LPTImageTransform(224, train=True, scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="interpolation"):
        LPTImageTransform(224, interpolation="lanczos")
    with pytest.raises(ValueError, match="std"):
        LPTImageTransform(224, std=(0.5, 0.0, 0.5))


def test_transformed_dataset_in_a_dataloader_with_the_default_collate():
    images = np.random.default_rng(10).integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    ds = dataset_from_uint8_arrays(images, [i % 3 for i in range(10)], ["a", "b", "c"])
    assert np.array_equal(np.asarray(ds[4]["image"]), images[4])
    eval_ds = TransformedImageDataset(ds, LPTImageTransform(12, train=False, resize_size=12))
    row = eval_ds[4]
    assert torch.allclose(row["pixel_values"], _normalise(images[4])) and row["labels"].item() == 1
    loader = torch.utils.data.DataLoader(TransformedImageDataset(ds, LPTImageTransform(8, train=True)), batch_size=4)
    batches = list(loader)
    assert [b["pixel_values"].shape for b in batches] == [(4, 3, 8, 8), (4, 3, 8, 8), (2, 3, 8, 8)]
    assert torch.cat([b["labels"] for b in batches]).tolist() == [i % 3 for i in range(10)]
    assert batches[0]["labels"].dtype == torch.int64
    with pytest.raises(ValueError, match=r"Column 'pixels' not found; the dataset has columns \['image', 'label'\]"):
        TransformedImageDataset(ds, LPTImageTransform(8), image_column="pixels")


def test_augmentation_is_a_function_of_seed_epoch_and_index_only():
    images = np.random.default_rng(11).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    ds = dataset_from_uint8_arrays(images, [0, 1, 2, 0, 1, 2], ["a", "b", "c"])
    transform = LPTImageTransform(8, train=True)
    train = TransformedImageDataset(ds, transform, seed=3)
    train.set_epoch(2)
    # Reference: the same transform called with the generator of numpy SeedSequence([3, 2, i]), as documented.
    for i in (5, 0, 3):  # any order
        state = np.random.SeedSequence([3, 2, i]).generate_state(1, dtype=np.uint64)[0]
        generator = torch.Generator().manual_seed(int(state) >> 1)
        assert torch.equal(train[i]["pixel_values"], transform(PIL.Image.fromarray(images[i]), generator=generator))
    two_workers = torch.utils.data.DataLoader(train, batch_size=2, num_workers=2)
    in_process = torch.stack([train[i]["pixel_values"] for i in range(6)])
    assert torch.equal(torch.cat([b["pixel_values"] for b in two_workers]), in_process)
    epoch_two = train[0]["pixel_values"]
    train.set_epoch(3)
    assert not torch.equal(train[0]["pixel_values"], epoch_two)
    assert not torch.equal(TransformedImageDataset(ds, transform, seed=4)[0]["pixel_values"], train[0]["pixel_values"])


# ----------------------------------------------------------------------------------------------- Fashion-MNIST


def _read_idx_reference(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8).reshape(shape)


fashion_files = pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian's dataset-fashion-mnist is not installed",
)


@fashion_files
def test_load_fashion_mnist():
    start = time.perf_counter()
    data = load_fashion_mnist()
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"loading Fashion-MNIST took {elapsed:.1f}s"
    assert len(data["train"]) == 60_000 and len(data["test"]) == 10_000
    names = data["train"].features["label"].names
    assert len(names) == 10 and names[0] == "T-shirt/top" and names[9] == "Ankle boot"
    assert np.bincount(labels_as_numpy(data["train"])).tolist() == [6000] * 10
    assert np.bincount(labels_as_numpy(data["test"])).tolist() == [1000] * 10
    reference = _read_idx_reference(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    reference_labels = _read_idx_reference(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    for i in (0, 1234, 9999):
        row = data["test"][i]
        assert row["image"].mode == "L" and row["image"].size == (28, 28)
        assert np.array_equal(np.asarray(row["image"]), reference[i]) and row["label"] == reference_labels[i]


@fashion_files
def test_load_fashion_mnist_lt(tmp_path):
    data = load_fashion_mnist_lt(n_max=500, imbalance=100, seed=0, val_per_class=20)
    assert data.train_class_counts == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert len(data.train) == 1236 and count_labels(labels_as_numpy(data.train), 10) == data.train_class_counts
    assert count_labels(labels_as_numpy(data.val), 10) == [20] * 10
    assert len(data.test) == 10_000 and data.num_classes == 10
    again = load_fashion_mnist_lt(n_max=500, imbalance=100, seed=0, val_per_class=20)
    assert np.array_equal(np.asarray(data.train[100]["image"]), np.asarray(again.train[100]["image"]))


def test_fashion_mnist_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


# ----------------------------------------------------------------------------------------------- iNaturalist / folders


def _inat_tree(tmp_path: Path) -> Path:
    root = tmp_path / "inat"
    categories = [{"id": 7, "name": "Vulpes vulpes"}, {"id": 3, "name": "Quercus robur"}, {"id": 5, "name": "Apis"}]
    colour_of = {3: COLOURS[0], 5: COLOURS[1], 7: COLOURS[2]}  # label order = sorted ids: 3, 5, 7

    def write(name, per_category):
        images, annotations = [], []
        for category_id, n in per_category.items():
            for i in range(n):
                image_id = len(images) + (1000 if name == "val" else 0)
                file_name = f"train_val2018/Plantae/{category_id}/{name}_{i}.jpg"
                _write_png(root / file_name, colour_of[category_id])  # PNG bytes; PIL sniffs the format
                images.append({"id": image_id, "file_name": file_name, "width": 6, "height": 5})
                annotations.append({"id": image_id, "image_id": image_id, "category_id": category_id})
        data = {"images": images, "annotations": annotations, "categories": categories}
        (root / f"{name}2018.json").write_text(json.dumps(data))

    write("train", {3: 4, 5: 2, 7: 1})
    write("val", {3: 1, 5: 1, 7: 1})
    return root


def test_load_inaturalist2018(tmp_path):
    root = _inat_tree(tmp_path)
    data = load_inaturalist2018(root, "train2018.json", root / "val2018.json")
    assert data.val is None and data.num_classes == 3
    assert data.class_names == ["Quercus robur", "Apis", "Vulpes vulpes"]
    assert data.train_class_counts == [4, 2, 1] and len(data.test) == 3
    for split in (data.train, data.test):
        for row in split:
            assert row["image"].getpixel((0, 0)) == COLOURS[row["label"]]

    broken = json.loads((root / "val2018.json").read_text())
    broken["annotations"][0]["category_id"] = 99
    (root / "bad.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"category ids missing from 'categories': \[99\]"):
        load_inaturalist2018(root, "train2018.json", "bad.json")
    broken["annotations"] = broken["annotations"][1:]
    (root / "bad.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="1 image.* have no annotation"):
        load_inaturalist2018(root, "train2018.json", "bad.json")
    with pytest.raises(FileNotFoundError, match="inat_comp"):
        load_inaturalist2018(tmp_path / "absent", "train2018.json", "val2018.json")
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_inaturalist2018(root, "missing.json", "val2018.json")


def test_load_imagefolder_lt(tmp_path):
    base = tmp_path / "folders"
    for split, per_class in (("train", {"ant": 3, "bee": 1, "cow": 2}), ("test", {"ant": 1, "bee": 1, "cow": 1})):
        for name, n in per_class.items():
            for i in range(n):
                _write_png(base / split / name / f"{i}.png", COLOURS["abc".index(name[0])])
    _write_png(base / "val" / "cow" / "0.png", COLOURS[2])

    data = load_imagefolder_lt(base / "train", base / "test", val_dir=base / "val", cache_dir=tmp_path / "cache")
    assert data.class_names == ["ant", "bee", "cow"] and data.train_class_counts == [3, 1, 2]
    assert (len(data.train), len(data.val), len(data.test)) == (6, 1, 3)
    for row in data.train:
        assert row["image"].getpixel((0, 0)) == COLOURS[row["label"]]
    assert data.val[0]["label"] == 2

    from_root = load_imagefolder_lt(base, cache_dir=tmp_path / "cache")
    assert from_root.train_class_counts == [3, 1, 2] and len(from_root.val) == 1

    _write_png(base / "test" / "dog" / "0.png", COLOURS[3])
    with pytest.raises(ValueError, match=r"\['dog'\] appear only outside"):
        load_imagefolder_lt(base / "train", base / "test", cache_dir=tmp_path / "cache2")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_imagefolder_lt(base / "train", tmp_path / "absent", cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="test_dir"):
        load_imagefolder_lt(base / "train")



def test_imagefolder_images_without_any_class_folder_are_named(tmp_path):
    """Images directly in train/ with no class folders: the message said "beside class folders" (there are none)."""
    for i in range(3):
        _write_png(tmp_path / "train" / f"{i}.png", COLOURS[0])
        _write_png(tmp_path / "test" / "ant" / f"{i}.png", COLOURS[0])
    with pytest.raises(ValueError) as err:
        load_imagefolder_lt(tmp_path / "train", tmp_path / "test", flag_prefix="--")
    message = str(err.value)
    assert "holds 3 image(s) directly (e.g. 0.png) and no class folders" in message
    assert f"{tmp_path / 'train'}/<class name>/0.png" in message and "beside" not in message
    # Beside class folders, the message names them.
    _write_png(tmp_path / "train" / "ant" / "0.png", COLOURS[0])
    _write_png(tmp_path / "train" / "bee" / "0.png", COLOURS[1])
    with pytest.raises(ValueError, match=r"directly \(e\.g\. 0\.png\) beside class folders \(ant, bee\)"):
        load_imagefolder_lt(tmp_path / "train", tmp_path / "test", flag_prefix="--")


# ----------------------------------------------------------------------------------------------- CIFAR-100 helpers


def test_cifar100_python_pickles_are_decoded_channel_first(tmp_path):
    # load_cifar100_lt itself would need the real data; only its local-file readers are tested (no network).
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    rows = images.transpose(0, 3, 1, 2).reshape(6, -1)  # CIFAR rows: all red, then green, then blue
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, part in (("train", slice(0, 4)), ("test", slice(4, 6))):
        with open(folder / split, "wb") as f:
            pickle.dump({"data": rows[part], "fine_labels": [1, 0, 2, 1][: len(rows[part])]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": ["apple", "bee", "cup"]}, f)
    data = benchmarks._standardise_cifar_columns(benchmarks._load_cifar100(tmp_path))
    assert len(data["train"]) == 4 and data["train"].features["label"].names == ["apple", "bee", "cup"]
    assert np.array_equal(np.asarray(data["train"][2]["image"]), images[2]) and data["train"][2]["label"] == 2
    assert np.array_equal(np.asarray(data["test"][1]["image"]), images[5])

    Dataset = datasets.Dataset
    renamed = datasets.DatasetDict(
        {s: Dataset.from_dict({"img": [1], "fine_label": [0], "coarse_label": [9]}) for s in ("train", "test")}
    )
    assert benchmarks._standardise_cifar_columns(renamed)["train"].column_names == ["image", "label"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        benchmarks._load_cifar100(tmp_path / "absent")


def test_seed_from_keys_is_seedsequence_and_checks_its_keys():
    from lpt_peft.data import seed_from_keys

    expected = int(np.random.SeedSequence([7, 0, 12]).generate_state(1, dtype=np.uint64)[0]) >> 1
    assert seed_from_keys(7, 0, 12) == expected < 2**63
    assert seed_from_keys(-1) == seed_from_keys(2**64 - 1)  # negative keys wrap modulo 2**64
    with pytest.raises(ValueError, match="integers"):
        seed_from_keys(True)
    with pytest.raises(ValueError, match="integers"):
        seed_from_keys()
