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


def _one_probe_by_hand(kind, features, labels, counts, lr, epochs, batch_size, seed, logit_scale):
    """The obvious implementation: one probe, one learning rate, its own loop (what the batched trainer replaced)."""
    import math

    from lpt_peft.training.losses import LPTObjective, ScaledCrossEntropyLoss
    from lpt_peft.training.samplers import create_sampler

    torch.manual_seed(seed)
    shard = {"num_replicas": 1, "rank": 0, "seed": seed}
    if kind == "linear_probe_ce":
        probe = torch.nn.Linear(features.shape[1], len(counts))
        sampler = create_sampler("instance_balanced", labels, batch_size, **shard)
    else:
        probe = CosineProbe(features.shape[1], len(counts))
        sampler = create_sampler("dual", labels, batch_size, samples_per_class=2, **shard)
        objective = LPTObjective(counts, num_epochs=epochs, scale=logit_scale)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr * batch_size / 256, momentum=0.9, weight_decay=0.01)
    total, step = epochs * len(sampler), 0
    probe.train()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for indices in sampler:
            for group in optimizer.param_groups:
                group["lr"] = lr * batch_size / 256 * 0.5 * (1 + math.cos(math.pi * step / total))
            index = torch.as_tensor(indices)
            logits = probe(features[index])
            if kind == "linear_probe_ce":
                loss = ScaledCrossEntropyLoss(scale=1.0)(logits, labels[index])
            else:
                (cb, ib), (yc, yi) = logits.split(sampler.split_sizes), labels[index].split(sampler.split_sizes)
                loss = objective(cb, yc, ib, yi, epoch)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return probe.eval()


@pytest.mark.parametrize("kind", ["linear_probe_ce", "linear_probe_agcl"])
def test_a_grid_trained_at_once_equals_one_run_per_learning_rate(kind, monkeypatch):
    """`train_linear_probes` trains the grid as one batched problem; every rate's weights must equal a separate run
    at that rate. The A-GCL probe's dropout and loss noise are random per probe, so they are switched off here (both
    are tested on their own) to make the runs comparable draw for draw."""
    import lpt_peft.training.baselines as baselines
    from lpt_peft.training.losses import AGCLLoss

    if kind == "linear_probe_agcl":
        monkeypatch.setattr(baselines.F, "dropout", lambda x, p, training: x)
        monkeypatch.setattr(CosineProbe, "forward", lambda self, x: baselines.cosine_logits(x, self.weight))
        monkeypatch.setattr(AGCLLoss, "sample_noise", lambda self, logits: torch.zeros_like(logits))
    counts = [12, 6, 4]
    centers = torch.randn(3, 6, generator=torch.Generator().manual_seed(3)) * 2
    features, labels = clustered_features(counts, centers, seed=4)
    rates = [0.03, 0.3, 3.0]
    options = {"epochs": 3, "batch_size": 4, "seed": 7, "logit_scale": 30.0}
    probes = baselines.train_linear_probes(kind, features, labels, counts, rates, samples_per_class=2, **options)
    for lr, probe in zip(rates, probes):
        reference = _one_probe_by_hand(kind, features, labels, counts, lr, **options)
        for got, expected in zip(probe.parameters(), reference.parameters()):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(probes[0].weight, probes[2].weight), "different rates must train different probes"
    with pytest.raises(ValueError, match="learning_rates is empty"):
        baselines.train_linear_probes(kind, features, labels, counts, [])
