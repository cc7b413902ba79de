"""A whole LPT run with accelerate: phase 1 and/or phase 2, the linear-probe baselines, test results, plots and the
Hub push; and the evaluation of a saved adapter.

The pieces live by concern in `lpt_peft.training`: `data` (data set, loaders), `builders` (accelerator, model,
objective, sampler), `checkpointing` (states, resume checks, atomic saves), `loop` ([`train_phase`], [`evaluate`]).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import PeftModel

from lpt_peft.backbones import load_backbone
from lpt_peft.data.long_tail import LongTailDataset
from lpt_peft.training.arguments import LPTTrainingArguments
from lpt_peft.training.builders import (
    build_peft_model,
    check_options_before_data,
    make_accelerator,
    objective_from_args,
    sampler_from_args,
)
from lpt_peft.training.checkpointing import (
    STATE_FILE,
    CheckpointManager,
    TrainerState,
    _atomic_write_text,
    check_output_dir,
    check_resume,
    install_adapter_only_checkpointing,
    load_adapter_weights,
    run_record,
    save_adapter,
)
from lpt_peft.training.data import (
    build_dataset,
    check_dataset,
    check_images_before_training,
    dataset_labels,
    make_eval_loader,
)
from lpt_peft.training.loop import callbacks_from_env, evaluate, scaled_learning_rate, train_phase
from lpt_peft.training.recipe import (
    BEST_PHASE_ROW,
    CollapseGuard,
    PhaseCollapsed,
    best_phase_by_validation,
    check_selection_possible,
    collapse_threshold,
    describe_recipe,
    initialize_head_from_prototypes,
    phase_epochs,
    phase_learning_rate,
)

logger = logging.getLogger(__name__)

__all__ = ["evaluate_adapter", "log_launch", "run_baselines", "run_training"]


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
        logger.info(
            "Recipe: %s; head init %s; learning rate %s.", describe_recipe(args), args.head_init,
            f"chosen on validation from {list(args.learning_rate_grid)} ({args.lr_trial_steps}-step trials)"
            if args.select_learning_rate else f"{args.learning_rate} (fixed)",
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
    warn_idle_cpu_cores(accelerator)


def warn_idle_cpu_cores(accelerator: Accelerator) -> str | None:
    """Warn (and return the message) when a CPU run leaves cores idle: `accelerate launch` without `--cpu` or
    `--num_cpu_threads_per_process` exports OMP_NUM_THREADS=1, so one process trains on one thread whatever the
    machine has (the demo's process then kept one of the two cores of the development machine idle)."""
    if accelerator.device.type != "cpu" or not accelerator.is_local_main_process:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    threads = torch.get_num_threads()
    if threads >= per_process or per_process <= 1:
        return None
    message = (
        f"Training on CPU with {threads} thread(s) per process while {cores} core(s) are available (OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; `accelerate launch` sets 1 unless told otherwise). Pass "
        f"`accelerate launch --num_cpu_threads_per_process {per_process}` (or run with `python`) to use them."
    )
    logger.warning(message)
    return message


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


def _open_run(args: LPTTrainingArguments):
    """The accelerator, checkpoint manager, trainer state and (when resuming) the checkpoint folder of a run."""
    output_dir = Path(args.output_dir)
    accelerator = make_accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=_trackers(args),
        project_dir=str(output_dir),
    )
    if not args.resume_from_checkpoint:
        # Before anything is written: a fresh run must not silently replace an earlier run's work.
        check_output_dir(output_dir, args.phases, args.overwrite_output_dir, accelerator)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    set_seed(args.seed)
    checkpoints = CheckpointManager(output_dir, accelerator, args.checkpoints_total_limit)
    checkpoints.remove_stale_partials()  # left by a save that failed (disk full, kill): never resumed from
    state, resume_dir = TrainerState(), None
    if args.resume_from_checkpoint:
        resume_dir = checkpoints.resolve(args.resume_from_checkpoint)
        state = TrainerState.load(resume_dir / STATE_FILE)
    return accelerator, checkpoints, state, resume_dir


def _card_info(args: LPTTrainingArguments) -> dict[str, Any]:
    """What the adapter's model card and `evaluate_lpt.py --adapter` need to know about this run."""
    return {
        "dataset": args.dataset,
        "grouping": "author" if args.author_grouping else "standard",
        "preprocessing": {
            "image_size": args.image_size,
            "resize_size": args.resize_size,
            "mean": list(args.mean),
            "std": list(args.std),
        },
        # The options that rebuild the evaluation split: `evaluate_lpt.py --adapter DIR` evaluates what was reported.
        "data": _data_options(args),
        **({"repo_id": args.hub_model_id} if args.hub_model_id else {}),
    }


# Options a data-set builder takes that do not define the data: how it is loaded, or recorded elsewhere.
_NOT_DATA_DEFINING = ("num_workers", "image_size")


def _data_options(args: LPTTrainingArguments) -> dict[str, Any]:
    """The data set's own options (the registry's `dataset_options_from_args`: Hub columns and splits, folders,
    subsampling), as JSON values."""
    from lpt_peft.data.registry import dataset_options_from_args

    options = dataset_options_from_args(args, resolve_defaults=True)
    return {k: _absolute_if_local(v) for k, v in options.items() if k not in _NOT_DATA_DEFINING}


def _absolute_if_local(value: Any) -> Any:
    """A local file or folder as an absolute path, so the record holds from any working directory."""
    if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
        return os.path.abspath(value)
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _report_phase(model, name: str, result, best, data, args) -> dict[str, dict[str, Any]]:
    """Main process: merge the phase's test row into results.json/.md, refresh the card, per-class and usage plots."""
    from lpt_peft.evaluation.metrics import format_results_table, save_results
    from lpt_peft.evaluation.plots import plot_group_usage, plot_per_class_accuracy

    output_dir = Path(args.output_dir)
    rows = _merge_json(output_dir / "results.json", {name: {**_summary(result), **best}})
    if name == "LPT phase 2":
        rows = _with_best_phase(rows, output_dir)
    # The card of the pushed/saved adapter shows the test table of this run.
    model.base_model.card_info["results_markdown"] = format_results_table(rows)
    model.base_model.card_info["results"] = rows  # the card's model-index takes this adapter's row from here
    per_class = _merge_json(output_dir / "per_class_accuracy.json", {name: result["per_class"]})
    save_results(rows, output_dir)
    if "group_usage" in result:
        _merge_json(output_dir / "group_usage.json", {name: result["group_usage"]})
        plot_group_usage(
            result["group_usage"], output_dir / "group_usage.png", title="How often each prompt group is selected"
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
    return rows


def _with_best_phase(rows: dict[str, dict[str, Any]], output_dir: Path) -> dict[str, dict[str, Any]]:
    """`rows` with the row of the phase chosen on validation (`BEST_PHASE_ROW`, with its `phase`), made from the
    folder's phase rows, and logged. A phase-2 run keeps the folder's phase-1 row, so the choice is made again from
    both; with no choice to make (no phase-1 row or validation scores, or other validation data) a row left by an
    earlier run is dropped, not kept stale."""
    rows = {name: row for name, row in rows.items() if name != BEST_PHASE_ROW}
    phase = best_phase_by_validation(rows)
    if phase is None:
        if all(f"LPT phase {p}" in rows for p in (1, 2)):
            logger.warning(
                "No best phase chosen: the phase-1 and phase-2 rows in %s were not validated on the same data (or "
                "not at all, or the phase-1 row predates the record), so their scores do not compare. Train both "
                "phases in one run to get the choice.", output_dir
            )
        return rows
    scores = ", ".join(f"phase {p} {rows[f'LPT phase {p}']['best_val_overall']:.2f}%" for p in (1, 2))
    logger.info("Best phase on validation: phase %d (%s); adapter: %s", phase, scores, output_dir / f"phase{phase}")
    return {**rows, BEST_PHASE_ROW: {**rows[f"LPT phase {phase}"], "phase": phase}}


def _prepare_model(args, data, accelerator, resume_dir) -> PeftModel:
    id2label = dict(enumerate(data.class_names))
    backbone = load_backbone(args.model_name_or_path, args.image_size, args.attn_implementation)
    init_from = args.init_from if args.phase == "2" and resume_dir is None else None
    model = build_peft_model(backbone, args, data.num_classes, id2label, init_from=init_from)
    check_dataset(data, model.peft_config[model.active_adapter].num_labels)
    model.to(accelerator.device)  # the baselines run before accelerate.prepare
    model.base_model.card_info = _card_info(args)
    return model


def run_training(args: LPTTrainingArguments, data: LongTailDataset | None = None) -> dict[str, Any]:
    """Phase 1 and/or phase 2 on one data set, then test evaluation, result tables and plots.

    Writes to `args.output_dir`: `phase1/` and `phase2/` (each phase's adapter, the epoch best on validation, loadable
    with `PeftModel.from_pretrained`), `best/` (the running best of each phase while it trains), `checkpoints/`
    (training states for `--resume_from_checkpoint`), `results.json`, `results.md`, `per_class_accuracy.png`,
    `group_usage.png`, `class_info.json`. Callbacks named in `$LPT_TRAINING_CALLBACKS` are loaded once, here.

    Returns:
        `dict`: `rows` (test accuracy in % per method: overall/many/medium/few) and `output_dir`.

    Raises:
        ValueError / FileNotFoundError: bad data, adapter or resume, before anything is trained or written.
    """
    output_dir = Path(args.output_dir)
    check_options_before_data(args)
    accelerator, checkpoints, state, resume_dir = _open_run(args)
    data = data if data is not None else build_dataset(args)
    check_images_before_training(data, args)
    check_selection_possible(args, data)
    record = _run_record(args, data, accelerator.num_processes)
    if resume_dir is not None:
        check_resume(resume_dir, state, record, args.phases)
    else:
        state.run = record
    log_launch(accelerator, args)
    model = _prepare_model(args, data, accelerator, resume_dir)
    callbacks = callbacks_from_env()
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
        if phase == 1 and resume_here is None and args.head_init == "prototypes":
            initialize_head_from_prototypes(model, data, args, accelerator)
        # Chosen before the phase's first checkpoint, so a resumed phase finds its choice in `state.run`.
        epoch_args = _with_phase_epochs(args, phase, data, accelerator)
        phase_args, selection = phase_learning_rate(model, phase, data, epoch_args, accelerator, state)
        best, phase_args, selection = _train_phase_guarded(
            model, phase, data, phase_args, selection, accelerator, checkpoints, state, resume_here, callbacks
        )
        best = {**best, **_recipe_summary(phase, phase_args, selection, record["val_data"])}
        save_adapter(model, output_dir / f"phase{phase}", accelerator)
        num_groups = model.peft_config[model.active_adapter].num_groups if phase == 2 else None
        result = evaluate(
            model, test_loader, accelerator, data.train_class_counts, grouping, num_groups, f"test phase {phase}"
        )
        if accelerator.is_main_process:
            rows = _report_phase(model, f"LPT phase {phase}", result, best, data, args)
            save_adapter(model, output_dir / f"phase{phase}", accelerator, barrier=False)
        if args.push_to_hub and accelerator.is_main_process:
            repo = args.hub_model_id if phase == 2 or len(args.phases) == 1 else f"{args.hub_model_id}-phase1"
            model.push_to_hub(repo)
        state.phase = phase + 1
        state.epoch = state.step_in_epoch = state.global_step = 0
    _finish(accelerator, rows, args)
    return {"rows": rows, "output_dir": str(output_dir)}


def _run_record(args: LPTTrainingArguments, data: LongTailDataset, num_processes: int) -> dict[str, Any]:
    """The checkpoints' run record (`checkpointing.run_record`) plus the recipe options, which change the trajectory
    too: a resume with another preset, head initialisation or selection grid is refused like any other difference."""
    record = run_record(args, data, num_processes)
    record["options"].update({name: getattr(args, name) for name in RECIPE_RECORD_OPTIONS})
    return record


# Recipe options recorded with the run besides checkpointing.TRAJECTORY_OPTIONS (which holds the learning rate, ...).
RECIPE_RECORD_OPTIONS = (
    "recipe", "head_init", "select_learning_rate", "learning_rate_grid", "lr_trial_steps",
    "select_learning_rate_phase2", "collapse_guard", "min_images_per_class",
)  # fmt: skip


def _with_phase_epochs(args: LPTTrainingArguments, phase: int, data: LongTailDataset, accelerator: Accelerator):
    """`args`, or a copy with `epochs_phase<phase>` raised by `--min_images_per_class` (recipe.phase_epochs)."""
    sampler = sampler_from_args(args, dataset_labels(data.train), accelerator)
    epochs = phase_epochs(args, phase, sampler, data.num_classes, accelerator.num_processes)
    name = f"epochs_phase{phase}"
    if epochs == getattr(args, name):
        return args
    logger.info(
        "phase %d: %d epochs instead of --%s %d, to train on >= %d images per class (--min_images_per_class)",
        phase, epochs, name, getattr(args, name), args.min_images_per_class,
    )  # fmt: skip
    raised = copy.copy(args)
    setattr(raised, name, epochs)
    return raised


def _train_once(model, phase, data, phase_args, accelerator, checkpoints, state, resume_dir, callbacks):
    num_epochs = getattr(phase_args, f"epochs_phase{phase}")
    objective = objective_from_args(phase_args, data.train_class_counts, num_epochs)
    sampler = sampler_from_args(phase_args, dataset_labels(data.train), accelerator)
    return train_phase(
        model, phase, data, phase_args, accelerator, checkpoints, state, resume_dir,
        objective=objective, sampler=sampler, callbacks=callbacks,
    )  # fmt: skip


def _collapse_guard(phase: int, phase_args: LPTTrainingArguments, selection) -> CollapseGuard | None:
    """The guard of a phase trained at a rate chosen by its own trials; None without a smaller rate to fall back to
    (or with --collapse_guard false, or when phase 2 reuses phase 1's rate: phase 1's trials score another model)."""
    if not phase_args.collapse_guard or selection is None or selection.phase != phase:
        return None
    found = collapse_threshold(selection, phase_args.learning_rate)
    return None if found is None else CollapseGuard(phase, phase_args.learning_rate, *found)


def _train_phase_guarded(
    model, phase, data, phase_args, selection, accelerator, checkpoints, state, resume, callbacks
):
    """[`train_phase`] under the [`CollapseGuard`]: on a collapse, the phase restarts from the weights and random
    state it started with, at the next smaller candidate rate, until it passes or no smaller rate is left. The
    rejected rates go into the selection (`restarts`) and into `state.run`, so a checkpoint of the restarted phase
    resumes it at the new rate.

    Returns:
        `(best, phase_args, selection)` of the attempt that finished.
    """
    guard = _collapse_guard(phase, phase_args, selection)
    start_dir = Path(phase_args.output_dir) / "best" / f"phase{phase}-start"
    rng_file = start_dir.with_name(f"{start_dir.name}-rng{accelerator.process_index}.pt")
    if guard is not None and resume is None:
        save_adapter(model, start_dir, accelerator)  # on disk, so a resumed phase can still restart from its start
        torch.save(_rng_states(), rng_file)
    elif guard is not None and not (start_dir / "adapter_model.safetensors").is_file():
        logger.warning("phase %d: the collapse guard is off for this resumed run (%s is missing)", phase, start_dir)
        guard = None
    while True:
        run_callbacks = [*callbacks, guard] if guard is not None else callbacks
        try:
            best = _train_once(model, phase, data, phase_args, accelerator, checkpoints, state, resume, run_callbacks)
            return best, phase_args, selection
        except PhaseCollapsed as collapse:
            logger.warning("%s", collapse)
            load_adapter_weights(model, start_dir)
            _set_rng_states(torch.load(rng_file))
            rejected = {"learning_rate": collapse.learning_rate, "score": collapse.score}
            rejected["threshold"] = collapse.threshold
            selection = dataclasses.replace(
                selection, chosen=collapse.fallback, restarts=[*selection.restarts, rejected]
            )
            state.run.setdefault("lr_selection", {})[f"phase{phase}"] = selection.to_dict()
            state.history = [record for record in state.history if record.get("phase") != phase]
            phase_args = copy.copy(phase_args)
            phase_args.learning_rate, resume = collapse.fallback, None
            guard = _collapse_guard(phase, phase_args, selection)


def _rng_states() -> dict[str, Any]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _recipe_summary(phase: int, phase_args: LPTTrainingArguments, selection, val_data: str | None) -> dict[str, Any]:
    """What results.json records of a phase's recipe: the preset, the epochs, the learning rate trained and the
    fingerprint of the validation split its epoch was chosen on (`val_data` of the run record)."""
    summary: dict[str, Any] = {
        "recipe": phase_args.recipe,
        "epochs": getattr(phase_args, f"epochs_phase{phase}"),
        "learning_rate": phase_args.learning_rate,
        # Phases are compared on validation only if this matches (recipe.best_phase_by_validation).
        "validation_data": val_data,
    }
    if selection is not None:
        summary["learning_rate_selection"] = selection.to_dict()
    return summary


def _finish(accelerator: Accelerator, rows, args: LPTTrainingArguments) -> None:
    if accelerator.is_main_process and rows:
        from lpt_peft.evaluation.metrics import format_results_table

        grouping = "author" if args.author_grouping else "standard"
        print(f"\nTest accuracy (%) by shot group, {args.dataset} ({grouping} groups: many n>100, few n<20):")
        print(format_results_table(rows))
        print(f"Adapters, results.json/.md and plots are in {Path(args.output_dir)}/")
        if BEST_PHASE_ROW in rows:
            best = Path(args.output_dir) / f"phase{rows[BEST_PHASE_ROW]['phase']}"
            print(f"The phase chosen on validation, to deploy: {best}/")
    accelerator.wait_for_everyone()
    accelerator.end_training()


PROBE_LEARNING_RATES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # at lr_reference_batch, scaled like LPT's
PROBE_NAMES = {
    "linear_probe_ce": "Linear probe (CE)",
    "linear_probe_agcl": "Linear probe (A-GCL, dual sampling)",
}


def run_baselines(model: PeftModel, data: LongTailDataset, args, accelerator: Accelerator, test_loader) -> None:
    """Train the requested linear probes on frozen features and record them in the results like LPT's phases."""
    from lpt_peft.training.baselines import evaluate_probe, extract_features, train_linear_probes

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
        rates = PROBE_LEARNING_RATES if val_features is not None else (args.learning_rate,)
        probes = train_linear_probes(
            kind,
            train_features,
            train_labels,
            data.train_class_counts,
            rates,
            epochs=args.probe_epochs,
            batch_size=args.batch_size,
            samples_per_class=args.samples_per_class,
            lr_reference_batch=args.lr_reference_batch,
            weight_decay=args.weight_decay,
            seed=args.seed,
            logit_scale=args.logit_scale,
        )  # the whole grid in one batched training
        best_probe, best_score = None, -1.0
        for lr, probe in zip(rates, probes):
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
