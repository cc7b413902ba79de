"""Two-phase LPT training with accelerate: dual sampling, A-GCL, per-epoch validation, exact resume.

The pieces are usable on their own ([`build_peft_model`], [`make_train_loader`], [`train_phase`], [`evaluate`]);
[`run_training`] strings them together the way `examples/train_lpt.py` does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader
from accelerate.utils import set_seed
from peft import PeftModel, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from lpt_peft.backbones import load_backbone
from lpt_peft.data.long_tail import LongTailDataset
from lpt_peft.data.transforms import LPTImageTransform, decode_image
from lpt_peft.evaluation.metrics import ShotAccuracyAccumulator, group_usage_counts
from lpt_peft.training.arguments import LPTTrainingArguments
from lpt_peft.training.losses import LPTObjective
from lpt_peft.training.samplers import ClassBalancedBatchSampler, DualBatchSampler, InstanceBalancedBatchSampler
from lpt_peft.tuner.config import LPTConfig

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------------- data
class TransformedImageDataset(Dataset):
    """A `datasets.Dataset` with `image`/`label` columns seen through an [`LPTImageTransform`].

    Random augmentation is drawn from a generator seeded by `(seed, epoch, index)`, so the images of a step do not
    depend on worker count or on when a DataLoader iterator was created: a resumed run sees exactly the same crops.

    Example:

    ```python
    >>> train = TransformedImageDataset(data.train, LPTImageTransform(224, train=True), seed=42)
    >>> train.set_epoch(3)
    >>> train[0]["pixel_values"].shape
    torch.Size([3, 224, 224])
    ```
    """

    def __init__(self, dataset, transform: LPTImageTransform, seed: int = 0) -> None:
        import datasets

        if isinstance(dataset.features.get("image"), datasets.Image):
            dataset = dataset.cast_column("image", datasets.Image(decode=False))
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.dataset[int(index)]
        generator = None
        if self.transform.train:
            generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, int(index))) & 0x7FFF_FFFF_FFFF)
        pixel_values = self.transform(decode_image(row["image"]), generator=generator)
        return {"pixel_values": pixel_values, "labels": torch.tensor(int(row["label"]), dtype=torch.long)}


def collate(examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "labels": torch.stack([e["labels"] for e in examples]),
    }


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
    dataset: TransformedImageDataset,
    labels: np.ndarray,
    args: LPTTrainingArguments,
    accelerator: Accelerator,
) -> tuple[DataLoader, DualBatchSampler | ClassBalancedBatchSampler]:
    """A DataLoader whose every batch is a class-balanced batch followed by an instance-balanced one.

    The sampler shards by `accelerator.process_index`, so the loader is NOT passed through `accelerator.prepare`.
    """
    shard = {"num_replicas": accelerator.num_processes, "rank": accelerator.process_index, "seed": args.seed}
    sampler = ClassBalancedBatchSampler(labels, args.batch_size, samples_per_class=args.samples_per_class, **shard)
    if args.dual_sampling:
        instance = InstanceBalancedBatchSampler(len(labels), args.batch_size, **shard)
        sampler = DualBatchSampler(sampler, instance)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=args.num_workers,
        collate_fn=collate,
        pin_memory=accelerator.device.type == "cuda",
        persistent_workers=False,
        # Its own generator: creating an iterator must not draw from the global RNG, or a resumed run (which
        # creates its iterator mid-epoch) would see different dropout and loss noise than an uninterrupted one.
        generator=torch.Generator().manual_seed(args.seed),
    )
    return loader, sampler


def make_eval_loader(dataset, args: LPTTrainingArguments, accelerator: Accelerator) -> DataLoader:
    transform = LPTImageTransform(
        args.image_size, train=False, resize_size=args.resize_size, mean=args.mean, std=args.std
    )
    loader = DataLoader(
        TransformedImageDataset(dataset, transform),
        batch_size=args.eval_batch_size,
        shuffle=False,
        num_workers=args.num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
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


# ---------------------------------------------------------------------------------------------------- model
def lpt_config_from_args(args: LPTTrainingArguments, num_labels: int, id2label: dict[int, str] | None) -> LPTConfig:
    return LPTConfig(
        num_labels=num_labels,
        prompt_length=args.prompt_length,
        num_groups=args.num_groups,
        group_prompt_length=args.group_prompt_length,
        top_k=args.top_k,
        shared_layers=args.shared_layers,
        classifier_dropout=args.classifier_dropout,
        layer_norm_eps=args.layer_norm_eps,
        id2label=id2label,
    )


def build_peft_model(
    backbone: nn.Module,
    args: LPTTrainingArguments,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    init_from: str | None = None,
) -> PeftModel:
    """A trainable LPT model: a fresh phase-1 adapter, or the phase-1 adapter saved in `init_from` (checked first)."""
    if init_from is None:
        return get_peft_model(backbone, lpt_config_from_args(args, num_labels, id2label))
    from peft import PeftConfig

    adapter_config = Path(init_from) / "adapter_config.json"
    if not adapter_config.is_file():
        raise FileNotFoundError(
            f"--init_from {init_from!r} holds no adapter_config.json. Point it at a folder written by "
            "save_pretrained (e.g. <output_dir>/phase1)."
        )
    config = PeftConfig.from_pretrained(init_from)
    if not isinstance(config, LPTConfig):
        raise ValueError(f"--init_from {init_from!r} is a {config.peft_type} adapter, not an LPT adapter.")
    if config.phase != 1:
        raise ValueError(
            f"--init_from {init_from!r} is a phase-{config.phase} adapter; phase 2 starts from a phase-1 adapter "
            "(<output_dir>/phase1). To continue an interrupted run use --resume_from_checkpoint."
        )
    if config.num_labels != num_labels:
        raise ValueError(
            f"--init_from {init_from!r} has num_labels={config.num_labels} but the data set has {num_labels} classes."
        )
    return PeftModel.from_pretrained(backbone, init_from, is_trainable=True)


def branch_match_scores(output, split: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Matching score of each branch of a concatenated batch (the model reports the mean over both)."""
    if output.key_similarity is None:
        return None, None
    per_sample = output.key_similarity.gather(1, output.group_indices).sum(dim=1)
    cb = per_sample[:split].mean()
    ib = per_sample[split:].mean() if per_sample.shape[0] > split else None
    return cb, ib


def _maybe_inject_fault(phase: int, step: int) -> None:
    """Crash hard (as `kill -9` would) at `LPT_FAULT_INJECT_STEP=<phase>:<step>`; the resume tests use it."""
    target = os.environ.get("LPT_FAULT_INJECT_STEP")
    if target and target == f"{phase}:{step}":
        os._exit(17)


# ---------------------------------------------------------------------------------------------------- checkpoints
@dataclass
class TrainerState:
    """Where a run stands; saved next to accelerate's state in every checkpoint."""

    phase: int = 1
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None
    finished_phases: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    run: dict[str, Any] | None = None  # what determines the trajectory, see `run_record`; checked on resume

    def save(self, path: Path) -> None:
        _atomic_write_text(path, json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> TrainerState:
        return cls(**json.loads(Path(path).read_text()))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _adapter_keys(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters() if ".lpt_" in name or name.startswith("lpt_")}


def install_adapter_only_checkpointing(accelerator: Accelerator) -> None:
    """Make `accelerator.save_state` store only adapter weights (the backbone is frozen and can be 100s of MB).

    Keys are stored without DDP's `module.` prefix and loaded by this hook, so a state saved with N processes resumes
    with any other number (the batches then shard differently, so the continuation is no longer bit-identical).
    """

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            keys = _adapter_keys(accelerator.unwrap_model(model))
            weights[i] = {
                k.removeprefix("module."): v for k, v in weights[i].items() if k.removeprefix("module.") in keys
            }

    def load_hook(models, input_dir):
        from safetensors.torch import load_file

        for i, model in enumerate(models):
            file = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            saved = {k.removeprefix("module."): v for k, v in load_file(file).items()}
            unwrapped = accelerator.unwrap_model(model)
            expected = _adapter_keys(unwrapped)
            if set(saved) != expected:
                raise ValueError(
                    f"Checkpoint {input_dir} does not match this model: {len(expected - set(saved))} adapter weights "
                    f"missing, {len(set(saved) - expected)} unexpected (e.g. {sorted(expected ^ set(saved))[:3]}). "
                    "Resume with the same adapter options as the interrupted run."
                )
            unwrapped.load_state_dict(saved, strict=False)
        models.clear()  # loaded above; accelerate would otherwise load them again, strictly

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


class CheckpointManager:
    """Writes training states so that a crash never leaves a corrupt or half-written "latest".

    Each state goes to `checkpoints/<name>.partial`, is renamed to `checkpoints/<name>` once complete, and only then
    does the `checkpoints/latest` pointer (replaced atomically) move to it.
    """

    def __init__(self, output_dir: str | Path, accelerator: Accelerator, total_limit: int = 2) -> None:
        self.root = Path(output_dir) / CHECKPOINT_DIR
        self.accelerator = accelerator
        self.total_limit = max(1, total_limit)

    def save(self, state: TrainerState) -> Path:
        name = f"phase{state.phase}-epoch{state.epoch:04d}-step{state.global_step:08d}"
        final = self.root / name
        partial = self.root / (name + ".partial")
        if self.accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(partial), safe_serialization=True)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            state.save(partial / STATE_FILE)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            _atomic_write_text(self.root / LATEST_FILE, name)
            self._prune(keep=final)
        self.accelerator.wait_for_everyone()
        return final

    def _prune(self, keep: Path) -> None:
        complete = sorted(
            p
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.endswith(".partial") and (p / STATE_FILE).is_file()
        )
        for path in complete[: max(0, len(complete) - self.total_limit)]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    def resolve(self, which: str) -> Path:
        """`'latest'` or a folder -> a complete checkpoint folder, or a clear error."""
        if which != "latest":
            path = Path(which)
            if not (path / STATE_FILE).is_file():
                raise FileNotFoundError(f"{which!r} is not a complete LPT checkpoint (no {STATE_FILE} in it).")
            return path
        pointer = self.root / LATEST_FILE
        if pointer.is_file():
            path = self.root / pointer.read_text().strip()
            if (path / STATE_FILE).is_file():
                return path
        complete = sorted(
            p
            for p in self.root.glob("phase*")
            if p.is_dir() and not p.name.endswith(".partial") and (p / STATE_FILE).is_file()
        )
        if not complete:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no complete checkpoint under {self.root}. Start without "
                "--resume_from_checkpoint, or pass the folder of a checkpoint."
            )
        return complete[-1]


# Options that change what a run computes: its data, model, schedule, sampling, loss or numerics. Output options
# (checkpointing_steps, num_workers, report_to, ...) do not, and test-only ones (max_test_per_class) cannot.
TRAJECTORY_OPTIONS = (
    "dataset", "n_max", "imbalance", "num_classes", "data_seed", "val_per_class", "verify_images",
    "image_size", "resize_size", "mean", "std", "crop_scale_min",
    "model_name_or_path", "attn_implementation", "layer_norm_eps", "prompt_length", "num_groups",
    "group_prompt_length", "top_k", "shared_layers", "classifier_dropout",
    "phase", "epochs_phase1", "epochs_phase2", "max_steps_per_epoch",
    "batch_size", "samples_per_class", "dual_sampling", "eta", "loss", "matching_weight", "instance_balanced_gammas",
    "learning_rate", "lr_reference_batch", "weight_decay", "momentum", "warmup_epochs",
    "gradient_accumulation_steps", "max_grad_norm", "mixed_precision", "seed", "eval_every_epochs",
)  # fmt: skip


def dataset_fingerprint(dataset) -> str | None:
    """`"<n> images, sha256 <hex>"` over the labels and each image's file name and size (or its bytes if in memory).

    Only the last two path components count, so a data set moved to another root keeps its fingerprint.
    """
    import hashlib

    import datasets

    if dataset is None:
        return None
    if isinstance(dataset.features.get("image"), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))
    digest = hashlib.sha256(dataset_labels(dataset).tobytes())
    for value in dataset["image"]:
        path, data = (value.get("path"), value.get("bytes")) if isinstance(value, dict) else (value, None)
        if data is not None:
            digest.update(hashlib.sha256(data).digest())
        else:
            path = os.fspath(path)
            size = os.path.getsize(path) if os.path.isfile(path) else -1
            digest.update(f"{Path(path).parent.name}/{Path(path).name}:{size}".encode())
    return f"{len(dataset)} images, sha256 {digest.hexdigest()[:16]}"


def run_record(args: LPTTrainingArguments, data: LongTailDataset, num_processes: int) -> dict[str, Any]:
    """Everything that determines a run's trajectory; a checkpoint stores it and a resume must match it."""
    return {
        "options": {name: getattr(args, name) for name in TRAJECTORY_OPTIONS},
        "num_processes": num_processes,
        "global_batch": args.batch_size * num_processes * args.gradient_accumulation_steps,
        "train_data": dataset_fingerprint(data.train),
        "val_data": dataset_fingerprint(data.val),
    }


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value)


def resume_mismatches(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per difference between a checkpoint's run record and this run's, saying how to match it."""
    lines = []
    old_options, new_options = recorded.get("options", {}), current["options"]
    for name, new in new_options.items():
        old = old_options.get(name, "<not recorded>")
        if json.dumps(old) == json.dumps(new):
            continue
        how = f"leave --{name} unset" if old is None else f"pass --{name} {_flag_value(old)}"
        lines.append(f"--{name}: the checkpoint has {_flag_value(old)}, this run {_flag_value(new)} ({how} as before)")
    if recorded.get("num_processes") != current["num_processes"]:
        old, new = recorded.get("num_processes"), current["num_processes"]
        lines.append(
            f"processes: the checkpoint was written by {old}, this run has {new} (the epoch length, learning-rate "
            f"scale and batches depend on it: launch with `accelerate launch --num_processes {old}` as before, "
            f"global batch {recorded.get('global_batch')})"
        )
    for key, split in (("train_data", "training"), ("val_data", "validation")):
        if recorded.get(key) != current[key]:
            lines.append(
                f"{split} data: the checkpoint was trained on {recorded.get(key)}, this run has {current[key]} "
                "(use the same data files and data options as before)"
            )
    return lines


def check_resume(resume_dir: Path, state: TrainerState, current: dict[str, Any], phases: Sequence[int]) -> None:
    """Refuse, before anything is written, a resume that would not continue the checkpoint's run exactly.

    Raises:
        ValueError: the checkpoint records no run (older lpt-peft), its run differs (each difference named with both
            values and how to match it), or its phase is not one this run trains.
    """
    fresh = "or start a fresh --output_dir without --resume_from_checkpoint"
    if not state.run:
        raise ValueError(
            f"Cannot resume from {resume_dir}: it records no run configuration (written by an older lpt-peft), so an "
            f"exact continuation cannot be checked. Retrain {fresh.removeprefix('or ')}."
        )
    lines = resume_mismatches(state.run, current)
    if lines:
        raise ValueError(
            f"Cannot resume from {resume_dir}: this run differs from the one that wrote it and would not continue "
            "the same training:\n  - " + "\n  - ".join(lines) + f"\nResume with the checkpoint's values, {fresh} to "
            "train with the new ones. Nothing was written."
        )
    if state.phase not in phases:
        raise ValueError(
            f"{resume_dir} is a phase-{state.phase} checkpoint but this run trains phase(s) {list(phases)}. Resume "
            "with the --phase of the interrupted run, or start phase 2 from its adapter with --init_from (and a new "
            "--output_dir)."
        )



# ---------------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    accelerator: Accelerator,
    train_class_counts: Sequence[int],
    grouping: str = "standard",
    num_groups: int | None = None,
    description: str = "eval",
) -> dict[str, Any]:
    """Accuracy overall / many / medium / few (from training counts), per class, and prompt-group usage."""
    was_training = model.training
    model.eval()
    accumulator = ShotAccuracyAccumulator(len(train_class_counts))
    usage = torch.zeros(num_groups or 0, dtype=torch.long)
    for batch in tqdm(loader, desc=description, disable=not accelerator.is_local_main_process, leave=False):
        output = model(pixel_values=batch["pixel_values"])
        predictions = output.logits.argmax(dim=-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, batch["labels"]))
        accumulator.update(predictions.cpu(), labels.cpu())
        if num_groups and output.group_indices is not None:
            groups = accelerator.gather_for_metrics(output.group_indices)
            usage += group_usage_counts(groups.cpu(), num_groups)
    model.train(was_training)
    result = accumulator.compute(train_class_counts, grouping=grouping)
    if num_groups and usage.sum() > 0:
        result["group_usage"] = usage.tolist()
    return result


# ---------------------------------------------------------------------------------------------------- training
def scaled_learning_rate(args: LPTTrainingArguments, num_processes: int) -> float:
    """Linear scaling rule: lr = learning_rate * global batch / lr_reference_batch (global per branch)."""
    global_batch = args.batch_size * num_processes * args.gradient_accumulation_steps
    return args.learning_rate * global_batch / args.lr_reference_batch


def train_phase(
    model: PeftModel,
    phase: int,
    data: LongTailDataset,
    args: LPTTrainingArguments,
    accelerator: Accelerator,
    checkpoints: CheckpointManager,
    state: TrainerState,
    resume_dir: Path | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train one phase; validate each epoch; keep the best adapter (on val) in `<output_dir>/best/phase{phase}`.

    Returns the best validation metrics. The model holds the best adapter weights when this returns.
    """
    output_dir = Path(args.output_dir)
    model.base_model.set_phase(phase)
    num_epochs = args.epochs_phase1 if phase == 1 else args.epochs_phase2
    labels = dataset_labels(data.train)
    train_transform = LPTImageTransform(
        args.image_size,
        train=True,
        resize_size=args.resize_size,
        mean=args.mean,
        std=args.std,
        scale=(args.crop_scale_min, 1.0),
    )
    train_set = TransformedImageDataset(data.train, train_transform, seed=args.seed + 1000 * phase)
    loader, sampler = make_train_loader(train_set, labels, args, accelerator)
    steps_per_epoch = len(sampler)
    if args.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.max_steps_per_epoch)
    updates_per_epoch = math.ceil(steps_per_epoch / args.gradient_accumulation_steps)
    total_updates = updates_per_epoch * num_epochs

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(
        params,
        lr=scaled_learning_rate(args, accelerator.num_processes),
        momentum=args.momentum,
        weight_decay=args.weight_decay,
    )
    # Stepped by hand once per optimizer update: the batches are sharded by our sampler, not by accelerate.
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(round(args.warmup_epochs * updates_per_epoch)), max(1, total_updates)
    )
    prepared_model, optimizer = accelerator.prepare(model, optimizer)
    objective = LPTObjective(
        data.train_class_counts,
        num_epochs=num_epochs,
        loss_name=args.loss,
        matching_weight=args.matching_weight,
        eta=args.eta,
        instance_balanced_branch="instance_balanced"
        if args.instance_balanced_gammas == "authors"
        else "class_balanced",
    ).to(accelerator.device)
    # Created before load_state so that accelerate sees the same prepared objects as when the state was saved.
    val_loader = make_eval_loader(data.val, args, accelerator) if data.val is not None else None

    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        for _ in range(state.global_step):  # the schedule is a pure function of the update count
            scheduler.step()
        logger.info("Resumed phase %d from %s (epoch %d, step %d)", phase, resume_dir, state.epoch, state.global_step)
    else:
        state.phase, state.epoch, state.step_in_epoch, state.global_step = phase, 0, 0, 0
        state.best_metric, state.best_epoch = None, None

    # Outside <output_dir>/phase{phase}, which is replaced when the phase's final adapter is saved.
    best_dir = output_dir / "best" / f"phase{phase}"
    split = args.batch_size
    grouping = "author" if args.author_grouping else "standard"
    progress = tqdm(
        total=total_updates,
        initial=state.global_step,
        desc=f"phase {phase}",
        disable=not accelerator.is_local_main_process,
    )
    prepared_model.train()
    for epoch in range(state.epoch, num_epochs):
        state.epoch = epoch
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch)
        start = state.step_in_epoch
        if start:
            sampler.skip_batches(start)
        running = []
        for batch_index, batch in enumerate(loader, start=start):
            if batch_index >= steps_per_epoch:
                break
            pixel_values = batch["pixel_values"].to(accelerator.device, non_blocking=True)
            targets = batch["labels"].to(accelerator.device, non_blocking=True)
            # Accumulation by hand: an update at every `gradient_accumulation_steps` micro-batches and at the end of
            # the epoch, so gradients never carry over into validation, a checkpoint, or the next epoch.
            sync = (batch_index + 1) % args.gradient_accumulation_steps == 0 or batch_index + 1 == steps_per_epoch
            with contextlib.nullcontext() if sync else accelerator.no_sync(prepared_model):
                with accelerator.autocast():
                    output = prepared_model(pixel_values=pixel_values)
                match_cb, match_ib = branch_match_scores(output, split)
                dual = args.dual_sampling and output.logits.shape[0] > split
                losses = objective(
                    output.logits[:split],
                    targets[:split],
                    output.logits[split:] if dual else None,
                    targets[split:] if dual else None,
                    epoch,
                    cb_match_score=match_cb,
                    ib_match_score=match_ib if dual else None,
                )
                accelerator.backward(losses["loss"])  # divided by gradient_accumulation_steps
            running.append(losses["loss"].detach())
            if sync:
                if args.max_grad_norm:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state.global_step += 1
                state.step_in_epoch = batch_index + 1
                progress.update(1)
                logs = {f"phase{phase}/{k}": float(torch.as_tensor(v).detach()) for k, v in losses.items()}
                logs[f"phase{phase}/lr"] = scheduler.get_last_lr()[0]
                accelerator.log(logs, step=state.global_step + 100_000 * (phase - 1))
                if args.checkpointing_steps and state.global_step % args.checkpointing_steps == 0:
                    checkpoints.save(state)
                _maybe_inject_fault(phase, state.global_step)
        state.step_in_epoch = 0
        epoch_record: dict[str, Any] = {
            "phase": phase,
            "epoch": epoch,
            "train_loss": float(torch.stack(running).mean()) if running else None,
        }
        last_epoch = epoch == num_epochs - 1
        if val_loader is not None and ((epoch + 1) % args.eval_every_epochs == 0 or last_epoch):
            metrics = evaluate(
                prepared_model,
                val_loader,
                accelerator,
                data.train_class_counts,
                grouping,
                description=f"val phase {phase} epoch {epoch}",
            )
            epoch_record.update({f"val_{k}": metrics[k] for k in ("overall", "many", "medium", "few")})
            accelerator.log(
                {f"phase{phase}/val_{k}": v for k, v in epoch_record.items() if k.startswith("val_")},
                step=state.global_step + 100_000 * (phase - 1),
            )
            if state.best_metric is None or metrics["overall"] > state.best_metric:
                state.best_metric, state.best_epoch = metrics["overall"], epoch
                save_adapter(accelerator.unwrap_model(prepared_model), best_dir, accelerator)
        elif val_loader is None and last_epoch:
            # No validation split (e.g. iNaturalist): the last epoch is the model.
            state.best_epoch = epoch
            save_adapter(accelerator.unwrap_model(prepared_model), best_dir, accelerator)
        state.history.append(epoch_record)
        if accelerator.is_main_process:
            logger.info("phase %d epoch %d: %s", phase, epoch, epoch_record)
        if on_epoch_end is not None:
            on_epoch_end(epoch_record)
        state.epoch = epoch + 1
        checkpoints.save(state)
    progress.close()

    model = accelerator.unwrap_model(prepared_model)
    load_adapter_weights(model, best_dir)
    state.finished_phases.append(phase)
    accelerator.free_memory()
    return {"best_epoch": state.best_epoch, "best_val_overall": state.best_metric}


def save_adapter(model: PeftModel, directory: Path, accelerator: Accelerator, barrier: bool = True) -> None:
    """`save_pretrained` into a temporary folder, then swap it in, so a crash never leaves half an adapter."""
    if barrier:
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    if barrier:
        accelerator.wait_for_everyone()


def load_adapter_weights(model: PeftModel, directory: Path) -> None:
    """Load the weights of a saved adapter into the active adapter of `model` (same shapes)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state_dict = load_file(Path(directory) / "adapter_model.safetensors")
    result = set_peft_model_state_dict(model, state_dict, adapter_name=model.active_adapter)
    missing = [k for k in result.missing_keys if ".lpt_" in k or k.startswith("base_model.lpt_")]
    if missing:
        raise ValueError(f"Adapter in {directory} lacks weights for {missing[:3]}")


# ---------------------------------------------------------------------------------------------------- the whole run
def build_dataset(args: LPTTrainingArguments) -> LongTailDataset:
    """The long-tailed data set named by `args.dataset`, with a clear error when its files are missing."""
    from lpt_peft.data.registry import dataset_from_args

    return dataset_from_args(args)


def _cap_per_class(dataset, cap: int):
    labels = dataset_labels(dataset)
    keep = np.concatenate([np.flatnonzero(labels == c)[:cap] for c in np.unique(labels)])
    return dataset.select(np.sort(keep))


def make_accelerator(**kwargs: Any) -> Accelerator:
    """An `Accelerator` that also runs several processes on a machine without GPUs (gloo).

    `accelerate launch --multi_gpu --num_processes N` starts N processes either way, but accelerate only joins them
    into one CPU process group when asked for the CPU explicitly; otherwise each would train alone.
    """
    cpu_group = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=cpu_group or kwargs.pop("cpu", False), **kwargs)


def check_images_before_training(data: LongTailDataset, args: LPTTrainingArguments) -> None:
    """Decode the val and test images once before any training (unless a loader already verified that split).

    A bad file there would otherwise crash validation after the first epoch trained, before its checkpoint.
    """
    from lpt_peft.data.benchmarks import check_images_decode

    for split in ("val", "test"):
        dataset = getattr(data, split)
        if dataset is not None and split not in data.skipped_images:
            check_images_decode(dataset, split, num_workers=max(1, args.num_workers))


def log_launch(accelerator: Accelerator, args: LPTTrainingArguments) -> None:
    """Say how many processes train, on which device, with which global batch; warn when processes were lost."""
    n = accelerator.num_processes
    global_batch = args.batch_size * n * args.gradient_accumulation_steps
    if accelerator.is_main_process:
        logger.info(
            "Training with %d process(es) (world size %d) on %s, mixed precision %s; global batch %d = %d per process "
            "and branch x %d process(es) x %d accumulation step(s); learning rate %g.",
            n, n, accelerator.device, args.mixed_precision, global_batch, args.batch_size, n,
            args.gradient_accumulation_steps, scaled_learning_rate(args, n),
        )  # fmt: skip
    requested = int(os.environ.get("WORLD_SIZE", "1") or 1)
    # `accelerate launch --cpu` runs one process whatever --num_processes/--num_machines say; it then still exports
    # MASTER_PORT (set only when more than one process or machine was asked for) and ACCELERATE_USE_CPU.
    cpu_launch = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and "MASTER_PORT" in os.environ
    if n == 1 and (requested > 1 or cpu_launch):
        logger.warning(
            "Several processes were requested but this run trains in ONE process. `accelerate launch --cpu` always "
            "starts a single process; for several CPU processes use `accelerate launch --multi_gpu --num_processes N` "
            "on a machine without GPUs (or with CUDA_VISIBLE_DEVICES=''): lpt-peft joins them into one gloo group."
        )



def _trackers(args: LPTTrainingArguments) -> list[str] | None:
    if args.report_to == "none":
        return None
    if args.report_to in ("tensorboard", "auto"):
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            if args.report_to == "tensorboard":
                raise ImportError("--report_to tensorboard needs `pip install tensorboard`.")
            return None
        return ["tensorboard"]
    return ["all"]


def run_training(args: LPTTrainingArguments, data: LongTailDataset | None = None) -> dict[str, Any]:
    """Phase 1 and/or phase 2 on one data set, then test evaluation, result tables and plots.

    Writes to `args.output_dir`: `phase1/` and `phase2/` (each phase's adapter, the epoch best on validation, loadable
    with `PeftModel.from_pretrained`), `best/` (the running best of each phase while it trains), `checkpoints/`
    (training states for `--resume_from_checkpoint`), `results.json`, `results.md`, `per_class_accuracy.png`,
    `group_usage.png`, `class_info.json`.
    """
    from lpt_peft.evaluation.metrics import save_results
    from lpt_peft.evaluation.plots import plot_group_usage, plot_per_class_accuracy

    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=_trackers(args),
        project_dir=str(output_dir),
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    set_seed(args.seed)

    checkpoints = CheckpointManager(output_dir, accelerator, args.checkpoints_total_limit)
    state, resume_dir = TrainerState(), None
    if args.resume_from_checkpoint:
        resume_dir = checkpoints.resolve(args.resume_from_checkpoint)
        state = TrainerState.load(resume_dir / STATE_FILE)

    data = data if data is not None else build_dataset(args)
    check_images_before_training(data, args)
    record = run_record(args, data, accelerator.num_processes)
    if resume_dir is not None:
        check_resume(resume_dir, state, record, args.phases)
    else:
        state.run = record
    log_launch(accelerator, args)
    id2label = dict(enumerate(data.class_names))
    backbone = load_backbone(args.model_name_or_path, args.image_size, args.attn_implementation)
    init_from = args.init_from if args.phase == "2" and resume_dir is None else None
    model = build_peft_model(backbone, args, data.num_classes, id2label, init_from=init_from)
    check_dataset(data, model.peft_config[model.active_adapter].num_labels)
    model.to(accelerator.device)  # the baselines run before accelerate.prepare
    model.base_model.card_info = {
        "dataset": args.dataset,
        "grouping": "author" if args.author_grouping else "standard",
        "preprocessing": {
            "image_size": args.image_size,
            "resize_size": args.resize_size,
            "mean": list(args.mean),
            "std": list(args.std),
        },
        # The options that rebuild the evaluation split: `evaluate_lpt.py --adapter DIR` evaluates what was reported.
        "data": {
            k: getattr(args, k) for k in ("n_max", "imbalance", "data_seed", "val_per_class", "max_test_per_class")
        },
        **({"repo_id": args.hub_model_id} if args.hub_model_id else {}),
    }
    install_adapter_only_checkpointing(accelerator)
    if accelerator.is_main_process:
        data.save_class_info(output_dir / "class_info.json")
    if _trackers(args):
        accelerator.init_trackers("lpt", config={k: v for k, v in asdict(args).items() if not isinstance(v, list)})

    grouping = "author" if args.author_grouping else "standard"
    test_loader = make_eval_loader(data.test, args, accelerator)
    rows: dict[str, dict[str, Any]] = {}
    if args.baselines and resume_dir is None:
        with torch.random.fork_rng(devices=[]):  # the probes must not shift LPT's random stream
            run_baselines(model, data, args, accelerator, test_loader)
    for phase in args.phases:
        if phase in state.finished_phases:
            continue
        resume_here = resume_dir if (resume_dir is not None and state.phase == phase) else None
        resume_dir = None  # a checkpoint resumes the phase it was written in, once
        best = train_phase(model, phase, data, args, accelerator, checkpoints, state, resume_dir=resume_here)
        save_adapter(model, output_dir / f"phase{phase}", accelerator)
        result = evaluate(
            model,
            test_loader,
            accelerator,
            data.train_class_counts,
            grouping,
            num_groups=model.peft_config[model.active_adapter].num_groups if phase == 2 else None,
            description=f"test phase {phase}",
        )
        name = f"LPT phase {phase}"
        if accelerator.is_main_process:
            rows = _merge_json(output_dir / "results.json", {name: {**_summary(result), **best}})
            from lpt_peft.evaluation.metrics import format_results_table

            # The card of the pushed/saved adapter shows the test table of this run.
            model.base_model.card_info["results_markdown"] = format_results_table(rows)
            save_adapter(model, output_dir / f"phase{phase}", accelerator, barrier=False)
            per_class = _merge_json(output_dir / "per_class_accuracy.json", {name: result["per_class"]})
            save_results(rows, output_dir)
            if "group_usage" in result:
                _merge_json(output_dir / "group_usage.json", {name: result["group_usage"]})
                plot_group_usage(
                    result["group_usage"],
                    output_dir / "group_usage.png",
                    title="How often each prompt group is selected",
                )
            names = list(per_class)
            plot_per_class_accuracy(
                per_class[names[-1]],
                data.train_class_counts,
                output_dir / "per_class_accuracy.png",
                class_names=data.class_names,
                compare={n: per_class[n] for n in names[:-1]} or None,
                label=names[-1],
                title=f"Per-class test accuracy vs training count ({args.dataset})",
            )
        if args.push_to_hub and accelerator.is_main_process:
            repo = args.hub_model_id if phase == 2 or len(args.phases) == 1 else f"{args.hub_model_id}-phase1"
            model.push_to_hub(repo)
        state.phase = phase + 1
        state.epoch = state.step_in_epoch = state.global_step = 0

    if accelerator.is_main_process and rows:
        from lpt_peft.evaluation.metrics import format_results_table

        print(f"\nTest accuracy (%) by shot group, {args.dataset} ({grouping} groups: many n>100, few n<20):")
        print(format_results_table(rows))
        print(f"Adapters, results.json/.md and plots are in {output_dir}/")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"rows": rows, "output_dir": str(output_dir)}


PROBE_LEARNING_RATES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # at lr_reference_batch, scaled like LPT's
PROBE_NAMES = {
    "linear_probe_ce": "Linear probe (CE)",
    "linear_probe_agcl": "Linear probe (A-GCL, dual sampling)",
}


def run_baselines(model: PeftModel, data: LongTailDataset, args, accelerator: Accelerator, test_loader) -> None:
    """Train the requested linear probes on frozen features and record them in the results like LPT's phases."""
    from lpt_peft.training.baselines import evaluate_probe, extract_features, train_linear_probe

    output_dir = Path(args.output_dir)
    grouping = "author" if args.author_grouping else "standard"
    train_loader = make_eval_loader(data.train, args, accelerator)  # no augmentation: features are cached once
    with model.disable_adapter():
        backbone = model.get_base_model()
        train_features, train_labels = extract_features(backbone, train_loader, accelerator, "train features")
        test_features, test_labels = extract_features(backbone, test_loader, accelerator, "test features")
        val_features = val_labels = None
        if data.val is not None:
            val_loader = make_eval_loader(data.val, args, accelerator)
            val_features, val_labels = extract_features(backbone, val_loader, accelerator, "val features")
    for kind in args.baselines:
        # A baseline deserves its best learning rate: pick it on the validation split (never on test).
        best_probe, best_score = None, -1.0
        for lr in PROBE_LEARNING_RATES if val_features is not None else (args.learning_rate,):
            probe = train_linear_probe(
                kind,
                train_features,
                train_labels,
                data.train_class_counts,
                epochs=args.probe_epochs,
                batch_size=args.batch_size,
                samples_per_class=args.samples_per_class,
                learning_rate=lr,
                lr_reference_batch=args.lr_reference_batch,
                weight_decay=args.weight_decay,
                seed=args.seed,
            )
            score = (
                evaluate_probe(probe, val_features, val_labels, data.train_class_counts, grouping)["overall"]
                if val_features is not None
                else 0.0
            )
            if score > best_score:
                best_probe, best_score, best_lr = probe, score, lr
        probe = best_probe
        logger.info("%s: learning rate %s chosen on val (%.2f%%)", PROBE_NAMES[kind], best_lr, best_score)
        result = evaluate_probe(probe, test_features, test_labels, data.train_class_counts, grouping)
        if accelerator.is_main_process:
            rows = _merge_json(output_dir / "results.json", {PROBE_NAMES[kind]: _summary(result)})
            _merge_json(output_dir / "per_class_accuracy.json", {PROBE_NAMES[kind]: result["per_class"]})
            from lpt_peft.evaluation.metrics import save_results

            save_results(rows, output_dir)
            logger.info("%s: %s", PROBE_NAMES[kind], _summary(result))


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("overall", "many", "medium", "few")}


def _merge_json(path: Path, new: dict[str, Any]) -> dict[str, Any]:
    """Add entries to a JSON mapping on disk (kept across resumes, so finished phases keep their rows)."""
    merged = {**json.loads(path.read_text()), **new} if path.is_file() else dict(new)
    _atomic_write_text(path, json.dumps(merged, indent=2, allow_nan=True))
    return merged


def evaluate_adapter(adapter: str, args: LPTTrainingArguments, data: LongTailDataset | None = None) -> dict[str, Any]:
    """Evaluate a saved LPT adapter on the test split of `args.dataset`: overall / many / medium / few + per class.

    The backbone is `args.model_name_or_path` unless that is left at its default and the adapter records its base.
    """
    from peft import PeftConfig

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter!r} holds no adapter_config.json; pass a folder written by save_pretrained.")
    config = PeftConfig.from_pretrained(adapter)
    accelerator = make_accelerator(mixed_precision=args.mixed_precision)
    data = data if data is not None else build_dataset(args)
    backbone_name = args.model_name_or_path
    if backbone_name == "demo" and config.base_model_name_or_path and Path(config.base_model_name_or_path).exists():
        backbone_name = config.base_model_name_or_path
    backbone = load_backbone(backbone_name, args.image_size, args.attn_implementation)
    model = PeftModel.from_pretrained(backbone, adapter).to(accelerator.device).eval()
    check_dataset(data, config.num_labels)
    loader = make_eval_loader(data.test, args, accelerator)
    result = evaluate(
        model,
        loader,
        accelerator,
        data.train_class_counts,
        "author" if args.author_grouping else "standard",
        num_groups=config.num_groups if config.phase == 2 else None,
        description="test",
    )
    result["phase"] = config.phase
    return result
