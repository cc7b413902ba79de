"""The training recipe: `--recipe` presets, the learning rate chosen on the validation split, and the cosine head
initialised from class prototypes, each against a hand-computed or independently computed reference."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from lpt_peft.backbones import tiny_random_vit
from lpt_peft.data.synthetic import make_synthetic_long_tail
from lpt_peft.data.transforms import LPTImageTransform
from lpt_peft.training import recipe
from lpt_peft.training.arguments import LPTTrainingArguments, parse_training_args
from lpt_peft.training.builders import build_peft_model
from lpt_peft.training.checkpointing import TrainerState
from lpt_peft.training.loop import train_phase
from lpt_peft.training.recipe import (
    RECIPES,
    class_prototypes,
    initialize_head_from_prototypes,
    learning_rate_trial,
    mean_per_class_accuracy,
    pick_learning_rate,
    search_learning_rate,
)
from lpt_peft.training.run import run_training

SMALL = dict(
    dataset="synthetic", model_name_or_path="tiny-random", image_size=32, num_classes=6, n_max=40, imbalance=10,
    val_per_class=4, batch_size=8, num_groups=4, shared_layers=2, num_workers=0, report_to="none",
    eval_batch_size=16,
)  # fmt: skip


def small_args(output_dir, **overrides):
    return LPTTrainingArguments(**{**SMALL, "output_dir": str(output_dir), **overrides})


def tiny_model(args, data, seed=0):
    torch.manual_seed(seed)
    return build_peft_model(tiny_random_vit(args.image_size), args, data.num_classes)


def data_for(args):
    return make_synthetic_long_tail(
        num_classes=args.num_classes, n_max=args.n_max, imbalance=args.imbalance, val_per_class=args.val_per_class,
        image_size=args.image_size,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- presets
def test_paper_recipe_gives_the_papers_values_and_explicit_options_override_it():
    args = parse_training_args(["--recipe", "paper"])
    paper = {
        "learning_rate": 0.02,
        "lr_reference_batch": 256,
        "weight_decay": 0.01,
        "momentum": 0.9,
        "warmup_epochs": 1.0,
        "select_learning_rate": False,
        "head_init": "random",
        "logit_scale": 20.0,
    }  # fmt: skip (LPT.md: SGD momentum 0.9, wd 0.01, lr 0.02 at batch 256, 1 warm-up epoch, random head, z = 20 c')
    assert {k: getattr(args, k) for k in paper} == paper and args.recipe_overrides == {}
    default = parse_training_args([])
    assert (default.recipe, default.select_learning_rate, default.head_init) == ("lpt_peft", True, "prototypes")
    assert (default.learning_rate, default.weight_decay, default.momentum) == (0.02, 0.01, 0.9)
    assert default.logit_scale == 40.0
    # An explicit option wins over the preset, on the command line, in Python, and even when it equals the other
    # preset's value; the override is recorded.
    args = parse_training_args(["--recipe", "paper", "--learning_rate", "0.1", "--head_init", "prototypes"])
    assert (args.learning_rate, args.head_init, args.select_learning_rate) == (0.1, "prototypes", False)
    assert args.recipe_overrides == {"learning_rate": (0.1, 0.02), "head_init": ("prototypes", "random")}
    args = LPTTrainingArguments(recipe="paper", select_learning_rate=True, weight_decay=0.0)
    assert (args.select_learning_rate, args.weight_decay, args.head_init) == (True, 0.0, "random")
    with pytest.raises(ValueError, match="--recipe must be one of lpt_peft, paper, got 'fast'"):
        LPTTrainingArguments(recipe="fast")
    with pytest.raises(ValueError, match="--head_init must be one of prototypes, random"):
        LPTTrainingArguments(head_init="zeros")
    with pytest.raises(ValueError, match="--learning_rate_grid must hold one or more rates > 0"):
        LPTTrainingArguments(learning_rate_grid=[0.1, -1.0])
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--logit_scale must be a finite number > 0"):
            LPTTrainingArguments(logit_scale=bad)
    assert set(RECIPES["paper"]) == set(RECIPES["lpt_peft"])


def test_configs_name_their_recipe():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    expected = {"places_lt": "paper", "imagenet_lt": "paper", "inat2018": "paper", "cifar100_lt": "paper"}
    for name, preset in expected.items():
        args = parse_training_args(["--config", str(root / f"{name}.yaml")])
        assert args.recipe == preset and args.head_init == "random" and not args.select_learning_rate, name
    demo = parse_training_args(["--config", str(root / "demo_fashion_mnist.yaml")])
    assert demo.recipe == "lpt_peft" and demo.select_learning_rate and demo.head_init == "prototypes"


def test_logit_scale_reaches_the_loss_the_adapter_and_the_agcl_probe(tmp_path, monkeypatch):
    """`--logit_scale` is A-GCL's s in z = s * c' on both branches (checked against the loss written out by hand), the
    adapter's `logit_scale`, and the A-GCL probe's; a registered loss without `scale` is built without it."""
    from lpt_peft.training import baselines
    from lpt_peft.training.builders import lpt_config_from_args, objective_from_args
    from lpt_peft.training.losses import LOSSES, register_loss

    args = small_args(tmp_path, logit_scale=33.0)
    objective = objective_from_args(args, [8, 4, 2], num_epochs=2)
    assert objective.cb_loss.scale == objective.ib_loss.scale == 33.0
    assert lpt_config_from_args(args, 3, None).logit_scale == 33.0
    # By hand (LPT.md, A-GCL with gamma_pos 0, gamma_neg 4, no noise): z = s * (c - margin at the target).
    cosines, labels = torch.tensor([[0.3, -0.2, 0.1]]), torch.tensor([1])
    z = 33.0 * (cosines - 0.1 * F.one_hot(labels, 3))
    p = z.softmax(-1)
    weights = torch.where(F.one_hot(labels, 3).bool(), torch.ones_like(p), p**4)
    targets = 0.9 * F.one_hot(labels, 3) + 0.1 / 3
    expected = -(targets * weights * p.log()).sum()
    got = objective.cb_loss(cosines, labels, noise=torch.zeros(1, 3))
    assert torch.allclose(got, expected, atol=1e-6)

    monkeypatch.setattr("lpt_peft.training.losses.LOSSES", dict(LOSSES))

    @register_loss("unscaled_ce")
    class UnscaledCE(torch.nn.Module):
        def forward(self, logits, labels, noise=None):
            return F.cross_entropy(logits, labels)

    assert isinstance(objective_from_args(small_args(tmp_path, loss="unscaled_ce"), [8, 4], 1).cb_loss, UnscaledCE)

    seen = []
    real = baselines.LPTObjective
    monkeypatch.setattr(baselines, "LPTObjective", lambda *a, **k: seen.append(k.get("scale")) or real(*a, **k))
    features, labels = torch.randn(12, 8), torch.tensor([0] * 8 + [1] * 4)
    baselines.train_linear_probe(
        "linear_probe_agcl", features, labels, [8, 4], epochs=1, batch_size=4, samples_per_class=2, logit_scale=33.0
    )
    assert seen == [33.0]


# ------------------------------------------------------------------------------------------- selection rule
def test_pick_learning_rate_is_the_argmax_with_ties_to_the_smallest_rate():
    assert pick_learning_rate([0.01, 0.1, 1.0], [50.0, 70.0, 60.0]) == 0.1
    assert pick_learning_rate([1.0, 0.1, 0.01], [70.0, 70.0, 60.0]) == 0.1  # tie: the smaller of 1.0 and 0.1
    assert pick_learning_rate([0.01, 0.1, 1.0], [70.0, 70.0, 70.0]) == 0.01
    assert pick_learning_rate([0.01, 0.1, 1.0], [50.0, math.nan, 40.0]) == 0.01  # a diverged trial never wins
    with pytest.raises(ValueError, match="Every learning-rate trial diverged"):
        pick_learning_rate([0.1], [math.nan])
    with pytest.raises(ValueError, match="one score per candidate"):
        pick_learning_rate([0.1, 1.0], [1.0])


def test_mean_per_class_accuracy_weighs_classes_equally_and_skips_absent_ones():
    # 3 classes present: 100, 50 and 0 % -> 50 %, whatever their sample counts; class 2 has no sample (nan).
    assert mean_per_class_accuracy({"per_class": [100.0, 50.0, math.nan, 0.0]}) == 50.0


def test_search_with_a_stubbed_trial_picks_the_argmax_of_known_scores():
    known = {0.01: 20.0, 0.03: 55.0, 0.1: 80.0, 0.3: 80.0, 1.0: 10.0}
    called = []

    def trial(lr):
        called.append(lr)
        return known[lr]

    selection = search_learning_rate(list(known), trial, phase=1, trial_steps=7)
    assert called == list(known)
    assert selection.to_dict() == {
        "phase": 1, "candidates": list(known), "scores": list(known.values()), "chosen": 0.1, "trial_steps": 7,
        "metric": "val_mean_per_class_accuracy", "restarts": [],
    }  # fmt: skip


def _hand_trial_score(model, data, args, lr, steps):
    """The trial by hand: `steps` phase-1 steps at `lr` through `train_phase` (the warm-up share of the full schedule),
    then the mean over classes of the validation accuracy, image by image."""
    trial_args = copy.copy(args)
    trial_args.learning_rate, trial_args.epochs_phase1, trial_args.max_steps_per_epoch = lr, 1, steps
    trial_args.warmup_epochs = args.warmup_epochs / args.epochs_phase1
    no_val = copy.copy(data)
    no_val.val = None
    train_phase(model, 1, no_val, trial_args, Accelerator(cpu=True), recipe._NoCheckpoints(), TrainerState())
    model.eval()
    transform = LPTImageTransform(args.image_size, train=False, mean=args.mean, std=args.std)
    hits = {}
    with torch.no_grad():
        for row in data.val:
            pixels = transform(row["image"].convert("RGB")).unsqueeze(0)
            hits.setdefault(row["label"], []).append(int(model(pixel_values=pixels).logits.argmax()) == row["label"])
    return sum(100.0 * sum(h) / len(h) for h in hits.values()) / len(hits)


def test_real_trials_score_like_a_hand_run_restore_the_adapter_and_pick_the_argmax(tmp_path):
    args = small_args(tmp_path, head_init="random", epochs_phase1=2, lr_trial_steps=3)
    data = data_for(args)
    accelerator = Accelerator(cpu=True)
    model = tiny_model(args, data)
    start = {k: v.clone() for k, v in model.state_dict().items() if "lpt_" in k}
    grid = [1e-4, 0.3, 3.0]
    torch.manual_seed(5)
    trial = learning_rate_trial(model, 1, data, args, accelerator, tmp_path / "trials")
    selection = search_learning_rate(grid, trial, phase=1, trial_steps=3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in start.items())  # every trial starts from the start
    assert trial(grid[1]) == selection.scores[1]  # same stream each time
    expected = []
    for lr in grid:
        fresh = tiny_model(args, data)
        torch.manual_seed(5)
        expected.append(_hand_trial_score(fresh, data, args, lr, steps=3))
    assert selection.scores == pytest.approx(expected, abs=1e-9)
    assert selection.chosen == pick_learning_rate(grid, expected)
    assert len(set(expected)) > 1, f"the trials should tell the rates apart: {expected}"


def test_a_trial_that_raises_still_restores_the_adapter(tmp_path, monkeypatch):
    """The weights a trial trained are put back even when the trial fails after training (here: its validation)."""
    from lpt_peft.training import loop

    args = small_args(tmp_path, head_init="random", epochs_phase1=2, lr_trial_steps=2)
    data = data_for(args)
    model = tiny_model(args, data)
    start = {k: v.clone() for k, v in model.state_dict().items() if "lpt_" in k}
    trained = []
    real_train_phase = loop.train_phase
    monkeypatch.setattr(loop, "train_phase", lambda *a, **k: trained.append(real_train_phase(*a, **k)))
    trained_weights = []

    def failing_evaluate(*args, **kwargs):
        trained_weights.extend(v.clone() for k, v in model.state_dict().items() if "lpt_" in k)
        raise RuntimeError("validation failed")

    monkeypatch.setattr(loop, "evaluate", failing_evaluate)
    trial = learning_rate_trial(model, 1, data, args, Accelerator(cpu=True), tmp_path / "trials")
    with pytest.raises(RuntimeError, match="validation failed"):
        trial(0.3)
    assert trained, "the trial trained before it failed"
    assert any(not torch.equal(v, p) for v, p in zip(start.values(), trained_weights)), "training changed weights"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in start.items())


# ------------------------------------------------------------------------------------------- prototypes
def test_prototype_head_equals_hand_computed_normalised_class_means(tmp_path):
    args = small_args(tmp_path, n_max=12, imbalance=4)
    data = data_for(args)
    model = tiny_model(args, data)
    prototypes = initialize_head_from_prototypes(model, data, args, Accelerator(cpu=True))
    # Independently: one image at a time, eval transform, the model's CLS feature; class sums in float64.
    transform = LPTImageTransform(args.image_size, train=False, mean=args.mean, std=args.std)
    sums, counts = {}, {}
    model.eval()
    with torch.no_grad():
        for row in data.train:
            pixels = transform(row["image"].convert("RGB")).unsqueeze(0)
            feature = model(pixel_values=pixels).features[0].double()
            sums[row["label"]] = sums.get(row["label"], 0) + feature
            counts[row["label"]] = counts.get(row["label"], 0) + 1
    expected = torch.stack([F.normalize(sums[c] / counts[c], dim=0) for c in range(data.num_classes)]).float()
    assert [counts[c] for c in range(data.num_classes)] == data.train_class_counts
    head = model.base_model.lpt_head["default"]
    assert head.shape == (model.peft_config["default"].hidden_size, data.num_classes)
    torch.testing.assert_close(prototypes, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(head.detach().t(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(head.detach().norm(dim=0), torch.ones(data.num_classes))
    assert head.requires_grad  # still the trainable phase-1 head


def test_prototypes_refuse_a_class_without_images(tmp_path):
    args = small_args(tmp_path)
    data = data_for(args)
    model = tiny_model(args, data)
    from lpt_peft.training.data import make_eval_loader

    loader = make_eval_loader(data.train.filter(lambda row: row["label"] != 3), args, Accelerator(cpu=True))
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] have no training image"):
        class_prototypes(model, loader, Accelerator(cpu=True), data.num_classes)


# ------------------------------------------------------------------------------------------- in a run
def _val_accuracy(out):
    return json.loads((out / "results.json").read_text())["LPT phase 1"]["best_val_overall"]


def test_selection_rescues_a_bad_fixed_rate_and_is_recorded(tmp_path):
    # A random head and a rate far too small: the fixed run stays near chance; the selection finds a usable rate.
    common = dict(
        phase="1", head_init="random", epochs_phase1=3, learning_rate=1e-5, max_steps_per_epoch=5, lr_trial_steps=5
    )
    run_training(small_args(tmp_path / "fixed", select_learning_rate=False, **common))
    run_training(small_args(tmp_path / "selected", learning_rate_grid=[1e-5, 0.3, 3.0], **common))
    fixed, selected = _val_accuracy(tmp_path / "fixed"), _val_accuracy(tmp_path / "selected")
    assert fixed <= 40.0 and selected >= fixed + 30.0, (fixed, selected)
    row = json.loads((tmp_path / "selected" / "results.json").read_text())["LPT phase 1"]
    selection = row["learning_rate_selection"]
    assert row["learning_rate"] == selection["chosen"] != 1e-5
    assert selection["chosen"] == pick_learning_rate(selection["candidates"], selection["scores"])
    fixed_row = json.loads((tmp_path / "fixed" / "results.json").read_text())["LPT phase 1"]
    assert "learning_rate_selection" not in fixed_row and fixed_row["learning_rate"] == 1e-5
    assert not (tmp_path / "selected" / "lr_search").exists()  # the trials leave nothing behind
    latest = tmp_path / "selected" / "checkpoints" / (tmp_path / "selected" / "checkpoints" / "latest").read_text()
    state = TrainerState.load(latest / "trainer_state.json")
    assert state.run["lr_selection"]["phase1"] == selection
    assert state.run["options"]["head_init"] == "random" and state.run["options"]["recipe"] == "lpt_peft"


class _Crash(RuntimeError):
    pass


def test_resume_reuses_the_recorded_choice_and_continues_exactly(tmp_path, monkeypatch):
    options = dict(phase="1", epochs_phase1=2, max_steps_per_epoch=3, learning_rate_grid=[0.03, 0.3], lr_trial_steps=2)
    run_training(small_args(tmp_path / "straight", **options))
    # Interrupted after epoch 0's checkpoint: the first epoch-1 step raises.
    from lpt_peft.training import loop

    class CrashInEpoch1(loop.TrainingCallback):
        def on_step_end(self, phase, state):
            if state.epoch == 1:
                raise _Crash

    monkeypatch.setattr("lpt_peft.training.run.callbacks_from_env", lambda: [CrashInEpoch1()])
    with pytest.raises(_Crash):
        run_training(small_args(tmp_path / "resumed", **options))
    monkeypatch.undo()

    def no_search(*args, **kwargs):
        raise AssertionError("a resumed phase must reuse its recorded learning rate, not search again")

    monkeypatch.setattr(recipe, "select_phase_learning_rate", no_search)
    run_training(small_args(tmp_path / "resumed", resume_from_checkpoint="latest", **options))
    rows = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("straight", "resumed")}
    assert rows["resumed"] == rows["straight"]
    from safetensors.torch import load_file

    straight = load_file(tmp_path / "straight" / "phase1" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "phase1" / "adapter_model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_without_validation_split_selection_falls_back_or_refuses_when_asked(tmp_path, caplog):
    with pytest.raises(ValueError, match="--select_learning_rate true needs a validation split"):
        run_training(small_args(tmp_path / "asked", val_per_class=0, select_learning_rate=True, phase="1"))
    assert not (tmp_path / "asked" / "checkpoints").exists()
    with caplog.at_level("WARNING"):
        run_training(
            small_args(tmp_path / "default", val_per_class=0, phase="1", epochs_phase1=1, max_steps_per_epoch=1)
        )
    assert "no validation split: the learning rate is not selected; training uses --learning_rate 0.02" in caplog.text
    row = json.loads((tmp_path / "default" / "results.json").read_text())["LPT phase 1"]
    assert row["learning_rate"] == 0.02 and "learning_rate_selection" not in row


# ------------------------------------------------------------------------------------------- phase length
def test_phase_epochs_reach_the_images_per_class_floor_by_hand_count():
    from lpt_peft.training.samplers import create_sampler

    args = small_args("unused", epochs_phase1=1, epochs_phase2=5, min_images_per_class=100)
    data = data_for(args)
    labels = [row["label"] for row in data.train]
    assert len(labels) == 100 and data.num_classes == 6
    # One process: ceil(100 / 8) = 13 steps of 8 + 8 images (dual sampling) = 208 images per epoch; 100 images for
    # each of 6 classes need ceil(600 / 208) = 3 epochs.
    one = create_sampler("dual", labels, 8, num_replicas=1, rank=0)
    assert (len(one), one.split_sizes) == (13, (8, 8))
    assert recipe.phase_epochs(args, 1, one, 6, 1) == 3
    assert recipe.phase_epochs(args, 2, one, 6, 1) == 5  # never fewer than given
    # Two processes: ceil(100 / 16) = 7 steps x 16 images x 2 processes = 224 per epoch -> ceil(600 / 224) = 3.
    two = create_sampler("dual", labels, 8, num_replicas=2, rank=1)
    assert len(two) == 7 and recipe.phase_epochs(args, 1, two, 6, 2) == 3
    assert recipe.phase_epochs(dataclasses_replace(args, min_images_per_class=700), 1, two, 6, 2) == 19  # 4200/224
    # Unset, or a quick run with --max_steps_per_epoch: the epochs as given.
    assert recipe.phase_epochs(dataclasses_replace(args, min_images_per_class=None), 1, one, 6, 1) == 1
    assert recipe.phase_epochs(dataclasses_replace(args, max_steps_per_epoch=2), 1, one, 6, 1) == 1
    with pytest.raises(ValueError, match="--min_images_per_class must be >= 1, got 0"):
        small_args("unused", min_images_per_class=0)


def dataclasses_replace(args, **changes):
    new = copy.copy(args)
    for name, value in changes.items():
        setattr(new, name, value)
    return new


# ------------------------------------------------------------------------------------------- collapse guard
def _selection(candidates, scores, chosen):
    return recipe.LearningRateSelection(1, candidates, scores, chosen, trial_steps=8)


def test_collapse_threshold_is_the_best_smaller_trial_and_the_next_smaller_rate():
    # MNIST-LT seed 44's trials (docs/results.md), with a third candidate whose trial diverged.
    selection = _selection([0.01, 0.05, 0.2], [27.0, 35.5, math.nan], 0.05)
    assert recipe.collapse_threshold(selection, 0.2) == (35.5, 0.05)
    assert recipe.collapse_threshold(selection, 0.05) == (27.0, 0.01)
    assert recipe.collapse_threshold(selection, 0.01) is None  # nothing smaller to fall back to
    assert recipe.collapse_threshold(_selection([0.01, 0.05], [math.nan, 40.0], 0.05), 0.05) is None
    assert recipe.collapse_threshold(_selection([0.05, 0.01, 0.02], [50.0, 30.0, 20.0], 0.05), 0.05) == (30.0, 0.02)


def test_collapse_guard_checks_only_the_phases_first_validated_epoch():
    guard = recipe.CollapseGuard(phase=1, learning_rate=0.05, threshold=27.0, fallback=0.01)
    metric = recipe.SELECTION_METRIC
    state = TrainerState()

    def epoch_end(record):
        state.history.append(record)
        guard.on_epoch_end(record["phase"], state, record)

    epoch_end({"phase": 1, "epoch": 0, "train_loss": 1.0})  # not validated (--eval_every_epochs): not judged yet
    with pytest.raises(recipe.PhaseCollapsed, match=r"val_mean_per_class_accuracy 10.00% .* below 27.00%") as err:
        epoch_end({"phase": 1, "epoch": 1, metric: 10.0})
    assert (err.value.learning_rate, err.value.score, err.value.fallback) == (0.05, 10.0, 0.01)
    for score in (math.nan, 26.99):
        state.history = []
        with pytest.raises(recipe.PhaseCollapsed):
            epoch_end({"phase": 1, "epoch": 0, metric: score})
    state.history = []
    epoch_end({"phase": 1, "epoch": 0, metric: 27.0})  # at the threshold: passes
    epoch_end({"phase": 1, "epoch": 1, metric: 5.0})  # later epochs are judged by validation, not by the guard
    guard.on_epoch_end(2, TrainerState(), {"phase": 2, "epoch": 0, metric: 1.0})  # another phase: not its business


def test_guard_restarts_a_collapsed_phase_exactly_as_a_run_at_the_fallback_rate(tmp_path, monkeypatch):
    # The trials are stubbed to prefer a rate that diverges (1e4) over one that trains (0.05), as MNIST-LT seed 44's
    # 8-step trials preferred 0.05 over 0.01. The guard must restart phase 1 from its start at 0.05, and the run must
    # then equal, bit for bit, a run trained at 0.05 from the start.
    stub_scores = {0.05: 50.0, 1e4: 60.0}
    monkeypatch.setattr(recipe, "learning_rate_trial", lambda *args, **kwargs: stub_scores.__getitem__)
    options = dict(phase="1", epochs_phase1=1, lr_trial_steps=2, min_images_per_class=60)
    run_training(small_args(tmp_path / "guarded", learning_rate_grid=[0.05, 1e4], **options))
    run_training(small_args(tmp_path / "fixed", select_learning_rate=False, learning_rate=0.05, **options))
    rows = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("guarded", "fixed")}
    guarded, fixed = rows["guarded"]["LPT phase 1"], rows["fixed"]["LPT phase 1"]
    selection = guarded.pop("learning_rate_selection")
    assert selection["chosen"] == 0.05 and selection["scores"] == [50.0, 60.0]
    ((restart),) = selection["restarts"]
    assert restart["learning_rate"] == 1e4 and restart["threshold"] == 50.0 and not restart["score"] >= 50.0
    assert guarded == fixed  # test accuracy, best epoch, learning rate 0.05, epochs
    # --epochs_phase1 1 raised: 13 steps x 16 images = 208 per epoch; 60 per class x 6 need ceil(360 / 208) = 2.
    assert guarded["epochs"] == 2
    from safetensors.torch import load_file

    weights = {name: load_file(tmp_path / name / "phase1" / "adapter_model.safetensors") for name in rows}
    assert weights["guarded"].keys() == weights["fixed"].keys()
    assert all(torch.equal(weights["guarded"][k], weights["fixed"][k]) for k in weights["fixed"])
    latest = tmp_path / "guarded" / "checkpoints" / (tmp_path / "guarded" / "checkpoints" / "latest").read_text()
    state = TrainerState.load(latest / "trainer_state.json")
    assert state.run["lr_selection"]["phase1"] == selection  # a resume continues at 0.05
    assert [r["epoch"] for r in state.history] == [0, 1]  # the collapsed attempt's epoch is not in the history


def test_a_run_interrupted_after_a_restart_resumes_at_the_fallback_rate_exactly(tmp_path, monkeypatch):
    # Guarded as above; the run is interrupted in the restarted attempt's second epoch and resumed from its latest
    # checkpoint: it must continue at the fallback rate (not search, not restart again) and end where the straight
    # run ends.
    from lpt_peft.training import loop

    stub_scores = {0.05: 50.0, 1e4: 60.0}
    monkeypatch.setattr(recipe, "learning_rate_trial", lambda *args, **kwargs: stub_scores.__getitem__)
    options = dict(phase="1", epochs_phase1=2, lr_trial_steps=2, learning_rate_grid=[0.05, 1e4], max_steps_per_epoch=4)
    run_training(small_args(tmp_path / "straight", **options))

    class CrashInEpoch1(loop.TrainingCallback):
        def on_step_end(self, phase, state):
            if state.epoch == 1 and state.run["lr_selection"]["phase1"]["restarts"]:
                raise _Crash

    monkeypatch.setattr("lpt_peft.training.run.callbacks_from_env", lambda: [CrashInEpoch1()])
    with pytest.raises(_Crash):
        run_training(small_args(tmp_path / "resumed", **options))
    monkeypatch.setattr("lpt_peft.training.run.callbacks_from_env", lambda: [])
    monkeypatch.setattr(recipe, "select_phase_learning_rate", lambda *a, **k: pytest.fail("searched again"))
    run_training(small_args(tmp_path / "resumed", resume_from_checkpoint="latest", **options))
    rows = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("straight", "resumed")}
    assert rows["resumed"] == rows["straight"]
    assert rows["straight"]["LPT phase 1"]["learning_rate_selection"]["chosen"] == 0.05
    from safetensors.torch import load_file

    straight = load_file(tmp_path / "straight" / "phase1" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "phase1" / "adapter_model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


# ------------------------------------------------------------------------------------------- which phase
def test_best_phase_by_validation_by_hand():
    def rows(val1, val2):
        return {"LPT phase 1": {"best_val_overall": val1}, "LPT phase 2": {"best_val_overall": val2}}

    assert recipe.best_phase_by_validation(rows(64.0, 63.5)) == 1  # the demo's seed 42 with 3 + 3 epochs
    assert recipe.best_phase_by_validation(rows(64.0, 64.5)) == 2
    assert recipe.best_phase_by_validation(rows(64.0, 64.0)) == 2  # a tie keeps the paper's final model
    assert recipe.best_phase_by_validation(rows(None, 64.0)) is None  # no validation split: nothing to choose on
    assert recipe.best_phase_by_validation(rows(math.nan, 64.0)) is None
    assert recipe.best_phase_by_validation({"LPT phase 2": {"best_val_overall": 64.0}}) is None
    same, other = rows(64.0, 63.5), rows(64.0, 63.5)  # validated on the same data: compared
    for fingerprint, row in zip(("a", "a"), same.values()):
        row["validation_data"] = fingerprint
    assert recipe.best_phase_by_validation(same) == 1
    for fingerprint, row in zip(("a", "b"), other.values()):  # on other data (a rerun with other options): not
        row["validation_data"] = fingerprint
    assert recipe.best_phase_by_validation(other) is None


def test_a_two_phase_run_reports_the_phase_chosen_on_validation(tmp_path, monkeypatch, caplog):
    common = dict(epochs_phase1=1, epochs_phase2=1, max_steps_per_epoch=2, select_learning_rate=False)
    run_training(small_args(tmp_path / "both", **common))
    rows = json.loads((tmp_path / "both" / "results.json").read_text())
    val1, val2 = (rows[f"LPT phase {p}"]["best_val_overall"] for p in (1, 2))
    chosen = 1 if val1 > val2 else 2
    assert rows[recipe.BEST_PHASE_ROW] == {**rows[f"LPT phase {chosen}"], "phase": chosen}
    assert recipe.BEST_PHASE_ROW in (tmp_path / "both" / "results.md").read_text()
    # Phase 2 trained again into the same folder (its phase-1 row stays): the choice is made again from the new row.
    results = tmp_path / "both" / "results.json"
    results.write_text(json.dumps({**rows, "LPT phase 1": {**rows["LPT phase 1"], "best_val_overall": 101.0}}))
    again = dict(phase="2", init_from=str(tmp_path / "both" / "phase1"), overwrite_output_dir=True, seed=7)
    run_training(small_args(tmp_path / "both", **common, **again))
    rows = json.loads(results.read_text())
    assert rows[recipe.BEST_PHASE_ROW] == {**rows["LPT phase 1"], "phase": 1}  # 101% on val beats any phase 2
    # No phase-1 row left to compare with: a best-phase row from before is removed, not kept stale.
    results.write_text(json.dumps({k: v for k, v in rows.items() if k != "LPT phase 1"}))
    run_training(small_args(tmp_path / "both", **common, **again))
    assert set(json.loads(results.read_text())) == {"LPT phase 2"}
    run_training(small_args(tmp_path / "one", phase="1", **common))  # one phase: nothing to choose between
    assert recipe.BEST_PHASE_ROW not in json.loads((tmp_path / "one" / "results.json").read_text())
    # Phase 2 again, on the same data and then on other validation data, whose scores do not compare: no choice.
    again = {**again, "init_from": str(tmp_path / "one" / "phase1")}
    run_training(small_args(tmp_path / "one", **common, **again))
    rows = json.loads((tmp_path / "one" / "results.json").read_text())
    assert recipe.BEST_PHASE_ROW in rows  # same data: chosen
    with caplog.at_level("WARNING"):
        run_training(small_args(tmp_path / "one", val_per_class=2, **common, **again))
    rows = json.loads((tmp_path / "one" / "results.json").read_text())
    assert recipe.BEST_PHASE_ROW not in rows and "not validated on the same data" in caplog.text
    assert rows["LPT phase 1"]["validation_data"] != rows["LPT phase 2"]["validation_data"]


def test_a_phase_2_rerun_that_fails_leaves_no_row_of_the_adapter_it_replaced(tmp_path, monkeypatch):
    from lpt_peft.training import loop

    common = dict(epochs_phase1=1, epochs_phase2=1, max_steps_per_epoch=2, select_learning_rate=False)
    run_training(small_args(tmp_path, **common))
    assert {"LPT phase 2", recipe.BEST_PHASE_ROW} <= set(json.loads((tmp_path / "results.json").read_text()))

    class CrashAtFirstStep(loop.TrainingCallback):
        def on_step_end(self, phase, state):
            raise _Crash

    monkeypatch.setattr("lpt_peft.training.run.callbacks_from_env", lambda: [CrashAtFirstStep()])
    again = dict(phase="2", init_from=str(tmp_path / "phase1"), overwrite_output_dir=True)
    with pytest.raises(_Crash):
        run_training(small_args(tmp_path, **common, **again))
    assert not (tmp_path / "phase2").exists()  # the overwrite removed the old phase-2 adapter ...
    for name in ("results.json", "per_class_accuracy.json"):  # ... and with it every row that described it
        assert set(json.loads((tmp_path / name).read_text())) == {"LPT phase 1"}
    assert "LPT phase 2" not in (tmp_path / "results.md").read_text()
    assert "LPT phase 1" in (tmp_path / "results.md").read_text()
