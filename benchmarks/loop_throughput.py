"""End-to-end training throughput: images/s of the real training loop over images/s of the pure training step.

Issue 11 asks how much of the pure step's speed the training loop keeps (target: loop / pure >= 0.90 on a GPU).

- **loop**: `lpt_peft.training.loop.train_phase`, the loop a run trains with: its DataLoader (`--num_workers`
  processes decoding and augmenting images), the dual sampler, the objective (`--loss`), SGD + cosine schedule, the
  per-step logging, no checkpoints (as a learning-rate trial runs it) and no validation; one epoch of
  `--warmup_steps + --steps` optimizer updates. Timed from the end of update `--warmup_steps` to the end of the last
  update (the device synchronised at both ends), so the workers' start-up and the first, slower steps are left out.
- **pure step**: the same model, objective and optimizer (prepared by the same accelerator, same autocast) on batches
  the loop's own loader produced, collated and moved to the device beforehand: forward + loss + backward + optimizer
  step, nothing else; `--warmup_steps` untimed steps, then `--steps` timed ones.

The two run alternately `--repeats` times (loop first, then pure; the order reversed every other repeat); the
report gives the median images/s of each and the median over repeats of the paired ratio loop / pure.

Usage:

```bash
python benchmarks/loop_throughput.py                                  # tiny-random on the CPU: a smoke run
python benchmarks/loop_throughput.py --model_name_or_path demo --image_size 224 --steps 10 --num_workers 2
python benchmarks/loop_throughput.py --device cuda --model_name_or_path random-vit-b16 --image_size 224 \\
    --num_classes 100 --n_max 400 --batch_size 128 --num_workers 8 --mixed_precision bf16 --steps 30 --phase 1
```

`--model_name_or_path` takes what training takes (`tiny-random`, `demo`, a checkpoint folder) or `random-vit-b16`:
ViT-B/16 with random weights, built offline as `benchmarks/benchmark_lpt.py --preset gpu` builds its backbone.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

RANDOM_VIT_B16 = "random-vit-b16"
TARGET = 0.90  # issue 11: the loop keeps >= 90% of the pure step's images/s (on the GPU)
PURE_BATCHES = 4  # distinct pre-collated batches the pure step cycles through


class UsageError(ValueError):
    """Options this measurement cannot run with; `main` prints the message alone (no traceback) and exits 2."""


# ---------------------------------------------------------------------------------------------------- options
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="Default cpu; cuda: the first GPU.")
    parser.add_argument("--dataset", default="synthetic", help="A registered data set (default synthetic).")
    parser.add_argument("--num_classes", type=int, help="Data-set option (synthetic: default 10).")
    parser.add_argument("--n_max", type=int, help="Data-set option: images of the largest class.")
    parser.add_argument("--image_size", type=int, default=32, help="Input resolution in pixels (default 32).")
    parser.add_argument(
        "--model_name_or_path", default="tiny-random", help=f"tiny-random, demo, a folder, or {RANDOM_VIT_B16}."
    )
    parser.add_argument("--shared_layers", type=int, help="K (default: min(6, half the backbone's layers)).")
    parser.add_argument("--batch_size", type=int, default=8, help="Per branch: a dual step trains on 2 x this.")
    parser.add_argument("--steps", type=int, default=10, help="Timed optimizer steps of each measurement.")
    parser.add_argument("--warmup_steps", type=int, default=2, help="Untimed steps first (>= 1).")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers of the loop.")
    parser.add_argument("--phase", type=int, choices=[1, 2], default=1)
    parser.add_argument("--repeats", type=int, default=3, help="Paired loop / pure measurements.")
    parser.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default="no")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", "--json_out", dest="json_out", type=Path, help="Write the results here.")
    opts = parser.parse_args(argv)
    for name in ("image_size", "batch_size", "steps", "warmup_steps", "repeats"):
        if getattr(opts, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(opts, name)}.")
    if opts.num_workers < 0:
        parser.error(f"--num_workers must be >= 0, got {opts.num_workers}.")
    if opts.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is visible to torch here; use --device cpu.")
    if opts.model_name_or_path == RANDOM_VIT_B16 and opts.image_size % 16:
        parser.error(f"{RANDOM_VIT_B16} takes images of a multiple of 16 px, got --image_size {opts.image_size}.")
    return opts


def training_arguments(opts: argparse.Namespace, depth: int, output_dir: str):
    """The run's `LPTTrainingArguments`: one epoch of warm-up + timed steps, no checkpoints, no trackers."""
    from lpt_peft.training.arguments import LPTTrainingArguments

    data_options = {k: getattr(opts, k) for k in ("num_classes", "n_max") if getattr(opts, k) is not None}
    values = dict(
        dataset=opts.dataset,
        **data_options,
        image_size=opts.image_size,
        model_name_or_path=opts.model_name_or_path,
        shared_layers=opts.shared_layers if opts.shared_layers is not None else min(6, depth // 2),
        batch_size=opts.batch_size,
        num_workers=opts.num_workers,
        mixed_precision=opts.mixed_precision,
        epochs_phase1=1,
        epochs_phase2=1,
        max_steps_per_epoch=opts.warmup_steps + opts.steps,
        checkpointing_steps=None,
        report_to="none",
        seed=opts.seed,
        output_dir=output_dir,
    )
    try:
        return LPTTrainingArguments(**values)
    except ValueError as err:  # the training options' own checks (e.g. batch size vs samples per class)
        raise UsageError(str(err)) from err


def load_backbone_for(opts: argparse.Namespace) -> nn.Module:
    if opts.model_name_or_path != RANDOM_VIT_B16:
        from lpt_peft.backbones import load_backbone

        return load_backbone(opts.model_name_or_path, opts.image_size)
    import benchmark_lpt

    values = {**benchmark_lpt.PRESETS["gpu"], "preset": "gpu", "device": "cpu", "image_size": opts.image_size}
    return benchmark_lpt.build_backbone(benchmark_lpt.Settings(**values), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------------- setup
@dataclass
class Bench:
    """What both measurements share."""

    opts: argparse.Namespace
    args: Any  # LPTTrainingArguments
    data: Any  # LongTailDataset, without its validation split
    model: nn.Module  # PeftModel
    accelerator: Any
    split_sizes: tuple[int, ...]  # the sampler's parts of a batch: (class-balanced, instance-balanced)

    @property
    def images_per_step(self) -> int:
        return sum(self.split_sizes)


def setup(opts: argparse.Namespace, output_dir: str) -> Bench:
    """Data, model and accelerator; refuses an epoch too short for warm-up + timed steps before building the model.

    Raises:
        UsageError: the training split gives fewer steps per epoch than `--warmup_steps + --steps`, or options the
            training arguments refuse.
    """
    from lpt_peft.training.builders import build_peft_model, make_accelerator, sampler_from_args
    from lpt_peft.training.data import build_dataset, check_dataset, dataset_labels

    backbone = load_backbone_for(opts)
    args = training_arguments(opts, backbone.config.num_hidden_layers, output_dir)
    accelerator = make_accelerator(cpu=opts.device == "cpu", mixed_precision=opts.mixed_precision)
    data = build_dataset(args)
    try:
        sampler = sampler_from_args(args, dataset_labels(data.train), accelerator)
    except ValueError as err:  # e.g. fewer classes than a class-balanced batch draws
        raise UsageError(str(err)) from err
    needed = opts.warmup_steps + opts.steps
    if len(sampler) < needed:
        raise UsageError(
            f"The training split ({len(data.train)} images) gives {len(sampler)} steps per epoch at --batch_size "
            f"{opts.batch_size}, but the measurement needs {needed} (--warmup_steps + --steps) in one epoch: raise "
            "--n_max or --num_classes, or lower --steps."
        )
    model = build_peft_model(backbone, args, data.num_classes)
    check_dataset(data, data.num_classes)
    model.to(accelerator.device)
    # No validation: a validation pass belongs to the epoch's end, outside the timed steps, and is not loop overhead.
    data = dataclasses.replace(data, val=None)
    return Bench(opts, args, data, model, accelerator, tuple(sampler.split_sizes))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- measurements
def _step_clock(bench: Bench, marks: tuple[int, int]):
    """A `TrainingCallback` that notes the time (device synchronised) after the optimizer updates in `marks`."""
    from lpt_peft.training.loop import TrainingCallback

    class StepClock(TrainingCallback):
        def __init__(self) -> None:
            self.times: dict[int, float] = {}

        def on_step_end(self, phase: int, state) -> None:
            if state.global_step in marks:
                synchronize(bench.accelerator.device)
                self.times[state.global_step] = time.perf_counter()

    return StepClock()


def loop_images_per_second(bench: Bench) -> float:
    """Images/s of `train_phase` over the timed steps (objective and sampler built from the arguments, as a run does).

    Raises:
        RuntimeError: the loop stopped before the last timed step.
    """
    from lpt_peft.training.checkpointing import TrainerState
    from lpt_peft.training.loop import train_phase
    from lpt_peft.training.recipe import _NoCheckpoints

    opts = bench.opts
    start, end = opts.warmup_steps, opts.warmup_steps + opts.steps
    clock = _step_clock(bench, (start, end))
    train_phase(
        bench.model, opts.phase, bench.data, bench.args, bench.accelerator, _NoCheckpoints(), TrainerState(),
        callbacks=[clock],
    )  # fmt: skip
    if set(clock.times) != {start, end}:
        raise RuntimeError(f"train_phase stopped before step {end} (steps timed: {sorted(clock.times)}).")
    return opts.steps * bench.images_per_step / (clock.times[end] - clock.times[start])


def collated_batches(bench: Bench, count: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` batches of the loop's own loader (same transform, sampler and collation), on the device."""
    from lpt_peft.data.seeding import STREAM_AUGMENT
    from lpt_peft.data.transforms import LPTImageTransform, TransformedImageDataset
    from lpt_peft.training.builders import sampler_from_args
    from lpt_peft.training.data import dataset_labels, make_train_loader

    args, accelerator = bench.args, bench.accelerator
    transform = LPTImageTransform(
        args.image_size, train=True, resize_size=args.resize_size, mean=args.mean, std=args.std,
        scale=(args.crop_scale_min, 1.0),
    )  # fmt: skip
    seed = (args.seed, bench.opts.phase, STREAM_AUGMENT)  # the loop's augmentation stream
    train_set = TransformedImageDataset(bench.data.train, transform, seed=seed)
    sampler = sampler_from_args(args, dataset_labels(bench.data.train), accelerator)
    sampler.set_epoch(0)
    serial = copy.copy(args)
    serial.num_workers = 0  # a few batches: no worker start-up; each image's augmentation is seeded alike
    loader = make_train_loader(train_set, sampler, serial, accelerator)
    device = accelerator.device
    return [{k: v.to(device) for k, v in batch.items()} for batch in itertools.islice(loader, count)]


def pure_images_per_second(bench: Bench, batches: list[dict[str, torch.Tensor]]) -> float:
    """Images/s of forward + loss + backward + SGD step on pre-collated device batches (no loader, no logging)."""
    from lpt_peft.training.builders import objective_from_args
    from lpt_peft.training.loop import scaled_learning_rate, split_batch

    opts, args, accelerator = bench.opts, bench.args, bench.accelerator
    model = bench.model
    model.base_model.set_phase(opts.phase)
    objective = objective_from_args(args, bench.data.train_class_counts, 1, accelerator.device)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = scaled_learning_rate(args, accelerator.num_processes)
    optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)
    prepared, optimizer = accelerator.prepare(model, optimizer)  # as train_phase prepares them
    prepared.train()

    def step(batch: dict[str, torch.Tensor]) -> None:
        with accelerator.autocast():
            output = prepared(pixel_values=batch["pixel_values"])
        (cb_logits, cb_labels, cb_match), *rest = split_batch(output, batch["labels"], bench.split_sizes)
        ib_logits, ib_labels, ib_match = rest[0] if rest else (None, None, None)
        losses = objective(
            cb_logits, cb_labels, ib_logits, ib_labels, 0, cb_match_score=cb_match, ib_match_score=ib_match
        )
        accelerator.backward(losses["loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    cycle = itertools.cycle(batches)
    for _ in range(opts.warmup_steps):
        step(next(cycle))
    synchronize(accelerator.device)
    start = time.perf_counter()
    for _ in range(opts.steps):
        step(next(cycle))
    synchronize(accelerator.device)
    return opts.steps * bench.images_per_step / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------- driver
def measure(opts: argparse.Namespace) -> dict[str, Any]:
    """`--repeats` paired measurements (loop and pure step alternately) and their summary."""
    with tempfile.TemporaryDirectory(prefix="loop_throughput_") as output_dir:  # train_phase saves its best adapter
        bench = setup(opts, output_dir)
        batches = collated_batches(bench, PURE_BATCHES)
        loop, pure = [], []
        for repeat in range(opts.repeats):
            order = ("loop", "pure") if repeat % 2 == 0 else ("pure", "loop")
            for what in order:
                if what == "loop":
                    loop.append(loop_images_per_second(bench))
                else:
                    pure.append(pure_images_per_second(bench, batches))
            print(f"repeat {repeat + 1}/{opts.repeats}: loop {loop[-1]:.1f}, pure {pure[-1]:.1f} img/s", flush=True)
    return summarize(opts, bench, loop, pure)


def summarize(opts: argparse.Namespace, bench: Bench, loop: list[float], pure: list[float]) -> dict[str, Any]:
    import benchmark_lpt

    device = bench.accelerator.device
    ratios = [a / b for a, b in zip(loop, pure)]
    ratio = statistics.median(ratios)
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "machine": benchmark_lpt.machine_info(device),
        "device": str(device),
        "images_per_step": bench.images_per_step,
        "split_sizes": list(bench.split_sizes),
        "loop_images_per_s": loop,
        "pure_images_per_s": pure,
        "paired_ratios": ratios,
        "loop_median_images_per_s": statistics.median(loop),
        "pure_median_images_per_s": statistics.median(pure),
        "loop_over_pure": ratio,
        "target": f">= {TARGET}",
    }
    # The target is the GPU's (issue 11); on the CPU the step is slow enough to hide any loader, so it is shown only.
    result["met"] = ratio >= TARGET if device.type == "cuda" else None
    if not all(math.isfinite(x) and x > 0 for x in loop + pure):
        raise RuntimeError(f"Non-finite or non-positive throughput measured: loop {loop}, pure {pure}.")
    return result


def print_report(result: dict[str, Any]) -> None:
    s = result["settings"]
    loop, pure = result["loop_images_per_s"], result["pure_images_per_s"]
    print(
        f"\n=== loop throughput: {s['model_name_or_path']} at {s['image_size']} px, phase {s['phase']}, batch "
        f"{result['images_per_step']} images per step {tuple(result['split_sizes'])}, {s['num_workers']} worker(s), "
        f"{s['steps']} timed steps after {s['warmup_steps']}, {result['device']}, mixed precision "
        f"{s['mixed_precision']} ==="
    )
    for label, values in (("loop (train_phase)", loop), ("pure step", pure)):
        print(f"{label:>18}: median {statistics.median(values):.1f} img/s [{min(values):.1f}, {max(values):.1f}]")
    met = {True: "met", False: "NOT met", None: "informational off the GPU"}[result["met"]]
    print(
        f"loop / pure (median of paired ratios): {result['loop_over_pure']:.3f} "
        f"[{min(result['paired_ratios']):.3f}, {max(result['paired_ratios']):.3f}]; target {result['target']}: {met}"
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    # peft asks transformers a deprecated question on every get_peft_model; it says nothing about this benchmark.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    try:
        result = measure(opts)
    except UsageError as err:
        print(f"loop_throughput.py: error: {err}", file=sys.stderr)
        return 2
    print_report(result)
    if opts.json_out:
        opts.json_out.parent.mkdir(parents=True, exist_ok=True)
        opts.json_out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
