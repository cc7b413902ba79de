"""The training loop of one LPT phase and evaluation.

[`train_phase`] takes the objective (the loss) and the batch sampler as arguments; by default both are built from the
training arguments through the `LOSSES` / `SAMPLERS` registries. Every batch is split at the sampler's `split_sizes`
(class-balanced part first), and the matching term of each part comes from the model output.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from lpt_peft.data.long_tail import LongTailDataset
from lpt_peft.data.seeding import STREAM_AUGMENT
from lpt_peft.data.transforms import LPTImageTransform
from lpt_peft.evaluation.metrics import ShotAccuracyAccumulator, group_usage_counts
from lpt_peft.training.arguments import LPTTrainingArguments
from lpt_peft.training.builders import objective_from_args, sampler_from_args
from lpt_peft.training.checkpointing import CheckpointManager, TrainerState, load_adapter_weights, save_adapter
from lpt_peft.training.data import TransformedImageDataset, dataset_labels, make_eval_loader, make_train_loader

logger = logging.getLogger(__name__)

__all__ = [
    "CALLBACKS_ENV",
    "TrainingCallback",
    "branch_match_scores",
    "callbacks_from_env",
    "evaluate",
    "scaled_learning_rate",
    "split_batch",
    "train_phase",
]

CALLBACKS_ENV = "LPT_TRAINING_CALLBACKS"


class TrainingCallback:
    """Hooks of [`train_phase`], in the spirit of transformers' `TrainerCallback`; override the ones you need.

    `on_step_end` runs after every optimizer update (after that step's checkpoint, if one is due); `on_epoch_end`
    after an epoch's validation and before its checkpoint.
    """

    def on_step_end(self, phase: int, state: TrainerState) -> None:
        pass

    def on_epoch_end(self, phase: int, state: TrainerState, record: dict[str, Any]) -> None:
        pass


def callbacks_from_env() -> list[TrainingCallback]:
    """Callbacks named in `$LPT_TRAINING_CALLBACKS` (`module:factory[,module:factory...]`, each factory called with no
    arguments). Read once when a run starts, so a launched script (`accelerate launch`) can be given hooks without
    code changes; the test suite injects its crashes this way.

    Raises:
        ValueError: an entry is not `module:attribute`.
    """
    callbacks = []
    for spec in filter(None, (s.strip() for s in os.environ.get(CALLBACKS_ENV, "").split(","))):
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"${CALLBACKS_ENV} entry {spec!r} must be 'module:factory' (e.g. 'my_hooks:LogGrads').")
        callbacks.append(getattr(importlib.import_module(module_name), attribute)())
    return callbacks


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


# ---------------------------------------------------------------------------------------------------- one step
def scaled_learning_rate(args: LPTTrainingArguments, num_processes: int) -> float:
    """Linear scaling rule: lr = learning_rate * global batch / lr_reference_batch (global per branch)."""
    global_batch = args.batch_size * num_processes * args.gradient_accumulation_steps
    return args.learning_rate * global_batch / args.lr_reference_batch


def branch_match_scores(output, split_sizes: Sequence[int]) -> tuple[torch.Tensor | None, ...]:
    """The phase-2 matching score of each branch part of a batch (None in phase 1).

    One part: the model's own `match_score`. Several parts: the model reports only the mean over the whole batch, so
    each part's score is the mean over its rows of the model's per-image matching term (`key_similarity` at the
    selected `group_indices`, summed over the top-k groups), the same expression the model averages.
    """
    if output.match_score is None:
        return (None,) * len(split_sizes)
    if len(split_sizes) == 1:
        return (output.match_score,)
    per_image = output.key_similarity.gather(1, output.group_indices).sum(dim=1)
    return tuple(part.mean() for part in per_image.split(list(split_sizes)))


def split_batch(output, targets: torch.Tensor, split_sizes: Sequence[int]) -> list[tuple]:
    """`(logits, labels, match_score)` of each branch part of a batch, split at the sampler's `split_sizes`.

    Raises:
        ValueError: the sizes do not add up to the batch (a sampler whose `split_sizes` disagree with its batches).
    """
    if sum(split_sizes) != targets.shape[0]:
        raise ValueError(
            f"The sampler's split_sizes {tuple(split_sizes)} add up to {sum(split_sizes)} but its batch has "
            f"{targets.shape[0]} images; split_sizes must give the size of each consecutive part of every batch."
        )
    logits = output.logits.split(list(split_sizes))
    labels = targets.split(list(split_sizes))
    return list(zip(logits, labels, branch_match_scores(output, split_sizes)))


@dataclass
class _PhaseRun:
    """What one phase's loop works with, built by `_prepare_phase`."""

    phase: int
    num_epochs: int
    objective: Callable[..., dict[str, torch.Tensor]]
    sampler: Any
    train_set: TransformedImageDataset
    loader: DataLoader
    steps_per_epoch: int
    total_updates: int
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    prepared_model: nn.Module
    val_loader: DataLoader | None
    best_dir: Path


def _forward_backward(run: _PhaseRun, batch, epoch: int, sync: bool, accelerator: Accelerator):
    pixel_values = batch["pixel_values"].to(accelerator.device, non_blocking=True)
    targets = batch["labels"].to(accelerator.device, non_blocking=True)
    with contextlib.nullcontext() if sync else accelerator.no_sync(run.prepared_model):
        with accelerator.autocast():
            output = run.prepared_model(pixel_values=pixel_values)
        parts = split_batch(output, targets, run.sampler.split_sizes)
        (cb_logits, cb_labels, cb_match), *rest = parts
        ib_logits, ib_labels, ib_match = rest[0] if rest else (None, None, None)
        losses = run.objective(
            cb_logits, cb_labels, ib_logits, ib_labels, epoch, cb_match_score=cb_match, ib_match_score=ib_match
        )
        accelerator.backward(losses["loss"])  # divided by gradient_accumulation_steps
    return losses


def _update(run: _PhaseRun, args: LPTTrainingArguments, accelerator: Accelerator, state: TrainerState, losses):
    if args.max_grad_norm:
        accelerator.clip_grad_norm_(run.params, args.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    state.global_step += 1
    logs = {f"phase{run.phase}/{k}": float(torch.as_tensor(v).detach()) for k, v in losses.items()}
    logs[f"phase{run.phase}/lr"] = run.scheduler.get_last_lr()[0]
    accelerator.log(logs, step=state.global_step + 100_000 * (run.phase - 1))


# ---------------------------------------------------------------------------------------------------- one phase
def _prepare_phase(model, phase, data, args, accelerator, objective, sampler, num_epochs) -> _PhaseRun:
    train_transform = LPTImageTransform(
        args.image_size,
        train=True,
        resize_size=args.resize_size,
        mean=args.mean,
        std=args.std,
        scale=(args.crop_scale_min, 1.0),
    )
    train_set = TransformedImageDataset(data.train, train_transform, seed=(args.seed, phase, STREAM_AUGMENT))
    loader = make_train_loader(train_set, sampler, args, accelerator)
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
    if isinstance(objective, nn.Module):
        objective = objective.to(accelerator.device)
    # Created before load_state so that accelerate sees the same prepared objects as when the state was saved.
    val_loader = make_eval_loader(data.val, args, accelerator) if data.val is not None else None
    # Outside <output_dir>/phase{phase}, which is replaced when the phase's final adapter is saved.
    best_dir = Path(args.output_dir) / "best" / f"phase{phase}"
    return _PhaseRun(
        phase, num_epochs, objective, sampler, train_set, loader, steps_per_epoch, total_updates, params,
        optimizer, scheduler, prepared_model, val_loader, best_dir,
    )  # fmt: skip


def _start_or_resume(run: _PhaseRun, state: TrainerState, accelerator: Accelerator, resume_dir: Path | None) -> None:
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        with warnings.catch_warnings():  # replaying the schedule before any optimizer step is intended here
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            for _ in range(state.global_step):  # the schedule is a pure function of the update count
                run.scheduler.step()
        logger.info(
            "Resumed phase %d from %s (epoch %d, step %d)", run.phase, resume_dir, state.epoch, state.global_step
        )
    else:
        state.phase, state.epoch, state.step_in_epoch, state.global_step = run.phase, 0, 0, 0
        state.best_metric, state.best_epoch = None, None


def _train_epoch(run, epoch, args, accelerator, checkpoints, state, callbacks, progress) -> list[torch.Tensor]:
    state.epoch = epoch
    run.sampler.set_epoch(epoch)
    run.train_set.set_epoch(epoch)
    start = state.step_in_epoch
    if start:
        run.sampler.skip_batches(start)
    running = []
    for batch_index, batch in enumerate(run.loader, start=start):
        if batch_index >= run.steps_per_epoch:
            break
        # Accumulation by hand: an update at every `gradient_accumulation_steps` micro-batches and at the end of
        # the epoch, so gradients never carry over into validation, a checkpoint, or the next epoch.
        sync = (batch_index + 1) % args.gradient_accumulation_steps == 0 or batch_index + 1 == run.steps_per_epoch
        losses = _forward_backward(run, batch, epoch, sync, accelerator)
        running.append(losses["loss"].detach())
        if sync:
            _update(run, args, accelerator, state, losses)
            state.step_in_epoch = batch_index + 1
            progress.update(1)
            if args.checkpointing_steps and state.global_step % args.checkpointing_steps == 0:
                checkpoints.save(state)
            for callback in callbacks:
                callback.on_step_end(run.phase, state)
    state.step_in_epoch = 0
    return running


def _validate_epoch(run, epoch, running, data, args, accelerator, state) -> dict[str, Any]:
    """The epoch's record (train loss, validation metrics); saves the adapter to `best_dir` when it is the best."""
    record: dict[str, Any] = {
        "phase": run.phase,
        "epoch": epoch,
        "train_loss": float(torch.stack(running).mean()) if running else None,
    }
    last_epoch = epoch == run.num_epochs - 1
    if run.val_loader is not None and ((epoch + 1) % args.eval_every_epochs == 0 or last_epoch):
        metrics = evaluate(
            run.prepared_model,
            run.val_loader,
            accelerator,
            data.train_class_counts,
            "author" if args.author_grouping else "standard",
            description=f"val phase {run.phase} epoch {epoch}",
        )
        record.update({f"val_{k}": metrics[k] for k in ("overall", "many", "medium", "few")})
        from lpt_peft.training.recipe import SELECTION_METRIC, mean_per_class_accuracy

        record[SELECTION_METRIC] = mean_per_class_accuracy(metrics)  # what the learning-rate trials are scored by
        accelerator.log(
            {f"phase{run.phase}/val_{k}": v for k, v in record.items() if k.startswith("val_")},
            step=state.global_step + 100_000 * (run.phase - 1),
        )
        if state.best_metric is None or metrics["overall"] > state.best_metric:
            state.best_metric, state.best_epoch = metrics["overall"], epoch
            save_adapter(accelerator.unwrap_model(run.prepared_model), run.best_dir, accelerator)
    elif run.val_loader is None and last_epoch:
        # No validation split (e.g. iNaturalist): the last epoch is the model.
        state.best_epoch = epoch
        save_adapter(accelerator.unwrap_model(run.prepared_model), run.best_dir, accelerator)
    return record


# lpt_peft.data.transforms.decode_image's message (also inside a DataLoader worker's re-raised error).
_DECODE_ERROR = re.compile(r"Could not decode (image file '(?P<path>[^']+)'|an in-memory image)")


def _decode_failure(err: ValueError, checkpoints: CheckpointManager, phase: int, epoch: int) -> ValueError:
    """The error for an image that cannot be decoded mid-training: the image, the last checkpoint, how to go on."""
    match = _DECODE_ERROR.search(str(err))
    image = repr(match["path"]) if match["path"] else "an in-memory image"
    try:
        last = checkpoints.resolve("latest")
        kept = (
            f"The finished epochs are kept in the checkpoint {last}. To continue from it, replace the file with a "
            "readable copy of the same image (same file size: the resume check compares names and sizes) and run "
            "again with `--resume_from_checkpoint latest`."
        )
    except FileNotFoundError:
        kept = "No checkpoint of this run was written yet, so nothing is lost by starting again."
    return ValueError(
        f"Training stopped in phase {phase}, epoch {epoch}: could not decode the training image {image} (corrupt, "
        f"truncated or not an image). {kept} Or start afresh without it: remove or replace the file, or pass "
        "--verify_images true (decodes every image before training and skips unreadable ones), with "
        "--overwrite_output_dir true or another --output_dir."
    )


def train_phase(
    model: PeftModel,
    phase: int,
    data: LongTailDataset,
    args: LPTTrainingArguments,
    accelerator: Accelerator,
    checkpoints: CheckpointManager,
    state: TrainerState,
    resume_dir: Path | None = None,
    *,
    objective: Callable[..., dict[str, torch.Tensor]] | None = None,
    sampler=None,
    callbacks: Sequence[TrainingCallback] = (),
) -> dict[str, Any]:
    """Train one phase; validate each epoch; keep the best adapter (on val) in `<output_dir>/best/phase{phase}`.

    Args:
        model ([`PeftModel`]): The LPT model; switched to `phase` here.
        phase (`int`): 1 or 2.
        data ([`LongTailDataset`]): Training data (and the validation split, if any).
        args ([`LPTTrainingArguments`]): The run's options.
        accelerator (`Accelerator`): Devices, processes, mixed precision.
        checkpoints ([`CheckpointManager`]) and state ([`TrainerState`]): Where the run stands and where states go.
        resume_dir (`Path`, *optional*): A checkpoint of this phase to continue exactly.
        objective (*optional*): Called as `objective(cb_logits, cb_labels, ib_logits, ib_labels, epoch,
            cb_match_score=..., ib_match_score=...)` and returning a dict with the scalar `"loss"` (plus scalars to
            log), like [`LPTObjective`]; the `ib_*` arguments are None when the sampler yields one part. Default:
            [`objective_from_args`] (the registered `--loss`).
        sampler (*optional*): A batch sampler with the interface of [`register_sampler`] (`split_sizes` included),
            sharded for this process. Default: [`sampler_from_args`] (the registered `--sampler`).
        callbacks (`Sequence[TrainingCallback]`): Hooks run after each optimizer update and each epoch.

    Returns:
        `dict`: `best_epoch` and `best_val_overall` (%). The model holds the best adapter weights when this returns.
    """
    model.base_model.set_phase(phase)
    num_epochs = args.epochs_phase1 if phase == 1 else args.epochs_phase2
    if objective is None:
        objective = objective_from_args(args, data.train_class_counts, num_epochs)
    if sampler is None:
        sampler = sampler_from_args(args, dataset_labels(data.train), accelerator)
    run = _prepare_phase(model, phase, data, args, accelerator, objective, sampler, num_epochs)
    _start_or_resume(run, state, accelerator, resume_dir)
    progress = tqdm(
        total=run.total_updates,
        initial=state.global_step,
        desc=f"phase {phase}",
        disable=not accelerator.is_local_main_process,
    )
    run.prepared_model.train()
    for epoch in range(state.epoch, num_epochs):
        try:
            running = _train_epoch(run, epoch, args, accelerator, checkpoints, state, callbacks, progress)
        except ValueError as err:
            if _DECODE_ERROR.search(str(err)) is None:
                raise
            raise _decode_failure(err, checkpoints, phase, epoch) from err
        record = _validate_epoch(run, epoch, running, data, args, accelerator, state)
        state.history.append(record)
        if accelerator.is_main_process:
            logger.info("phase %d epoch %d: %s", phase, epoch, record)
        for callback in callbacks:
            callback.on_epoch_end(phase, state, record)
        state.epoch = epoch + 1
        checkpoints.save(state)
    progress.close()

    model = accelerator.unwrap_model(run.prepared_model)
    load_adapter_weights(model, run.best_dir)
    state.finished_phases.append(phase)
    accelerator.free_memory()
    return {"best_epoch": state.best_epoch, "best_val_overall": state.best_metric}
