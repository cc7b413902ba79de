"""The logit-scale sweep behind the `lpt_peft` recipe's scale 40 (docs/training.md, docs/results.md): the A-GCL probe
(LPT's cosine head, loss and dual sampling, no prompts) on frozen features of one offline set, at several loss scales,
each with its learning rate chosen on the validation split; test accuracy printed per scale.

    python benchmarks/logit_scale_sweep.py --dataset mnist_family_lt --scales 20 40 80
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main(argv: list[str] | None = None) -> dict[float, dict]:
    from accelerate import Accelerator
    from recipe_benchmark import PRESET, SETS

    from lpt_peft.backbones import load_backbone
    from lpt_peft.training.arguments import parse_training_args
    from lpt_peft.training.baselines import evaluate_probe, extract_features, train_linear_probes
    from lpt_peft.training.data import build_dataset, make_eval_loader
    from lpt_peft.training.run import PROBE_LEARNING_RATES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist_family_lt", choices=[s for s in SETS if s != "synthetic"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--scales", type=float, nargs="+", default=[20.0, 40.0, 80.0])
    cli = parser.parse_args(argv)
    args = parse_training_args([*PRESET, "--dataset", cli.dataset, *SETS[cli.dataset], "--seed", str(cli.seed),
                                "--output_dir", "/nonexistent"])  # fmt: skip
    accelerator, data = Accelerator(cpu=True), build_dataset(args)
    backbone = load_backbone(args.model_name_or_path, args.image_size, args.attn_implementation)
    splits = {s: extract_features(backbone, make_eval_loader(getattr(data, s), args, accelerator), accelerator, s)
              for s in ("train", "val", "test")}  # fmt: skip
    counts, results = data.train_class_counts, {}
    for scale in cli.scales:
        probes = train_linear_probes(
            "linear_probe_agcl", *splits["train"], counts, PROBE_LEARNING_RATES, epochs=args.probe_epochs,
            batch_size=args.batch_size, samples_per_class=args.samples_per_class, seed=cli.seed, logit_scale=scale,
        )  # fmt: skip
        scores = [evaluate_probe(p, *splits["val"], counts)["overall"] for p in probes]
        best = max(range(len(probes)), key=lambda i: scores[i])
        results[scale] = evaluate_probe(probes[best], *splits["test"], counts)
        row = results[scale]
        shots = " ".join(f"{k} {row[k]:.2f}" for k in ("overall", "many", "medium", "few"))
        lr = PROBE_LEARNING_RATES[best]
        print(f"{cli.dataset} scale {scale:g}: lr {lr:g} (val {scores[best]:.2f}) test {shots}", flush=True)
    return results


if __name__ == "__main__":
    main()
