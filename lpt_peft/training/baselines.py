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


@one_cpu_thread()
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
) -> nn.Module:
    """Train a probe on cached features.

    Args:
        kind: `"linear_probe_ce"`: a linear layer with bias, cross-entropy, instance-balanced batches (the standard
            probe). `"linear_probe_agcl"`: LPT's cosine head, A-GCL and dual sampling, exactly LPT's phase-1 recipe
            without the prompts.
    """
    if kind not in PROBES:
        raise ValueError(f"Unknown probe {kind!r}; choose one of {PROBES}.")
    torch.manual_seed(seed)
    num_labels, hidden = len(class_counts), train_features.shape[1]
    shard = {"num_replicas": 1, "rank": 0, "seed": seed}
    if kind == "linear_probe_ce":
        probe: nn.Module = nn.Linear(hidden, num_labels)
        sampler = create_sampler("instance_balanced", train_labels, batch_size, **shard)
        loss_fn = ScaledCrossEntropyLoss(scale=1.0)
    else:
        probe = CosineProbe(hidden, num_labels)
        sampler = create_sampler("dual", train_labels, batch_size, samples_per_class=samples_per_class, **shard)
        objective = LPTObjective(class_counts, num_epochs=epochs)
    lr = learning_rate * batch_size / lr_reference_batch
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    # Cosine decay from lr to 0 over all steps, no warm-up.
    scheduler = get_cosine_schedule_with_warmup(optimizer, 0, epochs * len(sampler))
    probe.train()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for indices in sampler:
            index = torch.as_tensor(indices)
            logits = probe(train_features[index])
            targets = train_labels[index]
            if kind == "linear_probe_ce":
                loss = loss_fn(logits, targets)
            else:
                (cb_logits, ib_logits), (cb_labels, ib_labels) = (
                    logits.split(sampler.split_sizes),
                    targets.split(sampler.split_sizes),
                )
                loss = objective(cb_logits, cb_labels, ib_logits, ib_labels, epoch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
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
