"""Phase-2 ablations of the group pool, for measuring what the group prompts do (issue 10).

Two variants replace what a phase-2 forward feeds its layers K+1..L, without changing the model's code or weights:

- `"no_group_prompts"`: the layers get no group prompts at all (shared prompts only), so the main pass equals the
  query pass and phase 2 trains the cosine head (and the keys, through the matching term) on phase-1 features: the
  control for "does the group pool add anything beyond more head training?".
- `"random_groups"`: each image uses `top_k` distinct groups drawn uniformly at random (a seeded generator, a new
  draw per forward) instead of the `top_k` best-matching keys: the control for "does the matching matter?".

`"none"` is the paper's behaviour. The others (`top_k` 1/2, more groups, a longer phase 2) are training options.

```python
>>> with group_ablation("random_groups", seed=0):
...     run_training(args)  # phase 2 trains and is evaluated with random groups
```

From the command line (what `benchmarks/recipe_benchmark.py --ablations` runs):
`python -m lpt_peft.evaluation.ablations --ablation random_groups -- <training options>`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import weakref
from collections.abc import Iterator

import torch

from lpt_peft.tuner.layer import LPTAttention

ABLATIONS = ("none", "no_group_prompts", "random_groups")


class _RandomGroups:
    """Draws `top_k` distinct groups per image, once per forward: every layer of one forward gets the same draw."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self._for: weakref.ref | None = None
        self.indices: torch.Tensor | None = None

    def indices_for(self, matched: torch.Tensor, num_groups: int) -> torch.Tensor:
        # A forward passes one `lpt_group_indices` tensor to all its layers (and to their recomputation under
        # gradient checkpointing): the same tensor object means the same forward, so the same draw.
        if self._for is None or self._for() is not matched:
            batch, top_k = matched.shape
            scores = torch.rand(batch, num_groups, generator=self.generator)
            self.indices = scores.topk(top_k, dim=-1).indices.to(matched.device)  # uniform k-subsets
            self._for = weakref.ref(matched)
        return self.indices


@contextlib.contextmanager
def group_ablation(ablation: str, seed: int = 0) -> Iterator[_RandomGroups | None]:
    """
    Within the block, every LPT phase-2 forward (training and evaluation) runs the `ablation` variant.

    It replaces [`LPTAttention.group_prompts`] (the per-image group prompts of one layer) for the whole process and
    restores it on exit; the model's `group_indices` output still reports the matched groups.

    Args:
        ablation (`str`): One of [`ABLATIONS`].
        seed (`int`, defaults to 0): Seed of the `"random_groups"` draws (reproducible given the forward order).

    Yields:
        The random-group drawer (its `.indices` are the last draw, `(batch, top_k)`) for `"random_groups"`, else
        `None`.

    Raises:
        ValueError: an unknown `ablation`.
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"Unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}.")
    if ablation == "none":
        yield None
        return
    original = LPTAttention.group_prompts
    drawer = _RandomGroups(seed) if ablation == "random_groups" else None

    def group_prompts(self: LPTAttention, adapter_name: str, group_indices: torch.Tensor) -> torch.Tensor:
        pool = self.lpt_group_prompt[adapter_name]
        if drawer is None:  # no group prompts: zero of them, so attention sees the shared prompts only
            return pool.new_zeros((group_indices.shape[0], 0, pool.shape[-1]))
        return original(self, adapter_name, drawer.indices_for(group_indices, pool.shape[0]))

    LPTAttention.group_prompts = group_prompts
    try:
        yield drawer
    finally:
        LPTAttention.group_prompts = original


def main(argv: list[str] | None = None) -> None:
    """`python -m lpt_peft.evaluation.ablations --ablation NAME [--ablation_seed S] -- <training options>`.

    A bad training option or missing data prints `error: <message>` and exits with status 2, as the training script.
    """
    from lpt_peft.cli import TRAINING_FLAGS, cli_entry

    cli_entry(flags=TRAINING_FLAGS)(_main)(argv)


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run LPT training with a phase-2 ablation.")
    parser.add_argument("--ablation", choices=ABLATIONS, required=True)
    parser.add_argument("--ablation_seed", type=int, default=0)
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, training = parser.parse_args(argv[:split]), argv[split + 1 :]
    from lpt_peft.training.arguments import parse_training_args
    from lpt_peft.training.run import run_training

    args = parse_training_args(training)
    with group_ablation(own.ablation, own.ablation_seed):
        run_training(args)


if __name__ == "__main__":
    main()
