"""docs/extending.md's worked examples, executed from the markdown itself: a new phase-2 loss and a new sampler are
each one class plus its registration, and a run trains with them through `--loss` / `--sampler`."""

import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from lpt_peft.training import LOSSES, SAMPLERS, build_loss, create_sampler

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
SMALL = [
    "--dataset", "synthetic", "--model_name_or_path", "tiny-random", "--image_size", "32", "--num_classes", "6",
    "--n_max", "40", "--imbalance", "10", "--val_per_class", "4", "--batch_size", "8", "--num_groups", "4",
    "--shared_layers", "2", "--num_workers", "0", "--report_to", "none", "--epochs_phase1", "1",
    "--epochs_phase2", "1", "--max_steps_per_epoch", "2",
]  # fmt: skip


def code_blocks(heading: str) -> list[str]:
    """The ```python blocks of the `## heading` section of docs/extending.md, in order."""
    text = DOC.read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.fixture
def doc_module(tmp_path, monkeypatch):
    """Write a doc block as an importable module; the registries and sys.modules are restored afterwards."""
    losses, samplers = dict(LOSSES), dict(SAMPLERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(name: str, source: str):
        (tmp_path / f"{name}.py").write_text(source)
        written.append(name)
        return __import__(name)

    yield write
    for name in written:
        sys.modules.pop(name, None)
    LOSSES.clear(), LOSSES.update(losses)
    SAMPLERS.clear(), SAMPLERS.update(samplers)


def run_script(source: str, tmp_path: Path, monkeypatch, *options: str) -> dict:
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["train.py", *SMALL, "--output_dir", str(out), *options])
    exec(compile(source, "train.py", "exec"), {"__name__": "__main__"})
    return json.loads((out / "results.json").read_text())


def test_new_loss_from_the_docs(doc_module, tmp_path, monkeypatch):
    loss_block, script = code_blocks("A new phase-2 loss")
    module = doc_module("my_losses", loss_block)
    assert LOSSES["focal"] is module.FocalLoss
    # Against a hand computation: cosines (0.1, 0.0) and label 0 at scale 20 give p_y = 1 / (1 + e^-2).
    loss = build_loss("focal", [10, 5], gamma=2.0)
    p = 1 / (1 + math.exp(-2.0))
    value = loss(torch.tensor([[0.1, 0.0]]), torch.tensor([0]))
    assert value.item() == pytest.approx(-((1 - p) ** 2) * math.log(p), rel=1e-5)  # float32
    # gamma = 0 is cross-entropy on the scaled cosines.
    logits, labels = torch.rand(5, 3) * 2 - 1, torch.tensor([0, 1, 2, 2, 1])
    ce = torch.nn.functional.cross_entropy(20.0 * logits, labels)
    assert build_loss("focal", [3, 2, 1], gamma=0.0)(logits, labels).item() == pytest.approx(ce.item(), rel=1e-6)
    rows = run_script(script, tmp_path, monkeypatch, "--loss", "focal")
    assert set(rows) == {"LPT phase 1", "LPT phase 2", "LPT (best phase by val)"}
    assert all(0 <= r["overall"] <= 100 for r in rows.values())
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("*/trainer_state.json")).read_text())
    assert state["run"]["options"]["loss"] == "focal"


def test_new_sampler_from_the_docs(doc_module, tmp_path, monkeypatch):
    sampler_block, script = code_blocks("A new sampler")
    module = doc_module("my_samplers", sampler_block)
    assert SAMPLERS["square_root"] is module.SquareRootBatchSampler
    labels = [0] * 400 + [1] * 100 + [2] * 25
    sampler = create_sampler("square_root", labels, 50, num_replicas=1, rank=0, seed=3)
    assert sampler.split_sizes == (50,) and len(sampler) == 11
    # Class frequencies follow sqrt(n_c): 20 : 10 : 5 of 35, over 200 epochs of 11 batches of 50 (110,000 draws).
    counts = Counter()
    for epoch in range(200):
        sampler.set_epoch(epoch)
        counts.update(labels[i] for batch in sampler for i in batch)
    total = sum(counts.values())
    for cls, share in ((0, 20 / 35), (1, 10 / 35), (2, 5 / 35)):
        assert counts[cls] / total == pytest.approx(share, abs=0.01)
    # Resume contract: skip_batches(k) yields exactly the rest of the epoch; two ranks split the global batch.
    sampler.set_epoch(7)
    full = list(sampler)
    sampler.skip_batches(4)
    assert list(sampler) == full[4:]
    ranks = [create_sampler("square_root", labels, 25, num_replicas=2, rank=r, seed=3) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(7)
    assert [a + b for a, b in zip(*ranks)] == full[: len(ranks[0])]
    rows = run_script(script, tmp_path, monkeypatch, "--sampler", "square_root")
    assert set(rows) == {"LPT phase 1", "LPT phase 2", "LPT (best phase by val)"}
    state = json.loads(next((tmp_path / "run" / "checkpoints").glob("*/trainer_state.json")).read_text())
    assert state["run"]["options"]["sampler"] == "square_root"
