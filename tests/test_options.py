"""Every training option is honoured by every data set or rejected for it, image folders are checked before
`datasets` reads them, and a bad image never costs a trained epoch."""

import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from lpt_peft.data import load_imagefolder_lt
from lpt_peft.training.arguments import LPTTrainingArguments
from lpt_peft.training.data import build_dataset
from lpt_peft.training.run import log_launch, run_training, warn_idle_cpu_cores

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
CLASSES = ("ant", "bee", "cow")


def write_png(path: Path, colour=(128, 128, 128), size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", (size, size), colour).save(path)


def write_truncated_jpeg(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    PIL.Image.fromarray(noise).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:400])


def image_folders(root: Path, train=(6, 3, 2), test=1, val=1) -> Path:
    for c, name in enumerate(CLASSES):
        for split, n in (("train", train[c]), ("test", test), ("val", val)):
            for i in range(n):
                write_png(root / split / name / f"{i}.png", COLOURS[c])
    return root


def places_lt_files(root: Path) -> tuple[Path, Path]:
    """A Places-LT-shaped set: 365 classes, split files in the OLTR format, one 4x4 image per class (reused)."""
    images, splits = root / "places365_standard", root / "splits"
    splits.mkdir(parents=True)
    lines = []
    for c in range(365):
        write_png(images / "train" / f"c{c:03d}" / "0.png", (c % 256, 0, 0), size=4)
        lines.append(f"train/c{c:03d}/0.png {c}")
    extra = [f"train/c000/{i}.png 0" for i in range(1, 4)]
    for i in range(1, 4):
        write_png(images / "train" / "c000" / f"{i}.png", size=4)
    for split, rows in (("train", lines + extra), ("val", lines), ("test", lines)):
        (splits / f"Places_LT_{split}.txt").write_text("\n".join(rows) + "\n")
    return images, splits


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    folders = image_folders(root / "folders")
    places_root, places_splits = places_lt_files(root / "places")
    return {
        "synthetic": {"dataset": "synthetic", "num_classes": 3, "n_max": 8, "imbalance": 4, "val_per_class": 1},
        "imagefolder": {
            "dataset": "imagefolder",
            "train_dir": str(folders / "train"),
            "test_dir": str(folders / "test"),
            "val_dir": str(folders / "val"),
        },
        "places_lt": {"dataset": "places_lt", "data_root": str(places_root), "split_dir": str(places_splits)},
        "someone/data": {"dataset": "someone/data"},
    }


def make_args(base, tmp_path=None, **overrides):
    values = {
        "model_name_or_path": "tiny-random", "image_size": 32, "batch_size": 8, "num_groups": 4, "shared_layers": 2,
        "num_workers": 0, "report_to": "none", "epochs_phase1": 1, "epochs_phase2": 1, "max_steps_per_epoch": 1,
        "output_dir": str((tmp_path or Path("/nonexistent")) / "out"), **base, **overrides,
    }  # fmt: skip
    return LPTTrainingArguments(**values)


# -------------------------------------------------------------------------------------- options x data sets
SAMPLE = {
    "data_root": "/data/x", "split_dir": "/data/splits", "train_json": "t.json", "val_json": "v.json",
    "train_dir": "/data/train", "val_dir": "/data/val", "test_dir": "/data/test", "n_max": 7, "imbalance": 8.0,
    "val_per_class": 2, "data_seed": 5, "num_classes": 4, "dataset_config_name": "cfg", "image_column": "img",
    "label_column": "fine_label", "train_split": "tr", "validation_split": "dev", "test_split": "holdout",
    "long_tail_profile": "exponential",
}  # fmt: skip
# Options only a Hub/local data set (datasets.load_dataset) has a use for.
HUB_ONLY = ("dataset_config_name", "image_column", "label_column", "train_split", "validation_split", "test_split",
            "long_tail_profile")  # fmt: skip
# Written by hand from what each data set is: which data options it has no use for (and therefore refuses).
REJECTED = {
    "synthetic": ("data_root", "split_dir", "train_json", "val_json", "train_dir", "val_dir", "test_dir", *HUB_ONLY),
    "imagefolder": ("data_root", "split_dir", "train_json", "val_json", "n_max", "imbalance", "val_per_class",
                    "data_seed", "num_classes", *HUB_ONLY),
    "places_lt": ("train_json", "val_json", "train_dir", "val_dir", "test_dir", "n_max", "imbalance",
                  "val_per_class", "data_seed", "num_classes", *HUB_ONLY),
    # A Hub id: its splits, columns and classes come from the data set (nothing is loaded to check the options).
    "someone/data": ("data_root", "split_dir", "train_json", "val_json", "train_dir", "val_dir", "test_dir",
                     "num_classes"),
}  # fmt: skip
REJECT_CASES = [(dataset, option) for dataset, options in REJECTED.items() for option in options]


@pytest.mark.parametrize("dataset,option", REJECT_CASES, ids=[f"{d}-{o}" for d, o in REJECT_CASES])
def test_a_data_option_the_data_set_would_ignore_is_rejected(fixtures, dataset, option):
    expected = rf"--{option} \S+ does not apply to --dataset {dataset} \(.*Remove --{option}"
    with pytest.raises(ValueError, match=expected):
        make_args(fixtures[dataset], **{option: SAMPLE[option]})


def _honoured(dataset, option):
    return option not in REJECTED[dataset] and option in SAMPLE


HONOURED_SYNTHETIC = [o for o in SAMPLE if _honoured("synthetic", o)]


@pytest.mark.parametrize("option", HONOURED_SYNTHETIC)
def test_synthetic_honours_its_data_options(fixtures, option):
    base = build_dataset(make_args(fixtures["synthetic"]))
    changed = build_dataset(make_args(fixtures["synthetic"], **{option: SAMPLE[option]}))
    if option == "num_classes":
        assert (base.num_classes, changed.num_classes) == (3, 4)
    elif option == "val_per_class":
        assert (len(base.val), len(changed.val)) == (3, 6)
    elif option == "data_seed":
        assert base.train[0]["image"].tobytes() != changed.train[0]["image"].tobytes()
    elif option == "n_max":  # int(n_max * imbalance^(-i / (C - 1))), by hand: 7, 7 / 2, 7 / 4
        assert (base.train_class_counts, changed.train_class_counts) == ([8, 4, 2], [7, 3, 1])
    else:  # imbalance 8: 8, 8 / sqrt(8), 8 / 8
        assert (base.train_class_counts, changed.train_class_counts) == ([8, 4, 2], [8, 2, 1])


@pytest.mark.parametrize("dataset", ["synthetic", "imagefolder", "places_lt"])
def test_max_test_per_class_and_verify_images_are_honoured_by_every_data_set(fixtures, dataset):
    data = build_dataset(make_args(fixtures[dataset], max_test_per_class=1, verify_images=True))
    labels = np.asarray(data.test["label"])
    assert np.bincount(labels).max() == 1 and len(labels) == data.num_classes
    assert set(data.skipped_images) >= {"train", "test"}  # every split was decoded once


def test_verify_images_skips_a_truncated_jpeg_in_image_folders(tmp_path, caplog):
    root = image_folders(tmp_path / "f")
    write_truncated_jpeg(root / "train" / "ant" / "broken.jpg")
    base = {"dataset": "imagefolder", "train_dir": str(root / "train"), "test_dir": str(root / "test")}
    with caplog.at_level(logging.WARNING):
        data = build_dataset(make_args(base, verify_images=True))
    assert data.skipped_images["train"] == 1 and data.train_class_counts == [6, 3, 2]
    assert "broken.jpg" in caplog.text
    unverified = build_dataset(make_args(base))
    assert unverified.train_class_counts == [7, 3, 2]  # the flag, not the loader, dropped it


# ---------------------------------------------------------------------------------- a bad image costs no epoch
def test_a_bad_validation_image_is_reported_before_training(tmp_path):
    root = image_folders(tmp_path / "f")
    write_truncated_jpeg(root / "val" / "bee" / "broken.jpg")
    base = {"dataset": "imagefolder", "train_dir": str(root / "train"), "test_dir": str(root / "test"),
            "val_dir": str(root / "val")}  # fmt: skip
    args = make_args(base, tmp_path, phase="1")
    expected = r"1 image\(s\) of the val split cannot be decoded .*broken\.jpg.*verify_images"
    with pytest.raises(ValueError, match=expected):
        run_training(args)
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "phase1").exists()
    run_training(make_args(base, tmp_path, phase="1", verify_images=True))  # skipped, trained, saved
    assert (tmp_path / "out" / "phase1" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------- image folder layout
def _load(train, test, val=None):
    return load_imagefolder_lt(train, test, val_dir=val, flag_prefix="--")


def test_single_class_training_folder_says_lpt_needs_two_classes(tmp_path):
    write_png(tmp_path / "train" / "ant" / "0.png")
    write_png(tmp_path / "test" / "ant" / "0.png")
    with pytest.raises(ValueError, match=r"has 1 class folder \(ant\); LPT .* needs at least 2 classes"):
        _load(tmp_path / "train", tmp_path / "test")


def test_test_folder_at_another_depth_than_train_loads(tmp_path):
    root = image_folders(tmp_path / "a")
    deeper = tmp_path / "b" / "c" / "d" / "test"
    for c, name in enumerate(CLASSES):
        write_png(deeper / name / "0.png", COLOURS[c])
    data = _load(root / "train", deeper)
    assert data.class_names == list(CLASSES) and data.train_class_counts == [6, 3, 2]
    assert [row["label"] for row in data.test] == [0, 1, 2]
    assert all(row["image"].getpixel((0, 0)) == COLOURS[row["label"]] for row in data.test)


def test_test_folder_one_level_above_its_class_folders_is_named(tmp_path):
    root = image_folders(tmp_path / "a")
    expected = rf"--test_dir {root}: test/ holds folders .* pass --test_dir {root / 'test'}"
    with pytest.raises(ValueError, match=expected):
        _load(root / "train", root)


def test_nested_subfolder_in_a_class_folder_is_named(tmp_path):
    root = image_folders(tmp_path / "a")
    write_png(root / "train" / "bee" / "extra" / "0.png")
    with pytest.raises(ValueError, match=r"Class folder .*train/bee \(--train_dir\) holds subfolder\(s\) \['extra'\]"):
        _load(root / "train", root / "test")


def test_metadata_file_in_a_class_folder_is_named(tmp_path):
    root = image_folders(tmp_path / "a")
    (root / "test" / "cow" / "metadata.csv").write_text("file_name,text\n0.png,a cow\n")
    with pytest.raises(ValueError, match=r"test/cow/metadata\.csv is a `datasets` imagefolder metadata file"):
        _load(root / "train", root / "test")


def test_loose_images_and_empty_class_folders_are_named(tmp_path):
    root = image_folders(tmp_path / "a")
    write_png(root / "train" / "stray.png")
    with pytest.raises(ValueError, match=r"holds 1 image\(s\) directly \(e\.g\. stray\.png\)"):
        _load(root / "train", root / "test")
    (root / "train" / "stray.png").unlink()
    (root / "train" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"Class folder\(s\) \['dog'\] .* hold no images"):
        _load(root / "train", root / "test")


# ------------------------------------------------------------------------------------------------ launch log
def test_launch_log_names_world_size_global_batch_and_device(caplog, monkeypatch):
    from accelerate import Accelerator

    args = make_args({"dataset": "synthetic"}, gradient_accumulation_steps=2)
    accelerator = Accelerator(cpu=True)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with caplog.at_level(logging.INFO, logger="lpt_peft.training.run"):
        log_launch(accelerator, args)
    assert "Training with 1 process(es) (world size 1) on cpu" in caplog.text
    assert "global batch 16 = 8 per process and branch x 1 process(es) x 2 accumulation step(s)" in caplog.text
    assert "ONE process" not in caplog.text
    # What `accelerate launch --cpu --num_processes 2` exports: it asked for several processes but started one.
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with caplog.at_level(logging.INFO, logger="lpt_peft.training.run"):
        log_launch(accelerator, args)
    assert "this run trains in ONE process" in caplog.text and "--multi_gpu --num_processes N" in caplog.text


def test_a_cpu_run_on_one_thread_of_several_cores_is_told_how_to_use_them(monkeypatch):
    """`accelerate launch` (no --cpu, no --num_cpu_threads_per_process) exports OMP_NUM_THREADS=1: the run says so and
    names the flag; with every core in use, or one core per process, it says nothing."""
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    threads = torch.get_num_threads()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    try:
        torch.set_num_threads(1)
        message = warn_idle_cpu_cores(accelerator)
        assert "1 thread(s) per process while 4 core(s)" in message and "OMP_NUM_THREADS=1" in message
        assert "--num_cpu_threads_per_process 4" in message
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine: 2 threads each
        assert "--num_cpu_threads_per_process 2" in warn_idle_cpu_cores(accelerator)
        torch.set_num_threads(2)
        assert warn_idle_cpu_cores(accelerator) is None
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        torch.set_num_threads(1)
        assert warn_idle_cpu_cores(accelerator) is None
    finally:
        torch.set_num_threads(threads)
