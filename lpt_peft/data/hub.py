"""Any image-classification data set `datasets` can load (a Hub id, a local folder of parquet/csv/images, a
`save_to_disk` copy) as a [`LongTailDataset`], optionally subsampled into a long-tailed profile.

On the command line: `--dataset owner/name`, `--dataset ./local/folder` or `--dataset hfds/<id or path>` (the form
for a Hub id without an owner); in Python: `create_dataset("hfds/<id or path>", ...)` or [`load_hub_dataset`].
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lpt_peft._extras import requires_extras
from lpt_peft.data.long_tail import (
    LongTailDataset,
    labels_as_numpy,
    long_tail_from_splits,
    make_long_tailed,
)
from lpt_peft.data.registry import HUB_BUILDER, register_dataset

with requires_extras(__name__):
    import datasets

PROFILES = ("none", "exponential")
# Defaults of the options that only apply to a subsampled profile; other values with profile "none" are refused.
_PROFILE_DEFAULTS = {"n_max": 500, "imbalance": 100.0, "data_seed": 0}


def _looks_like_local_path(path: str) -> bool:
    # A Hub id is `name` or `owner/name`; anything else that names a file system location is local.
    windows = os.sep != "/" and os.sep in path
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or windows


def _offline() -> bool:
    return bool(datasets.config.HF_HUB_OFFLINE)


def _load(path: str, config_name: str | None) -> datasets.DatasetDict:
    """Load every split of `path`; a missing local path or an unreachable Hub id is a clear error, not a trace."""
    local = Path(os.path.expanduser(path))
    if local.exists():
        if local.is_dir() and any((local / f).is_file() for f in ("dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(os.fspath(local))
        else:
            loaded = datasets.load_dataset(os.fspath(local), name=config_name)
    elif _looks_like_local_path(path):
        raise FileNotFoundError(
            f"Data set folder {path} does not exist. Pass an existing folder (parquet/csv/image files, or a "
            "`save_to_disk` copy) or a Hub id (owner/name)."
        )
    else:
        try:
            loaded = datasets.load_dataset(path, name=config_name)
        except (ConnectionError, OSError, ValueError) as err:
            reason = (
                "the Hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and it is not cached"
                if (_offline())
                else "the Hub has no such data set, it needs a config name or the Hub is unreachable"
            )
            raise FileNotFoundError(
                f"Could not load data set {path!r}: it is not a local folder and {reason} ({type(err).__name__}: "
                f"{err}). Pass a local folder, download it once online, or check the id (and "
                "--dataset_config_name)."
            ) from err
    if isinstance(loaded, datasets.Dataset):  # a single saved split
        loaded = datasets.DatasetDict({"train": loaded})
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"{path!r} loaded as {type(loaded).__name__}; a map-style DatasetDict is needed.")
    return loaded


def _pick_splits(loaded: datasets.DatasetDict, train: str, validation: str, test: str) -> dict[str, str]:
    available = list(loaded)
    picked = {}
    for role, split, flag in (("train", train, "train_split"), ("test", test, "test_split")):
        if split not in loaded:
            raise ValueError(
                f"The data set has no {split!r} split (splits: {', '.join(available)}); pass --{flag} <one of them> "
                f"(`{flag}=` in Python) for its {role} split."
            )
        picked[role] = split
    if validation in loaded:
        picked["val"] = validation
    elif validation != "validation":  # named explicitly, so it must exist
        raise ValueError(
            f"The data set has no {validation!r} split (splits: {', '.join(available)}); pass --validation_split "
            "<one of them>, or leave it at 'validation' (used when present)."
        )
    if len(set(picked.values())) != len(picked):
        raise ValueError(f"The train, validation and test splits must differ, got {picked}.")
    return picked


def _class_space(train: datasets.Dataset, label_column: str, split: str) -> tuple[list[str], np.ndarray | None]:
    """Class names, and the sorted label values when the labels are plain integers (None for a ClassLabel)."""
    if label_column not in train.column_names:
        raise ValueError(
            f"The {split} split has no column {label_column!r}; its columns are {train.column_names}. Pass "
            "--label_column <column> (`label_column=` in Python)."
        )
    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), None
    dtype = getattr(feature, "dtype", type(feature).__name__)
    if not (isinstance(feature, datasets.Value) and ("int" in dtype)):
        raise ValueError(
            f"Label column {label_column!r} of the {split} split holds {dtype} values, not integer class labels. "
            f"Encode them first, e.g. `ds = ds.class_encode_column({label_column!r})` then `save_to_disk`, or pass "
            "--label_column with the integer / ClassLabel column."
        )
    values = np.unique(labels_as_numpy(train, label_column))
    return [str(v) for v in values], values


def _standardise(
    dataset: datasets.Dataset,
    split: str,
    image_column: str,
    label_column: str,
    names: list[str],
    values: np.ndarray | None,
) -> datasets.Dataset:
    """The split with exactly the columns `image` (datasets.Image) and `label` (ClassLabel over `names`)."""
    for column, flag in ((image_column, "image_column"), (label_column, "label_column")):
        if column not in dataset.column_names:
            raise ValueError(
                f"The {split} split has no column {column!r}; its columns are {dataset.column_names}. Pass "
                f"--{flag} <column> (`{flag}=` in Python)."
            )
    image_feature = dataset.features[image_column]
    if not isinstance(image_feature, datasets.Image) and getattr(image_feature, "dtype", None) != "string":
        raise ValueError(
            f"Column {image_column!r} of the {split} split is {type(image_feature).__name__}, not images (a "
            "datasets.Image feature or file paths); pass --image_column with the image column."
        )
    labels = labels_as_numpy(dataset, label_column)
    if values is not None:
        index = np.searchsorted(values, labels).clip(0, len(values) - 1)
        unknown = np.unique(labels[values[index] != labels])
        if unknown.size:
            raise ValueError(
                f"The {split} split has label(s) {unknown[:10].tolist()} that no training image has; every class "
                "needs training images."
            )
        labels = index
    elif labels.size and labels.min() < 0:
        raise ValueError(
            f"The {split} split has {int((labels < 0).sum())} unlabeled row(s) (label {labels.min()}); choose a "
            "labeled split (--test_split / --validation_split) or remove them."
        )
    elif dataset.features[label_column] != datasets.ClassLabel(names=names):
        raise ValueError(
            f"The {split} split's class names differ from the training split's ({dataset.features[label_column]})."
        )
    dataset = dataset.select_columns([image_column]).add_column("label", labels.tolist())
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    return dataset.cast(features)


def _check_profile(profile: str, n_max: int, imbalance: float, data_seed: int) -> None:
    if profile not in PROFILES:
        raise ValueError(f"`long_tail_profile` must be one of {', '.join(PROFILES)}, got {profile!r}.")
    if profile == "none":
        given = {k: v for k, v in (("n_max", n_max), ("imbalance", imbalance), ("data_seed", data_seed))}
        changed = [f"{k}={v}" for k, v in given.items() if v != _PROFILE_DEFAULTS[k]]
        if changed:
            raise ValueError(
                f"{', '.join(changed)} only apply to a subsampled training split, but long_tail_profile is 'none' "
                "(the training split is used as it is); pass --long_tail_profile exponential or drop them."
            )


@register_dataset(HUB_BUILDER)
def load_hub_dataset(
    path: str,
    dataset_config_name: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    train_split: str = "train",
    validation_split: str = "validation",
    test_split: str = "test",
    long_tail_profile: str = "none",
    n_max: int = 500,
    imbalance: float = 100.0,
    data_seed: int = 0,
    val_per_class: int = 20,
) -> LongTailDataset:
    """Hub or local data set: its splits, classes and counts come from the data set (`datasets.load_dataset`).

    The classes are the label column's `ClassLabel` names, or the sorted distinct values of an integer label column
    (renumbered `0..C-1`). The training counts, hence the many/medium/few shot groups, are those of the training
    split, after the optional subsampling.

    Args:
        path (`str`): A Hub id (`owner/name`), a local folder `datasets.load_dataset` reads (parquet, csv, json or
            image files), or a folder written by `save_to_disk`.
        dataset_config_name (`str`, *optional*): The data set's configuration (`load_dataset(path, name=...)`).
        image_column, label_column (`str`, default `"image"`, `"label"`): The image (`datasets.Image` or file paths)
            and the integer / `ClassLabel` label columns; other columns are dropped.
        train_split, test_split (`str`, default `"train"`, `"test"`): Splits that must exist.
        validation_split (`str`, defaults to `"validation"`): Used when present; a name other than the default must
            exist.
        long_tail_profile (`str`, defaults to `"none"`): `"none"` keeps the training split as it is; `"exponential"`
            keeps `floor(n_max * imbalance ** (-c / (C - 1)))` images of class `c` (see [`make_long_tailed`], seeded
            by `data_seed`).
        n_max, imbalance, data_seed: The profile (only with `"exponential"`).
        val_per_class (`int`, defaults to 20): With `"exponential"` and no validation split in the data set, a
            balanced validation set of this many images per class is taken from the training images left out.

    Returns:
        [`LongTailDataset`]

    Raises:
        FileNotFoundError: a local path that does not exist, or a Hub id that cannot be loaded (offline and not
            cached, unknown); no network is attempted for a local path or when offline.
        ValueError: a missing split or column (the message lists those available), labels that are not integer
            class labels or unlabeled (-1), a class without training images, an option that does not apply.

    Example:

    ```py
    >>> data = load_hub_dataset("./beans_copy", long_tail_profile="exponential", n_max=300, imbalance=10)
    >>> data.class_names, data.train_class_counts
    (['angular_leaf_spot', 'bean_rust', 'healthy'], [300, 94, 30])
    ```
    """
    _check_profile(long_tail_profile, n_max, imbalance, data_seed)
    loaded = _load(path, dataset_config_name)
    splits = _pick_splits(loaded, train_split, validation_split, test_split)
    names, values = _class_space(loaded[splits["train"]], label_column, splits["train"])
    built = {
        role: _standardise(loaded[split], split, image_column, label_column, names, values)
        for role, split in splits.items()
    }
    if long_tail_profile == "exponential":
        draw_val = val_per_class if "val" not in built else 0
        built["train"], val = make_long_tailed(
            built["train"], n_max, imbalance, seed=data_seed, val_per_class=draw_val
        )
        if val is not None:
            built["val"] = val
    return long_tail_from_splits(built, names)


