"""Summaries across runs: the median of several seeds, as results are reported in docs/results.md."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

METRICS = ("overall", "many", "medium", "few")


def summarize_runs(output_dirs: Sequence[str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """Median (and per-run values) of each method's overall / many / medium / few accuracy over runs.

    Each folder must hold the `results.json` written by a training run. A method missing from some runs is summarised
    over the runs that have it.

    Example:

    ```python
    >>> summary = summarize_runs(["outputs/demo_seed1", "outputs/demo_seed2", "outputs/demo_seed3"])
    >>> summary["LPT phase 2"]["few"]["median"]
    ```
    """
    runs = []
    for directory in output_dirs:
        path = Path(directory) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: is {directory!r} the output_dir of a finished run?")
        runs.append(json.loads(path.read_text()))
    methods: list[str] = []
    for run in runs:
        methods += [name for name in run if name not in methods]
    summary: dict[str, dict[str, Any]] = {}
    for name in methods:
        summary[name] = {}
        for metric in METRICS:
            values = [run[name][metric] for run in runs if name in run and run[name].get(metric) is not None]
            values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
            summary[name][metric] = {
                "median": statistics.median(values) if values else None,
                "runs": values,
            }
    return summary


def summary_table(summary: dict[str, dict[str, Any]]) -> str:
    """Markdown table of medians with the per-run values in brackets."""
    lines = ["| Method | " + " | ".join(m.capitalize() for m in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    for name, metrics in summary.items():
        cells = []
        for metric in METRICS:
            entry = metrics[metric]
            if entry["median"] is None:
                cells.append("n/a")
            else:
                runs = ", ".join(f"{v:.1f}" for v in entry["runs"])
                cells.append(f"**{entry['median']:.2f}** ({runs})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
