"""The training recipe: presets (`--recipe`), the learning rate chosen on the validation split, and the cosine head
initialised from class prototypes.

A fixed learning rate tuned on one data set fails on the next (issue 10: MNIST-LT phase 1 at 17% with the demo's
rate, 61% with a 10x larger one), so the `lpt_peft` recipe picks each phase's rate from a short grid by short trials
scored on the validation split, as the linear-probe baselines do, and starts the cosine classifier at the class
prototypes of the frozen model (as LIFT offers) instead of random unit vectors. `--recipe paper` keeps the paper's
recipe exactly (docs/training.md).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import PeftModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

__all__ = [
    "RECIPES",
    "RECIPE_OPTIONS",
    "SELECTION_METRIC",
    "LearningRateSelection",
    "CollapseGuard",
    "PhaseCollapsed",
    "apply_recipe",
    "class_prototypes",
    "collapse_threshold",
    "initialize_head_from_prototypes",
    "learning_rate_trial",
    "mean_per_class_accuracy",
    "phase_epochs",
    "pick_learning_rate",
    "search_learning_rate",
]

# The values each preset gives to the options left unset. `paper` is LPT's recipe (Dong et al., ICLR 2023, and
# docs/method.md): SGD, momentum 0.9, weight decay 0.01, lr 0.02 at batch 256 scaled linearly, cosine
# schedule after 1 warm-up epoch, random unit-vector head, no selection. `lpt_peft` differs only where it chooses on
# data: the learning rate (selected on validation; `learning_rate` is then the fallback without a validation split)
# and the head's starting point.
RECIPES: dict[str, dict[str, Any]] = {
    "lpt_peft": {
        "learning_rate": 0.02,
        "lr_reference_batch": 256,
        "weight_decay": 0.01,
        "momentum": 0.9,
        "warmup_epochs": 1.0,
        "select_learning_rate": True,
        "head_init": "prototypes",
        "logit_scale": 40.0,
    },
    "paper": {
        "learning_rate": 0.02,
        "lr_reference_batch": 256,
        "weight_decay": 0.01,
        "momentum": 0.9,
        "warmup_epochs": 1.0,
        "select_learning_rate": False,
        "head_init": "random",
        "logit_scale": 20.0,
    },
}
RECIPE_OPTIONS = tuple(RECIPES["paper"])
HEAD_INITS = ("prototypes", "random")
# What a trial is scored by: the mean over classes of the per-class validation accuracy ("balanced accuracy").
SELECTION_METRIC = "val_mean_per_class_accuracy"
# Scores closer than this (in accuracy points) are a tie.
TIE_TOLERANCE = 1e-9


def apply_recipe(args) -> None:
    """Fill the recipe options of `args` (an `LPTTrainingArguments`) left at None from the preset `args.recipe`.

    An option set explicitly (command line, `--config` file, or Python) keeps its value; the preset values it overrode
    are kept in `args.recipe_overrides` (`{option: (given, preset)}`) and logged when the run starts; the options the
    preset filled in `args.recipe_filled`.

    Raises:
        ValueError: an unknown recipe or head initialisation, or a learning rate, grid or trial length that is not
            positive.
    """
    if args.recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {args.recipe!r}.")
    preset = RECIPES[args.recipe]
    overrides, filled = {}, set()
    for name, value in preset.items():
        given = getattr(args, name)
        if given is None:
            setattr(args, name, value)
            filled.add(name)
        elif given != value:
            overrides[name] = (given, value)
    args.recipe_overrides, args.recipe_filled = overrides, filled
    if args.head_init not in HEAD_INITS:
        raise ValueError(f"--head_init must be one of {', '.join(HEAD_INITS)}, got {args.head_init!r}.")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if not (math.isfinite(args.logit_scale) and args.logit_scale > 0):
        raise ValueError(f"--logit_scale must be a finite number > 0, got {args.logit_scale}.")
    grid = list(args.learning_rate_grid or [])
    if args.select_learning_rate and (not grid or not all(lr > 0 for lr in grid)):
        raise ValueError(
            f"--learning_rate_grid must hold one or more rates > 0 when --select_learning_rate is on, got {grid}. "
            "Pass e.g. `--learning_rate_grid 0.01 0.1 1`, or `--select_learning_rate false` for a fixed rate."
        )
    if args.lr_trial_steps < 1:
        raise ValueError(f"--lr_trial_steps must be >= 1, got {args.lr_trial_steps}.")


def describe_recipe(args) -> str:
    """One log line: the preset and the options that override it."""
    text = f"recipe {args.recipe!r}"
    overrides = getattr(args, "recipe_overrides", {})
    if overrides:
        text += " with " + ", ".join(f"{k}={v[0]} (preset {v[1]})" for k, v in overrides.items())
    return text


# ------------------------------------------------------------------------------------------- learning-rate selection
def mean_per_class_accuracy(result: dict[str, Any]) -> float:
    """The mean over classes of the per-class accuracy (%) of an `evaluate` result; classes absent from the split
    are left out (their accuracy is nan).

    Why this and not overall accuracy: on a validation split that is itself long-tailed (Hub data sets, or
    iNaturalist-like splits), overall accuracy is dominated by the head classes and would prefer a rate that
    sacrifices the tail; the per-class mean weighs every class equally, like LPT's class-balanced objective. On a
    balanced validation split (Places-LT, ImageNet-LT, the built `*_lt` sets) the two are equal.
    """
    values = torch.tensor(result["per_class"], dtype=torch.float64)
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() else float("nan")


def pick_learning_rate(candidates: Sequence[float], scores: Sequence[float]) -> float:
    """The candidate with the highest score; among scores tied (within `TIE_TOLERANCE`), the smallest rate.

    Ties go to the smallest rate because a short trial cannot tell apart rates that reach the same accuracy, and the
    smaller one is the safer over the full schedule (a larger rate that only matched it may diverge later). A nan
    score (a diverged trial) never wins.

    Raises:
        ValueError: no candidates, lengths differ, or every score is nan.
    """
    if not candidates or len(candidates) != len(scores):
        raise ValueError(f"Need one score per candidate rate, got {len(candidates)} rates and {len(scores)} scores.")
    valid = [(s, lr) for lr, s in zip(candidates, scores) if not math.isnan(s)]
    if not valid:
        raise ValueError(f"Every learning-rate trial diverged (nan scores) for {list(candidates)}.")
    best = max(s for s, _ in valid)
    return min(lr for s, lr in valid if s >= best - TIE_TOLERANCE)


@dataclass
class LearningRateSelection:
    """The learning-rate choice of one phase, as saved in the run record, results.json and the log.

    Attributes:
        phase (`int`): 1 or 2.
        candidates (`list[float]`): The grid, at the reference batch size (like `--learning_rate`).
        scores (`list[float]`): Each candidate's `metric` on the validation split (%) after its trial.
        chosen (`float`): The selected rate (reference batch size), see [`pick_learning_rate`].
        trial_steps (`int`): Optimizer steps of each trial.
        metric (`str`): `SELECTION_METRIC`.
        restarts (`list[dict]`): The rates the collapse guard rejected over the full schedule, in order, each as
            `{"learning_rate", "score", "threshold"}` (see [`CollapseGuard`]); `chosen` is then the rate trained.
    """

    phase: int
    candidates: list[float]
    scores: list[float]
    chosen: float
    trial_steps: int
    metric: str = SELECTION_METRIC
    restarts: list[dict[str, float]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def search_learning_rate(
    candidates: Sequence[float], score: Callable[[float], float], phase: int, trial_steps: int
) -> LearningRateSelection:
    """Score every candidate with `score(lr)` (a short trial from the same start, see [`learning_rate_trial`]) and
    pick the best with [`pick_learning_rate`]; every score and the choice are logged."""
    scores = []
    for lr in candidates:
        scores.append(float(score(float(lr))))
        logger.info("phase %d learning-rate trial: lr %g -> %s %.2f%%", phase, lr, SELECTION_METRIC, scores[-1])
    chosen = pick_learning_rate(candidates, scores)
    logger.info("phase %d: learning rate %g chosen on the validation split (scores %s)", phase, chosen, scores)
    return LearningRateSelection(phase, [float(c) for c in candidates], scores, float(chosen), trial_steps)


class _NoCheckpoints:
    """Stands in for the `CheckpointManager` during trials: a trial is never resumed, so it writes no state."""

    def save(self, state) -> None:
        pass

    def resolve(self, which: str):
        raise FileNotFoundError("learning-rate trials write no checkpoints")


def _adapter_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lpt_" in n or n.startswith("lpt_")}


def learning_rate_trial(
    model: PeftModel, phase: int, data, args, accelerator: Accelerator, trial_dir: Path
) -> Callable[[float], float]:
    """A function `lr -> score`: a short run of `phase` from the model's current adapter weights, scored by
    [`mean_per_class_accuracy`] on the validation split.

    Each trial is [`train_phase`] compressed to `args.lr_trial_steps` optimizer steps (at most one epoch): the same
    batches, augmentation and random stream (the global RNG is forked, so every candidate sees the same dropout and
    loss noise, and the run after the search continues as if there had been none), the same warm-up fraction and
    cosine decay. The adapter weights are restored after each trial, also one that raises. Multi-process: the
    validation accuracy is gathered over all processes, so every process computes the same scores.
    """
    from lpt_peft.training.builders import objective_from_args, sampler_from_args
    from lpt_peft.training.checkpointing import TrainerState
    from lpt_peft.training.data import dataset_labels, make_eval_loader
    from lpt_peft.training.loop import evaluate, train_phase

    start = {n: p.detach().clone() for n, p in _adapter_parameters(model).items()}
    epochs_field = "epochs_phase1" if phase == 1 else "epochs_phase2"
    num_epochs = getattr(args, epochs_field)
    val_loader = make_eval_loader(data.val, args, accelerator)
    no_val = dataclasses.replace(data, val=None)  # the trial's own validation would score overall accuracy
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []

    def trial(lr: float) -> float:
        trial_args = copy.copy(args)
        trial_args.learning_rate = lr
        trial_args.max_steps_per_epoch = min(args.lr_trial_steps, args.max_steps_per_epoch or args.lr_trial_steps)
        setattr(trial_args, epochs_field, 1)
        trial_args.warmup_epochs = args.warmup_epochs / num_epochs  # the same warm-up share of the schedule
        trial_args.output_dir = str(trial_dir)
        try:
            with torch.random.fork_rng(devices=devices):
                objective = objective_from_args(trial_args, data.train_class_counts, 1)
                sampler = sampler_from_args(trial_args, dataset_labels(data.train), accelerator)
                train_phase(
                    model, phase, no_val, trial_args, accelerator, _NoCheckpoints(), TrainerState(),
                    objective=objective, sampler=sampler,
                )  # fmt: skip
                grouping = "author" if args.author_grouping else "standard"
                counts = data.train_class_counts
                result = evaluate(model, val_loader, accelerator, counts, grouping, None, f"val lr {lr:g}")
        finally:  # also when a trial raises (or is interrupted): the model leaves as it came
            with torch.no_grad():
                for name, param in _adapter_parameters(model).items():
                    param.copy_(start[name])
        return mean_per_class_accuracy(result)

    return trial


def select_phase_learning_rate(model, phase: int, data, args, accelerator: Accelerator) -> LearningRateSelection:
    """Run the grid search of one phase (all processes) and return the choice, the same on every process."""
    from accelerate.utils import broadcast_object_list

    trial_dir = Path(args.output_dir) / "lr_search" / f"phase{phase}"
    try:
        score = learning_rate_trial(model, phase, data, args, accelerator, trial_dir)
        selection = search_learning_rate(args.learning_rate_grid, score, phase, args.lr_trial_steps)
    finally:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(trial_dir.parent, ignore_errors=True)
    # Scores are gathered over processes, so they agree; the broadcast makes the choice identical even if a
    # process's float arithmetic did not.
    shared = broadcast_object_list([selection.to_dict()], from_process=0)[0]
    return LearningRateSelection(**shared)


# ------------------------------------------------------------------------------------------- collapse guard
class PhaseCollapsed(RuntimeError):
    """Raised by [`CollapseGuard`] when a phase's first validation score falls below its threshold."""

    def __init__(self, phase: int, learning_rate: float, score: float, threshold: float, fallback: float) -> None:
        super().__init__(
            f"phase {phase} at learning rate {learning_rate:g}: {SELECTION_METRIC} {score:.2f}% after its first "
            f"validated epoch, below {threshold:.2f}% (a smaller rate's short trial); restarting with {fallback:g}"
        )
        self.phase, self.learning_rate, self.score = phase, learning_rate, score
        self.threshold, self.fallback = threshold, fallback


def collapse_threshold(selection: LearningRateSelection, learning_rate: float) -> tuple[float, float] | None:
    """`(threshold, fallback)` of the guard for a phase trained at `learning_rate`: the best trial score among the
    smaller candidates, and the largest smaller candidate; None when no smaller candidate has a score (nothing to
    fall back to).

    Why this threshold: a phase's first full epoch runs many more steps than a trial, so a rate that stays stable
    ends it above what a smaller rate reached in a few steps (issue 10's benchmark: 45.0-55.5% after the first epoch
    at the kept rate, trial scores 27.0-43.7%); ending it below means the larger rate diverged once its schedule
    reached the peak (MNIST-LT seed 44: trials 0.01 -> 27.0%, 0.05 -> 35.5%; 0.05 over the full schedule
    stayed at chance, 10%; docs/results.md).
    """
    smaller = [(lr, s) for lr, s in zip(selection.candidates, selection.scores) if lr < learning_rate]
    scored = [s for _, s in smaller if not math.isnan(s)]
    if not scored:
        return None
    return max(scored), max(lr for lr, _ in smaller)


class CollapseGuard:
    """A [`TrainingCallback`] that stops a phase whose first validated epoch scores below `threshold` (in % of
    [`SELECTION_METRIC`]), by raising [`PhaseCollapsed`]; `run_training` then restarts the phase from its starting
    weights and random state with `fallback` (see [`collapse_threshold`]). A nan score counts as collapsed. Later
    epochs are not checked: a schedule that got past its first epoch is judged by validation as usual.
    """

    def __init__(self, phase: int, learning_rate: float, threshold: float, fallback: float) -> None:
        self.phase, self.learning_rate, self.threshold, self.fallback = phase, learning_rate, threshold, fallback

    def on_step_end(self, phase: int, state) -> None:
        pass

    def on_epoch_end(self, phase: int, state, record: dict[str, Any]) -> None:
        score = record.get(SELECTION_METRIC)
        if phase != self.phase or score is None:
            return
        validated = [r for r in state.history if r.get("phase") == phase and r.get(SELECTION_METRIC) is not None]
        if validated and validated[0] is not record:
            return  # checked at the first validated epoch already (possibly before a resume)
        if not score >= self.threshold:
            raise PhaseCollapsed(phase, self.learning_rate, score, self.threshold, self.fallback)


# ------------------------------------------------------------------------------------------- which phase
BEST_PHASE_ROW = "LPT (best phase by val)"


def best_phase_by_validation(rows: dict[str, dict[str, Any]]) -> int | None:
    """The LPT phase to deploy: the one whose best epoch scored higher on the validation split.

    Phase 2 is the paper's final model, but on small or few-class data its extra epochs can end below phase 1
    (docs/results.md), and choosing between the two adapters is model selection like choosing an epoch: it uses the
    validation split, never the test set. A tie goes to phase 2.

    Args:
        rows: Method name -> result row, as in results.json; reads `best_val_overall` and `validation_data` (the
            fingerprint of the validation split the phase was scored on) of `"LPT phase 1"` and `"LPT phase 2"`.

    Returns:
        `1` or `2`; None when a phase or its validation score is missing (a single-phase run, no validation split)
        or the two phases were validated on different splits (a phase-2 rerun with other data options), whose scores
        do not compare.
    """
    phase_rows = [rows.get(f"LPT phase {phase}", {}) for phase in (1, 2)]
    scores = [row.get("best_val_overall") for row in phase_rows]
    if any(score is None or math.isnan(score) for score in scores):
        return None
    if phase_rows[0].get("validation_data") != phase_rows[1].get("validation_data"):
        return None
    return 1 if scores[0] > scores[1] else 2


# ------------------------------------------------------------------------------------------- phase length
def phase_epochs(args, phase: int, sampler, num_classes: int, num_processes: int) -> int:
    """The epochs phase `phase` trains: `--epochs_phase<phase>`, raised to train at least `--min_images_per_class`
    images per class when that is set.

    An epoch trains `len(sampler)` steps of `sum(sampler.split_sizes)` images per process, so `images per class =
    epochs x steps x batch x processes / num_classes`. A run with `--max_steps_per_epoch` (quick runs, tests) keeps
    its epochs. Why: the demo's 3 + 2 epochs give each class ~750 + 500 images on Fashion-MNIST-LT (10 classes,
    1,236 images), but ~330 + 220 on the 30-class set (1,626 images), whose phase 2 then stops short: 6 epochs of
    phase 2 there gave 71.9% against 64.7% (docs/results.md).

    Returns:
        `int`, >= the given epochs.
    """
    given = getattr(args, f"epochs_phase{phase}")
    if args.min_images_per_class is None or args.max_steps_per_epoch:
        return given  # a quick run that cut its epochs short asked for a short run
    per_epoch = len(sampler) * sum(sampler.split_sizes) * num_processes
    return max(given, math.ceil(args.min_images_per_class * num_classes / per_epoch))


# ------------------------------------------------------------------------------------------- prototype head
@torch.no_grad()
def class_prototypes(model: PeftModel, loader: DataLoader, accelerator: Accelerator, num_classes: int) -> torch.Tensor:
    """The L2-normalised mean feature of each class over `loader` (an unaugmented loader of the training split).

    The feature is the model's `features` output: the CLS token after the final LayerNorm, before dropout and the
    cosine classifier, computed with the adapter as it is (phase 1 at initialisation: the backbone with the initial
    shared prompts), so the head starts at the prototype (nearest-class-mean) classifier of the features it sees.

    Returns:
        `torch.Tensor` of shape `(num_classes, hidden)`, float32, every row of norm 1.

    Raises:
        ValueError: a class has no image in `loader` (naming the classes; a run refuses such data earlier, in
            `check_dataset`).
    """
    was_training = model.training
    model.eval()
    sums = counts = None
    for batch in tqdm(loader, desc="class prototypes", disable=not accelerator.is_local_main_process, leave=False):
        features = model(pixel_values=batch["pixel_values"]).features.float()
        features, labels = accelerator.gather_for_metrics((features, batch["labels"]))
        if sums is None:
            sums = torch.zeros(num_classes, features.shape[-1], dtype=torch.float64, device=features.device)
            counts = torch.zeros(num_classes, dtype=torch.long, device=features.device)
        sums.index_add_(0, labels, features.double())
        counts += torch.bincount(labels, minlength=num_classes)
    model.train(was_training)
    if counts is None or (counts == 0).any():
        empty = list(range(num_classes)) if counts is None else (counts == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"Cannot initialise the head from class prototypes: class(es) {empty[:10]} have no training image. "
            "Remove the class or add images (or pass --head_init random)."
        )
    means = sums / counts.unsqueeze(1)
    return F.normalize(means, dim=1).float()


def initialize_head_from_prototypes(model: PeftModel, data, args, accelerator: Accelerator) -> torch.Tensor:
    """Set the active adapter's cosine classifier `lpt_head` `(hidden, num_labels)` to the class prototypes of the
    training split ([`class_prototypes`], transposed: column c is class c's unit-norm mean feature).

    Returns:
        The prototypes `(num_labels, hidden)`.
    """
    from lpt_peft.training.data import make_eval_loader

    model.base_model.set_phase(1)
    loader = make_eval_loader(data.train, args, accelerator)  # the evaluation transform: no augmentation
    prototypes = class_prototypes(model, loader, accelerator, data.num_classes)
    head = model.base_model.lpt_head[model.active_adapter]
    with torch.no_grad():
        head.copy_(prototypes.t().to(device=head.device, dtype=head.dtype))
    return prototypes


# ------------------------------------------------------------------------------------------- in a run
def check_selection_possible(args, data) -> None:
    """Before training: without a validation split, selection falls back to `--learning_rate` (logged), or refuses
    when `--select_learning_rate true` was asked for explicitly.

    Raises:
        ValueError: selection asked for explicitly on data without a validation split.
    """
    if not args.select_learning_rate or data.val is not None:
        return
    if "select_learning_rate" not in getattr(args, "recipe_filled", ()):
        raise ValueError(
            f"--select_learning_rate true needs a validation split, and the data set {args.dataset!r} has none. Give "
            "it one (e.g. --val_per_class 20 for built long-tailed sets, --val_dir or --validation_split), or pass "
            "--select_learning_rate false to train with --learning_rate."
        )
    logger.warning(
        "The data set %r has no validation split: the learning rate is not selected; training uses --learning_rate "
        "%g. Give the data set a validation split to select it.", args.dataset, args.learning_rate,
    )  # fmt: skip


def phase_learning_rate(model, phase: int, data, args, accelerator: Accelerator, state):
    """The options of one phase with its learning rate: chosen on validation ([`select_phase_learning_rate`]), or
    reused from `state.run["lr_selection"]` when a resumed run already chose it (phase 2, unless
    `args.select_learning_rate_phase2`, reuses phase 1's choice), or `args` unchanged (no selection).

    A new choice is written into `state.run["lr_selection"]["phase<phase>"]`, so every later checkpoint carries it.

    Returns:
        `(phase_args, selection)`: a copy of `args` with `learning_rate` set to the choice, and the
        [`LearningRateSelection`] (None without selection).
    """
    key = f"phase{phase}"
    chosen = (state.run or {}).get("lr_selection") or {}
    recorded = chosen.get(key)
    if recorded is None and phase == 2 and "phase1" in chosen and not args.select_learning_rate_phase2:
        recorded = chosen["phase1"]  # phase 2 trains with phase 1's choice
    if recorded is not None:
        selection = LearningRateSelection(**recorded)
        logger.info("phase %d: learning rate %g, chosen on validation in phase %d (scores %s)", phase,
                    selection.chosen, selection.phase, selection.scores)  # fmt: skip
    elif args.select_learning_rate and data.val is not None:
        selection = select_phase_learning_rate(model, phase, data, args, accelerator)
        if state.run is not None:
            state.run.setdefault("lr_selection", {})[key] = selection.to_dict()
    else:
        return args, None
    phase_args = copy.copy(args)
    phase_args.learning_rate = selection.chosen
    return phase_args, selection
