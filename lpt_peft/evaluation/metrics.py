"""Long-tailed evaluation: overall and many/medium/few-shot accuracy, result tables and prompt-group usage.

Shot groups are defined by the number of *training* images of each class (never by test counts):

- standard (the usual long-tailed protocol, default): many n > 100, medium 20 <= n <= 100, few n < 20.
  On Places-LT this gives 131 / 163 / 71 classes.
- author (what the official LPT code does): a class with exactly n = 20 counts as few, i.e. few n <= 20 and
  medium 20 < n <= 100. On Places-LT this gives 131 / 157 / 77 classes.

Group accuracy is the accuracy over the test samples whose *true* class is in the group (mean over samples). On a
class-balanced test set (Places-LT, ImageNet-LT, CIFAR-100-LT, iNaturalist 2018) this equals the mean of the per-class
accuracies of the group; on an imbalanced test set it weights classes by their number of test samples.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lpt_peft._extras import requires_extras
from lpt_peft.checks import check_int

SHOT_GROUPINGS = ("standard", "author")
GROUP_NAMES = ("many", "medium", "few")
METRIC_SCRIPT_DIR = Path(__file__).resolve().parent / "metric_scripts" / "shot_accuracy"

__all__ = [
    "GROUP_NAMES",
    "SHOT_GROUPINGS",
    "ShotAccuracyAccumulator",
    "format_results_table",
    "group_usage_counts",
    "load_shot_accuracy_metric",
    "save_results",
    "shot_accuracy",
    "shot_groups",
]


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _as_int_array(values: Any, name: str, *, allow_2d: bool = False) -> np.ndarray:
    """Converts a list / numpy array / torch tensor of indices or counts to int64 numpy, or explains why not."""
    try:
        array = _to_numpy(values)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"`{name}` must be a list, numpy array or torch tensor of integers; got {type(values)}."
        ) from err
    if array.ndim == 0:
        raise ValueError(f"`{name}` must be a 1-D sequence, got a scalar ({array.item()!r}). Wrap it in a list.")
    if array.ndim != 1 and not (allow_2d and array.ndim == 2):
        hint = " If these are logits or scores, pass `logits.argmax(-1)`." if array.ndim == 2 else ""
        raise ValueError(f"`{name}` must be 1-D (class indices), got shape {tuple(array.shape)}.{hint}")
    if array.dtype == np.bool_:
        raise TypeError(f"`{name}` must hold integers, got booleans.")
    if array.size == 0:
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int64)
    if np.issubdtype(array.dtype, np.floating):
        # Float storage of whole numbers (e.g. counts read from a JSON file) is harmless; fractional values are not.
        if np.all(np.isfinite(array)) and np.all(array == np.round(array)):
            return array.astype(np.int64)
        raise TypeError(f"`{name}` must hold whole numbers (class indices or counts), got non-integer floats.")
    raise TypeError(f"`{name}` must hold integers, got dtype {array.dtype}.")


def _check_train_class_counts(train_class_counts: Any) -> np.ndarray:
    counts = _as_int_array(train_class_counts, "train_class_counts")
    if counts.size == 0:
        raise ValueError("`train_class_counts` is empty: pass the number of training images of every class.")
    if (counts < 0).any():
        bad = int(np.flatnonzero(counts < 0)[0])
        raise ValueError(f"`train_class_counts[{bad}]` is {int(counts[bad])}; training counts must be >= 0.")
    return counts


def _check_grouping(grouping: str) -> None:
    if grouping not in SHOT_GROUPINGS:
        raise ValueError(
            f"Unknown grouping {grouping!r}; choose one of {list(SHOT_GROUPINGS)} ('standard': few n < 20, "
            "'author': few n <= 20 as in the official LPT code)."
        )


def _check_range(array: np.ndarray, name: str, num_classes: int) -> None:
    if array.size == 0:
        return
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise ValueError(
            f"`{name}` contains {bad}, outside the valid class range [0, {num_classes}) where {num_classes} = "
            "len(train_class_counts). Check that labels and train_class_counts come from the same label mapping."
        )


def shot_groups(
    train_class_counts: Sequence[int] | np.ndarray | torch.Tensor,
    many_threshold: int = 100,
    few_threshold: int = 20,
    grouping: str = "standard",
) -> dict[str, list[int]]:
    """Splits classes into many / medium / few-shot groups by their number of training images.

    Args:
        train_class_counts: Number of training images of each class; index = class id.
        many_threshold: Classes with more than this many training images are "many".
        few_threshold: Classes with fewer than this many training images are "few" (`grouping="standard"`), or with at
            most this many (`grouping="author"`).
        grouping: `"standard"` (many n > 100, medium 20 <= n <= 100, few n < 20) or `"author"` (n = 20 counts as
            few, as in the official LPT code).

    Returns:
        `dict` with keys `"many"`, `"medium"`, `"few"`, each a sorted list of class indices.

    Example:

    ```python
    >>> from lpt_peft.evaluation.metrics import shot_groups

    >>> shot_groups([500, 101, 100, 20, 19, 3])
    {'many': [0, 1], 'medium': [2, 3], 'few': [4, 5]}
    >>> shot_groups([500, 101, 100, 20, 19, 3], grouping="author")
    {'many': [0, 1], 'medium': [2], 'few': [3, 4, 5]}
    ```
    """
    _check_grouping(grouping)
    counts = _check_train_class_counts(train_class_counts)
    if not few_threshold < many_threshold:
        raise ValueError(
            f"few_threshold ({few_threshold}) must be smaller than many_threshold ({many_threshold}); "
            "the defaults are 20 and 100."
        )
    many = counts > many_threshold
    few = counts <= few_threshold if grouping == "author" else counts < few_threshold
    medium = ~many & ~few
    return {name: np.flatnonzero(mask).tolist() for name, mask in zip(GROUP_NAMES, (many, medium, few))}


def _percent(correct: int, total: int) -> float:
    return 100.0 * correct / total if total > 0 else float("nan")


def _results_from_counts(
    correct: np.ndarray, total: np.ndarray, train_class_counts: Any, grouping: str
) -> dict[str, Any]:
    """Builds the result dict of `shot_accuracy` from per-class correct / total test counts."""
    groups = shot_groups(train_class_counts, grouping=grouping)
    num_samples = int(total.sum())
    if num_samples == 0:
        raise ValueError("No test samples to evaluate: pass at least one prediction / reference pair.")
    results: dict[str, Any] = {"overall": _percent(int(correct.sum()), num_samples)}
    for name in GROUP_NAMES:
        idx = np.asarray(groups[name], dtype=np.int64)
        results[name] = _percent(int(correct[idx].sum()), int(total[idx].sum()))
    results["per_class"] = [_percent(int(c), int(t)) for c, t in zip(correct, total)]
    results["per_class_count"] = [int(t) for t in total]
    results["num_samples"] = num_samples
    return results


def shot_accuracy(
    predictions: Sequence[int] | np.ndarray | torch.Tensor,
    references: Sequence[int] | np.ndarray | torch.Tensor,
    train_class_counts: Sequence[int] | np.ndarray | torch.Tensor,
    grouping: str = "standard",
) -> dict[str, Any]:
    """Overall and many / medium / few-shot top-1 accuracy (in percent) of class predictions.

    A group's accuracy is computed over the test samples whose *true* class belongs to the group (mean over samples;
    on a class-balanced test set this equals the mean of the group's per-class accuracies).

    Args:
        predictions: Predicted class index per sample (e.g. `logits.argmax(-1)`), shape `(N,)`.
        references: True class index per sample, shape `(N,)`.
        train_class_counts: Number of training images of each class; its length is the number of classes `C`.
        grouping: `"standard"` or `"author"`, see [`shot_groups`].

    Returns:
        `dict` with
        - `"overall"`, `"many"`, `"medium"`, `"few"`: accuracies in percent (`float`). A group without classes, or
          whose classes have no test sample, is `nan` (an absent group has no accuracy, and 0 would be misleading).
        - `"per_class"`: list of `C` accuracies in percent, `nan` for a class without test samples.
        - `"per_class_count"`: list of `C` test sample counts.
        - `"num_samples"`: `N`.

    Example:

    ```python
    >>> from lpt_peft.evaluation.metrics import shot_accuracy

    >>> res = shot_accuracy([0, 1, 2, 2], [0, 1, 2, 1], train_class_counts=[200, 50, 5])
    >>> res["overall"], res["many"], res["medium"], res["few"]
    (75.0, 100.0, 50.0, 100.0)
    ```
    """
    counts = _check_train_class_counts(train_class_counts)
    num_classes = len(counts)
    preds = _as_int_array(predictions, "predictions")
    refs = _as_int_array(references, "references")
    if len(preds) != len(refs):
        raise ValueError(
            f"`predictions` has {len(preds)} entries but `references` has {len(refs)}; they must pair one to one."
        )
    _check_range(preds, "predictions", num_classes)
    _check_range(refs, "references", num_classes)
    total = np.bincount(refs, minlength=num_classes)
    correct = np.bincount(refs[preds == refs], minlength=num_classes)
    return _results_from_counts(correct, total, counts, grouping)


class ShotAccuracyAccumulator:
    """Accumulates per-class correct / total counts batch by batch, then reports [`shot_accuracy`] results.

    Only two int64 vectors of length `num_classes` are kept, so evaluation over any number of batches uses constant
    memory. The counts live on the device of the first batch (no host sync per batch beyond the range check).

    Distributed evaluation: the accumulator is deliberately process-local. Gather first, then update, so that every
    process sees the whole data set exactly once (`gather_for_metrics` also drops the samples that the distributed
    sampler duplicated to even out the last batch):

    ```python
    preds, labels = accelerator.gather_for_metrics((logits.argmax(-1), labels))
    accumulator.update(preds, labels)
    ```

    Alternatively, update without gathering on each process and combine the accumulators with [`merge`] (that
    counts duplicated padding samples, so prefer the gather when it is available).

    Example:

    ```python
    >>> import torch
    >>> from lpt_peft.evaluation.metrics import ShotAccuracyAccumulator

    >>> acc = ShotAccuracyAccumulator(num_classes=3)
    >>> acc.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    >>> acc.update(torch.tensor([2, 2]), torch.tensor([2, 1]))
    >>> acc.compute(train_class_counts=[200, 50, 5])["overall"]
    75.0
    ```
    """

    def __init__(self, num_classes: int):
        self.num_classes = check_int(num_classes, "`num_classes`")
        self.reset()

    def reset(self) -> None:
        """Clears all counts."""
        self.correct = torch.zeros(self.num_classes, dtype=torch.int64)
        self.total = torch.zeros(self.num_classes, dtype=torch.int64)
        self._device_set = False

    @property
    def num_samples(self) -> int:
        return int(self.total.sum())

    def _as_index_tensor(self, values: Any, name: str) -> torch.Tensor:
        tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(_as_int_array(values, name))
        if tensor.ndim != 1:
            hint = " If these are logits, pass `logits.argmax(-1)`." if tensor.ndim == 2 else ""
            raise ValueError(f"`{name}` must have shape (N,), got {tuple(tensor.shape)}.{hint}")
        if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
            raise TypeError(f"`{name}` must be an integer tensor of class indices, got dtype {tensor.dtype}.")
        if tensor.numel() > 0:
            low, high = int(tensor.min()), int(tensor.max())
            if low < 0 or high >= self.num_classes:
                bad = low if low < 0 else high
                raise ValueError(
                    f"`{name}` contains {bad}, outside the valid class range [0, {self.num_classes}) where "
                    f"{self.num_classes} = num_classes of the accumulator."
                )
        return tensor.long()

    @torch.no_grad()
    def update(
        self,
        predictions: torch.Tensor | np.ndarray | Sequence[int],
        references: torch.Tensor | np.ndarray | Sequence[int],
    ) -> None:
        """Adds a batch of predicted and true class indices (each of shape `(N,)`)."""
        preds = self._as_index_tensor(predictions, "predictions")
        refs = self._as_index_tensor(references, "references")
        if preds.shape != refs.shape:
            raise ValueError(
                f"`predictions` has {preds.numel()} entries but `references` has {refs.numel()}; they must pair "
                "one to one."
            )
        if not self._device_set:
            self.correct, self.total = self.correct.to(refs.device), self.total.to(refs.device)
            self._device_set = True
        preds, refs = preds.to(self.total.device), refs.to(self.total.device)
        self.total += torch.bincount(refs, minlength=self.num_classes)
        self.correct += torch.bincount(refs[preds == refs], minlength=self.num_classes)

    def merge(self, other: ShotAccuracyAccumulator) -> ShotAccuracyAccumulator:
        """Adds the counts of `other` (e.g. from another process or data shard) into this accumulator; returns self."""
        if not isinstance(other, ShotAccuracyAccumulator):
            raise TypeError(f"Can only merge another ShotAccuracyAccumulator, got {type(other).__name__}.")
        if other.num_classes != self.num_classes:
            raise ValueError(
                f"Cannot merge accumulators over different class counts ({self.num_classes} vs {other.num_classes})."
            )
        self.total += other.total.to(self.total.device)
        self.correct += other.correct.to(self.correct.device)
        return self

    def compute(
        self, train_class_counts: Sequence[int] | np.ndarray | torch.Tensor, grouping: str = "standard"
    ) -> dict[str, Any]:
        """Returns the same dict as [`shot_accuracy`] over everything added so far."""
        counts = _check_train_class_counts(train_class_counts)
        if len(counts) != self.num_classes:
            raise ValueError(
                f"`train_class_counts` has {len(counts)} classes but the accumulator was built for "
                f"{self.num_classes}; both must describe the same label set."
            )
        return _results_from_counts(self.correct.cpu().numpy(), self.total.cpu().numpy(), counts, grouping)


def load_shot_accuracy_metric(**kwargs: Any):
    """Loads the `shot_accuracy` metric as an `evaluate.EvaluationModule` from the script shipped with this package.

    The script is read from the local package folder, so nothing is downloaded (works with `HF_HUB_OFFLINE=1` /
    `HF_EVALUATE_OFFLINE=1`). Keyword arguments go to `evaluate.load` (e.g. `keep_in_memory=True`, `num_process`,
    `process_id`, `experiment_id`).

    Example:

    ```python
    >>> from lpt_peft.evaluation.metrics import load_shot_accuracy_metric

    >>> metric = load_shot_accuracy_metric(keep_in_memory=True)
    >>> metric.add_batch(predictions=[0, 1, 2], references=[0, 1, 1])
    >>> metric.compute(train_class_counts=[200, 50, 5])["medium"]
    50.0
    ```
    """
    # deferred: importing evaluate costs seconds and most users of this module do not need it
    with requires_extras(__name__):
        import evaluate

    script = METRIC_SCRIPT_DIR / "shot_accuracy.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"The shot_accuracy metric script is missing at {script}. The installed package was built without its "
            "package data; reinstall lpt-peft (pyproject must ship lpt_peft/evaluation/metric_scripts/**/*.py)."
        )
    return evaluate.load(str(METRIC_SCRIPT_DIR), **kwargs)


def _format_number(value: Any) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def format_results_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Formats results of several methods as a Markdown table of overall / many / medium / few accuracy.

    Args:
        rows: Method name -> result dict holding at least `"overall"`, `"many"`, `"medium"` and `"few"` (as returned by
            [`shot_accuracy`]; other keys are ignored). Missing / NaN values print as `n/a`.

    Example:

    ```python
    >>> from lpt_peft.evaluation.metrics import format_results_table

    >>> print(format_results_table({"LPT": {"overall": 50.07, "many": 49.27, "medium": 52.31, "few": 46.88}}))
    | Method | Overall | Many | Medium | Few |
    |---|---:|---:|---:|---:|
    | LPT | 50.07 | 49.27 | 52.31 | 46.88 |
    ```
    """
    if not isinstance(rows, Mapping) or not rows:
        raise ValueError("`rows` must be a non-empty dict mapping a method name to its result dict.")
    columns = ("overall", *GROUP_NAMES)
    lines = ["| Method | Overall | Many | Medium | Few |", "|---|---:|---:|---:|---:|"]
    for name, result in rows.items():
        if not isinstance(result, Mapping):
            raise TypeError(f"Result of method {name!r} must be a dict, got {type(result).__name__}.")
        missing = [key for key in columns if key not in result]
        if missing:
            raise ValueError(f"Result of method {name!r} lacks {missing}; pass the dict returned by shot_accuracy().")
        # A "|" in a method name would split the Markdown cell.
        cells = [str(name).replace("|", "\\|")] + [_format_number(result[key]) for key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    """Converts numpy / torch values to plain Python; NaN / inf become None so that the file is strict JSON."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().tolist()
    elif isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_results(rows: Mapping[str, Mapping[str, Any]], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Writes `results.json` (all keys, NaN as null) and `results.md` ([`format_results_table`]) into `out_dir`.

    Returns:
        The paths of `results.json` and `results.md`.

    Example:

    ```python
    >>> from lpt_peft.evaluation.metrics import save_results, shot_accuracy

    >>> res = shot_accuracy([0, 1, 2], [0, 1, 1], train_class_counts=[200, 50, 5])
    >>> json_path, md_path = save_results({"LPT": res}, "outputs/eval")
    ```
    """
    table = format_results_table(rows)  # validates rows before anything is written
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(_jsonable(rows), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    md_path.write_text(table + "\n", encoding="utf-8")
    return json_path, md_path


def group_usage_counts(group_indices: torch.Tensor | np.ndarray | Sequence, num_groups: int) -> torch.LongTensor:
    """Counts how often each prompt group was selected.

    Args:
        group_indices: Selected group indices, shape `(N, top_k)` (one row per image) or `(N,)`. Each selection counts
            once, so the counts sum to `N * top_k`.
        num_groups: Size of the prompt-group pool.

    Returns:
        `torch.LongTensor` of shape `(num_groups,)` (on CPU).

    Example:

    ```python
    >>> from lpt_peft.evaluation.metrics import group_usage_counts

    >>> group_usage_counts([[0, 2], [2, 3]], num_groups=5)
    tensor([1, 0, 2, 1, 0])
    ```
    """
    check_int(num_groups, "`num_groups`")
    indices = _as_int_array(group_indices, "group_indices", allow_2d=True).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= num_groups):
        bad = int(indices.min()) if indices.min() < 0 else int(indices.max())
        raise ValueError(f"`group_indices` contains {bad}, outside [0, {num_groups}) where {num_groups} = num_groups.")
    return torch.bincount(torch.from_numpy(indices), minlength=num_groups)
