"""Export a trained LPT classifier (an adapter folder) through torch.export (.pt2) and to ONNX, and check both.

    python examples/export_lpt.py --adapter outputs/demo/phase2 --output_dir exported/demo
    python examples/export_lpt.py --adapter out/adapter --base out/base --format onnx --check_batch_sizes 1 32

Writes `<output_dir>/<name>.pt2` (a `torch.export.ExportedProgram`, load with `torch.export.load`) and/or
`<output_dir>/<name>.onnx` (run with onnxruntime). Input: `pixel_values` (batch, 3, image_size, image_size), already
preprocessed (the preprocessing and class names are stored in the files' metadata); outputs: `logits` and, for a
phase-2 adapter, `group_indices`. The batch size is free; the image size, the phase and the adapter are fixed.

After exporting, each file is run on random inputs at the --check_batch_sizes and compared with the PyTorch model:
the largest logit difference is printed, and a difference above --tolerance or a changed prediction or group choice
is an error (exit status 1). --check_batch_sizes with no value skips the check.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

import lpt_peft  # noqa: F401  (registers LPT with peft)
from lpt_peft.cli import LPTUsageError, cli_entry
from lpt_peft.export import export_onnx, load_program, save_program
from lpt_peft.inference import load_classifier


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True, help="LPT adapter folder or Hub id.")
    parser.add_argument("--base", default=None, help="Base model folder, Hub id, 'demo' (default: the adapter's).")
    parser.add_argument("--output_dir", required=True, help="Folder for the exported files (created if missing).")
    parser.add_argument("--name", default="lpt", help="File name without suffix.")
    parser.add_argument("--format", nargs="+", choices=["pt2", "onnx"], default=["pt2", "onnx"])
    parser.add_argument("--image_size", type=int, default=None, help="Override: input size (default: the adapter's).")
    parser.add_argument("--opset_version", type=int, default=None, help="ONNX opset (default: the exporter's).")
    parser.add_argument("--overwrite", action="store_true", help="Replace existing exported files.")
    parser.add_argument("--check_batch_sizes", type=int, nargs="*", default=[1, 3, 8])
    parser.add_argument("--tolerance", type=float, default=1e-4, help="Largest allowed logit difference.")
    return parser.parse_args(argv)


def compare(classifier, run, batch_sizes, tolerance: float, seed: int = 0) -> float:
    """Run `run(pixel_values) -> outputs` against the PyTorch model on random inputs; the largest logit difference.

    Raises:
        RuntimeError: a difference above `tolerance`, or a different prediction or group choice.
    """
    size = classifier.transform.image_size
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batch_sizes:
        x = torch.randn(batch, 3, size, size, generator=generator)
        with torch.no_grad():
            expected = classifier.model(pixel_values=x)
        got = [torch.as_tensor(np.asarray(value)) for value in run(x)]
        difference = (got[0] - expected.logits).abs().max().item()
        worst = max(worst, difference)
        same_classes = torch.equal(got[0].argmax(-1), expected.logits.argmax(-1))
        same_groups = expected.group_indices is None or torch.equal(got[1], expected.group_indices)
        if difference > tolerance or not same_classes or not same_groups:
            raise RuntimeError(
                f"batch {batch}: max |logit difference| {difference:.2e} (tolerance {tolerance:.0e}), same "
                f"predictions: {same_classes}, same group choice: {same_groups}."
            )
    return worst


def onnx_runner(path: Path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"pixel_values": x.numpy()})


@cli_entry(flags={"base_model": "--base", "image_size": "--image_size"})
def main(argv=None) -> dict[str, dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if any(batch < 1 for batch in args.check_batch_sizes):
        raise LPTUsageError(f"--check_batch_sizes must be positive, got {args.check_batch_sizes}.")
    classifier = load_classifier(args.base, args.adapter, device="cpu", image_size=args.image_size)
    out = Path(args.output_dir)
    results = {}
    for fmt in args.format:
        path = out / f"{args.name}.{fmt}"
        if fmt == "pt2":
            save_program(classifier, path, overwrite=args.overwrite)
            program = load_program(path).module()
            run = lambda x, program=program: program(x)  # noqa: E731
        else:
            export_onnx(classifier, path, opset_version=args.opset_version, overwrite=args.overwrite)
            run = onnx_runner(path)
        result = {"path": str(path), "bytes": path.stat().st_size}
        if args.check_batch_sizes:
            try:
                result["max_logit_difference"] = compare(classifier, run, args.check_batch_sizes, args.tolerance)
            except RuntimeError as err:
                path.unlink()  # a file that does not reproduce the model is not left to be deployed
                print(f"error: {path} does not reproduce the PyTorch model and was removed: {err}", file=sys.stderr)
                raise SystemExit(1) from None
        results[fmt] = result
        checked = (
            f", max |logit difference| {result['max_logit_difference']:.2e} at batch sizes {args.check_batch_sizes}"
            if "max_logit_difference" in result
            else ""
        )
        print(f"{path} ({result['bytes'] / 1e6:.1f} MB, phase {classifier.config.phase}{checked})")
    return results


if __name__ == "__main__":
    main()
