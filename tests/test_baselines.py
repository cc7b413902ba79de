"""Linear-probe baselines on cached features."""

import pytest
import torch

from lpt_peft.training.baselines import CosineProbe, evaluate_probe, train_linear_probe


def clustered_features(counts, centers, seed):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return centers[labels] + torch.randn(
        len(labels), centers.shape[1], generator=torch.Generator().manual_seed(seed)
    ), labels


@pytest.mark.parametrize("kind", ["linear_probe_ce", "linear_probe_agcl"])
def test_probes_learn_separable_clusters(kind):
    counts = [60, 30, 10, 4]
    centers = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 3
    features, labels = clustered_features(counts, centers, seed=1)
    test_features, test_labels = clustered_features([20] * 4, centers, seed=2)
    probe = train_linear_probe(kind, features, labels, counts, epochs=20, batch_size=8, learning_rate=0.3)
    result = evaluate_probe(probe, test_features, test_labels, counts)
    assert result["overall"] >= 90.0
    expected = (probe(test_features).argmax(-1) == test_labels).float().mean().item() * 100
    assert result["overall"] == pytest.approx(expected)


def test_cosine_probe_is_a_cosine_classifier():
    probe = CosineProbe(8, 3).eval()
    x = torch.randn(5, 8)
    expected = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(probe.weight, dim=0)
    torch.testing.assert_close(probe(x), expected)
    assert probe(x).abs().max() <= 1.0 + 1e-6


def test_unknown_probe_kind():
    with pytest.raises(ValueError, match="Unknown probe 'svm'"):
        train_linear_probe("svm", torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), [2, 2])


def test_probe_learning_rate_follows_the_previous_cosine_formula(monkeypatch):
    # The probe's schedule is transformers' cosine schedule without warm-up; it must equal the formula it replaced,
    # lr * 0.5 * (1 + cos(pi * step / total)), at every step.
    import math

    import lpt_peft.training.baselines as baselines

    made = []

    def record(*args, **kwargs):
        made.append(baselines_schedule(*args, **kwargs))
        return made[-1]

    baselines_schedule = baselines.get_cosine_schedule_with_warmup
    monkeypatch.setattr(baselines, "get_cosine_schedule_with_warmup", record)
    features, labels = torch.randn(40, 8), torch.arange(40) % 4
    train_linear_probe("linear_probe_ce", features, labels, [10] * 4, epochs=3, batch_size=8, learning_rate=0.02,
                       lr_reference_batch=8)  # fmt: skip
    (scheduler,) = made
    total = 3 * 5
    assert scheduler.last_epoch == total
    for step in range(total):
        expected = 0.02 * 0.5 * (1 + math.cos(math.pi * step / total))
        assert 0.02 * scheduler.lr_lambdas[0](step) == pytest.approx(expected, rel=1e-12, abs=1e-15)
