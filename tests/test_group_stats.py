"""The class x group selection statistic, its heatmap, and the phase-2 ablation hooks (lpt_peft.evaluation)."""

import numpy as np
import pytest
import torch
from peft import get_peft_model
from testing_utils import make_tiny_vit, randomize_adapter

import lpt_peft
from lpt_peft.evaluation.ablations import group_ablation
from lpt_peft.evaluation.group_stats import class_group_counts, collect_group_selections, row_normalize
from lpt_peft.evaluation.plots import plot_benchmark_bars, plot_class_group_heatmap
from lpt_peft.tuner.layer import LPTAttention
from lpt_peft.tuner.model import cosine_logits


def _slow_counts(groups, labels, num_classes, num_groups):
    table = [[0] * num_groups for _ in range(num_classes)]
    for row, label in zip(groups, labels):
        for group in row:
            table[int(label)][int(group)] += 1
    return np.array(table)


def test_class_group_counts_matches_a_loop():
    rng = np.random.RandomState(0)
    labels = rng.randint(0, 7, size=300)
    groups = np.stack([rng.choice(9, size=3, replace=False) for _ in range(300)])
    counts = class_group_counts(torch.as_tensor(groups), labels, num_classes=7, num_groups=9)
    np.testing.assert_array_equal(counts, _slow_counts(groups, labels, 7, 9))
    assert counts.sum() == 900 and counts.shape == (7, 9)
    top1 = class_group_counts(groups[:, 0], labels, 7, 9)  # (N,) indices: top_k 1
    np.testing.assert_array_equal(top1, _slow_counts(groups[:, :1], labels, 7, 9))


def test_class_group_counts_refuses_bad_input():
    with pytest.raises(ValueError, match="N labels"):
        class_group_counts([[0, 1]], [0, 1], 2, 2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        class_group_counts([[0, 3]], [0], 2, 3)
    with pytest.raises(ValueError, match="Labels"):
        class_group_counts([[0, 1]], [5], 2, 3)


def test_row_normalize():
    shares = row_normalize(np.array([[1, 3], [0, 0]]))
    np.testing.assert_allclose(shares, [[0.25, 0.75], [0.0, 0.0]])


@pytest.fixture
def phase2_model():
    vit = make_tiny_vit(seed=0)
    model = get_peft_model(vit, lpt_peft.LPTConfig(num_labels=5, shared_layers=2, num_groups=6, top_k=2, phase=2))
    randomize_adapter(model, seed=1)
    return model.eval()


def test_collect_group_selections_and_heatmap(phase2_model, tmp_path):
    pixels = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    loader = [{"pixel_values": pixels[:6], "labels": labels[:6]}, {"pixel_values": pixels[6:], "labels": labels[6:]}]
    groups, got_labels = collect_group_selections(phase2_model, loader)
    expected = phase2_model(pixel_values=pixels).group_indices
    torch.testing.assert_close(groups, expected)
    torch.testing.assert_close(got_labels, labels)
    counts = class_group_counts(groups, got_labels, 5, 6)
    path = plot_class_group_heatmap(counts, tmp_path / "heat.png", [f"c{i}" for i in range(5)])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="class names"):
        plot_class_group_heatmap(counts, tmp_path / "bad.png", ["a"])


def test_collect_group_selections_refuses_phase1(tmp_path):
    model = get_peft_model(make_tiny_vit(seed=0), lpt_peft.LPTConfig(num_labels=3, shared_layers=2, phase=1))
    with pytest.raises(ValueError, match="phase-2 adapter"):
        collect_group_selections(model, [{"pixel_values": torch.randn(2, 3, 16, 16), "labels": torch.tensor([0, 1])}])


def test_benchmark_bars_plot(tmp_path):
    path = plot_benchmark_bars({"A": {"overall": [50, 60, 55], "few": [10, 20, 30]}}, tmp_path / "bars.png")
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="empty"):
        plot_benchmark_bars({}, tmp_path / "none.png")


# ------------------------------------------------------------------------------------------ ablations
def test_no_group_prompts_equals_phase1_features(phase2_model):
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        shipped = phase2_model(pixel_values=pixels)
        with group_ablation("no_group_prompts"):
            ablated = phase2_model(pixel_values=pixels)
    # Without group prompts the main pass is the query pass: the head applied to the query (phase-1 feature).
    reference = cosine_logits(shipped.query, phase2_model.base_model.lpt_head["default"])
    torch.testing.assert_close(ablated.logits, reference, atol=1e-6, rtol=0)
    assert (shipped.logits - reference).abs().max() > 1e-3  # the group prompts do change the shipped model
    with torch.no_grad():  # the hook is removed on exit
        torch.testing.assert_close(phase2_model(pixel_values=pixels).logits, shipped.logits)


def test_no_group_prompts_trains_head_not_group_prompts(phase2_model):
    phase2_model.train()
    with group_ablation("no_group_prompts"):
        output = phase2_model(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 1]))
        output.loss.backward()
    grads = {n: p.grad for n, p in phase2_model.named_parameters() if p.requires_grad}
    assert all(g is None for n, g in grads.items() if "lpt_group_prompt" in n)
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lpt_head" in n)


def test_random_groups_are_random_seeded_and_used(phase2_model):
    pixels = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        matched = phase2_model(pixel_values=pixels).group_indices
        with group_ablation("random_groups", seed=5) as drawer:
            first = phase2_model(pixel_values=pixels)
            draw1 = drawer.indices.clone()
            phase2_model(pixel_values=pixels)
            draw2 = drawer.indices.clone()
        with group_ablation("random_groups", seed=5) as drawer:
            again = phase2_model(pixel_values=pixels)
            draw_again = drawer.indices.clone()
    assert draw1.shape == (64, 2) and (draw1[:, 0] != draw1[:, 1]).all()  # two distinct groups per image
    assert draw1.min() >= 0 and draw1.max() < 6
    torch.testing.assert_close(draw1, draw_again)  # seeded
    torch.testing.assert_close(first.logits, again.logits)
    assert not torch.equal(draw1, draw2)  # a new draw per forward
    assert not torch.equal(draw1.sort(dim=1).values, matched.sort(dim=1).values)  # not the matched groups
    assert len({tuple(sorted(r)) for r in draw1.tolist()}) > 5  # spread over many pairs (15 possible)


def test_random_groups_use_the_mean_of_the_drawn_prompts(phase2_model):
    layer = next(m for m in phase2_model.modules() if isinstance(m, LPTAttention) and "default" in m.lpt_group_prompt)
    matched = torch.tensor([[0, 1], [2, 3]])
    with group_ablation("random_groups", seed=0) as drawer:
        got = layer.group_prompts("default", matched)
        again = layer.group_prompts("default", matched)  # same forward (same tensor): same draw in every layer
        drawn = drawer.indices
    pool = layer.lpt_group_prompt["default"]
    torch.testing.assert_close(got, pool[drawn].mean(dim=1))
    torch.testing.assert_close(again, got)


def test_unknown_ablation():
    with pytest.raises(ValueError, match="no_group_prompts"):
        with group_ablation("shuffle"):
            pass


def test_ablation_entry_refuses_bad_options_cleanly(capsys):
    from lpt_peft.evaluation.ablations import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--ablation", "random_groups", "--", "--dataset", "no_such_set"])
    assert exit_info.value.code == 2 and "no_such_set" in capsys.readouterr().err
    assert LPTAttention.group_prompts.__qualname__ == "LPTAttention.group_prompts"  # never installed / restored
