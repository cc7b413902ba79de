"""Two-phase training through `accelerate launch`: end to end, two processes, exact resume, and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fault_injection import crash_at
from peft import PeftModel
from safetensors.torch import load_file
from testing_utils import load_script

from lpt_peft import LPTConfig
from lpt_peft.backbones import tiny_random_vit
from lpt_peft.data.synthetic import make_synthetic_long_tail
from lpt_peft.training.arguments import LPTTrainingArguments, parse_training_args
from lpt_peft.training.data import check_dataset
from lpt_peft.training.run import evaluate_adapter, run_training

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    "--dataset", "synthetic", "--model_name_or_path", "tiny-random", "--image_size", "32",
    "--num_classes", "6", "--n_max", "40", "--imbalance", "10", "--val_per_class", "4",
    "--batch_size", "8", "--num_groups", "4", "--shared_layers", "2", "--num_workers", "0",
    "--report_to", "none", "--learning_rate", "0.5", "--lr_trial_steps", "2",
]  # fmt: skip


def launch(args, num_processes=1, env=None, check=True):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes)]
    command += ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if num_processes > 1:
        # Several ranks on one machine: always CPU processes joined over gloo, so the test runs the same on CPU-only,
        # one-GPU (where NCCL refuses two ranks on one device) and many-GPU machines. GPUs: scripts/gpu_smoke.sh.
        full_env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run(
        command + [str(ROOT / "examples" / "train_lpt.py"), *COMMON, *args],
        env=full_env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"launch failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def adapter_weights(path):
    return load_file(Path(path) / "adapter_model.safetensors")


def test_both_phases_end_to_end_and_reload_reproduces_accuracy(tmp_path):
    out = tmp_path / "run"
    launch(["--output_dir", str(out), "--epochs_phase1", "3", "--epochs_phase2", "2", "--report_to", "tensorboard"])
    rows = json.loads((out / "results.json").read_text())
    assert list(out.rglob("events.out.tfevents*")), "no TensorBoard log written"
    assert set(rows) == {"LPT phase 1", "LPT phase 2", "LPT (best phase by val)"}
    state = json.loads(
        (out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "trainer_state.json").read_text()
    )
    losses = [h["train_loss"] for h in state["history"] if h["phase"] == 1]
    assert losses[-1] < losses[0], f"phase-1 loss did not fall: {losses}"
    for name in ("results.md", "per_class_accuracy.png", "group_usage.png", "class_info.json"):
        assert (out / name).stat().st_size > 0
    # The phase-2 adapter infers in phase 2 and only its group pool, keys and head differ from phase 1.
    phase1, phase2 = adapter_weights(out / "phase1"), adapter_weights(out / "phase2")
    shared = [k for k in phase1 if "lpt_shared_prompt" in k]
    assert shared and all(torch.equal(phase1[k], phase2[k]) for k in shared)
    assert not torch.equal(phase1["base_model.lpt_keys"], phase2["base_model.lpt_keys"])
    args = parse_training_args(COMMON)
    for phase in (1, 2):
        result = evaluate_adapter(str(out / f"phase{phase}"), args)
        assert result["phase"] == phase
        assert result["overall"] == pytest.approx(rows[f"LPT phase {phase}"]["overall"], abs=1e-9)
        assert result["few"] == pytest.approx(rows[f"LPT phase {phase}"]["few"], abs=1e-9)
    model = PeftModel.from_pretrained(tiny_random_vit(32), out / "phase2").eval()
    assert model.peft_config["default"].phase == 2
    # The adapter carries its preprocessing and a card with this run's test table.
    preprocessing = json.loads((out / "phase2" / "preprocessor_config.json").read_text())
    assert preprocessing["crop_size"]["height"] == 32 and preprocessing["image_mean"] == [0.5, 0.5, 0.5]
    card = (out / "phase2" / "README.md").read_text()
    assert "| LPT phase 2 |" in card and "synthetic" in card
    # From the adapter folder alone (COMMON's --n_max 40 / --imbalance 10 differ from the defaults), the evaluation
    # script rebuilds the same split and reproduces the reported numbers.
    result = load_script("evaluate_lpt").main(["--adapter", str(out / "phase2"), "--num_workers", "0"])
    assert result["overall"] == pytest.approx(rows["LPT phase 2"]["overall"], abs=1e-9)
    assert result["few"] == pytest.approx(rows["LPT phase 2"]["few"], abs=1e-9)


def test_two_processes_train_both_phases(tmp_path):
    out = tmp_path / "ddp"
    launch(["--output_dir", str(out), "--epochs_phase1", "1", "--epochs_phase2", "1"], num_processes=2)
    model = PeftModel.from_pretrained(tiny_random_vit(32), out / "phase2").eval()
    logits = model(pixel_values=torch.randn(2, 3, 32, 32)).logits
    assert logits.shape == (2, 6) and torch.isfinite(logits).all()
    rows = json.loads((out / "results.json").read_text())
    assert set(rows) == {"LPT phase 1", "LPT phase 2", "LPT (best phase by val)"}
    # Resuming the 2-process checkpoint with 1 process would change the epoch length, lr scale and batches: refused.
    files = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(ValueError, match="processes: the checkpoint was written by 2, this run has 1"):
        run_training(parse_training_args([*COMMON, "--output_dir", str(out), "--epochs_phase1", "1",
                                          "--epochs_phase2", "1", "--resume_from_checkpoint", "latest"]))  # fmt: skip
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == files


def test_killed_run_resumes_to_identical_parameters(tmp_path):
    common = ["--epochs_phase1", "2", "--epochs_phase2", "2", "--checkpointing_steps", "2"]
    launch(["--output_dir", str(tmp_path / "straight"), *common])
    interrupted = tmp_path / "interrupted"
    # Crash hard in phase 1 between checkpoints (step 5; the last state is from step 4), resume, then crash again at
    # the first step of phase 2, before any phase-2 state exists (so the run resumes from the end of phase 1).
    crashed = launch(["--output_dir", str(interrupted), *common], env=crash_at("1:5"), check=False)
    assert crashed.returncode != 0 and "exit status 17" in crashed.stderr, crashed.stderr[-3000:]
    assert not (interrupted / "phase2").exists()
    resume = ["--output_dir", str(interrupted), *common, "--resume_from_checkpoint", "latest"]
    crashed = launch(resume, env=crash_at("2:1"), check=False)
    assert crashed.returncode != 0 and "exit status 17" in crashed.stderr, crashed.stderr[-3000:]
    launch(resume)
    for phase in ("phase1", "phase2"):
        expected, resumed = adapter_weights(tmp_path / "straight" / phase), adapter_weights(interrupted / phase)
        assert expected.keys() == resumed.keys()
        for key in expected:
            assert torch.equal(expected[key], resumed[key]), f"{phase}: {key} differs after resume"
    straight_rows = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert json.loads((interrupted / "results.json").read_text()) == straight_rows


# ------------------------------------------------------------------------------------------------ bad input
def small_args(tmp_path, **overrides):
    values = dict(
        dataset="synthetic", model_name_or_path="tiny-random", image_size=32, num_classes=6, n_max=40, imbalance=10,
        val_per_class=4, batch_size=8, num_groups=4, shared_layers=2, num_workers=0, report_to="none",
        epochs_phase1=1, epochs_phase2=1, output_dir=str(tmp_path / "out"),
    )  # fmt: skip
    values.update(overrides)
    return LPTTrainingArguments(**values)


def test_unknown_config_key_is_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("dataset: synthetic\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown option\(s\): learning_rat \(did you mean learning_rate\?\)"):
        parse_training_args(["--config", str(config)])


def test_config_file_and_command_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("dataset: synthetic\nbatch_size: 16\nepochs_phase1: 3\nmean: [0.1, 0.2, 0.3]\n")
    args = parse_training_args(["--config", str(config), "--epochs_phase1", "5"])
    assert (args.dataset, args.batch_size, args.epochs_phase1, args.mean) == ("synthetic", 16, 5, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="must be a multiple of --samples_per_class 4"):
        parse_training_args(["--batch_size", "10"])


def test_class_without_training_images_and_bad_labels():
    data = make_synthetic_long_tail(num_classes=4, n_max=8, imbalance=4)
    check_dataset(data, 4)
    with pytest.raises(ValueError, match="has 4 classes but the adapter has num_labels=5"):
        check_dataset(data, 5)
    data.train_class_counts[2] = 0
    with pytest.raises(ValueError, match=r"disagree with the training labels .* class 2 \(class_2\): 0 recorded, 3"):
        check_dataset(data, 4)
    data.train = data.train.filter(lambda row: row["label"] != 2)
    with pytest.raises(ValueError, match=r"1 class\(es\) have no training images: 2 \('class_2'\)"):
        check_dataset(data, 4)
    data = make_synthetic_long_tail(num_classes=4, n_max=8, imbalance=4)
    data.test = data.test.cast_column("label", data.test.features["label"].__class__(num_classes=10))
    data.test = data.test.map(lambda row: {"label": 7 if row["label"] == 1 else row["label"]})
    with pytest.raises(ValueError, match=r"The test split has label 7, outside 0..3"):
        check_dataset(data, 4)


def test_init_from_wrong_phase_or_base_fails_before_training(tmp_path):
    from peft import get_peft_model

    def save_adapter(path, phase, backbone, num_labels=6):
        model = get_peft_model(backbone, LPTConfig(num_labels=num_labels, shared_layers=2, num_groups=4, phase=phase))
        model.save_pretrained(path)

    save_adapter(tmp_path / "p2", 2, tiny_random_vit(32))
    with pytest.raises(ValueError, match="is a phase-2 adapter; phase 2 starts from a phase-1 adapter"):
        run_training(small_args(tmp_path, phase="2", init_from=str(tmp_path / "p2")))

    from transformers import ViTConfig, ViTModel

    other = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                               image_size=32, patch_size=8), add_pooling_layer=False)  # fmt: skip
    save_adapter(tmp_path / "other", 1, other)
    with pytest.raises(ValueError, match="does not fit the base model .*hidden_size: adapter 32, base 64"):
        run_training(small_args(tmp_path, phase="2", init_from=str(tmp_path / "other")))

    save_adapter(tmp_path / "labels", 1, tiny_random_vit(32), num_labels=5)
    with pytest.raises(ValueError, match="has num_labels=5 but the data set has 6 classes"):
        run_training(small_args(tmp_path, phase="2", init_from=str(tmp_path / "labels")))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under"):
        run_training(small_args(tmp_path, resume_from_checkpoint="latest"))


def test_bf16_mixed_precision_and_gradient_accumulation(tmp_path):
    out = tmp_path / "bf16"
    launch(
        ["--output_dir", str(out), "--epochs_phase1", "1", "--epochs_phase2", "1", "--max_steps_per_epoch", "4",
         "--mixed_precision", "bf16", "--gradient_accumulation_steps", "2", "--max_grad_norm", "1.0"]
    )  # fmt: skip
    state_files = sorted((out / "checkpoints").glob("*/trainer_state.json"))
    state = json.loads(state_files[-1].read_text())
    assert state["phase"] == 2 and state["global_step"] == 2  # 4 micro-batches, 2 optimizer updates
    weights = adapter_weights(out / "phase2")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


def test_resuming_a_phase1_checkpoint_as_phase2_is_refused(tmp_path):
    run_training(small_args(tmp_path, phase="1", max_steps_per_epoch=2))
    adapter = str(tmp_path / "out" / "phase1")
    with pytest.raises(ValueError, match=r"--phase: the checkpoint has 1, this run 2 \(pass --phase 1 as before\)"):
        run_training(small_args(tmp_path, phase="2", init_from=adapter, resume_from_checkpoint="latest"))


def test_cpu_launch_with_two_processes_says_it_trains_in_one(tmp_path):
    # `accelerate launch --cpu --num_processes 2` starts a single process: the run must say so, and log its world size.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines",
               "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "examples" / "train_lpt.py"),
               *COMMON, "--phase", "1", "--epochs_phase1", "1", "--max_steps_per_epoch", "1", "--val_per_class", "0",
               "--output_dir", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Training with 1 process(es) (world size 1) on cpu" in result.stderr
    assert "global batch 8 = 8 per process and branch x 1 process(es)" in result.stderr
    assert "this run trains in ONE process" in result.stderr


def test_loss_and_sampler_options_name_registered_classes(tmp_path):
    with pytest.raises(ValueError, match=r"--loss 'focall' is not a registered loss; choose one of agcl, ce, logit"):
        small_args(tmp_path, loss="focall")
    with pytest.raises(ValueError, match=r"--sampler 'dul' is not a registered sampler; choose one of .*dual"):
        small_args(tmp_path, sampler="dul")
    with pytest.raises(ValueError, match="--sampler dual contradicts --dual_sampling false"):
        small_args(tmp_path, sampler="dual", dual_sampling=False)
    assert small_args(tmp_path).sampler_name == "dual"  # the paper recipe stays the default
    assert small_args(tmp_path, dual_sampling=False).sampler_name == "class_balanced"
    assert small_args(tmp_path, sampler="Instance-Balanced").sampler_name == "instance_balanced"


# ------------------------------------------------------------------------------------------- the loop's batch split
def test_batch_parts_and_their_matching_terms_come_from_the_model_output():
    from peft import get_peft_model

    from lpt_peft.training.loop import split_batch

    torch.manual_seed(0)
    config = LPTConfig(num_labels=6, shared_layers=2, num_groups=4, top_k=2, phase=2)
    model = get_peft_model(tiny_random_vit(32), config).eval()
    output = model(pixel_values=torch.randn(6, 3, 32, 32))
    targets = torch.arange(6)
    (cb_logits, cb_labels, cb_match), (ib_logits, ib_labels, ib_match) = split_batch(output, targets, (4, 2))
    assert torch.equal(cb_logits, output.logits[:4]) and torch.equal(ib_logits, output.logits[4:])
    assert torch.equal(cb_labels, targets[:4]) and torch.equal(ib_labels, targets[4:])
    # By hand: an image's matching term is the sum of its top-k key similarities; a part's score is their mean.
    per_image = output.key_similarity.topk(2, dim=-1).values.sum(dim=-1)
    assert cb_match.item() == pytest.approx(per_image[:4].mean().item(), rel=1e-6)
    assert ib_match.item() == pytest.approx(per_image[4:].mean().item(), rel=1e-6)
    # The model's own whole-batch score is the size-weighted mean of the parts.
    assert ((4 * cb_match + 2 * ib_match) / 6).item() == pytest.approx(output.match_score.item(), rel=1e-6)
    assert cb_match.requires_grad  # the keys learn from it
    # One part: the model's score itself.
    ((logits, labels, match),) = split_batch(output, targets, (6,))
    assert match is output.match_score and torch.equal(logits, output.logits)
    with pytest.raises(ValueError, match=r"split_sizes \(3, 2\) add up to 5 but its batch has 6 images"):
        split_batch(output, targets, (3, 2))
    model.base_model.set_phase(1)
    output = model(pixel_values=torch.randn(6, 3, 32, 32))
    assert [part[2] for part in split_batch(output, targets, (4, 2))] == [None, None]
