"""Data for training: the transformed image data set, class-label checks, the training and evaluation loaders, and
the data set named by the training arguments.

Batches are collated with torch's `default_collate` (a list of `{"pixel_values", "labels"}` dicts becomes one dict of
stacked tensors).
"""

from __future__ import annotations

import logging

import numpy as np
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader, default_collate

from lpt_peft.data.long_tail import LongTailDataset, long_tail_from_splits
from lpt_peft.data.seeding import STREAM_LOADER, torch_generator
from lpt_peft.data.transforms import LPTImageTransform, TransformedImageDataset
from lpt_peft.training.arguments import LPTTrainingArguments

logger = logging.getLogger(__name__)

__all__ = [
    "TransformedImageDataset",  # lives in lpt_peft.data.transforms; re-exported for the training API
    "build_dataset",
    "check_dataset",
    "check_images_before_training",
    "dataset_labels",
    "make_eval_loader",
    "make_train_loader",
]


def dataset_labels(dataset) -> np.ndarray:
    return np.asarray(dataset["label"], dtype=np.int64)


_EMPTY_CLASS_HINT = "remove the class or add images"


def check_dataset(data: LongTailDataset, num_labels: int) -> None:
    """Fail before training when the data set cannot be trained on with `num_labels` classes."""
    if data.num_classes != num_labels:
        raise ValueError(
            f"The data set has {data.num_classes} classes but the adapter has num_labels={num_labels}. Use the "
            "adapter that matches this data set, or build a new one."
        )
    # The data package's check (the one every loader runs), on the training labels themselves: a LongTailDataset
    # built by hand gets the same refusal and message.
    counted = long_tail_from_splits({"train": data.train, "test": data.test}, data.class_names, hint=_EMPTY_CLASS_HINT)
    differ = [i for i, (a, b) in enumerate(zip(data.train_class_counts, counted.train_class_counts)) if a != b]
    if differ:
        i = differ[0]
        raise ValueError(
            f"train_class_counts disagree with the training labels for {len(differ)} class(es), e.g. class {i} "
            f"({data.class_names[i]}): {data.train_class_counts[i]} recorded, {counted.train_class_counts[i]} images. "
            "Rebuild the LongTailDataset with the counts of its training split (lpt_peft.data.count_labels)."
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
        generator=torch_generator(args.seed, STREAM_LOADER),
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
        generator=torch_generator(0, STREAM_LOADER),
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


# Training splits up to this many images are decoded once before training (Places-LT's 62.5k take a few minutes on
# a few cores, small next to one epoch); larger ones are not, unless --verify_images true.
TRAIN_CHECK_LIMIT = 100_000


def check_images_before_training(data: LongTailDataset, args: LPTTrainingArguments) -> None:
    """Decode the images once before any training (unless a loader already verified that split with
    `--verify_images true`): val and test always, train when it holds at most `TRAIN_CHECK_LIMIT` images.

    A bad file would otherwise crash training or validation after epochs were trained; checked here, the run fails
    before its first step and a fresh start (with the file fixed, or `--verify_images true`) loses nothing.

    Raises:
        ValueError: naming the unreadable files of a split.
    """
    from lpt_peft.data.benchmarks import check_images_decode

    for split in ("train", "val", "test"):
        dataset = getattr(data, split)
        if dataset is None or split in data.skipped_images:
            continue
        if split == "train" and len(dataset) > TRAIN_CHECK_LIMIT:
            logger.info(
                "The %d training images are not decoded before training (more than %d); an unreadable one stops "
                "training with the last checkpoint named. --verify_images true checks (and skips) them first.",
                len(dataset), TRAIN_CHECK_LIMIT,
            )  # fmt: skip
            continue
        check_images_decode(dataset, split, num_workers=max(1, args.num_workers))


def build_dataset(args: LPTTrainingArguments) -> LongTailDataset:
    """The long-tailed data set named by `args.dataset`, built through the data-set registry (`lpt_peft.data`)."""
    from lpt_peft.data.registry import dataset_from_args

    return dataset_from_args(args)
