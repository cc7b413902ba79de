"""Loaders for the long-tailed benchmarks used by LPT: Places-LT, ImageNet-LT, iNaturalist 2018, CIFAR-100-LT and
generic image folders. See `docs/datasets.md` for how to download and lay out each one."""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image

from lpt_peft._extras import requires_extras
from lpt_peft.data.long_tail import (
    LongTailDataset,
    count_labels,
    dataset_from_uint8_arrays,
    labels_as_numpy,
    long_tail_from_splits,
    make_long_tailed,
)
from lpt_peft.data.registry import register_dataset
from lpt_peft.data.transforms import IMAGE_DECODE_ERRORS

with requires_extras(__name__):
    import datasets
    from datasets import load_dataset, load_from_disk

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "test": "test"}

PLACES_LT_HINT = (
    "Places-LT uses the Places365-Standard images: download `places365standard_easyformat.tar` (256x256 images "
    "already sorted into train/<class>/ and val/<class>/) from http://places2.csail.mit.edu/download.html, extract "
    "it and pass the extracted `places365_standard` directory as `root`. The split files Places_LT_{train,val,test}"
    ".txt come from the OLTR release (Liu et al., CVPR 2019)."
)
IMAGENET_LT_HINT = (
    "ImageNet-LT uses the ILSVRC-2012 images (https://image-net.org): `root` must contain train/<wnid>/*.JPEG and "
    "val/<wnid>/*.JPEG (the validation images sorted into class folders). The split files "
    "ImageNet_LT_{train,val,test}.txt come from the OLTR release (Liu et al., CVPR 2019)."
)
INATURALIST_HINT = (
    "iNaturalist 2018: download train_val2018.tar.gz, train2018.json and val2018.json from "
    "https://github.com/visipedia/inat_comp/tree/master/2018 and pass the directory that contains the extracted "
    "`train_val2018/` folder as `root`."
)

def _image_features(class_names: Sequence[str]) -> datasets.Features:
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(class_names))})


def _parse_split_file(path: str | os.PathLike) -> tuple[list[str], list[int], list[int]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Split file {path} does not exist.")
    paths, labels, line_numbers = [], [], []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            # Split from the right so that paths containing spaces still parse.
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(
                    f"{path}, line {line_number}: expected '<relative/image/path> <integer label>', got {line!r}."
                )
            label = int(parts[1])
            if label < 0:
                raise ValueError(f"{path}, line {line_number}: labels must be >= 0, got {label}.")
            paths.append(parts[0])
            labels.append(label)
            line_numbers.append(line_number)
    return paths, labels, line_numbers


def read_split_file(path: str | os.PathLike) -> tuple[list[str], list[int]]:
    """
    Read an OLTR-style split file (one `relative/path label` per line; blank lines ignored).

    Needs no images, so class counts and shot groups can be computed from the split files alone.

    Example:

    ```py
    >>> paths, labels = read_split_file("data/places_lt/Places_LT_train.txt")
    >>> paths[0], labels[0], len(labels)
    ('train/airfield/00004851.jpg', 0, 62500)
    ```
    """
    paths, labels, _ = _parse_split_file(path)
    return paths, labels


def _derive_class_names(paths: Sequence[str], labels: Sequence[int], num_classes: int) -> list[str]:
    # Standard layouts keep each class in its own folder (train/<class>/<file>); use that folder name when it is
    # consistent within every class and distinct across classes, else fall back to numbered names.
    names: list[str | None] = [None] * num_classes
    for path, label in zip(paths, labels):
        folder = os.path.basename(os.path.dirname(path.replace("\\", "/")))
        if not folder or (names[label] is not None and names[label] != folder):
            return [f"class_{i}" for i in range(num_classes)]
        names[label] = folder
    if any(name is None for name in names) or len(set(names)) != num_classes:
        return [f"class_{i}" for i in range(num_classes)]
    return names  # type: ignore[return-value]


def _is_readable(path: str) -> bool:
    try:
        with PIL.Image.open(path) as image:
            image.load()
        return True
    except IMAGE_DECODE_ERRORS:
        return False


def _check_files_exist(root: Path, paths: Sequence[str], source: str, hint: str) -> None:
    missing = [p for p in paths if not os.path.isfile(os.path.join(root, p))]
    if missing:
        examples = ", ".join(repr(p) for p in missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} images listed in {source} are missing under {root} (first: {examples}). "
            f"`root` must be the directory the listed relative paths start from. {hint}"
        )


def _build_long_tail_dataset(
    root: Path,
    splits: Mapping[str, tuple[list[str], list[int]]],
    num_classes: int,
    class_names: Sequence[str],
    verify_images: bool,
    num_workers: int,
) -> LongTailDataset:
    features = _image_features(class_names)
    built: dict[str, datasets.Dataset] = {}
    skipped: dict[str, int] = {}
    for split, (paths, labels) in splits.items():
        files = [os.path.join(root, p) for p in paths]
        if verify_images:
            with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
                readable = list(pool.map(_is_readable, files, chunksize=64))
            bad = [f for f, ok in zip(files, readable) if not ok]
            skipped[split] = len(bad)
            if bad:
                logger.warning(
                    "Skipped %d unreadable or truncated image(s) of the %s split (first: %s).",
                    len(bad),
                    split,
                    ", ".join(bad[:3]),
                )
                files = [f for f, ok in zip(files, readable) if ok]
                labels = [label for label, ok in zip(labels, readable) if ok]
        built[split] = datasets.Dataset.from_dict({"image": files, "label": labels}, features=features)
    return long_tail_from_splits(
        built, list(class_names), skipped, hint="check the split files / `num_classes`"
    )


def _split_file_paths(split_files: Mapping[str, str | os.PathLike], download_hint: str) -> dict[str, Path]:
    unknown = [key for key in split_files if key not in _SPLIT_ALIASES]
    if unknown:
        raise ValueError(f"Unknown split name(s) {unknown}; use 'train', 'val' (or 'validation') and 'test'.")
    files = {_SPLIT_ALIASES[key]: Path(value) for key, value in split_files.items()}
    for required in ("train", "test"):
        if required not in files:
            raise ValueError(f"`split_files` needs a {required!r} entry, got {sorted(split_files)}.")
    for split, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(f"The {split} split file {path} does not exist. {download_hint}".rstrip())
    return files


def load_split_file_dataset(
    root: str | os.PathLike,
    split_files: Mapping[str, str | os.PathLike],
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    verify_images: bool = False,
    *,
    check_files: bool = True,
    num_workers: int = 8,
    download_hint: str = "",
) -> LongTailDataset:
    """
    Build a [`LongTailDataset`] from OLTR-style split files (`relative/path label` per line), as used by Places-LT
    and ImageNet-LT. Images are decoded lazily (`datasets.Image` over absolute paths).

    Args:
        root (`str` or `os.PathLike`): Directory the relative paths in the split files start from.
        split_files (`Mapping[str, path]`): Split file per split: `"train"` and `"test"` are required, `"val"` (or
            `"validation"`) is optional.
        num_classes (`int`, *optional*): Number of classes; defaults to the largest label + 1 over all splits.
        class_names (`Sequence[str]`, *optional*): Class names; by default the image folder name when it is the same
            for every image of a class (e.g. `train/airfield/x.jpg` -> `"airfield"`), else `class_<i>`.
        verify_images (`bool`, defaults to `False`): Decode every image once and skip those that cannot be read
            (corrupt or truncated files). The number skipped per split is logged as a warning and stored in
            `LongTailDataset.skipped_images`. Without it, an unreadable image raises a `ValueError` naming the file
            when it is first decoded through [`TransformedImageDataset`].
        check_files (`bool`, defaults to `True`): Check that every listed image exists (fast; no decoding).
        num_workers (`int`, defaults to 8): Threads used by `verify_images`.
        download_hint (`str`, *optional*): Where to get the data, appended to file-not-found errors.

    Example:

    ```py
    >>> data = load_split_file_dataset(
    ...     "/data/places365_standard",
    ...     {"train": "Places_LT_train.txt", "val": "Places_LT_val.txt", "test": "Places_LT_test.txt"},
    ...     num_classes=365,
    ... )
    >>> len(data.train), data.train_class_counts[0]
    (62500, 4980)
    ```
    """
    files = _split_file_paths(split_files, download_hint)
    parsed = {split: _parse_split_file(files[split]) for split in SPLIT_NAMES if split in files}
    max_label = max((max(labels) for _, labels, _ in parsed.values() if labels), default=-1)
    if num_classes is None:
        num_classes = max_label + 1
    for split, (_, labels, line_numbers) in parsed.items():
        for label, line_number in zip(labels, line_numbers):
            if label >= num_classes:
                raise ValueError(
                    f"{files[split]}, line {line_number}: label {label} is out of range for num_classes="
                    f"{num_classes} (labels must be in [0, {num_classes - 1}])."
                )
    if class_names is None:
        train_paths, train_labels, _ = parsed["train"]
        class_names = _derive_class_names(train_paths, train_labels, num_classes)
    elif len(class_names) != num_classes:
        raise ValueError(f"`class_names` has {len(class_names)} entries but there are {num_classes} classes.")

    root = Path(root)
    if not root.is_dir():
        example = next((paths[0] for paths, _, _ in parsed.values() if paths), "train/<class>/<image>.jpg")
        raise FileNotFoundError(
            f"Image root {root} does not exist. Expected layout: {root}/<path as listed in the split files>, e.g. "
            f"{root / example}. {download_hint}".rstrip()
        )
    if check_files:
        for split, (paths, _, _) in parsed.items():
            _check_files_exist(root, paths, str(files[split]), download_hint)

    splits = {split: (paths, labels) for split, (paths, labels, _) in parsed.items()}
    return _build_long_tail_dataset(root, splits, num_classes, class_names, verify_images, num_workers)


def _standard_split_files(split_dir: str | os.PathLike, prefix: str, hint: str) -> dict[str, Path]:
    split_dir = Path(split_dir)
    files = {split: split_dir / f"{prefix}_{split}.txt" for split in SPLIT_NAMES}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Missing split file(s): {', '.join(missing)}. `split_dir` must contain {prefix}_train.txt, "
            f"{prefix}_val.txt and {prefix}_test.txt. {hint}"
        )
    return files


def load_places_lt(root: str | os.PathLike, split_dir: str | os.PathLike, **kwargs) -> LongTailDataset:
    """
    Places-LT (Liu et al., 2019): 365 classes, 62,500 train (4,980 .. 5 per class), 7,300 val, 36,500 test.

    Args:
        root (`str` or `os.PathLike`): The extracted `places365_standard` directory (with `train/` and `val/`).
        split_dir (`str` or `os.PathLike`): Directory with Places_LT_train.txt, Places_LT_val.txt, Places_LT_test.txt.
        kwargs: Passed to [`load_split_file_dataset`] (`verify_images`, `check_files`, `num_workers`).

    Example:

    ```py
    >>> data = load_places_lt("/data/places365_standard", "data/places_lt")
    >>> data.num_classes, len(data.val), len(data.test)
    (365, 7300, 36500)
    ```
    """
    files = _standard_split_files(split_dir, "Places_LT", PLACES_LT_HINT)
    kwargs.setdefault("download_hint", PLACES_LT_HINT)
    return load_split_file_dataset(root, files, num_classes=365, **kwargs)


def load_imagenet_lt(root: str | os.PathLike, split_dir: str | os.PathLike, **kwargs) -> LongTailDataset:
    """
    ImageNet-LT (Liu et al., 2019): 1,000 classes, 115,846 train (1,280 .. 5 per class), 20,000 val, 50,000 test.

    Args:
        root (`str` or `os.PathLike`): ILSVRC-2012 directory with `train/<wnid>/` and `val/<wnid>/`.
        split_dir (`str` or `os.PathLike`): Directory with ImageNet_LT_train.txt, ImageNet_LT_val.txt and
            ImageNet_LT_test.txt.
        kwargs: Passed to [`load_split_file_dataset`].

    Example:

    ```py
    >>> data = load_imagenet_lt("/data/imagenet", "data/imagenet_lt")
    >>> len(data.train), data.num_classes
    (115846, 1000)
    ```
    """
    files = _standard_split_files(split_dir, "ImageNet_LT", IMAGENET_LT_HINT)
    kwargs.setdefault("download_hint", IMAGENET_LT_HINT)
    return load_split_file_dataset(root, files, num_classes=1000, **kwargs)


def _read_coco_json(path: Path) -> tuple[list[str], list[int], dict[int, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}.") from err
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{path} lacks the {key!r} list of a COCO-style annotation file.")
    try:
        categories = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        image_files = {int(im["id"]): im["file_name"] for im in data["images"]}
        category_of: dict[int, int] = {}
        for annotation in data["annotations"]:
            image_id = int(annotation["image_id"])
            if image_id in category_of:
                raise ValueError(f"{path}: image {image_id} has more than one annotation; expected exactly one.")
            category_of[image_id] = int(annotation["category_id"])
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"{path}: malformed entry ({type(err).__name__}: {err}); images need 'id' and 'file_name', "
            "annotations 'image_id' and 'category_id', categories 'id'."
        ) from err
    unlabeled = [i for i in image_files if i not in category_of]
    if unlabeled:
        raise ValueError(f"{path}: {len(unlabeled)} image(s) have no annotation (first ids: {unlabeled[:5]}).")
    unknown = sorted({c for c in category_of.values() if c not in categories})
    if unknown:
        raise ValueError(f"{path}: annotations use category ids missing from 'categories': {unknown[:10]}.")
    stray = [i for i in category_of if i not in image_files]
    if stray:
        raise ValueError(f"{path}: annotations refer to image ids missing from 'images': {stray[:5]}.")
    files = [image_files[i] for i in image_files]
    category_ids = [category_of[i] for i in image_files]
    return files, category_ids, categories


def load_inaturalist2018(
    root: str | os.PathLike,
    train_json: str | os.PathLike = "train2018.json",
    val_json: str | os.PathLike = "val2018.json",
    verify_images: bool = False,
    *,
    check_files: bool = True,
    num_workers: int = 8,
) -> LongTailDataset:
    """
    iNaturalist 2018 from its COCO-style JSON files (8,142 classes, 437,513 train, 24,426 val images).

    As in LPT and the long-tail literature, the official validation set is the test set, so `val` is `None`.
    Category ids are mapped to labels `0..C-1` in increasing id order (the identity for iNaturalist 2018); class
    names are the categories' `name`.

    Args:
        root (`str` or `os.PathLike`): Directory the JSON `file_name`s start from (contains `train_val2018/`).
        train_json, val_json (`str` or `os.PathLike`): Annotation files; relative paths are looked up under `root`
            when they do not exist as given.
        verify_images, check_files, num_workers: See [`load_split_file_dataset`].

    Example:

    ```py
    >>> data = load_inaturalist2018("/data/inat2018", "train2018.json", "val2018.json")
    >>> data.num_classes, len(data.test), data.val is None
    (8142, 24426, True)
    ```
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Image root {root} does not exist. Expected layout: {root}/train_val2018/<kingdom>/<id>/<image>.jpg. "
            f"{INATURALIST_HINT}"
        )

    def _resolve(path: str | os.PathLike) -> Path:
        path = Path(path)
        if not path.is_file() and not path.is_absolute() and (root / path).is_file():
            path = root / path
        if not path.is_file():
            raise FileNotFoundError(f"Annotation file {path} does not exist. {INATURALIST_HINT}")
        return path

    train_path, test_path = _resolve(train_json), _resolve(val_json)
    train_files, train_categories, categories = _read_coco_json(train_path)
    test_files, test_categories, test_category_names = _read_coco_json(test_path)
    for category_id, name in test_category_names.items():
        categories.setdefault(category_id, name)
    ordered = sorted(categories)
    label_of = {category_id: label for label, category_id in enumerate(ordered)}
    names = [categories[c] for c in ordered]
    if len(set(names)) != len(names):
        names = [f"{categories[c]} ({c})" for c in ordered]

    splits = {
        "train": (train_files, [label_of[c] for c in train_categories]),
        "test": (test_files, [label_of[c] for c in test_categories]),
    }
    if check_files:
        for split, source in (("train", train_path), ("test", test_path)):
            _check_files_exist(root, splits[split][0], str(source), INATURALIST_HINT)
    return _build_long_tail_dataset(root, splits, len(ordered), names, verify_images, num_workers)


def load_imagefolder_lt(
    train_dir: str | os.PathLike,
    test_dir: str | os.PathLike | None = None,
    val_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    verify_images: bool = False,
    *,
    num_workers: int = 8,
    flag_prefix: str = "",
) -> LongTailDataset:
    """
    Load `<split_dir>/<class name>/<image>` folders with `datasets`' `imagefolder` builder (works offline).

    The layout is checked first ([`check_imagefolder_layout`]): one folder per class holding images directly, at
    least 2 training classes, no `metadata.csv`/`.jsonl`/`.parquet` (which would turn the builder's labels off), no
    class that only exists outside the training folder. Class names are the sorted training folder names. The split
    folders may sit at any depth (labels come from each image's parent folder). When `test_dir` is `None`,
    `train_dir` must be a root holding `train/` and `test/` (and optionally `val/` or `validation/`) subfolders.

    Args:
        train_dir (`str` or `os.PathLike`): Training images (or the root described above).
        test_dir (`str` or `os.PathLike`, *optional*): Test images.
        val_dir (`str` or `os.PathLike`, *optional*): Validation images.
        cache_dir (`str` or `os.PathLike`, *optional*): Where `datasets` writes its Arrow cache.
        verify_images (`bool`, defaults to `False`): Decode every image once and skip unreadable ones (counted in
            `skipped_images` and logged), as for the split-file data sets.
        num_workers (`int`, defaults to 8): Threads used by `verify_images`.
        flag_prefix (`str`, defaults to `""`): Prefix of the argument names in error messages (`"--"` for the CLI).

    Raises:
        FileNotFoundError: a split folder does not exist.
        ValueError: the layout is wrong (the message names the folder, the cause and the fix).

    Example:

    ```py
    >>> data = load_imagefolder_lt("my_data/train", "my_data/test", val_dir="my_data/val")
    >>> data.class_names[:2], data.train_class_counts[:2]
    (['cat', 'dog'], [120, 7])
    ```
    """
    flags = {split: f"{flag_prefix}{split}_dir" for split in ("train", "test")}
    flags["validation"] = f"{flag_prefix}val_dir"
    train_dir = Path(train_dir)
    if test_dir is None:
        test_dir = train_dir / "test"
        if val_dir is None:
            val_dir = next((train_dir / n for n in ("val", "validation") if (train_dir / n).is_dir()), None)
        train_dir = train_dir / "train"
        if not (train_dir.is_dir() and test_dir.is_dir()):
            raise ValueError(
                f"`{flags['test']}` was not given, so {train_dir.parent} must contain 'train/' and 'test/' "
                f"subfolders; pass `{flags['test']}` explicitly otherwise."
            )
    dirs = {"train": Path(train_dir), "test": Path(test_dir)}
    if val_dir is not None:
        dirs["validation"] = Path(val_dir)
    class_names = check_imagefolder_layout(dirs, flags)
    data_files = {split: str(directory / "**") for split, directory in dirs.items()}
    # Labels from each image's parent folder whatever its depth (the layout is checked above): the builder's own
    # inference drops all labels when the splits sit at different depths.
    loaded = load_dataset(
        "imagefolder",
        data_files=data_files,
        drop_labels=False,
        drop_metadata=True,
        cache_dir=os.fspath(cache_dir) if cache_dir else None,
    )
    splits = {split: _relabel(dataset, class_names) for split, dataset in loaded.items()}
    data = LongTailDataset(
        train=splits["train"],
        val=splits.get("validation"),
        test=splits["test"],
        num_classes=len(class_names),
        class_names=list(class_names),
        train_class_counts=count_labels(labels_as_numpy(splits["train"]), len(class_names)),
    )
    return drop_unreadable_images(data, num_workers) if verify_images else data


def _relabel(dataset: datasets.Dataset, class_names: Sequence[str]) -> datasets.Dataset:
    """Labels as indices into `class_names` (the training folders), whatever names the builder saw in this split."""
    remap = np.asarray([list(class_names).index(n) for n in dataset.features["label"].names], dtype=np.int64)
    labels = remap[labels_as_numpy(dataset)].tolist()
    return dataset.remove_columns("label").add_column("label", labels).cast(_image_features(class_names))


IMAGEFOLDER_METADATA_FILES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")


def _image_extensions() -> set[str]:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return {ext.lower() for ext in ImageFolder.EXTENSIONS}


def _check_class_folder_layout(split: str, directory: Path, flag: str) -> dict[str, int]:
    """Check `<directory>/<class>/<image>` (the imagefolder layout) and return the image count of each class folder.

    `datasets`' imagefolder builder silently changes meaning on a metadata file (labels become metadata), a nested
    folder or files at different depths (no labels at all), and then reports the wrong folder; this names the cause.
    """
    extensions = _image_extensions()
    fix = f"Expected {directory}/<class name>/<image file>, one folder per class and images directly inside."
    if not directory.is_dir():
        raise FileNotFoundError(f"The {split} image folder {directory} ({flag}) does not exist. {fix}")
    entries = sorted(directory.iterdir())
    loose = [p.name for p in entries if p.is_file() and p.suffix.lower() in extensions]
    metadata = [p for p in directory.rglob("*") if p.name in IMAGEFOLDER_METADATA_FILES]
    if metadata:
        raise ValueError(
            f"{metadata[0]} is a `datasets` imagefolder metadata file: with it the builder reads labels from the "
            f"metadata instead of the class folders. Class folders define the labels here; remove or move "
            f"{len(metadata)} metadata file(s) out of {directory}."
        )
    counts: dict[str, int] = {}
    for folder in (p for p in entries if p.is_dir()):
        nested = sorted(p.name for p in folder.iterdir() if p.is_dir())
        images = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions]
        if nested and not images and not loose:
            raise ValueError(
                f"{flag} {directory}: {folder.name}/ holds folders ({', '.join(nested[:3])}) instead of images, so "
                f"{directory} looks one level above the class folders; pass {flag} {folder} (or move the class "
                "folders up)."
            )
        if nested:
            raise ValueError(
                f"Class folder {folder} ({flag}) holds subfolder(s) {nested[:3]}; a class folder must hold its "
                "images directly (imagefolder takes the image's parent folder as its class). Move the images up into "
                f"{folder}/ or make each subfolder a class folder of {directory}."
            )
        counts[folder.name] = len(images)
    if loose and not counts:  # no class folders at all: the images' class is unknown
        raise ValueError(
            f"{flag} {directory} holds {len(loose)} image(s) directly (e.g. {loose[0]}) and no class folders; the "
            f"class of an image is the folder it sits in. Move each class's images into a folder named after the "
            f"class, e.g. {directory}/<class name>/{loose[0]}."
        )
    if loose:
        raise ValueError(
            f"{flag} {directory} holds {len(loose)} image(s) directly (e.g. {loose[0]}) beside class folders "
            f"({', '.join(list(counts)[:3])}); every image must be in a class folder. {fix}"
        )
    if not counts:
        raise ValueError(f"No class subfolders found in {directory} ({flag}). {fix}")
    empty = [name for name, n in counts.items() if n == 0]
    if empty and split == "train":
        raise ValueError(
            f"Class folder(s) {empty[:10]} in {directory} ({flag}) hold no images; every class needs training "
            f"images (supported extensions: .jpg, .png, ...). Add images or remove the folder(s)."
        )
    return counts


def check_imagefolder_layout(dirs: Mapping[str, Path], flags: Mapping[str, str]) -> list[str]:
    """Check every split's class folders before `datasets` reads them; return the class names (sorted).

    Raises:
        FileNotFoundError: a split folder is missing.
        ValueError: a metadata file, nested folders, loose images, empty training classes, fewer than 2 training
            classes, or a class folder outside the training folder; the message names the folder and the fix.
    """
    counts = {split: _check_class_folder_layout(split, Path(d), flags[split]) for split, d in dirs.items()}
    train = counts["train"]
    if len(train) < 2:
        raise ValueError(
            f"{flags['train']} {dirs['train']} has {len(train)} class folder ({', '.join(train)}); LPT classifies "
            "long-tailed data and needs at least 2 classes (one folder per class under the training folder)."
        )
    for split, split_counts in counts.items():
        outside = sorted(set(split_counts) - set(train))
        if outside:
            raise ValueError(
                f"Class folder(s) {outside[:10]} appear only outside {dirs['train']} (in {dirs[split]}, "
                f"{flags[split]}); every class needs training images. Add them to {dirs['train']} or remove them."
            )
    return sorted(train)


def find_unreadable_images(dataset: datasets.Dataset, num_workers: int = 8) -> list[int]:
    """Row indices of `dataset` whose image cannot be decoded (corrupt, truncated, not an image).

    Works on file paths and on in-memory bytes alike, so `verify_images` means the same for every data set.
    """
    from lpt_peft.data.transforms import decode_image

    if isinstance(dataset.features.get("image"), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))

    def readable(value) -> bool:
        if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
            return _is_readable(value["path"])
        try:
            decode_image(value)
            return True
        except (ValueError, TypeError):
            return False

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        ok = list(pool.map(readable, dataset["image"], chunksize=64))
    return [i for i, good in enumerate(ok) if not good]


def _image_name(dataset: datasets.Dataset, index: int) -> str:
    value = dataset.cast_column("image", datasets.Image(decode=False))[int(index)]["image"]
    return (value.get("path") if isinstance(value, dict) else None) or f"row {index} (in-memory image)"


def drop_unreadable_images(data: LongTailDataset, num_workers: int = 8) -> LongTailDataset:
    """Remove unreadable images from every split of `data` (in place), count them in `data.skipped_images`.

    Raises:
        ValueError: a class loses all its training images.
    """
    for split in SPLIT_NAMES:
        dataset = getattr(data, split)
        if dataset is None:
            continue
        bad = find_unreadable_images(dataset, num_workers)
        data.skipped_images[split] = data.skipped_images.get(split, 0) + len(bad)
        if bad:
            names = ", ".join(_image_name(dataset, i) for i in bad[:3])
            logger.warning(
                "Skipped %d unreadable or truncated image(s) of the %s split (first: %s).", len(bad), split, names
            )
            keep = np.setdiff1d(np.arange(len(dataset)), bad)
            setattr(data, split, dataset.select(keep))
    data.train_class_counts = count_labels(labels_as_numpy(data.train), data.num_classes)
    empty = [data.class_names[i] for i, n in enumerate(data.train_class_counts) if n == 0]
    if empty:
        raise ValueError(
            f"Class(es) {empty[:10]} have no readable training image left after --verify_images; replace the "
            "unreadable files or remove the class."
        )
    return data


def check_images_decode(dataset: datasets.Dataset, split: str, num_workers: int = 8) -> None:
    """Decode every image of `split` once and fail, naming the files, if any cannot be read.

    Run on the evaluation splits before training so a bad file cannot crash validation after an epoch has trained.
    """
    bad = find_unreadable_images(dataset, num_workers)
    if bad:
        names = ", ".join(_image_name(dataset, i) for i in bad[:5])
        raise ValueError(
            f"{len(bad)} image(s) of the {split} split cannot be decoded (corrupt, truncated or not an image): "
            f"{names}{' ...' if len(bad) > 5 else ''}. Replace or remove them, or pass --verify_images true to skip "
            "unreadable images (they are counted and logged). Checked before training so no epoch is lost to them."
        )


CIFAR100_HUB_ID = "uoft-cs/cifar100"  # the canonical "cifar100" data set, now hosted under this name


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _read_cifar100_python(directory: Path) -> datasets.DatasetDict:
    """Read the original `cifar-100-python` pickles (train, test, meta) into a DatasetDict."""
    names = list(_unpickle(directory / "meta")["fine_label_names"])
    splits = {}
    for split in ("train", "test"):
        batch = _unpickle(directory / split)
        # Rows are 3072 bytes: the 1024 red, then green, then blue values of a 32x32 image.
        images = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        splits[split] = dataset_from_uint8_arrays(images, batch["fine_labels"], names)
    return datasets.DatasetDict(splits)


def _standardise_cifar_columns(data: datasets.DatasetDict) -> datasets.DatasetDict:
    if not isinstance(data, datasets.DatasetDict):
        raise ValueError(
            f"Expected a DatasetDict with 'train' and 'test' splits for CIFAR-100, got {type(data).__name__}."
        )
    for split in ("train", "test"):
        if split not in data:
            raise ValueError(f"The CIFAR-100 data has splits {list(data)}; 'train' and 'test' are required.")
    result = {}
    for split in ("train", "test"):
        ds = data[split]
        image = next((c for c in ("image", "img") if c in ds.column_names), None)
        label = next((c for c in ("label", "fine_label") if c in ds.column_names), None)
        if image is None or label is None:
            raise ValueError(f"CIFAR-100 {split} split has columns {ds.column_names}; expected img/fine_label.")
        ds = ds.select_columns([image, label])
        if image != "image":
            ds = ds.rename_column(image, "image")
        if label != "label":
            ds = ds.rename_column(label, "label")
        result[split] = ds
    return datasets.DatasetDict(result)


def _load_cifar100(data_dir: str | os.PathLike | None) -> datasets.DatasetDict:
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise FileNotFoundError(f"CIFAR-100 `data_dir` {data_dir} does not exist.")
        if (data_dir / "dataset_dict.json").is_file():
            return load_from_disk(os.fspath(data_dir))
        for candidate in (data_dir, data_dir / "cifar-100-python"):
            if all((candidate / name).is_file() for name in ("train", "test", "meta")):
                return _read_cifar100_python(candidate)
        try:  # a local clone of the Hub repository (parquet files)
            return load_dataset(os.fspath(data_dir))
        except Exception as err:
            raise ValueError(
                f"Could not read CIFAR-100 from {data_dir} ({type(err).__name__}: {err}). `data_dir` must be a "
                "`DatasetDict.save_to_disk` copy, the extracted `cifar-100-python` folder (files train, test, meta) "
                "or a local clone of the Hub repository."
            ) from err
    try:
        return load_dataset(CIFAR100_HUB_ID)
    except Exception as err:  # offline, no cache, Hub unreachable: all surface differently
        raise FileNotFoundError(
            f"Could not load CIFAR-100 from the Hugging Face Hub ({CIFAR100_HUB_ID}): {type(err).__name__}: {err}. "
            "When offline, pass `data_dir=` pointing to a `DatasetDict.save_to_disk` copy, to the extracted "
            "`cifar-100-python` folder (https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz), or to a local "
            "clone of the Hub repository."
        ) from err


def load_cifar100_lt(
    imbalance: float = 100,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    val_per_class: int = 0,
    n_max: int = 500,
) -> LongTailDataset:
    """
    CIFAR-100-LT: class `i` keeps `int(500 * (1 / imbalance) ** (i / 99))` training images (10,847 for imbalance 100);
    the test set is the full balanced 10,000 images. Images are 32x32 (the transforms upsample them to 224).

    The data come from the Hub (`uoft-cs/cifar100`, formerly `cifar100`) or, when `data_dir` is given, from a
    `save_to_disk` copy, the original `cifar-100-python` pickles or a local clone of the Hub repository.

    Args:
        imbalance (`float`, defaults to 100): n_max / n_min.
        seed (`int`, defaults to 0): Seed of the per-class selection (see [`make_long_tailed`]).
        data_dir (`str` or `os.PathLike`, *optional*): Local copy of CIFAR-100.
        val_per_class (`int`, defaults to 0): Optional balanced validation images per class, taken from the unused
            training images (the standard protocol has no validation set).
        n_max (`int`, defaults to 500): Training images of the largest class (500, all of them, in the standard
            protocol).

    Example:

    ```py
    >>> data = load_cifar100_lt(imbalance=100)
    >>> len(data.train), max(data.train_class_counts), min(data.train_class_counts)
    (10847, 500, 5)
    ```
    """
    data = _standardise_cifar_columns(_load_cifar100(data_dir))
    train, test = data["train"], data["test"]
    if not isinstance(train.features["label"], datasets.ClassLabel):
        raise ValueError("CIFAR-100 labels must be a ClassLabel feature with the 100 fine class names.")
    class_names = train.features["label"].names
    if len(class_names) != 100:
        raise ValueError(f"Expected the 100 fine CIFAR-100 classes, found {len(class_names)}.")
    train_lt, val = make_long_tailed(train, n_max=n_max, imbalance=imbalance, seed=seed, val_per_class=val_per_class)
    return LongTailDataset(
        train=train_lt,
        val=val,
        test=test,
        num_classes=100,
        class_names=list(class_names),
        train_class_counts=count_labels(labels_as_numpy(train_lt), 100),
    )


# ---------------------------------------------------------------------------- registered under the CLI's names
@register_dataset("cifar100_lt")
def cifar100_lt(
    n_max: int = 500,
    imbalance: float = 100,
    data_seed: int = 0,
    val_per_class: int = 0,
    data_root: str | os.PathLike | None = None,
) -> LongTailDataset:
    """CIFAR-100-LT: it has 100 classes, subsampled into the exponential profile of n_max / imbalance.

    [`load_cifar100_lt`] under the names of the command line (`data_root` is its `data_dir`).
    """
    return load_cifar100_lt(
        imbalance=imbalance, seed=data_seed, data_dir=data_root, val_per_class=val_per_class, n_max=n_max
    )


@register_dataset("places_lt")
def places_lt(
    data_root: str | os.PathLike, split_dir: str | os.PathLike, verify_images: bool = False, num_workers: int = 8
) -> LongTailDataset:
    """Places-LT: its splits and counts come from the split files.

    See [`load_places_lt`].
    """
    return load_places_lt(data_root, split_dir, verify_images=verify_images, num_workers=num_workers)


@register_dataset("imagenet_lt")
def imagenet_lt(
    data_root: str | os.PathLike, split_dir: str | os.PathLike, verify_images: bool = False, num_workers: int = 8
) -> LongTailDataset:
    """ImageNet-LT: its splits and counts come from the split files.

    See [`load_imagenet_lt`].
    """
    return load_imagenet_lt(data_root, split_dir, verify_images=verify_images, num_workers=num_workers)


@register_dataset("inat2018")
def inat2018(
    data_root: str | os.PathLike,
    train_json: str | os.PathLike = "train2018.json",
    val_json: str | os.PathLike = "val2018.json",
    verify_images: bool = False,
    num_workers: int = 8,
) -> LongTailDataset:
    """iNaturalist 2018: its splits and counts come from the annotation files.

    See [`load_inaturalist2018`].
    """
    return load_inaturalist2018(
        data_root, train_json, val_json, verify_images=verify_images, num_workers=num_workers
    )


@register_dataset("imagefolder")
def imagefolder(
    train_dir: str | os.PathLike,
    test_dir: str | os.PathLike | None = None,
    val_dir: str | os.PathLike | None = None,
    verify_images: bool = False,
    num_workers: int = 8,
    flag_prefix: str = "",
) -> LongTailDataset:
    """Image folders: its splits, classes and counts come from the class folders.

    See [`load_imagefolder_lt`].
    """
    return load_imagefolder_lt(
        train_dir,
        test_dir=test_dir,
        val_dir=val_dir,
        verify_images=verify_images,
        num_workers=num_workers,
        flag_prefix=flag_prefix,
    )
