"""benchmarks/recipe_benchmark.py: plan, commands, resume-skip, report (medians, acceptance) and plots.

The fast tests replace the training subprocess by a stand-in that returns fixed rows (the script's own logic is what
they check); the slow test runs the real `--quick` mode end to end on a tiny generated set.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml


def _load():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "recipe_benchmark.py"
    spec = importlib.util.spec_from_file_location("recipe_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rb():
    return _load()


def _rows(seed, variant):
    base = {"many": 90.0, "medium": 60.0}
    if variant != "main":
        return {"LPT phase 2": {"overall": 50.0 + seed, "few": 30.0, **base, "best_val_overall": 55.0}}
    return {
        "Linear probe (CE)": {"overall": 60.0 + seed, "few": 20.0 + seed, **base},
        "Linear probe (A-GCL, dual sampling)": {"overall": 58.0, "few": 50.0, **base},
        "LPT phase 1": {"overall": 62.0 + seed, "few": 35.0, **base, "best_val_overall": 70.0},
        "LPT phase 2": {"overall": 61.0 + seed, "few": 31.0, **base, "best_val_overall": 65.0 + 10 * (seed == 1)},
    }


@pytest.fixture
def fake_runs(rb, monkeypatch):
    calls = []

    def run_variant(name, seed, variant, args):
        calls.append((name, seed, variant))
        return {"rows": _rows(seed, variant), "wall_s": 10.0, "cpu_s": 15.0, "command": []}

    def group_heatmap(name, seed, args):
        return {"counts": [[3, 1], [0, 4]], "class_names": ["a", "b"], "train_counts": [5, 50]}

    monkeypatch.setattr(rb, "run_variant", run_variant)
    monkeypatch.setattr(rb, "group_heatmap", group_heatmap)
    return calls


def test_run_resumes_and_reports(rb, fake_runs, tmp_path, capsys):
    argv = ["--sets", "mnist_lt", "--num_seeds", "3", "--first_seed", "0", "--output_dir", str(tmp_path)]
    report = rb.main(argv)
    assert fake_runs == [("mnist_lt", 0, "main"), ("mnist_lt", 1, "main"), ("mnist_lt", 2, "main")]
    store = json.loads((tmp_path / "store.json").read_text())
    assert sorted(store["runs"]) == ["mnist_lt/0/main", "mnist_lt/1/main", "mnist_lt/2/main"]
    assert "[3/3] mnist_lt seed 2 main" in capsys.readouterr().out
    # Run again with one more seed: only the new (set, seed, variant) runs.
    rb.main([*argv[:3], "4", *argv[4:]])
    assert fake_runs[3:] == [("mnist_lt", 3, "main")]
    text = report.read_text()
    # Best phase by val: phase 1 (val 70 > 65) except seed 1 (75 > 70: phase 2). Overall 62, 62, 64, 65 -> median 63.
    assert "| LPT (best phase by val) | 63.00 |" in text
    assert "| Linear probe (CE) | 61.50 |" in text  # 60, 61, 62, 63
    assert "62.00, 62.00, 64.00, 65.00" in text  # per-seed overall of the best phase
    assert "LPT best phase overall 63.00 >= CE probe 61.50: **met**" in text
    assert "few 35.00 >= CE probe few 21.50 + 10: **met**" in text  # few: 35, 31, 35, 35 -> 35
    assert "phase 2 - phase 1 overall per seed: -1.00, -1.00, -1.00, -1.00" in text
    assert (tmp_path / "mnist_lt_bars.png").stat().st_size > 0
    assert (tmp_path / "mnist_lt_group_heatmap.png").stat().st_size > 0


def test_acceptance_not_met(rb):
    table = {
        rb.CE: {"overall": [70.0], "few": [30.0]},
        rb.BEST: {"overall": [69.0], "few": [39.0]},
    }
    lines = "\n".join(rb.acceptance(table))
    assert "69.00 >= CE probe 70.00: **not met**" in lines and "39.00 >= CE probe few 30.00 + 10: **not met**" in lines


def test_ablation_plan_and_commands(rb, fake_runs, tmp_path):
    rb.main(["--sets", "fashion_mnist_lt", "--num_seeds", "1", "--ablations", "--output_dir", str(tmp_path)])
    assert fake_runs[:2] == [("fashion_mnist_lt", 42, "main"), ("mnist_family_lt", 42, "main")]
    assert [v for _, _, v in fake_runs[2:]] == list(rb.ABLATIONS)
    text = (tmp_path / "report.md").read_text()
    assert "## Phase-2 ablations on mnist_family_lt" in text
    for variant in rb.ABLATIONS:  # the stand-in's phase 2 of an ablation: overall 50 + seed
        assert f"| {variant} | 92.00 | 90.00 | 60.00 | 30.00 | 55.00 |" in text
    assert "| phase 2 as shipped | 103.00 |" in text  # the main run's phase 2: 61 + seed
    main_dir = tmp_path / "runs" / "mnist_family_lt" / "42" / "main"
    argv = rb.training_argv("mnist_family_lt", 42, main_dir.parent / "x", False, ["--learning_rate", "0.5"])
    assert argv[-2:] == ["--learning_rate", "0.5"]  # extra options come last, so they win
    assert argv[argv.index("--n_max") + 1] == "200" and argv[argv.index("--seed") + 1] == "42"
    hook = rb.variant_command("random_groups", argv, main_dir)
    assert hook[1:5] == ["-m", "lpt_peft.evaluation.ablations", "--ablation", "random_groups"]
    assert hook[5] == "--" and hook[6:-6] == argv  # the training options pass through unchanged
    assert hook[-6:] == ["--phase", "2", "--init_from", str(main_dir / "phase1"), "--baselines", "none"]
    top1 = rb.variant_command("top_k_1", argv, main_dir)
    assert "--init_from" not in top1 and top1[-2:] == ["--top_k", "1"]
    control = rb.variant_command("phase2_control", argv, main_dir)  # phase 2 again from the same adapter, unchanged
    assert control[1].endswith("train_lpt.py") and control[2:-6] == argv and control[-6:] == hook[-6:]
    longer = rb.variant_command("longer_phase2", argv, main_dir)
    preset = yaml.safe_load((rb.REPO / "configs" / "demo_fashion_mnist.yaml").read_text())["min_images_per_class"]
    assert longer[-2:] == ["--min_images_per_class", str(3 * preset)] and "--init_from" in longer
    # 3x the run's own value: an option given after -- counts, not only the preset's.
    longer = rb.variant_command("longer_phase2", [*argv, "--min_images_per_class", "100"], main_dir)
    assert longer[-2:] == ["--min_images_per_class", "300"]
    with pytest.raises(ValueError, match="leaves unset"):  # nothing to triple: said, not a silent 3 x None
        rb.variant_command("longer_phase2", ["--dataset", "mnist_family_lt", "--output_dir", str(main_dir)], main_dir)


def test_bad_arguments(rb):
    with pytest.raises(SystemExit):
        rb.parse_args(["--num_seeds", "0"])
    with pytest.raises(SystemExit):
        rb.parse_args(["--sets", "nope"])


@pytest.mark.slow
def test_quick_end_to_end(rb, tmp_path):
    """The real training entry in subprocesses on a tiny generated set: runs, skips on the second call, reports."""
    tiny = ["--model_name_or_path", "tiny-random", "--image_size", "16", "--num_groups", "4", "--shared_layers", "2",
            "--batch_size", "4", "--eval_batch_size", "16", "--num_workers", "0"]  # fmt: skip
    argv = ["--sets", "synthetic", "--num_seeds", "1", "--quick", "--output_dir", str(tmp_path), "--", *tiny]
    rb.main(argv)
    store = json.loads((tmp_path / "store.json").read_text())
    record = store["runs"]["synthetic/42/main"]
    assert {"Linear probe (CE)", "LPT phase 1", "LPT phase 2"} <= set(record["rows"])
    counts = record["group_heatmap"]["counts"]
    assert len(counts) == 4 and len(counts[0]) == 4 and sum(map(sum, counts)) % 2 == 0  # top_k 2 per test image
    mtime = (tmp_path / "store.json").stat().st_mtime
    rb.main(argv)  # everything is done: nothing runs, the store is not rewritten
    assert (tmp_path / "store.json").stat().st_mtime == mtime
    assert "LPT (best phase by val)" in (tmp_path / "report.md").read_text()
