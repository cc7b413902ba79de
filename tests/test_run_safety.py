"""A training run never replaces or loses earlier work and fails fast on bad options: an existing output folder is
refused (or overwritten on request), a bad training image costs no finished epoch, `--init_from` refuses options that
contradict its adapter, and the base model and option checks come before the data is loaded."""

import json
import os
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lpt_peft.cli import TRAINING_FLAGS, format_error
from lpt_peft.training import run as training_run
from lpt_peft.training.arguments import LPTTrainingArguments, parse_training_args
from lpt_peft.training.loop import TrainingCallback
from lpt_peft.training.run import run_training

SMALL = dict(
    dataset="synthetic", model_name_or_path="tiny-random", image_size=32, num_classes=6, n_max=40, imbalance=10,
    val_per_class=4, batch_size=8, num_groups=4, shared_layers=2, num_workers=0, report_to="none",
    epochs_phase1=1, epochs_phase2=1, max_steps_per_epoch=2,
)  # fmt: skip
FLAGS = [
    "--dataset", "synthetic", "--model_name_or_path", "tiny-random", "--image_size", "32", "--num_classes", "6",
    "--n_max", "40", "--imbalance", "10", "--val_per_class", "4", "--batch_size", "8", "--num_workers", "0",
    "--report_to", "none", "--epochs_phase1", "1", "--epochs_phase2", "1", "--max_steps_per_epoch", "2",
]  # fmt: skip


def small_args(output_dir, **overrides):
    return LPTTrainingArguments(**{**SMALL, "output_dir": str(output_dir), **overrides})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def phase1_run(tmp_path_factory):
    """A finished phase-1 run (num_groups 4, shared_layers 2, prompt_length 10)."""
    out = tmp_path_factory.mktemp("safety") / "p1"
    run_training(small_args(out, phase="1"))
    return out


@pytest.fixture
def no_data(monkeypatch):
    """Loading the data fails the test: the checks under test must come first."""

    def refuse(args):
        raise AssertionError("the data set was loaded before the options were checked")

    monkeypatch.setattr(training_run, "build_dataset", refuse)


# ------------------------------------------------------------------------------------ fault 2: existing output
def test_a_fresh_run_into_an_earlier_run_is_refused_before_anything_is_written(phase1_run):
    before = snapshot(phase1_run)
    with pytest.raises(ValueError) as info:
        run_training(small_args(phase1_run, phase="1", seed=7))
    message = str(info.value)
    assert f"--output_dir {str(phase1_run)!r} already holds an earlier run (phase1" in message
    assert "--resume_from_checkpoint latest" in message and "--overwrite_output_dir true" in message
    assert snapshot(phase1_run) == before


def test_overwrite_output_dir_replaces_the_earlier_run(phase1_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(phase1_run, out)
    old = load_file(out / "phase1" / "adapter_model.safetensors")
    argv = [*FLAGS, "--phase", "1", "--seed", "7", "--output_dir", str(out), "--num_groups", "4",
            "--shared_layers", "2", "--overwrite_output_dir", "true"]  # fmt: skip
    args = parse_training_args(argv)
    run_training(args)
    new = load_file(out / "phase1" / "adapter_model.safetensors")
    assert any(not (old[k] == new[k]).all() for k in old)  # another seed: another adapter
    states = [json.loads(p.read_text()) for p in (out / "checkpoints").glob("*/trainer_state.json")]
    assert states and all(s["run"]["options"]["seed"] == 7 for s in states)  # no checkpoint of the old run is left
    assert set(json.loads((out / "results.json").read_text())) == {"LPT phase 1"}


def test_phase2_next_to_its_phase1_adapter_is_not_an_earlier_run(phase1_run, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(phase1_run, out)
    run_training(small_args(out, phase="2", init_from=str(out / "phase1")))
    assert (out / "phase2" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="already holds an earlier run"):  # now phase 2 would be replaced
        run_training(small_args(out, phase="2", init_from=str(out / "phase1")))


# --------------------------------------------------------------------------------- fault 3: bad training image
def _folders(root: Path) -> dict:
    from test_options import image_folders

    image_folders(root)
    return {"dataset": "imagefolder", "train_dir": str(root / "train"), "test_dir": str(root / "test"),
            "val_dir": str(root / "val")}  # fmt: skip


def _imagefolder_args(base, out, **overrides):
    values = {**SMALL, **base, "output_dir": str(out), "phase": "1", "batch_size": 4, "samples_per_class": 2,
              "max_steps_per_epoch": 1, **overrides}  # fmt: skip
    for key in ("num_classes", "n_max", "imbalance", "val_per_class"):
        values.pop(key)
    return LPTTrainingArguments(**values)


def test_a_bad_training_image_is_found_before_the_first_epoch(tmp_path):
    from test_options import write_truncated_jpeg

    base = _folders(tmp_path / "f")
    write_truncated_jpeg(tmp_path / "f" / "train" / "ant" / "broken.jpg")
    with pytest.raises(ValueError, match=r"1 image\(s\) of the train split cannot be decoded .*broken\.jpg"):
        run_training(_imagefolder_args(base, tmp_path / "out", epochs_phase1=3))
    assert not (tmp_path / "out" / "checkpoints").exists()


CORRUPT_ENV = "LPT_TEST_CORRUPT_DIR"


class CorruptAfterFirstEpoch(TrainingCallback):
    """Truncates every training image after epoch 0 (a file that goes bad mid-run, or a set too large to check)."""

    def on_epoch_end(self, phase, state, record) -> None:
        from test_options import write_truncated_jpeg

        if state.epoch == 0:
            for path in Path(os.environ[CORRUPT_ENV]).rglob("*.png"):
                write_truncated_jpeg(path)


def test_a_training_image_unreadable_mid_run_names_the_image_and_the_kept_checkpoint(tmp_path, monkeypatch):
    base = _folders(tmp_path / "f")
    monkeypatch.setenv("LPT_TRAINING_CALLBACKS", "test_run_safety:CorruptAfterFirstEpoch")
    monkeypatch.setenv(CORRUPT_ENV, str(tmp_path / "f" / "train"))
    with pytest.raises(ValueError) as info:
        run_training(_imagefolder_args(base, tmp_path / "out", epochs_phase1=3))
    message = str(info.value)
    checkpoint = tmp_path / "out" / "checkpoints" / "phase1-epoch0001-step00000001"
    assert "Training stopped in phase 1, epoch 1: could not decode the training image '" in message
    assert str(tmp_path / "f" / "train") in message
    assert f"The finished epochs are kept in the checkpoint {checkpoint}" in message
    assert "--resume_from_checkpoint latest" in message
    assert (checkpoint / "trainer_state.json").is_file()
    # The CLI renders Python argument names as flags: the flag is named once, not twice.
    assert format_error(info.value, TRAINING_FLAGS).count("--verify_images") == 1


# ------------------------------------------------------------------------------- fault 7: --init_from options
@pytest.mark.parametrize(
    "flags,named",
    [
        (["--num_groups", "2"], "--num_groups 2 (the adapter has 4)"),
        (["--shared_layers", "1"], "--shared_layers 1 (the adapter has 2)"),
        (["--prompt_length", "4"], "--prompt_length 4 (the adapter has 10)"),
        (["--layer_norm_eps", "1e-3"], "--layer_norm_eps 0.001 (the adapter has None)"),
        (["--classifier_dropout", "0.3"], "--classifier_dropout 0.3 (the adapter has 0.1)"),
    ],
)
def test_init_from_refuses_explicit_options_that_differ_from_its_adapter(phase1_run, tmp_path, flags, named, no_data):
    argv = [*FLAGS, "--phase", "2", "--init_from", str(phase1_run / "phase1"), "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match="--init_from .*other values: " + re.escape(named)):
        run_training(parse_training_args(argv + flags))
    assert not (tmp_path / "o").exists()


def test_init_from_accepts_defaults_and_equal_explicit_values(phase1_run, tmp_path, tmp_path_factory):
    # num_groups/shared_layers left at their defaults (20, 6): the adapter's 4 and 2 are used, no complaint.
    argv = [*FLAGS, "--phase", "2", "--init_from", str(phase1_run / "phase1"), "--output_dir", str(tmp_path / "o")]
    run_training(parse_training_args(argv))
    config = json.loads((tmp_path / "o" / "phase2" / "adapter_config.json").read_text())
    assert (config["num_groups"], config["shared_layers"]) == (4, 2)
    # An explicit value equal to the adapter's is fine, also from a config file.
    config_file = tmp_path / "c.yaml"
    config_file.write_text("num_groups: 4\nprompt_length: 10\n")
    args = parse_training_args([*argv[:-1], str(tmp_path / "o2"), "--config", str(config_file)])
    assert {"num_groups", "prompt_length", "init_from"} <= args.explicit_options
    run_training(args)


def test_options_from_a_config_file_count_as_explicit(phase1_run, tmp_path, no_data):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("num_groups: 20\n")  # the dataclass default, but written by the user
    argv = [*FLAGS, "--phase", "2", "--init_from", str(phase1_run / "phase1"), "--output_dir", str(tmp_path / "o"),
            "--config", str(config_file)]  # fmt: skip
    with pytest.raises(ValueError, match=r"--num_groups 20 \(the adapter has 4\)"):
        run_training(parse_training_args(argv))


# ----------------------------------------------------------------- fault 9: base and options before the data
def test_a_missing_base_folder_names_the_flag_before_the_data_is_loaded(tmp_path, no_data):
    with pytest.raises(ValueError) as info:
        run_training(small_args(tmp_path / "o", model_name_or_path=str(tmp_path / "nonexist")))
    message = format_error(info.value, TRAINING_FLAGS)
    assert f"Base {str(tmp_path / 'nonexist')!r}, which is not a folder here" in message
    assert "--model_name_or_path" in message and "Repo id" not in message
    assert not (tmp_path / "o").exists()


def test_an_uncached_hub_id_offline_names_the_flag_and_the_cause(tmp_path, monkeypatch, no_data):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ValueError) as info:
        run_training(small_args(tmp_path / "o", model_name_or_path="foo/bar"))
    message = format_error(info.value, TRAINING_FLAGS)
    assert "'foo/bar'" in message and "not in the local Hugging Face cache" in message
    assert "HF_HUB_OFFLINE" in message and "--model_name_or_path" in message


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"mean": [0.5, 0.5]}, "`mean` and `std` need one value per RGB channel"),
        ({"top_k": 9}, "top_k=9 must be <= num_groups=4"),
        ({"shared_layers": 12}, "--shared_layers 12 must be < the 4 layers of --model_name_or_path 'tiny-random'"),
    ],
    ids=["mean", "top_k", "shared_layers"],
)
def test_option_errors_come_before_the_data_is_loaded(tmp_path, overrides, expected, no_data):
    with pytest.raises(ValueError, match=expected):
        run_training(small_args(tmp_path / "o", **overrides))
    assert not (tmp_path / "o").exists()


def test_shared_layers_is_checked_against_a_folder_backbones_depth(tmp_path, no_data):
    from transformers import ViTConfig

    ViTConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, intermediate_size=64).save_pretrained(
        tmp_path / "vit"
    )
    with pytest.raises(ValueError, match="--shared_layers 3 must be < the 3 layers"):
        run_training(small_args(tmp_path / "o", model_name_or_path=str(tmp_path / "vit"), shared_layers=3))


def test_unknown_loss_is_refused_when_the_options_are_built():
    with pytest.raises(ValueError, match="--loss 'foo' is not a registered loss"):
        small_args("unused", loss="foo")


# -------------------------------------------------------------------------------------- fault 11: bad YAML
def test_invalid_yaml_config_names_the_flag_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs_phase1: 2\nbatch_size: [8\nseed: 1\n")
    with pytest.raises(ValueError) as info:
        parse_training_args(["--config", str(bad)])
    message = str(info.value)
    assert message.startswith(f"--config {str(bad)!r} is not valid YAML at line ")
    line = int(message.split(" at line ")[1].split(",")[0])
    assert line in (2, 3)  # the unclosed `[` of line 2, reported where the parser noticed it


def test_invalid_yaml_config_prints_an_error_without_traceback(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1\n")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "examples" / "train_lpt.py"), "--config", str(bad)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)},
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --config {str(bad)!r} is not valid YAML")
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------- fault 4: the recorded data options
def test_the_adapter_records_the_data_sets_own_options(tmp_path):
    base = _folders(tmp_path / "f")
    run_training(_imagefolder_args(base, tmp_path / "out"))
    card = (tmp_path / "out" / "phase1" / "README.md").read_text()
    import yaml

    recorded = yaml.safe_load(card.split("---")[1])["lpt_data"]
    assert recorded == {"dataset": "imagefolder", "train_dir": base["train_dir"], "test_dir": base["test_dir"],
                        "val_dir": base["val_dir"], "verify_images": False}  # fmt: skip (unset options: not passed)
