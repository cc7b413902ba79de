"""The data-set registry: built-ins by name, options declared by signature and refused otherwise, any Hub/local data
set through `datasets.load_dataset` (tested on local `save_to_disk` and parquet copies, never the network), and the
worked example of docs/extending.md."""

import json
import re
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest

from lpt_peft.data import (
    LongTailDataset,
    create_dataset,
    dataset_options,
    dataset_options_from_args,
    list_datasets,
    long_tail_counts,
    make_synthetic_long_tail,
    register_dataset,
)
from lpt_peft.data import registry as registry_module
from lpt_peft.training.arguments import DATASETS, LPTTrainingArguments
from lpt_peft.training.run import build_dataset, run_training

REPO = Path(__file__).resolve().parents[1]
NAMES = ["ant", "bee", "cow"]


# ------------------------------------------------------------------------------------------------ the registry
# Written by hand from each loader's documented inputs (docs/datasets.md), not read from the registry.
EXPECTED_OPTIONS = {
    "synthetic": {"num_classes", "n_max", "imbalance", "image_size", "val_per_class", "data_seed"},
    "fashion_mnist_lt": {"n_max", "imbalance", "data_seed", "val_per_class", "data_root"},
    "cifar100_lt": {"n_max", "imbalance", "data_seed", "val_per_class", "data_root"},
    "places_lt": {"data_root", "split_dir"},
    "imagenet_lt": {"data_root", "split_dir"},
    "inat2018": {"data_root", "train_json", "val_json"},
    "imagefolder": {"train_dir", "test_dir", "val_dir"},
    "hfds": {"path", "dataset_config_name", "image_column", "label_column", "train_split", "validation_split",
             "test_split", "long_tail_profile", "n_max", "imbalance", "data_seed", "val_per_class"},
}  # fmt: skip
COMMON = {"verify_images", "num_workers", "max_test_per_class"}


def test_every_built_in_is_registered_with_its_options():
    assert set(EXPECTED_OPTIONS) <= set(list_datasets())
    assert list_datasets() == sorted(list_datasets()) and set(DATASETS) == set(list_datasets())
    for name, options in EXPECTED_OPTIONS.items():
        assert dataset_options(name) == options | COMMON, name


def test_create_dataset_builds_what_the_loader_builds():
    data = create_dataset("synthetic", num_classes=3, n_max=8, imbalance=4, image_size=8, data_seed=2)
    reference = make_synthetic_long_tail(num_classes=3, n_max=8, imbalance=4, image_size=8, seed=2)
    assert data.train_class_counts == reference.train_class_counts == [8, 4, 2]
    for split in ("train", "val", "test"):
        ours, theirs = getattr(data, split), getattr(reference, split)
        assert ours["label"] == theirs["label"]
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours["image"], theirs["image"]))


def test_an_option_the_builder_does_not_declare_is_refused_with_the_fix():
    expected = (
        r"Option `split_dir='/s'` does not apply to data set 'synthetic' \(Synthetic: it is generated in memory.*"
        r"its options are data_seed, image_size, .*\); only imagenet_lt, places_lt use it\. Remove `split_dir=`"
    )
    with pytest.raises(ValueError, match=expected):
        create_dataset("synthetic", split_dir="/s")
    with pytest.raises(ValueError, match=r"Data set 'places_lt' needs `data_root`, `split_dir`"):
        create_dataset("places_lt")
    with pytest.raises(ValueError, match=r"'placs_lt' is not registered .* Did you mean 'places_lt'\?"):
        create_dataset("placs_lt")


def test_common_options_hold_for_every_builder():
    capped = create_dataset("synthetic", num_classes=3, n_max=8, imbalance=4, image_size=8, max_test_per_class=3)
    assert np.bincount(capped.test["label"]).tolist() == [3, 3, 3]  # 8 per class before
    verified = create_dataset("synthetic", num_classes=3, n_max=8, imbalance=4, image_size=8, verify_images=True)
    assert verified.skipped_images == {"train": 0, "val": 0, "test": 0}


def test_register_dataset_refuses_a_taken_name_and_variadic_builders():
    with pytest.raises(ValueError, match=r"'synthetic' is already registered .* `overwrite=True`"):
        register_dataset("synthetic")(lambda n_max=1: None)
    with pytest.raises(ValueError, match=r"takes \*\*options; declare each option as a named parameter"):
        register_dataset("variadic")(lambda **options: None)
    assert "variadic" not in list_datasets()


# --------------------------------------------------------------------------------------- Hub / local data sets
def _split(per_class, image_column="img", labels=None, label_feature=None):
    """Images whose red channel is 100 * class, so a decoded image shows its class; an unused column on the side."""
    classes = [c for c, n in enumerate(per_class) for _ in range(n)]
    images = [PIL.Image.new("RGB", (4, 4), (100 * c, i, 0)) for c, n in enumerate(per_class) for i in range(n)]
    label_feature = label_feature or datasets.ClassLabel(names=NAMES[: len(per_class)])
    features = datasets.Features(
        {image_column: datasets.Image(), "label": label_feature, "note": datasets.Value("string")}
    )
    values = labels if labels is not None else classes
    return datasets.Dataset.from_dict(
        {image_column: images, "label": values, "note": ["x"] * len(classes)}, features=features
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    datasets.DatasetDict(
        train=_split([12, 6, 4]), validation=_split([1, 1, 1]), test=_split([2, 2, 2])
    ).save_to_disk(root / "disk")
    # Integer labels 2, 5, 9 (not 0..C-1, no ClassLabel), parquet files named by split, no validation split.
    int_feature = datasets.Value("int64")
    parquet = root / "parquet"
    parquet.mkdir()
    for split, per_class in (("train", [12, 6, 4]), ("test", [2, 2, 2])):
        raw = [v for v, n in zip((2, 5, 9), per_class) for _ in range(n)]
        _split(per_class, labels=raw, label_feature=int_feature).to_parquet(parquet / f"{split}.parquet")
    return root


def _red_matches_label(split, label_to_class=lambda label: label):
    return all(row["image"].getpixel((0, 0))[0] == 100 * label_to_class(row["label"]) for row in split)


def test_save_to_disk_copy_with_class_labels(saved):
    data = create_dataset(f"hfds/{saved / 'disk'}", image_column="img")
    assert isinstance(data, LongTailDataset)
    assert data.class_names == NAMES and data.train_class_counts == [12, 6, 4]
    assert (len(data.val), len(data.test)) == (3, 6)
    assert data.train.column_names == ["image", "label"]  # the extra column is dropped, the image one renamed
    assert _red_matches_label(data.train) and _red_matches_label(data.test)


def test_parquet_folder_with_integer_labels_is_renumbered(saved):
    data = create_dataset(str(saved / "parquet"), image_column="img")
    assert data.class_names == ["2", "5", "9"] and data.train_class_counts == [12, 6, 4]
    assert data.val is None and sorted(data.test["label"]) == [0, 0, 1, 1, 2, 2]
    assert _red_matches_label(data.train) and _red_matches_label(data.test)


def test_exponential_profile_subsamples_the_training_split(saved):
    options = {"image_column": "img", "long_tail_profile": "exponential", "n_max": 8, "imbalance": 4}
    data = create_dataset(str(saved / "parquet"), val_per_class=1, **options)
    assert data.train_class_counts == long_tail_counts(3, 8, 4) == [8, 4, 2]  # 8 * 4^(-c/2), by hand
    assert np.bincount(data.val["label"]).tolist() == [1, 1, 1]  # no validation split: drawn from the rest
    train_pixels = {(row["label"], row["image"].getpixel((0, 0))) for row in data.train}
    assert all((row["label"], row["image"].getpixel((0, 0))) not in train_pixels for row in data.val)
    again = create_dataset(str(saved / "parquet"), val_per_class=1, **options)
    other = create_dataset(str(saved / "parquet"), val_per_class=1, data_seed=1, **options)
    pixels = [[row["image"].getpixel((0, 0)) for row in d.train] for d in (data, again, other)]
    assert pixels[0] == pixels[1] and pixels[0] != pixels[2]
    # A data set with its own validation split keeps it.
    kept = create_dataset(str(saved / "disk"), val_per_class=1, **options)
    assert kept.train_class_counts == [8, 4, 2] and len(kept.val) == 3


@pytest.mark.parametrize(
    "options,error,match",
    [
        ({}, ValueError, r"The train split has no column 'image'; its columns are \['img', 'label', 'note'\]\. "
                         r"Pass --image_column"),
        ({"image_column": "img", "label_column": "note"}, ValueError,
         r"Label column 'note' of the train split holds string values, not integer class labels.*class_encode_column"),
        ({"image_column": "img", "test_split": "holdout"}, ValueError,
         r"no 'holdout' split \(splits: train, validation, test\); pass --test_split"),
        ({"image_column": "img", "validation_split": "dev"}, ValueError, r"no 'dev' split"),
        ({"image_column": "img", "n_max": 3}, ValueError, r"n_max=3 only apply to a subsampled .* exponential"),
        ({"image_column": "img", "long_tail_profile": "step"}, ValueError, r"one of none, exponential"),
    ],
)  # fmt: skip
def test_hub_builder_errors_name_the_problem_and_the_fix(saved, options, error, match):
    with pytest.raises(error, match=match):
        create_dataset(str(saved / "disk"), **options)


def test_float_and_unlabeled_labels_are_refused(tmp_path):
    floats = _split([2, 2], labels=[0.0, 0.0, 1.0, 1.0], label_feature=datasets.Value("float32"))
    datasets.DatasetDict(train=floats, test=floats).save_to_disk(tmp_path / "floats")
    with pytest.raises(ValueError, match=r"holds float32 values, not integer class labels"):
        create_dataset(str(tmp_path / "floats"), image_column="img")
    unlabeled = _split([2, 2], labels=[0, 1, -1, -1], label_feature=datasets.ClassLabel(names=NAMES[:2]))
    datasets.DatasetDict(train=_split([2, 2]), test=unlabeled).save_to_disk(tmp_path / "unlabeled")
    with pytest.raises(ValueError, match=r"The test split has 2 unlabeled row\(s\) \(label -1\)"):
        create_dataset(str(tmp_path / "unlabeled"), image_column="img")


def test_missing_paths_and_unreachable_ids_fail_without_the_network(tmp_path, monkeypatch):
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or real(*a, **k))
    with pytest.raises(FileNotFoundError, match=r"Data set folder .*/absent does not exist"):
        create_dataset(str(tmp_path / "absent"))
    assert calls == []  # a local path is never looked up on the Hub
    assert datasets.config.HF_HUB_OFFLINE  # conftest: tests never reach a hub
    with pytest.raises(FileNotFoundError, match=r"'someone/absent': it is not a local folder and the Hub is switched"):
        create_dataset("someone/absent")


def test_the_command_line_reaches_the_hub_builder(saved):
    base = {"model_name_or_path": "tiny-random", "image_size": 16, "output_dir": "/nonexistent", "report_to": "none"}
    args = LPTTrainingArguments(dataset=str(saved / "disk"), image_column="img", max_test_per_class=1, **base)
    data = build_dataset(args)
    assert data.train_class_counts == [12, 6, 4] and len(data.test) == 3
    recorded = dataset_options_from_args(args)
    assert recorded["image_column"] == "img" and recorded["max_test_per_class"] == 1 and "data_root" not in recorded
    profile = {"long_tail_profile": "exponential", "n_max": 8, "imbalance": 4, "val_per_class": 1}
    args = LPTTrainingArguments(dataset=f"hfds/{saved / 'parquet'}", image_column="img", **profile, **base)
    assert build_dataset(args).train_class_counts == [8, 4, 2]
    with pytest.raises(ValueError, match=r"--split_dir /s does not apply to --dataset .*disk \(Hub or local data"):
        LPTTrainingArguments(dataset=str(saved / "disk"), split_dir="/s", **base)
    with pytest.raises(ValueError, match=r"--image_column img does not apply to --dataset synthetic"):
        LPTTrainingArguments(dataset="synthetic", image_column="img", **base)


def test_the_command_line_keeps_each_builders_own_defaults(monkeypatch):
    """Options not given on the command line reach no builder: each keeps its keyword default (one builder's
    defaults, e.g. n_max 500 for Fashion-MNIST-LT, must not override another's), and the run records the resolved
    values. A value given explicitly is passed even when it equals another builder's default."""
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))  # leave no trace
    seen = []

    @register_dataset("own_defaults")
    def own_defaults(n_max: int = 7, imbalance: float = 3.0, val_per_class: int = 1, data_seed: int = 5):
        seen.append({"n_max": n_max, "imbalance": imbalance, "val_per_class": val_per_class, "data_seed": data_seed})
        return make_synthetic_long_tail(num_classes=2, n_max=n_max, imbalance=imbalance, image_size=8)

    base = {"model_name_or_path": "tiny-random", "image_size": 8, "output_dir": "/nonexistent", "report_to": "none"}
    args = LPTTrainingArguments(dataset="own_defaults", **base)
    own = {"n_max", "imbalance", "val_per_class", "data_seed"}
    assert not own & set(dataset_options_from_args(args))  # (the common run options, e.g. num_workers, still pass)
    build_dataset(args)
    assert seen[-1] == {"n_max": 7, "imbalance": 3.0, "val_per_class": 1, "data_seed": 5}
    recorded = dataset_options_from_args(args, resolve_defaults=True)
    assert {k: recorded[k] for k in own} == {"n_max": 7, "imbalance": 3.0, "val_per_class": 1, "data_seed": 5}
    args = LPTTrainingArguments(dataset="own_defaults", n_max=500, val_per_class=20, **base)
    build_dataset(args)
    assert seen[-1] == {"n_max": 500, "imbalance": 3.0, "val_per_class": 20, "data_seed": 5}
    assert dataset_options_from_args(args, resolve_defaults=True)["n_max"] == 500
    # A built-in: the synthetic set's own 40 .. 4 profile, not the 500 / 100 of the Fashion-MNIST demo.
    data = build_dataset(LPTTrainingArguments(dataset="synthetic", num_classes=3, **base))
    assert data.train_class_counts == long_tail_counts(3, 40, 10.0)


def test_a_run_trains_on_a_local_copy(saved, tmp_path):
    args = LPTTrainingArguments(
        dataset=str(saved / "disk"), image_column="img", model_name_or_path="tiny-random", image_size=16,
        batch_size=4, samples_per_class=2, num_groups=4, shared_layers=2, num_workers=0, report_to="none",
        phase="1", epochs_phase1=1, max_steps_per_epoch=1, output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    run_training(args)
    info = json.loads((tmp_path / "out" / "class_info.json").read_text())
    assert info["train_class_counts"] == [12, 6, 4] and info["class_names"] == NAMES
    assert (tmp_path / "out" / "phase1" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ docs/extending.md
def _doc_example() -> str:
    text = (REPO / "docs" / "extending.md").read_text()
    section = text.split("## A new data set", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the data-set section of docs/extending.md has one python block, run here as written"
    return blocks[0]


def test_the_documented_new_data_set_builds_through_the_registry(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))  # leave no trace
    namespace: dict = {}
    exec(compile(_doc_example(), "docs/extending.md", "exec"), namespace)
    assert "gradients_lt" in list_datasets()
    assert dataset_options("gradients_lt") == {"num_classes", "n_max", "imbalance", "data_seed"} | COMMON
    data = create_dataset("gradients_lt", num_classes=4, n_max=12, imbalance=6, data_seed=1)
    assert data.train_class_counts == [12, 6, 3, 2]  # 12 * 6^(-c/3), by hand: 12, 6.6, 3.6, 2
    assert data.num_classes == 4 and len(data.test) == 4 * 5 and data.val is None
    assert np.bincount(data.train["label"]).tolist() == [12, 6, 3, 2]
    with pytest.raises(ValueError, match=r"--data_root /x does not apply to --dataset gradients_lt"):
        LPTTrainingArguments(dataset="gradients_lt", data_root="/x", model_name_or_path="tiny-random")
