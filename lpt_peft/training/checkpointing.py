"""Checkpoints of a training run: the trainer state, atomic checkpoint folders with a `latest` pointer, adapter-only
accelerate states, the run record that a resume must match, and atomic adapter saves.

Why not accelerate's `ProjectConfiguration(automatic_checkpoint_naming=True, total_limit=N)`: its `save_state` writes
straight into the final `checkpoint_<i>` folder and prunes by folder number, so a crash mid-save leaves a half-written
newest checkpoint that `load_state` would pick, and it has no place for our trainer state or resume checks. Ours writes
`<name>.partial`, renames it when complete, then moves the `latest` pointer atomically; it keeps `total_limit` the
same way (oldest complete checkpoints removed first).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from peft import PeftModel
from torch import nn

from lpt_peft.data.long_tail import LongTailDataset
from lpt_peft.training.arguments import LPTTrainingArguments
from lpt_peft.training.data import dataset_labels
from lpt_peft.training.recipe import BEST_PHASE_ROW

__all__ = [
    "CHECKPOINT_DIR",
    "LATEST_FILE",
    "STATE_FILE",
    "TRAJECTORY_OPTIONS",
    "CheckpointManager",
    "TrainerState",
    "check_output_dir",
    "check_resume",
    "install_adapter_only_checkpointing",
    "load_adapter_weights",
    "resume_mismatches",
    "run_record",
    "save_adapter",
]

CHECKPOINT_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"


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
        """Write `state` and accelerate's state as a new complete checkpoint; returns its folder.

        Raises:
            OSError: the write failed (e.g. a full disk), naming the folder, the cause and the previous checkpoint,
                which is left intact (the half-written `.partial` folder is removed).
        """
        name = f"phase{state.phase}-epoch{state.epoch:04d}-step{state.global_step:08d}"
        final = self.root / name
        partial = self.root / (name + ".partial")
        if self.accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            self.accelerator.save_state(str(partial), safe_serialization=True)
            if self.accelerator.is_main_process:
                state.save(partial / STATE_FILE)
        except Exception as err:
            self._raise_write_failure(err, final, partial)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            _atomic_write_text(self.root / LATEST_FILE, name)
            self._prune(keep=final)
        self.accelerator.wait_for_everyone()
        return final

    def _raise_write_failure(self, err: Exception, final: Path, partial: Path) -> None:
        # The adapter save path's classification of writer errors (OSError, torch.save's stream RuntimeErrors,
        # SafetensorError): other errors are bugs and keep their traceback.
        from lpt_peft.tuner.registration import _is_write_failure, _save_error

        if not _is_write_failure(err):
            raise err
        shutil.rmtree(partial, ignore_errors=True)  # frees the space the half-written state took
        code = _save_error(err, str(final), str(partial)).errno
        cause = f"no space left on the device ({err})" if code == errno.ENOSPC else f"{type(err).__name__}: {err}"
        previous = self._latest_complete()
        kept = (
            f"The previous checkpoint {previous} is intact: after fixing the cause, continue with "
            "`--resume_from_checkpoint latest`."
            if previous is not None
            else "No earlier checkpoint of this run exists."
        )
        hint = "Free disk space (or choose another --output_dir)" if code == errno.ENOSPC else "Check the folder"
        message = f"Could not write the training checkpoint {final}: {cause}. {kept} {hint}."
        raise (OSError(code, message) if code is not None else OSError(message)) from err

    def _latest_complete(self) -> Path | None:
        try:
            return self.resolve("latest")
        except FileNotFoundError:
            return None

    def remove_stale_partials(self) -> None:
        """Remove `*.partial` folders left by a save that was killed or failed (main process; never resumed from)."""
        if self.accelerator.is_main_process and self.root.is_dir():
            for path in self.root.glob("*.partial"):
                shutil.rmtree(path, ignore_errors=True)
        self.accelerator.wait_for_everyone()

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
    "batch_size", "samples_per_class", "dual_sampling", "sampler", "eta", "loss", "logit_scale", "matching_weight",
    "instance_balanced_gammas",
    "learning_rate", "lr_reference_batch", "weight_decay", "momentum", "warmup_epochs",
    "gradient_accumulation_steps", "max_grad_norm", "mixed_precision", "seed", "eval_every_epochs",
)  # fmt: skip


# Options recorded since a later lpt-peft than others: a checkpoint without them ran with this value (the option's
# default reproduces the behaviour from before it existed), so their absence is no difference.
_VALUE_BEFORE_RECORDED = {
    "sampler": None, "logit_scale": 20.0, "collapse_guard": False, "min_images_per_class": None,
}  # fmt: skip


def dataset_fingerprint(dataset) -> str | None:
    """`"<n> images, sha256 <hex>"` over the labels and each image's file name and size (or its bytes if in memory).

    Only the last two path components count, so a data set moved to another root keeps its fingerprint.
    """
    import hashlib

    from lpt_peft._extras import requires_extras

    with requires_extras(__name__):
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
    """Everything that determines a run's trajectory; a checkpoint stores it and a resume must match it.

    A data option left unset is recorded with the value the data set used (its builder's default), so a resume that
    passes that value explicitly matches, and a refusal names the value to pass. A data option the data set does not
    take is not recorded: it cannot change the data (and older checkpoints, which recorded the command line's
    defaults for them, then still resume)."""
    from lpt_peft.data.registry import dataset_options, dataset_options_from_args
    from lpt_peft.training.arguments import DATASET_ARGUMENTS

    resolved = dataset_options_from_args(args, resolve_defaults=True)
    accepted = dataset_options(args.dataset)
    options = {
        name: getattr(args, name)
        for name in TRAJECTORY_OPTIONS
        if name not in DATASET_ARGUMENTS or name in accepted
    }
    options.update({name: resolved[name] for name, value in options.items() if value is None and name in resolved})
    return {
        "options": options,
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
        old = old_options.get(name, _VALUE_BEFORE_RECORDED.get(name, "<not recorded>"))
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


# What a run writes into its output folder besides checkpoints/: adapters, the running best, the result tables.
_RESULT_FILES = ("results.json", "results.md", "per_class_accuracy.json", "group_usage.json")


def _earlier_run(output_dir: Path, phases: Sequence[int]) -> list[Path]:
    """What a fresh run training `phases` would replace or mix into: adapters and checkpoints of those phases."""
    found = [
        folder
        for phase in phases
        for folder in (output_dir / f"phase{phase}", output_dir / "best" / f"phase{phase}")
        if (folder / "adapter_model.safetensors").is_file()
    ]
    root = output_dir / CHECKPOINT_DIR
    if root.is_dir():
        found += sorted(
            p
            for p in root.iterdir()
            if p.is_dir() and p.name.startswith(tuple(f"phase{q}-" for q in phases)) and (p / STATE_FILE).is_file()
        )  # a `.partial` folder without a state is no finished work (and is removed at the start)
    return found


def _drop_result_rows(output_dir: Path, names: Sequence[str]) -> None:
    """Remove `names` from the result files, so an interrupted rerun leaves no row of an adapter it deleted."""
    from lpt_peft.evaluation.metrics import save_results

    for file_name in _RESULT_FILES:
        path = output_dir / file_name
        if path.suffix != ".json" or not path.is_file():
            continue
        rows = json.loads(path.read_text())
        kept = {name: row for name, row in rows.items() if name not in names}
        if kept == rows:
            continue
        if file_name != "results.json":
            _atomic_write_text(path, json.dumps(kept, indent=2))
        elif kept:
            save_results(kept, output_dir)  # the table in results.md too
        else:
            path.unlink()
            (output_dir / "results.md").unlink(missing_ok=True)


def check_output_dir(output_dir: Path, phases: Sequence[int], overwrite: bool, accelerator: Accelerator) -> None:
    """A fresh run refuses an output folder holding adapters or checkpoints of the phases it trains (a phase-2 run
    next to its phase-1 adapter is fine); with `overwrite`, the main process removes them (and, for a run that
    trains phase 1, the result tables).

    Raises:
        ValueError: naming the folder, what it holds, `--resume_from_checkpoint latest` and `--overwrite_output_dir`.
    """
    found = _earlier_run(Path(output_dir), phases)
    if found and not overwrite:
        names = ", ".join(str(p.relative_to(output_dir)) for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise ValueError(
            f"--output_dir {str(output_dir)!r} already holds an earlier run ({names}). To continue that run pass "
            "`--resume_from_checkpoint latest`; to replace it pass `--overwrite_output_dir true` (its checkpoints, "
            "adapters and results are removed at the start); or choose another --output_dir. Nothing was written."
        )
    if not overwrite:
        return
    # Every process waits here (whatever it found: the main process may already have removed the files).
    if accelerator.is_main_process:
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
        if found and 1 in phases:
            for name in _RESULT_FILES:
                (Path(output_dir) / name).unlink(missing_ok=True)
        elif found:  # a phase-2 run keeps the phase-1 rows, but not those of the adapter it replaces
            _drop_result_rows(Path(output_dir), [f"LPT phase {phase}" for phase in phases] + [BEST_PHASE_ROW])
        pointer = Path(output_dir) / CHECKPOINT_DIR / LATEST_FILE
        pointer.unlink(missing_ok=True)
    accelerator.wait_for_everyone()


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
