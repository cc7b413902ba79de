import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import places_lt_split_dir

from lpt_peft.evaluation.metrics import (
    METRIC_SCRIPT_DIR,
    ShotAccuracyAccumulator,
    format_results_table,
    group_usage_counts,
    save_results,
    shot_accuracy,
    shot_groups,
)
from lpt_peft.evaluation.plots import plot_group_usage, plot_per_class_accuracy

REPO_ROOT = Path(__file__).resolve().parents[1]


def slow_shot_accuracy(preds, refs, counts, few_inclusive=False):
    """Obvious loop implementation used as the reference."""

    def group_of(n):
        if n > 100:
            return "many"
        if n < 20 or (few_inclusive and n == 20):
            return "few"
        return "medium"

    hits = {"overall": [], "many": [], "medium": [], "few": []}
    per_class_hits = [[] for _ in counts]
    for p, r in zip(preds, refs):
        ok = 1.0 if p == r else 0.0
        hits["overall"].append(ok)
        hits[group_of(counts[r])].append(ok)
        per_class_hits[r].append(ok)
    out = {k: (100.0 * sum(v) / len(v) if v else float("nan")) for k, v in hits.items()}
    out["per_class"] = [100.0 * sum(v) / len(v) if v else float("nan") for v in per_class_hits]
    out["per_class_count"] = [len(v) for v in per_class_hits]
    out["num_samples"] = len(preds)
    return out


def assert_same_results(got, expected):
    assert set(got) == {"overall", "many", "medium", "few", "per_class", "per_class_count", "num_samples"}
    for key in ("overall", "many", "medium", "few"):
        assert isinstance(got[key], float)
        if math.isnan(expected[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(expected[key], abs=1e-9), key
    np.testing.assert_allclose(got["per_class"], expected["per_class"], atol=1e-9, equal_nan=True)
    assert list(got["per_class_count"]) == expected["per_class_count"]
    assert got["num_samples"] == expected["num_samples"]


def random_case(seed, num_classes=30, num_samples=500):
    rng = np.random.default_rng(seed)
    # Counts straddle both boundaries, including the exact values 100 and 20 that the groupings disagree on.
    counts = rng.choice([0, 1, 5, 19, 20, 21, 50, 99, 100, 101, 400], size=num_classes).tolist()
    refs = rng.integers(0, num_classes, size=num_samples)
    preds = np.where(rng.random(num_samples) < 0.6, refs, rng.integers(0, num_classes, size=num_samples))
    return preds, refs, counts


# ---------------------------------------------------------------- shot_groups


def test_shot_groups_hand_counted():
    counts = [500, 101, 100, 21, 20, 19, 0]
    assert shot_groups(counts) == {"many": [0, 1], "medium": [2, 3, 4], "few": [5, 6]}
    assert shot_groups(counts, grouping="author") == {"many": [0, 1], "medium": [2, 3], "few": [4, 5, 6]}
    # Custom thresholds (CIFAR-style experiments sometimes use other boundaries).
    assert shot_groups(counts, many_threshold=50, few_threshold=10) == {
        "many": [0, 1, 2],
        "medium": [3, 4, 5],
        "few": [6],
    }
    # numpy / torch inputs give the same answer
    assert shot_groups(np.array(counts)) == shot_groups(torch.tensor(counts)) == shot_groups(counts)


def test_shot_groups_places_lt_split():
    PLACES_LT_TRAIN = places_lt_split_dir() / "Places_LT_train.txt"
    counts_by_label = {}
    with open(PLACES_LT_TRAIN) as f:
        for line in f:
            if line.strip():
                label = int(line.split()[1])
                counts_by_label[label] = counts_by_label.get(label, 0) + 1
    counts = [counts_by_label[i] for i in range(len(counts_by_label))]
    assert len(counts) == 365
    standard = shot_groups(counts)
    author = shot_groups(counts, grouping="author")
    assert [len(standard[g]) for g in ("many", "medium", "few")] == [131, 163, 71]
    assert [len(author[g]) for g in ("many", "medium", "few")] == [131, 157, 77]
    assert sorted(standard["many"] + standard["medium"] + standard["few"]) == list(range(365))


def test_shot_groups_errors():
    with pytest.raises(ValueError, match=r"choose one of \['standard', 'author'\]"):
        shot_groups([1, 2], grouping="paper")
    with pytest.raises(ValueError, match=r"train_class_counts\[1\]"):
        shot_groups([5, -1])
    with pytest.raises(ValueError, match="empty"):
        shot_groups([])
    with pytest.raises(ValueError, match="smaller than many_threshold"):
        shot_groups([5], many_threshold=10, few_threshold=10)
    with pytest.raises(TypeError, match="whole numbers"):
        shot_groups([1.5, 2.0])


# ---------------------------------------------------------------- shot_accuracy


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("grouping", ["standard", "author"])
def test_shot_accuracy_matches_loop(seed, grouping):
    preds, refs, counts = random_case(seed)
    expected = slow_shot_accuracy(preds.tolist(), refs.tolist(), counts, few_inclusive=grouping == "author")
    assert_same_results(shot_accuracy(preds, refs, counts, grouping=grouping), expected)


def test_shot_accuracy_input_types_agree():
    preds, refs, counts = random_case(3)
    expected = slow_shot_accuracy(preds.tolist(), refs.tolist(), counts)
    assert_same_results(shot_accuracy(preds.tolist(), refs.tolist(), counts), expected)
    assert_same_results(shot_accuracy(torch.from_numpy(preds), torch.from_numpy(refs), torch.tensor(counts)), expected)
    assert_same_results(shot_accuracy(preds.astype(np.int32), refs.astype(np.float32), np.array(counts)), expected)


def test_shot_accuracy_hand_computed_and_nan_groups():
    # class 0 many (1/1), class 1 medium (1/2), class 2 few but no test samples
    res = shot_accuracy([0, 1, 2], [0, 1, 1], train_class_counts=[200, 50, 5])
    assert res["overall"] == pytest.approx(200 / 3)
    assert (res["many"], res["medium"]) == (100.0, 50.0)
    assert math.isnan(res["few"])
    assert res["per_class"][:2] == [100.0, 50.0] and math.isnan(res["per_class"][2])
    assert res["per_class_count"] == [1, 2, 0]
    assert res["num_samples"] == 3
    # no many-shot class at all -> NaN, not 0
    assert math.isnan(shot_accuracy([0, 1], [0, 1], [50, 5])["many"])


def test_group_accuracy_is_sample_mean():
    # Imbalanced test set inside the medium group: 1/1 correct for class 0 and 0/3 for class 1.
    res = shot_accuracy([0, 0, 0, 0], [0, 1, 1, 1], [50, 50])
    assert res["medium"] == pytest.approx(25.0)  # sample mean; the class mean would be 50


def test_shot_accuracy_errors():
    with pytest.raises(ValueError, match=r"`references` contains 3, outside the valid class range \[0, 3\)"):
        shot_accuracy([0, 1], [0, 3], [10, 10, 10])
    with pytest.raises(ValueError, match=r"`predictions` contains -1.*\[0, 3\)"):
        shot_accuracy([-1, 1], [0, 1], [10, 10, 10])
    with pytest.raises(ValueError, match="3 entries but `references` has 2"):
        shot_accuracy([0, 1, 2], [0, 1], [10, 10, 10])
    with pytest.raises(ValueError, match=r"logits.argmax\(-1\)"):
        shot_accuracy(torch.randn(4, 3), [0, 1, 2, 0], [10, 10, 10])
    with pytest.raises(TypeError, match="whole numbers"):
        shot_accuracy([0.5, 1.0], [0, 1], [10, 10])
    with pytest.raises(ValueError, match="No test samples"):
        shot_accuracy([], [], [10, 10])
    with pytest.raises(ValueError, match="choose one of"):
        shot_accuracy([0], [0], [10], grouping="authors")


# ---------------------------------------------------------------- accumulator


@pytest.mark.parametrize("grouping", ["standard", "author"])
def test_accumulator_batches_and_merge_equal_one_shot(grouping):
    preds, refs, counts = random_case(4, num_samples=503)
    expected = shot_accuracy(preds, refs, counts, grouping=grouping)
    preds_t, refs_t = torch.from_numpy(preds), torch.from_numpy(refs)

    single = ShotAccuracyAccumulator(len(counts))
    for start in range(0, len(preds), 64):
        single.update(preds_t[start : start + 64], refs_t[start : start + 64])
    assert single.correct.dtype == single.total.dtype == torch.int64
    assert single.num_samples == 503
    assert_same_results(
        single.compute(counts, grouping),
        slow_shot_accuracy(preds.tolist(), refs.tolist(), counts, few_inclusive=grouping == "author"),
    )
    assert_same_results(single.compute(counts, grouping), expected)

    # Two "processes" over disjoint shards, merged.
    shards = [ShotAccuracyAccumulator(len(counts)) for _ in range(2)]
    for i, start in enumerate(range(0, len(preds), 50)):
        shards[i % 2].update(preds_t[start : start + 50], refs_t[start : start + 50])
    merged = shards[0].merge(shards[1])
    assert merged is shards[0]
    assert_same_results(merged.compute(counts, grouping), expected)

    merged.reset()
    assert merged.num_samples == 0


def test_accumulator_errors():
    acc = ShotAccuracyAccumulator(3)
    with pytest.raises(ValueError, match=r"contains 5, outside the valid class range \[0, 3\)"):
        acc.update(torch.tensor([0, 1]), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="must pair one to one"):
        acc.update(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(TypeError, match="integer tensor"):
        acc.update(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"logits.argmax\(-1\)"):
        acc.update(torch.randn(2, 3), torch.tensor([0, 1]))
    assert acc.num_samples == 0  # failed updates leave no trace
    with pytest.raises(ValueError, match="No test samples"):
        acc.compute([10, 10, 10])
    acc.update([0, 1], [0, 1])
    with pytest.raises(ValueError, match="accumulator was built for 3"):
        acc.compute([10, 10])
    with pytest.raises(ValueError, match="different class counts"):
        acc.merge(ShotAccuracyAccumulator(4))
    with pytest.raises(TypeError, match="ShotAccuracyAccumulator"):
        acc.merge({"correct": 1})
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        ShotAccuracyAccumulator(0)


# ---------------------------------------------------------------- evaluate module


def test_metric_script_loads_offline_and_matches(tmp_path):
    """Load through `evaluate` in a fresh interpreter with the Hub disabled and sockets blocked."""
    preds, refs, counts = random_case(5, num_samples=300)
    payload = {"preds": preds.tolist(), "refs": refs.tolist(), "counts": counts}
    script = f"""
import json, socket
def _no_network(*args, **kwargs):
    raise RuntimeError("network access attempted")
socket.socket.connect = _no_network
socket.create_connection = _no_network
from lpt_peft.evaluation.metrics import load_shot_accuracy_metric
data = json.loads({json.dumps(json.dumps(payload))})
metric = load_shot_accuracy_metric(keep_in_memory=True)
for start in range(0, len(data["preds"]), 100):
    metric.add_batch(predictions=data["preds"][start:start + 100], references=data["refs"][start:start + 100])
out = {{"standard": metric.compute(train_class_counts=data["counts"])}}
out["author"] = metric.compute(
    predictions=data["preds"], references=data["refs"], train_class_counts=data["counts"], grouping="author"
)
print("RESULT" + json.dumps(out))
"""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_EVALUATE_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        HF_HOME=str(tmp_path / "hf_home"),
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    for grouping in ("standard", "author"):
        expected = slow_shot_accuracy(preds.tolist(), refs.tolist(), counts, few_inclusive=grouping == "author")
        assert_same_results(out[grouping], expected)
    # the script really was copied into the module cache we pointed evaluate at
    assert list((tmp_path / "modules").rglob("shot_accuracy.py"))


def test_metric_script_ships_inside_package():
    script = METRIC_SCRIPT_DIR / "shot_accuracy.py"
    assert script.is_file()
    assert METRIC_SCRIPT_DIR.parents[1] == Path(__file__).resolve().parents[1] / "lpt_peft" / "evaluation"
    assert "from lpt_peft.evaluation.metrics import shot_accuracy" in script.read_text()


# ---------------------------------------------------------------- tables, usage


def test_format_results_table_content():
    rows = {
        "LPT": {"overall": 50.07, "many": 49.27, "medium": 52.31, "few": 46.88, "per_class": [1.0]},
        "a|b": {"overall": 1 / 3, "many": float("nan"), "medium": np.float32(12.345), "few": torch.tensor(7.0)},
    }
    table = format_results_table(rows)
    assert table.splitlines() == [
        "| Method | Overall | Many | Medium | Few |",
        "|---|---:|---:|---:|---:|",
        "| LPT | 50.07 | 49.27 | 52.31 | 46.88 |",
        "| a\\|b | 0.33 | n/a | 12.35 | 7.00 |",
    ]
    with pytest.raises(ValueError, match=r"'LPT' lacks \['few'\]"):
        format_results_table({"LPT": {"overall": 1.0, "many": 1.0, "medium": 1.0}})
    with pytest.raises(ValueError, match="non-empty"):
        format_results_table({})


def test_save_results(tmp_path):
    res = shot_accuracy([0, 1, 2], [0, 1, 1], train_class_counts=[200, 50, 5])
    json_path, md_path = save_results({"LPT": res}, tmp_path / "eval")
    loaded = json.loads(json_path.read_text())  # strict JSON: NaN stored as null
    assert loaded["LPT"]["few"] is None
    assert loaded["LPT"]["medium"] == 50.0
    assert loaded["LPT"]["per_class_count"] == [1, 2, 0]
    assert md_path.read_text().splitlines()[2] == "| LPT | 66.67 | 100.00 | 50.00 | n/a |"


def test_group_usage_counts():
    idx = torch.tensor([[0, 2], [2, 3], [2, 0]])
    usage = group_usage_counts(idx, num_groups=5)
    expected = [sum(int(v == g) for row in idx.tolist() for v in row) for g in range(5)]
    assert usage.dtype == torch.int64 and usage.tolist() == expected == [2, 0, 3, 1, 0]
    assert group_usage_counts(np.array([4, 4, 1]), 5).tolist() == [0, 1, 0, 0, 2]
    with pytest.raises(ValueError, match=r"contains 5, outside \[0, 5\)"):
        group_usage_counts([[0, 5]], 5)
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        group_usage_counts([[0, 1]], 0)


# ---------------------------------------------------------------- plots


def _assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5000


def test_plots_write_png(tmp_path):
    preds, refs, counts = random_case(6, num_classes=40)
    res = shot_accuracy(preds, refs, counts)
    out = plot_per_class_accuracy(
        res["per_class"],
        counts,
        tmp_path / "sub" / "per_class.png",
        title="test",
        class_names=[f"c{i}" for i in range(40)],
        compare={"other": np.array(res["per_class"]) / 2},
    )
    assert out == tmp_path / "sub" / "per_class.png"
    _assert_png(out)
    many = np.random.default_rng(0)
    _assert_png(plot_per_class_accuracy(many.random(365) * 100, many.integers(1, 5000, 365), tmp_path / "big.png"))
    usage = group_usage_counts(torch.randint(0, 20, (100, 2)), 20)
    _assert_png(plot_group_usage(usage, tmp_path / "usage.png", title="usage"))
    _assert_png(plot_group_usage([0, 0, 0], tmp_path / "empty_usage.png"))


def test_plot_errors(tmp_path):
    with pytest.raises(ValueError, match="have 2 entries but train_class_counts has 3"):
        plot_per_class_accuracy([1.0, 2.0], [10, 5, 1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="'b'.*1 entries"):
        plot_per_class_accuracy([1.0, 2.0], [10, 5], tmp_path / "x.png", compare={"b": [1.0]})
    with pytest.raises(ValueError, match="class_names has 1"):
        plot_per_class_accuracy([1.0, 2.0], [10, 5], tmp_path / "x.png", class_names=["a"])
    with pytest.raises(ValueError, match=">= 0"):
        plot_group_usage([1, -1], tmp_path / "y.png")
    assert not list(tmp_path.iterdir())
