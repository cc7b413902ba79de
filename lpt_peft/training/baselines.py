"""Linear-probe baselines on frozen features, trained with the same data, sampling and losses as LPT.

They answer the question users ask first: what do the prompts add beyond a good loss on a frozen backbone? A
cross-entropy linear probe (the usual baseline) and a cosine probe trained with LPT's own objective (A-GCL with dual
sampling) are both cheap: features are computed once, without augmentation, and the probe trains on them in seconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from lpt_peft.evaluation.metrics import shot_accuracy
from lpt_peft.training.losses import LPTObjective, ScaledCrossEntropyLoss
from lpt_peft.training.samplers import create_sampler
from lpt_peft.tuner.architectures import get_architecture
from lpt_peft.tuner.model import cosine_logits

PROBES = ("linear_probe_ce", "linear_probe_agcl")


@torch.no_grad()
def extract_features(backbone: nn.Module, loader, accelerator: Accelerator, description: str = "features"):
    """CLS features after the final norm, and labels, for every image of `loader` (gathered across processes)."""
    architecture = get_architecture(backbone)
    backbone.eval()
    features, labels = [], []
    for batch in tqdm(loader, desc=description, disable=not accelerator.is_local_main_process, leave=False):
        with accelerator.autocast():
            feature = architecture.image_features(backbone, batch["pixel_values"]).float()
        feature, label = accelerator.gather_for_metrics((feature, batch["labels"]))
        features.append(feature.cpu())
        labels.append(label.cpu())
    return torch.cat(features), torch.cat(labels)


@contextlib.contextmanager
def one_cpu_thread() -> Iterator[None]:
    """Run the block (or the decorated function) with one torch CPU thread, then restore the previous count.

    A probe step works on (batch, hidden) x (hidden, classes) tensors, far too small to gain from intra-op threads:
    with two threads every op pays the thread hand-off, and on a loaded machine a preempted thread stalls the other
    at every barrier (the demo's probes trained 4-8x slower with 2 threads than with 1, to bit-identical weights).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class CosineProbe(nn.Module):
    """A cosine classifier on frozen features, initialised like LPT's head (random unit columns)."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        weight = torch.randn(hidden_size, num_labels)
        self.weight = nn.Parameter(weight / weight.norm(dim=0, keepdim=True))
        self.dropout = dropout

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(F.dropout(features, self.dropout, self.training), self.weight)


def train_linear_probe(
    kind: str,
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    class_counts: Sequence[int],
    epochs: int = 30,
    batch_size: int = 64,
    samples_per_class: int = 4,
    learning_rate: float = 0.02,
    lr_reference_batch: int = 256,
    weight_decay: float = 0.01,
    seed: int = 0,
    logit_scale: float = 20.0,
) -> nn.Module:
    """Train a probe on cached features: [`train_linear_probes`] with one learning rate.

    Args:
        kind: `"linear_probe_ce"`: a linear layer with bias, cross-entropy, instance-balanced batches (the standard
            probe). `"linear_probe_agcl"`: LPT's cosine head, A-GCL and dual sampling, exactly LPT's phase-1 recipe
            without the prompts.
        logit_scale: The A-GCL probe's loss scale (LPT's `--logit_scale`); the CE probe's linear logits are unscaled.
    """
    return train_linear_probes(
        kind, train_features, train_labels, class_counts, [learning_rate], epochs=epochs, batch_size=batch_size,
        samples_per_class=samples_per_class, lr_reference_batch=lr_reference_batch, weight_decay=weight_decay,
        seed=seed, logit_scale=logit_scale,
    )[0]  # fmt: skip


def _initial_weights(kind: str, hidden: int, num_labels: int) -> list[torch.Tensor]:
    """The probe's initial weight `(hidden, classes)` (and bias), drawn once: every learning rate starts from it, as
    separate runs with the same seed would."""
    if kind == "linear_probe_ce":
        layer = nn.Linear(hidden, num_labels)  # PyTorch's default initialisation of a linear layer
        return [layer.weight.detach().t().contiguous(), layer.bias.detach()]
    return [CosineProbe(hidden, num_labels).weight.detach()]


@one_cpu_thread()
def train_linear_probes(
    kind: str,
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    class_counts: Sequence[int],
    learning_rates: Sequence[float],
    epochs: int = 30,
    batch_size: int = 64,
    samples_per_class: int = 4,
    lr_reference_batch: int = 256,
    weight_decay: float = 0.01,
    seed: int = 0,
    logit_scale: float = 20.0,
) -> list[nn.Module]:
    """Train one probe per learning rate, all at once: the same batches, initial weights and schedule (SGD momentum
    0.9, `weight_decay`, cosine decay to 0 without warm-up), each rate its own weights.

    The `R` probes run as one `(R, batch, hidden) x (R, hidden, classes)` product per step, so a learning-rate grid
    costs about one probe's training time instead of `R` (a probe step is far too small to keep a CPU busy). The summed
    loss of the `R` probes gives each its own gradient, and each rate is a separate SGD parameter group. The A-GCL
    probe's dropout masks and loss noise are drawn per probe.

    Args:
        kind: `"linear_probe_ce"` or `"linear_probe_agcl"`, see [`train_linear_probe`].
        train_features (`torch.Tensor` of shape `(num_images, hidden)`), train_labels (`(num_images,)` integers).
        learning_rates: The `R` rates, at `lr_reference_batch` (scaled by `batch_size / lr_reference_batch`).

    Returns:
        `list[nn.Module]`: `R` probes in eval mode (`nn.Linear` or [`CosineProbe`]), in the order of `learning_rates`.
    """
    if kind not in PROBES:
        raise ValueError(f"Unknown probe {kind!r}; choose one of {PROBES}.")
    if not learning_rates:
        raise ValueError("learning_rates is empty: give at least one learning rate.")
    torch.manual_seed(seed)
    copies, (num_labels, hidden) = len(learning_rates), (len(class_counts), train_features.shape[1])
    initial = _initial_weights(kind, hidden, num_labels)
    shard = {"num_replicas": 1, "rank": 0, "seed": seed}
    if kind == "linear_probe_ce":
        sampler = create_sampler("instance_balanced", train_labels, batch_size, **shard)
        loss_fn = ScaledCrossEntropyLoss(scale=1.0)
    else:
        sampler = create_sampler("dual", train_labels, batch_size, samples_per_class=samples_per_class, **shard)
        objective = LPTObjective(class_counts, num_epochs=epochs, scale=logit_scale)
    # One parameter group per rate, stacked into (R, ...) tensors for each step's batched product.
    leaves = [[nn.Parameter(t.clone()) for t in initial] for _ in learning_rates]
    groups = [{"params": leaf, "lr": lr * batch_size / lr_reference_batch} for leaf, lr in zip(leaves, learning_rates)]
    optimizer = torch.optim.SGD(groups, momentum=0.9, weight_decay=weight_decay)
    # Cosine decay from lr to 0 over all steps, no warm-up.
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, epochs * len(sampler))
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for indices in sampler:
            index = torch.as_tensor(indices)
            features, targets = train_features[index], train_labels[index]
            weights = [torch.stack(ts) for ts in zip(*leaves)]
            if kind == "linear_probe_ce":
                logits = torch.baddbmm(weights[1].unsqueeze(1), features.expand(copies, -1, -1), weights[0])
                loss = loss_fn(logits.flatten(0, 1), targets.repeat(copies))
            else:
                dropped = F.dropout(features.expand(copies, -1, -1), 0.1, True)
                logits = F.normalize(dropped, dim=-1) @ F.normalize(weights[0], dim=1)  # (R, batch, classes)
                cb, ib = logits.split(sampler.split_sizes, dim=1)
                cb_labels, ib_labels = (t.repeat(copies) for t in targets.split(sampler.split_sizes))
                loss = objective(cb.flatten(0, 1), cb_labels, ib.flatten(0, 1), ib_labels, epoch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            (loss * copies).backward()  # each loss is a mean over R x batch rows: x R gives each probe its own mean
            optimizer.step()
            scheduler.step()
    return [_probe_from(kind, leaf, hidden, num_labels) for leaf in leaves]


def _probe_from(kind: str, leaf: list[nn.Parameter], hidden: int, num_labels: int) -> nn.Module:
    if kind == "linear_probe_ce":
        probe: nn.Module = nn.Linear(hidden, num_labels)
        probe.weight.data.copy_(leaf[0].detach().t())
        probe.bias.data.copy_(leaf[1].detach())
    else:
        probe = CosineProbe(hidden, num_labels)
        probe.weight.data.copy_(leaf[0].detach())
    return probe.eval()


@torch.no_grad()
def evaluate_probe(
    probe: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    class_counts: Sequence[int],
    grouping: str = "standard",
) -> dict[str, Any]:
    predictions = probe(features).argmax(dim=-1)
    return shot_accuracy(predictions.numpy(), labels.numpy(), np.asarray(class_counts), grouping=grouping)
