"""Plots for long-tailed evaluation: per-class accuracy along the tail and prompt-group usage.

Figures are drawn with matplotlib's object-oriented API on an Agg canvas, so no window ever opens and the global
pyplot backend is left untouched (safe on headless machines and inside notebooks).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lpt_peft._extras import requires_extras

with requires_extras(__name__):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

__all__ = ["plot_benchmark_bars", "plot_class_group_heatmap", "plot_group_usage", "plot_per_class_accuracy"]

# Above this many classes tick labels overlap, so class names are not drawn.
_MAX_NAMED_TICKS = 50


def _as_float_array(values: Any, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be a 1-D list, numpy array or tensor of numbers.") from err
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D sequence, got shape {tuple(array.shape)}.")
    return array


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average that skips NaN (classes without test samples)."""
    valid = ~np.isnan(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(valid, values, 0.0), kernel, mode="same")
    counts = np.convolve(valid.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def plot_per_class_accuracy(
    per_class_accuracy: Sequence[float] | np.ndarray | torch.Tensor,
    train_class_counts: Sequence[int] | np.ndarray | torch.Tensor,
    path: str | os.PathLike,
    title: str | None = None,
    class_names: Sequence[str] | None = None,
    compare: Mapping[str, Sequence[float] | np.ndarray | torch.Tensor] | None = None,
    label: str = "model",
    many_threshold: int = 100,
    few_threshold: int = 20,
) -> Path:
    """Plots per-class accuracy with classes sorted from most to fewest training images, and saves it as a PNG.

    Grey bars (right axis, log scale) show each class's training count; dashed lines mark the shot-group boundaries
    (n = 100 and n = 20, standard grouping). Each method is drawn as faint per-class points plus a moving average
    (window about 1/25 of the classes) so that the trend along the tail stays readable for hundreds of classes.

    Args:
        per_class_accuracy: Accuracy of each class (e.g. `shot_accuracy(...)["per_class"]`, in percent); NaN for a
            class without test samples is skipped.
        train_class_counts: Number of training images of each class.
        path: Where to write the PNG; parent folders are created.
        title: Figure title.
        class_names: Optional class names, used as x tick labels when there are at most 50 classes.
        compare: Optional method name -> per-class accuracies, overlaid on the same axes.
        label: Legend name of `per_class_accuracy`.
        many_threshold, few_threshold: Shot-group boundaries to mark.

    Returns:
        `Path` of the written PNG.

    Example:

    ```python
    >>> from lpt_peft.evaluation.metrics import shot_accuracy
    >>> from lpt_peft.evaluation.plots import plot_per_class_accuracy

    >>> counts = [500, 120, 60, 30, 10, 5]
    >>> res = shot_accuracy([0, 1, 2, 3, 0, 0], [0, 1, 2, 3, 4, 5], counts)
    >>> baseline = [90, 80, 50, 40, 0, 0]
    >>> plot_per_class_accuracy(res["per_class"], counts, "per_class.png", compare={"baseline": baseline})
    PosixPath('per_class.png')
    ```
    """
    counts = _as_float_array(train_class_counts, "train_class_counts")
    series = _accuracy_series(per_class_accuracy, label, compare, len(counts))
    num_classes = len(counts)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} entries but there are {num_classes} classes.")

    # Stable sort keeps class-index order among ties, so the plot is deterministic.
    order = np.argsort(-counts, kind="stable")
    sorted_counts = counts[order]
    x = np.arange(num_classes)

    fig = _new_figure(max(8.0, min(16.0, num_classes / 25)), 4.8)
    ax = fig.add_subplot(1, 1, 1)
    ax_counts = ax.twinx()
    ax_counts.bar(x, np.maximum(sorted_counts, 1), width=1.0, color="0.85", label="train images")
    ax_counts.set_yscale("log")
    ax_counts.set_ylabel("training images (log scale)")
    # Accuracy curves must sit on top of the count bars.
    ax.set_zorder(ax_counts.get_zorder() + 1)
    ax.patch.set_visible(False)
    _draw_accuracy_curves(ax, x, series, order)
    _mark_shot_groups(ax, sorted_counts, many_threshold, few_threshold)

    _label_axes(ax, series, order, class_names)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.9)
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)


def _label_axes(ax, series: Mapping[str, np.ndarray], order: np.ndarray, class_names) -> None:
    """Accuracy axis in percent or fraction (whichever the values are), class axis by name when there are few."""
    num_classes = len(order)
    finite = np.concatenate([v[np.isfinite(v)] for v in series.values()])
    top = 100.0 if finite.size == 0 or finite.max() > 1.0 else 1.0
    ax.set_ylim(-0.02 * top, 1.02 * top)
    ax.set_xlim(-0.5, num_classes - 0.5)
    ax.set_ylabel("accuracy (%)" if top == 100.0 else "accuracy")
    if class_names is not None and num_classes <= _MAX_NAMED_TICKS:
        ax.set_xticks(np.arange(num_classes))
        ax.set_xticklabels([str(class_names[i]) for i in order], rotation=90, fontsize=7)
        ax.set_xlabel("class (sorted by training images, most to fewest)")
    else:
        ax.set_xlabel(f"class rank by training images (0 = most; {num_classes} classes)")


def _accuracy_series(per_class_accuracy, label: str, compare, num_classes: int) -> dict[str, np.ndarray]:
    """Method name -> per-class accuracies, checked: unique names, one value per class."""
    series = {label: _as_float_array(per_class_accuracy, "per_class_accuracy")}
    for name, values in (compare or {}).items():
        if name in series:
            raise ValueError(f"compare uses the name {name!r} twice (or also as `label`); names must be unique.")
        series[name] = _as_float_array(values, f"compare[{name!r}]")
    for name, values in series.items():
        if len(values) != num_classes:
            raise ValueError(
                f"Accuracies of {name!r} have {len(values)} entries but train_class_counts has {num_classes}; "
                "pass one value per class, in class-index order."
            )
    return series


def _draw_accuracy_curves(ax, x: np.ndarray, series: Mapping[str, np.ndarray], order: np.ndarray) -> None:
    """Faint per-class points plus a moving average (about 1/25 of the classes) for each method."""
    num_classes = len(x)
    window = max(1, num_classes // 25)
    colors = [f"C{i}" for i in range(10)]
    for i, (name, values) in enumerate(series.items()):
        sorted_values = values[order]
        color = colors[i % len(colors)]
        ax.plot(
            x,
            sorted_values,
            linestyle="none",
            marker=".",
            markersize=3 if num_classes > 100 else 6,
            alpha=0.35 if window > 1 else 0.9,
            color=color,
        )
        smooth = _moving_average(sorted_values, window) if window > 1 else sorted_values
        suffix = f" (moving avg, {window} classes)" if window > 1 else ""
        ax.plot(x, smooth, color=color, linewidth=1.8, label=f"{name}{suffix}")


def _mark_shot_groups(ax, sorted_counts: np.ndarray, many_threshold: int, few_threshold: int) -> None:
    """Dashed lines between the shot groups (standard grouping) and the group names above them."""
    num_classes = len(sorted_counts)
    # Boundaries sit between the last class of one group and the first of the next.
    boundaries = [
        (int((sorted_counts > many_threshold).sum()), f"n = {many_threshold}"),
        (int((sorted_counts >= few_threshold).sum()), f"n = {few_threshold}"),
    ]
    edges = [0] + [b for b, _ in boundaries] + [num_classes]
    for boundary, text in boundaries:
        if 0 < boundary < num_classes:
            ax.axvline(boundary - 0.5, color="0.3", linestyle="--", linewidth=1)
            ax.text(boundary - 0.5, 1.0, f" {text}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    for group, start, stop in zip(("many", "medium", "few"), edges[:-1], edges[1:]):
        if stop > start:
            ax.text(
                (start + stop - 1) / 2,
                1.02,
                group,
                transform=ax.get_xaxis_transform(),
                ha="center",
                fontsize=9,
                fontweight="bold",
            )


def plot_group_usage(
    usage_counts: Sequence[int] | np.ndarray | torch.Tensor, path: str | os.PathLike, title: str | None = None
) -> Path:
    """Bar chart of how often each prompt group was selected (e.g. from `group_usage_counts`).

    A dashed line marks uniform usage (total / number of groups), to show at a glance whether the pool collapsed onto
    a few groups.

    Returns:
        `Path` of the written PNG.

    Example:

    ```python
    >>> from lpt_peft.evaluation.metrics import group_usage_counts
    >>> from lpt_peft.evaluation.plots import plot_group_usage

    >>> usage = group_usage_counts([[0, 2], [2, 3]], num_groups=5)
    >>> plot_group_usage(usage, "group_usage.png", title="Prompt group usage (test)")
    PosixPath('group_usage.png')
    ```
    """
    counts = _as_float_array(usage_counts, "usage_counts")
    if (counts < 0).any():
        raise ValueError("`usage_counts` must be >= 0 (selection counts of each prompt group).")
    num_groups = len(counts)
    total = counts.sum()
    x = np.arange(num_groups)

    fig = _new_figure(max(6.0, min(16.0, num_groups * 0.35)), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(x, counts, color="C0")
    if total > 0:
        ax.axhline(total / num_groups, color="C3", linestyle="--", linewidth=1, label="uniform usage")
        ax.legend(loc="upper right", fontsize=8)
        share = ax.secondary_yaxis("right", functions=(lambda c: 100 * c / total, lambda p: p * total / 100))
        share.set_ylabel("share of selections (%)")
    ax.set_xticks(x if num_groups <= 40 else x[:: max(1, num_groups // 20)])
    ax.set_xlim(-0.6, num_groups - 0.4)
    ax.set_xlabel("prompt group")
    ax.set_ylabel("times selected")
    ax.set_title(title or f"Prompt group usage ({int(total)} selections)")
    return _save_png(fig, path)


def plot_class_group_heatmap(
    counts: np.ndarray | Sequence[Sequence[int]],
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    normalize: bool = True,
    title: str | None = None,
) -> Path:
    """Heatmap of prompt-group selections per class (the paper's "statistic of prompt matching", LPT Fig. 4).

    Args:
        counts: `(C, G)` selection counts, e.g. from [`lpt_peft.evaluation.group_stats.class_group_counts`]; rows in
            the order to draw (sort them by training count for a head-to-tail view).
        path: Where the PNG goes.
        class_names (`Sequence[str]`, *optional*): Row labels (drawn when at most 50 classes).
        normalize (`bool`, defaults to `True`): Show each row's share of its class's selections instead of counts.
        title (`str`, *optional*): Figure title.

    Returns:
        `Path` of the written PNG.

    Raises:
        ValueError: `counts` is not a non-empty 2-D array of non-negative numbers, or `class_names` has another length.
    """
    from lpt_peft.evaluation.group_stats import row_normalize

    matrix = np.asarray(counts, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0 or (matrix < 0).any():
        raise ValueError(f"`counts` must be a non-empty (classes, groups) array of counts >= 0, got {matrix.shape}.")
    if class_names is not None and len(class_names) != matrix.shape[0]:
        raise ValueError(f"{len(class_names)} class names for {matrix.shape[0]} rows.")
    shown = row_normalize(matrix) if normalize else matrix
    num_classes, num_groups = shown.shape
    fig = _new_figure(max(5.0, min(14.0, 2.0 + num_groups * 0.35)), max(3.5, min(14.0, 1.5 + num_classes * 0.22)))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of the class's selections" if normalize else "selections")
    ax.set_xlabel("prompt group")
    ax.set_ylabel("class")
    ax.set_xticks(np.arange(num_groups) if num_groups <= 40 else np.arange(0, num_groups, max(1, num_groups // 20)))
    if class_names is not None and num_classes <= _MAX_NAMED_TICKS:
        ax.set_yticks(np.arange(num_classes), [str(name) for name in class_names], fontsize=7)
    ax.set_title(title or "Prompt-group selections per class")
    return _save_png(fig, path)


def plot_benchmark_bars(
    per_seed: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | os.PathLike,
    metrics: Sequence[str] = ("overall", "few"),
    title: str | None = None,
) -> Path:
    """Grouped bars of the median of each method per metric, with every seed's value as a dot.

    Args:
        per_seed: `{method: {metric: [value of each seed, ...]}}` (accuracy in %).
        path: Where the PNG goes.
        metrics (`Sequence[str]`, defaults to `("overall", "few")`): One bar group per metric.
        title (`str`, *optional*): Figure title.

    Returns:
        `Path` of the written PNG.

    Raises:
        ValueError: `per_seed` is empty.
    """
    methods = list(per_seed)
    if not methods:
        raise ValueError("`per_seed` is empty: nothing to plot.")
    width = 0.8 / len(methods)
    fig = _new_figure(max(6.0, 1.2 * len(metrics) * len(methods)), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for m, method in enumerate(methods):
        for k, metric in enumerate(metrics):
            values = np.asarray([v for v in per_seed[method].get(metric, []) if v is not None], dtype=np.float64)
            x = k + (m - (len(methods) - 1) / 2) * width
            if values.size:
                ax.bar(x, np.median(values), width * 0.9, color=f"C{m}", label=method if k == 0 else None)
                ax.scatter(np.full(values.size, x), values, color="black", s=10, zorder=3)
    ax.set_xticks(np.arange(len(metrics)), list(metrics))
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars may reach the top
    ax.set_title(title or "Median over seeds (bars) and each seed (dots)")
    return _save_png(fig, path)
