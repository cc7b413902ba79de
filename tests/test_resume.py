"""Resume is exact or refused: every value that determines a run's trajectory is recorded in its checkpoints, and a
resume with another value is refused, naming the option, both values and the fix, before anything is written."""

import json
import shutil
from pathlib import Path

import pytest
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from lpt_peft.training.arguments import LPTTrainingArguments
from lpt_peft.training.checkpointing import STATE_FILE, CheckpointManager, TrainerState, resume_mismatches
from lpt_peft.training.run import run_training

SMALL = dict(
    dataset="synthetic", model_name_or_path="tiny-random", image_size=32, num_classes=6, n_max=40, imbalance=10,
    val_per_class=4, batch_size=8, num_groups=4, shared_layers=2, num_workers=0, report_to="none",
    epochs_phase1=1, epochs_phase2=1, max_steps_per_epoch=2,
)  # fmt: skip


def small_args(output_dir, **overrides):
    return LPTTrainingArguments(**{**SMALL, "output_dir": str(output_dir), **overrides})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny two-phase run (about 6 s); its latest checkpoint is at the end of phase 2."""
    out = tmp_path_factory.mktemp("resume") / "run"
    run_training(small_args(out))
    return out


@pytest.fixture
def fresh_accelerate_state():
    # Accelerate keeps one process-wide state; a row that changes mixed precision needs a clean one, and leaves one.
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# (option, value on resume, what the refusal must say). The checkpoint was written with SMALL's values and the
# defaults of LPTTrainingArguments.
CHANGES = [
    ("batch_size", 16, "--batch_size: the checkpoint has 8, this run 16 (pass --batch_size 8 as before)"),
    ("seed", 7, "--seed: the checkpoint has 42, this run 7 (pass --seed 42 as before)"),
    ("learning_rate", 0.1, "--learning_rate: the checkpoint has 0.02, this run 0.1 (pass --learning_rate 0.02"),
    ("image_size", 16, "--image_size: the checkpoint has 32, this run 16 (pass --image_size 32 as before)"),
    ("gradient_accumulation_steps", 2, "--gradient_accumulation_steps: the checkpoint has 1, this run 2"),
    ("epochs_phase1", 2, "--epochs_phase1: the checkpoint has 1, this run 2 (pass --epochs_phase1 1 as before)"),
    ("epochs_phase2", 3, "--epochs_phase2: the checkpoint has 1, this run 3"),
    ("max_steps_per_epoch", 3, "--max_steps_per_epoch: the checkpoint has 2, this run 3"),
    ("phase", "1", "--phase: the checkpoint has both, this run 1 (pass --phase both as before)"),
    ("samples_per_class", 2, "--samples_per_class: the checkpoint has 4, this run 2"),
    ("dual_sampling", False, "--dual_sampling: the checkpoint has true, this run false (pass --dual_sampling true"),
    ("loss", "ce", "--loss: the checkpoint has agcl, this run ce"),
    ("sampler", "instance_balanced", "--sampler: the checkpoint has None, this run instance_balanced (leave --sampl"),
    ("eta", 0.25, "--eta: the checkpoint has 0.5, this run 0.25"),
    ("matching_weight", 1.0, "--matching_weight: the checkpoint has 0.5, this run 1.0"),
    ("instance_balanced_gammas", "paper", "--instance_balanced_gammas: the checkpoint has authors, this run paper"),
    ("warmup_epochs", 0.0, "--warmup_epochs: the checkpoint has 1.0, this run 0.0"),
    ("weight_decay", 0.0, "--weight_decay: the checkpoint has 0.01, this run 0.0"),
    ("momentum", 0.5, "--momentum: the checkpoint has 0.9, this run 0.5"),
    ("lr_reference_batch", 64, "--lr_reference_batch: the checkpoint has 256, this run 64"),
    ("max_grad_norm", 1.0, "--max_grad_norm: the checkpoint has None, this run 1.0 (leave --max_grad_norm unset"),
    ("mixed_precision", "bf16", "--mixed_precision: the checkpoint has no, this run bf16 (pass --mixed_precision no"),
    ("eval_every_epochs", 2, "--eval_every_epochs: the checkpoint has 1, this run 2"),
    ("crop_scale_min", 0.5, "--crop_scale_min: the checkpoint has 0.08, this run 0.5"),
    ("mean", [0.4, 0.5, 0.5], "--mean: the checkpoint has 0.5 0.5 0.5, this run 0.4 0.5 0.5"),
    ("num_groups", 2, "--num_groups: the checkpoint has 4, this run 2"),
    ("prompt_length", 4, "--prompt_length: the checkpoint has 10, this run 4"),
    ("attn_implementation", "eager", "--attn_implementation: the checkpoint has sdpa, this run eager"),
    ("group_prompt_length", 4, "--group_prompt_length: the checkpoint has 10, this run 4"),
    ("top_k", 1, "--top_k: the checkpoint has 2, this run 1"),
    ("shared_layers", 1, "--shared_layers: the checkpoint has 2, this run 1"),
    ("classifier_dropout", 0.2, "--classifier_dropout: the checkpoint has 0.1, this run 0.2"),
    ("layer_norm_eps", 1e-5, "--layer_norm_eps: the checkpoint has None, this run 1e-05 (leave --layer_norm_eps"),
    ("model_name_or_path", "demo", "--model_name_or_path: the checkpoint has tiny-random, this run demo"),
    ("resize_size", 40, "--resize_size: the checkpoint has None, this run 40"),
    ("std", [0.25, 0.5, 0.5], "--std: the checkpoint has 0.5 0.5 0.5, this run 0.25 0.5 0.5"),
    ("verify_images", True, "--verify_images: the checkpoint has false, this run true"),
    ("num_classes", 5, "--num_classes: the checkpoint has 6, this run 5"),
    ("imbalance", 5.0, "--imbalance: the checkpoint has 10, this run 5.0"),
    ("n_max", 30, "training data: the checkpoint was trained on 100 images"),
    ("data_seed", 1, "--data_seed: the checkpoint has 0, this run 1"),
    ("logit_scale", 30.0, "--logit_scale: the checkpoint has 40.0, this run 30.0"),
    ("val_per_class", 3, "validation data: the checkpoint was trained on 24 images"),
    # The recipe options (recorded by run.py beside TRAJECTORY_OPTIONS).
    ("recipe", "paper", "--recipe: the checkpoint has lpt_peft, this run paper (pass --recipe lpt_peft as before)"),
    ("head_init", "random", "--head_init: the checkpoint has prototypes, this run random"),
    ("select_learning_rate", False, "--select_learning_rate: the checkpoint has true, this run false"),
    ("learning_rate_grid", [0.1, 1.0], "--learning_rate_grid: the checkpoint has 0.01 0.05 0.2 1.0, this run 0.1 1.0"),
    ("lr_trial_steps", 3, "--lr_trial_steps: the checkpoint has 8, this run 3"),
    ("select_learning_rate_phase2", True, "--select_learning_rate_phase2: the checkpoint has false, this run true"),
    ("collapse_guard", False, "--collapse_guard: the checkpoint has true, this run false"),
    ("min_images_per_class", 50, "--min_images_per_class: the checkpoint has None, this run 50"),
]


@pytest.mark.parametrize("option,value,message", CHANGES, ids=[c[0] for c in CHANGES])
def test_resume_with_another_value_is_refused_and_writes_nothing(
    finished_run, fresh_accelerate_state, option, value, message
):
    before = snapshot(finished_run)
    args = small_args(finished_run, resume_from_checkpoint="latest", **{option: value})
    with pytest.raises(ValueError) as error:
        run_training(args)
    text = str(error.value)
    assert text.startswith("Cannot resume from ") and message in text, text
    assert "or start a fresh --output_dir" in text and "Nothing was written." in text
    assert snapshot(finished_run) == before  # names and bytes of every file of the run, checkpoints included


def test_every_recorded_option_has_a_row():
    from lpt_peft.training.checkpointing import TRAJECTORY_OPTIONS
    from lpt_peft.training.run import RECIPE_RECORD_OPTIONS

    untested = {*TRAJECTORY_OPTIONS, *RECIPE_RECORD_OPTIONS} - {c[0] for c in CHANGES}
    # --dataset is recorded too; another data set needs other files, so its row would test the data loaders instead.
    assert untested == {"dataset"}


def test_process_count_is_recorded_and_a_different_count_is_refused(finished_run):
    state = TrainerState.load(_latest(finished_run) / STATE_FILE)
    assert state.run["num_processes"] == 1 and state.run["global_batch"] == 8
    assert state.run["train_data"].startswith("100 images, sha256 ")
    recorded = {**state.run, "num_processes": 2, "global_batch": 16}
    (line,) = resume_mismatches(recorded, state.run)
    assert line.startswith("processes: the checkpoint was written by 2, this run has 1")
    assert "launch with `accelerate launch --num_processes 2` as before, global batch 16" in line


def test_unchanged_resume_is_accepted_and_older_checkpoints_are_refused(finished_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    rows = json.loads((copy / "results.json").read_text())
    run_training(small_args(copy, resume_from_checkpoint="latest"))  # same options: continues (here: re-finishes)
    assert json.loads((copy / "results.json").read_text()) == rows

    state_file = _latest(copy) / STATE_FILE
    legacy = json.loads(state_file.read_text())
    del legacy["run"]
    state_file.write_text(json.dumps(legacy))
    before = snapshot(copy)
    with pytest.raises(ValueError, match="records no run configuration"):
        run_training(small_args(copy, resume_from_checkpoint="latest"))
    assert snapshot(copy) == before


def test_a_checkpoint_from_before_the_sampler_option_resumes_as_the_default(finished_run):
    # Checkpoints written before --sampler existed do not record it; they ran the default sampler (dual sampling).
    state = TrainerState.load(_latest(finished_run) / STATE_FILE)
    older = {**state.run, "options": {k: v for k, v in state.run["options"].items() if k != "sampler"}}
    assert resume_mismatches(older, state.run) == []
    other = {**state.run, "options": {**state.run["options"], "sampler": "class_balanced"}}
    (line,) = resume_mismatches(state.run, other)
    assert line.startswith("--sampler: the checkpoint has None, this run class_balanced")


def test_a_checkpoint_from_before_the_collapse_guard_is_refused_with_the_fix(finished_run):
    # Written before the guard existed, a run had none: the default now differs (refused, naming the flag), and
    # --min_images_per_class left unset is the behaviour from before (no difference).
    state = TrainerState.load(_latest(finished_run) / STATE_FILE)
    older = {**state.run, "options": {k: v for k, v in state.run["options"].items() if k not in NEW_OPTIONS}}
    (line,) = resume_mismatches(older, state.run)
    assert line == "--collapse_guard: the checkpoint has false, this run true (pass --collapse_guard false as before)"
    current = {**state.run, "options": {**state.run["options"], "collapse_guard": False}}
    assert resume_mismatches(older, current) == []


NEW_OPTIONS = ("collapse_guard", "min_images_per_class")


def test_phase2_checkpoint_resumed_as_phase1_does_not_exit_silently(finished_run):
    # The observed fault: `--phase 1` on a phase-2 checkpoint did nothing, wrote nothing and exited 0.
    with pytest.raises(ValueError, match=r"--phase: the checkpoint has both, this run 1"):
        run_training(small_args(finished_run, phase="1", resume_from_checkpoint="latest"))


def _latest(out: Path) -> Path:
    return out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()


# ------------------------------------------------------------------------------------------- atomic checkpoints
def test_a_crash_while_saving_leaves_the_previous_checkpoint_latest_and_intact(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    manager = CheckpointManager(tmp_path, accelerator)

    def write(path, **kwargs):  # stands in for accelerate's save_state, which creates the folder
        Path(path).mkdir(parents=True, exist_ok=True)
        Path(path, "model.safetensors").write_text("1")

    monkeypatch.setattr(accelerator, "save_state", write)
    first = manager.save(TrainerState(phase=1, epoch=1, global_step=3))
    before = snapshot(tmp_path / "checkpoints")

    def crash(path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        Path(path, "model.safetensors").write_text("half")
        raise OSError("No space left on device")

    monkeypatch.setattr(accelerator, "save_state", crash)
    with pytest.raises(OSError, match="No space left"):
        manager.save(TrainerState(phase=1, epoch=2, global_step=6))
    assert manager.resolve("latest") == first
    partial = tmp_path / "checkpoints" / "phase1-epoch0002-step00000006.partial"
    # A write failure removes its half-written folder (it only takes space); the previous checkpoint is untouched.
    assert not partial.exists() and not (tmp_path / "checkpoints" / "phase1-epoch0002-step00000006").exists()
    assert snapshot(tmp_path / "checkpoints") == before
    # Even a half-written folder that already holds a state file (a kill between the two writes) is never picked.
    partial.mkdir()
    TrainerState(phase=1, epoch=2, global_step=6).save(partial / STATE_FILE)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert manager.resolve("latest") == first


# ------------------------------------------------------------------------------------- failed checkpoint writes
class SafetensorError(Exception):
    """Stands in for safetensors' own exception type (matched by name, as the real one is a Rust-side class)."""


WRITE_FAILURES = [
    (SafetensorError("Error while serializing: IoError(No space left on device (os error 28))"), "no space left"),
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4480 vs 4374"), "unexpected pos"),
    (RuntimeError("basic_ios::clear: iostream error"), "iostream error"),
]


@pytest.mark.parametrize("error,cause", WRITE_FAILURES, ids=["safetensors-enospc", "torch-pos", "torch-iostream"])
def test_a_failed_checkpoint_write_names_folder_cause_and_the_intact_previous_checkpoint(
    tmp_path, monkeypatch, error, cause
):
    accelerator = Accelerator(cpu=True)
    manager = CheckpointManager(tmp_path, accelerator)

    def write(path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        Path(path, "model.safetensors").write_text("1")

    monkeypatch.setattr(accelerator, "save_state", write)
    first = manager.save(TrainerState(phase=1, epoch=1, global_step=3))
    before = snapshot(tmp_path / "checkpoints")

    def fail(path, **kwargs):
        Path(path).mkdir(parents=True, exist_ok=True)
        Path(path, "model.safetensors").write_text("half")
        raise error

    monkeypatch.setattr(accelerator, "save_state", fail)
    with pytest.raises(OSError) as info:
        manager.save(TrainerState(phase=1, epoch=2, global_step=6))
    message = str(info.value)
    assert "Could not write the training checkpoint" in message
    assert str(tmp_path / "checkpoints" / "phase1-epoch0002-step00000006") in message
    assert cause in message
    assert f"The previous checkpoint {first} is intact" in message and "--resume_from_checkpoint latest" in message
    assert snapshot(tmp_path / "checkpoints") == before


def test_a_bug_in_the_writer_is_not_reported_as_a_write_failure(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    manager = CheckpointManager(tmp_path, accelerator)
    monkeypatch.setattr(accelerator, "save_state", lambda path, **kw: (_ for _ in ()).throw(KeyError("bug")))
    with pytest.raises(KeyError):
        manager.save(TrainerState(phase=1, epoch=1, global_step=3))


def test_stale_partial_folders_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    stale = out / "checkpoints" / "phase1-epoch0009-step00000099.partial"  # not a name this run writes
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_text("half")
    run_training(small_args(out, phase="1"))
    assert not stale.exists()
    assert not list((out / "checkpoints").glob("*.partial"))


def test_data_options_the_data_set_does_not_take_are_not_compared():
    """Before data options defaulted to "the data set's own", checkpoints recorded the command line's n_max 500,
    imbalance 100, ... even for data sets without them (folders, Places-LT): such a checkpoint must still resume, and a
    data set's own defaults are recorded by value."""
    from lpt_peft.data.synthetic import make_synthetic_long_tail
    from lpt_peft.training.checkpointing import run_record

    data = make_synthetic_long_tail(num_classes=3, n_max=6, imbalance=2, image_size=8)
    base = {"model_name_or_path": "tiny-random", "image_size": 8, "output_dir": "/nonexistent", "report_to": "none"}
    folders = LPTTrainingArguments(dataset="imagefolder", train_dir="/t", test_dir="/e", **base)
    record = run_record(folders, data, 1)
    assert not {"n_max", "imbalance", "val_per_class", "num_classes", "data_seed"} & set(record["options"])
    old = {**record, "options": {**record["options"], "n_max": 500, "imbalance": 100.0, "data_seed": 0}}
    assert resume_mismatches(old, record) == []
    synthetic = run_record(LPTTrainingArguments(dataset="synthetic", **base), data, 1)
    assert (synthetic["options"]["n_max"], synthetic["options"]["imbalance"]) == (40, 10.0)  # the builder's defaults
