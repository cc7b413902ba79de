"""The paper's "statistic of prompt matching": how often images of each class select each prompt group.

LPT (Dong et al., ICLR 2023, section 4.3 / Fig. 4) shows, per class, which groups of the phase-2 pool its test images
select: if matching groups similar classes together, each row concentrates on a few groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

__all__ = ["class_group_counts", "collect_group_selections", "row_normalize"]


def class_group_counts(
    group_indices: torch.Tensor | np.ndarray | Sequence,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    num_classes: int,
    num_groups: int,
) -> np.ndarray:
    """
    Selection counts per class and group: entry `[c, g]` is how many (image, selected group) pairs have label `c`
    and group `g`. Each image counts once per group among its `top_k` selections.

    Args:
        group_indices: `(N, top_k)` selected groups (the model output's `group_indices`), or `(N,)` for top_k 1.
        labels: `(N,)` true classes.
        num_classes (`int`): C, the rows.
        num_groups (`int`): G, the columns.

    Returns:
        `np.ndarray` of int64, shape `(C, G)`; its total is `N * top_k`.

    Raises:
        ValueError: the lengths differ, or an index lies outside `[0, C)` / `[0, G)`.

    Example:

    ```py
    >>> class_group_counts([[0, 2], [2, 1]], [1, 0], num_classes=2, num_groups=3)
    array([[0, 1, 1],
           [1, 0, 1]])
    ```
    """
    groups = np.asarray(torch.as_tensor(group_indices).cpu(), dtype=np.int64)
    groups = groups[:, None] if groups.ndim == 1 else groups
    labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)
    if groups.ndim != 2 or len(groups) != len(labels):
        raise ValueError(f"Need (N, top_k) group indices and N labels, got {groups.shape} and {labels.shape}.")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"Labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}.")
    if groups.size and (groups.min() < 0 or groups.max() >= num_groups):
        raise ValueError(f"Group indices must lie in [0, {num_groups}), found {groups.min()}..{groups.max()}.")
    flat = np.repeat(labels, groups.shape[1]) * num_groups + groups.reshape(-1)
    return np.bincount(flat, minlength=num_classes * num_groups).reshape(num_classes, num_groups)


def row_normalize(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (the share of a class's selections going to each group); empty rows stay 0."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


@torch.no_grad()
def collect_group_selections(model: torch.nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Run a phase-2 LPT model over `loader` (batches with `pixel_values` and `labels`) and return
    `(group_indices (N, top_k), labels (N,))` on the CPU.

    Raises:
        ValueError: the model gives no `group_indices` (a phase-1 adapter or adapters disabled).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    groups, labels = [], []
    try:
        for batch in loader:
            output = model(pixel_values=batch["pixel_values"].to(device))
            if output.group_indices is None:
                raise ValueError("The model selected no prompt groups: load a phase-2 adapter (config.phase == 2).")
            groups.append(output.group_indices.cpu())
            labels.append(torch.as_tensor(batch["labels"]).cpu())
    finally:
        model.train(was_training)
    return torch.cat(groups), torch.cat(labels)
