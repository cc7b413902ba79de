"""Data for training: the transformed image data set, class-label checks, the training and evaluation loaders, and
the data set named by the training arguments.

Batches are collated with torch's `default_collate` (a list of `{"pixel_values", "labels"}` dicts becomes one dict of
stacked tensors).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader, Dataset, default_collate

from lpt_peft.data.long_tail import LongTailDataset
from lpt_peft.data.transforms import LPTImageTransform, decode_image
from lpt_peft.training.arguments import LPTTrainingArguments
from lpt_peft.training.seeding import STREAM_AUGMENT, STREAM_LOADER, seeded_generator

__all__ = [
    "TransformedImageDataset",
    "build_dataset",
    "check_dataset",
    "check_images_before_training",
    "dataset_labels",
    "make_eval_loader",
    "make_train_loader",
]


class TransformedImageDataset(Dataset):
    """A `datasets.Dataset` with `image`/`label` columns seen through an [`LPTImageTransform`].

    Random augmentation of image `index` in epoch `epoch` is drawn from `seeded_generator(*seed, STREAM_AUGMENT,
    epoch, index)` (see `lpt_peft.training.seeding`), so the images of a step do not depend on worker count or on when
    a DataLoader iterator was created: a resumed run sees exactly the same crops.

    Args:
        dataset (`datasets.Dataset`): Rows with an `image` (any form `decode_image` reads) and an integer `label`.
        transform ([`LPTImageTransform`]): Training (random) or evaluation transform.
        seed (`int` or `Sequence[int]`, defaults to 0): Key(s) prefixed to every augmentation stream, e.g.
            `(run_seed, phase)`.

    Example:

    ```python
    >>> train = TransformedImageDataset(data.train, LPTImageTransform(224, train=True), seed=(42, 1))
    >>> train.set_epoch(3)
    >>> train[0]["pixel_values"].shape
    torch.Size([3, 224, 224])
    ```
    """

    def __init__(self, dataset, transform: LPTImageTransform, seed: int | Sequence[int] = 0) -> None:
        import datasets

        if isinstance(dataset.features.get("image"), datasets.Image):
            dataset = dataset.cast_column("image", datasets.Image(decode=False))
        self.dataset = dataset
        self.transform = transform
        self.seed = (int(seed),) if isinstance(seed, int) else tuple(int(s) for s in seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.dataset[int(index)]
        generator = None
        if self.transform.train:
            generator = seeded_generator(*self.seed, STREAM_AUGMENT, self.epoch, int(index))
        pixel_values = self.transform(decode_image(row["image"]), generator=generator)
        return {"pixel_values": pixel_values, "labels": torch.tensor(int(row["label"]), dtype=torch.long)}


def dataset_labels(dataset) -> np.ndarray:
    return np.asarray(dataset["label"], dtype=np.int64)


def check_dataset(data: LongTailDataset, num_labels: int) -> None:
    """Fail before training when the data set cannot be trained on with `num_labels` classes."""
    if data.num_classes != num_labels:
        raise ValueError(
            f"The data set has {data.num_classes} classes but the adapter has num_labels={num_labels}. Use the "
            "adapter that matches this data set, or build a new one."
        )
    empty = [i for i, n in enumerate(data.train_class_counts) if n <= 0]
    if empty:
        names = ", ".join(f"{i} ({data.class_names[i]})" for i in empty[:5])
        raise ValueError(
            f"{len(empty)} class(es) have no training image: {names}{' ...' if len(empty) > 5 else ''}. LPT's loss, "
            "sampler and shot groups need every class in the training split; remove the class or add images."
        )
    for split_name in ("train", "val", "test"):
        split = getattr(data, split_name)
        if split is None or len(split) == 0:
            continue
        labels = dataset_labels(split)
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_labels:
            raise ValueError(
                f"The {split_name} split has label {low if low < 0 else high}, outside 0..{num_labels - 1}. Check the "
                "label column (labels must be class indices starting at 0)."
            )


def make_train_loader(
    dataset: TransformedImageDataset, sampler, args: LPTTrainingArguments, accelerator: Accelerator
) -> DataLoader:
    """A DataLoader over `dataset` whose batches are the index lists of `sampler` (e.g. a dual batch sampler).

    The samplers shard by `accelerator.process_index` themselves, so the loader is NOT passed through
    `accelerator.prepare` (which would shard a second time).
    """
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=args.num_workers,
        collate_fn=default_collate,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=False,
        # Its own generator: creating an iterator must not draw from the global RNG, or a resumed run (which
        # creates its iterator mid-epoch) would see different dropout and loss noise than an uninterrupted one.
        generator=seeded_generator(args.seed, STREAM_LOADER),
    )


def make_eval_loader(dataset, args: LPTTrainingArguments, accelerator: Accelerator) -> DataLoader:
    """A sharded, unshuffled, unaugmented loader of `dataset` for evaluation (`args.eval_batch_size` per process)."""
    transform = LPTImageTransform(
        args.image_size, train=False, resize_size=args.resize_size, mean=args.mean, std=args.std
    )
    loader = DataLoader(
        TransformedImageDataset(dataset, transform),
        batch_size=args.eval_batch_size,
        shuffle=False,
        num_workers=args.num_workers,
        collate_fn=default_collate,
        generator=seeded_generator(0, STREAM_LOADER),
    )
    # Sharded like accelerator.prepare would, but not registered with it: evaluation loaders carry no training state,
    # and keeping them out of save_state makes a checkpoint independent of which loaders exist when it is resumed.
    return prepare_data_loader(
        loader,
        device=accelerator.device,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        put_on_device=True,
    )


def check_images_before_training(data: LongTailDataset, args: LPTTrainingArguments) -> None:
    """Decode the val and test images once before any training (unless a loader already verified that split).

    A bad file there would otherwise crash validation after the first epoch trained, before its checkpoint.
    """
    from lpt_peft.data.benchmarks import check_images_decode

    for split in ("val", "test"):
        dataset = getattr(data, split)
        if dataset is not None and split not in data.skipped_images:
            check_images_decode(dataset, split, num_workers=max(1, args.num_workers))


def build_dataset(args: LPTTrainingArguments) -> LongTailDataset:
    """The long-tailed data set named by `args.dataset`, with a clear error when its files are missing."""
    from lpt_peft import data as lt

    def need(*names: str) -> None:
        missing = [f"--{n}" for n in names if not getattr(args, n)]
        if missing:
            raise ValueError(f"--dataset {args.dataset} needs {', '.join(missing)} (see docs/datasets.md).")

    if args.dataset == "synthetic":
        from lpt_peft.data.synthetic import make_synthetic_long_tail

        data = make_synthetic_long_tail(
            num_classes=args.num_classes,
            n_max=args.n_max,
            imbalance=args.imbalance,
            image_size=args.image_size,
            val_per_class=args.val_per_class,
            seed=args.data_seed,
        )
    elif args.dataset == "fashion_mnist_lt":
        data = lt.load_fashion_mnist_lt(
            n_max=args.n_max,
            imbalance=args.imbalance,
            seed=args.data_seed,
            val_per_class=args.val_per_class,
            data_dir=args.data_root,
        )
    elif args.dataset == "cifar100_lt":
        data = lt.load_cifar100_lt(
            imbalance=args.imbalance,
            seed=args.data_seed,
            data_dir=args.data_root,
            val_per_class=args.val_per_class,
            n_max=args.n_max,
        )
    elif args.dataset in ("places_lt", "imagenet_lt"):
        need("data_root", "split_dir")
        loader = lt.load_places_lt if args.dataset == "places_lt" else lt.load_imagenet_lt
        data = loader(
            args.data_root, args.split_dir, verify_images=args.verify_images, num_workers=max(1, args.num_workers)
        )
    elif args.dataset == "inat2018":
        need("data_root")
        kwargs = {k: getattr(args, k) for k in ("train_json", "val_json") if getattr(args, k)}
        data = lt.load_inaturalist2018(
            args.data_root, verify_images=args.verify_images, num_workers=max(1, args.num_workers), **kwargs
        )
    else:
        need("train_dir")
        data = lt.load_imagefolder_lt(
            args.train_dir,
            test_dir=args.test_dir,
            val_dir=args.val_dir,
            verify_images=args.verify_images,
            num_workers=max(1, args.num_workers),
            flag_prefix="--",
        )
    if args.verify_images and not data.skipped_images:  # built in memory: verify here, like the file loaders do
        data = lt.drop_unreadable_images(data, num_workers=max(1, args.num_workers))
    if args.max_test_per_class:
        data.test = _cap_per_class(data.test, args.max_test_per_class)
    return data


def _cap_per_class(dataset, cap: int):
    labels = dataset_labels(dataset)
    keep = np.concatenate([np.flatnonzero(labels == c)[:cap] for c in np.unique(labels)])
    return dataset.select(np.sort(keep))
