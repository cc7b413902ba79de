"""The offline multi-data-set benchmark of issue 10: the baselines and LPT on three long-tailed sets over seeds, and
the phase-2 ablations on the many-class set.

    python benchmarks/recipe_benchmark.py                       # 3 sets x 3 seeds: probes + LPT phase 1 and 2
    python benchmarks/recipe_benchmark.py --ablations           # + the phase-2 ablations (1 seed) on mnist_family_lt
    python benchmarks/recipe_benchmark.py --quick --num_seeds 1 # a smoke run (short schedules)
    python benchmarks/recipe_benchmark.py -- --learning_rate 0.5  # anything after -- goes to every training run

Each (set, seed, variant) is one run of the training entry (`examples/train_lpt.py`, or
`python -m lpt_peft.evaluation.ablations` for the ablations) in a subprocess, one at a time. Its numbers go into
`<output_dir>/store.json` as soon as it finishes; a finished (set, seed, variant) is skipped when the command is run
again (`--rerun` runs it anyway), so an interrupted benchmark resumes where it stopped. Then `report.md` (medians and
per-seed numbers, the issue's acceptance checks) and the plots (`<set>_bars.png`, `<set>_group_heatmap.png`,
`ablations.png`) are written from the store.

The benchmark preset (what makes a (set, seed) cost a few minutes on 2 CPU cores): the demo's recipe,
`configs/demo_fashion_mnist.yaml` (the 56 px DINOv2 ViT-S/14 demo backbone, batch 32, 3 + 2 epochs raised by
`min_images_per_class`, probes with their learning rate chosen on val), with each set's data options of `SETS`.
Only the data set, its options, the seed and the output folder are set here; every other option keeps the training
entry's own default or the demo config's value, so a changed default of the training code applies here unchanged.

Phase-2 ablations (`--ablations`, on `--ablation_set`, `--ablation_seeds` seeds): every variant starts phase 2 from
the same seed's phase-1 adapter of the main run (`--phase 2 --init_from`), so only phase 2 differs:
`phase2_control` (nothing changed: what a phase-2-only rerun gives), `no_group_prompts` and `random_groups`
(lpt_peft.evaluation.ablations), `longer_phase2` (3x the phase-2 images per class of the preset) and
`matching_weight_x10` (the key-matching term weighted 5 instead of 0.5);
`top_k_1`, `top_k_3` (top_k 2 is the shipped value) and `more_groups` (40 groups instead of 20) change the
adapter's configuration, so they train phase 1 again (same seed). "As shipped" is the main run's phase 2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = ["--config", str(REPO / "configs" / "demo_fashion_mnist.yaml")]
# Each set at its chosen imbalance; the test sets are capped (balanced) to keep evaluation cheap.
SETS = {
    "fashion_mnist_lt": "--n_max 500 --imbalance 100 --val_per_class 20 --max_test_per_class 200".split(),
    "mnist_lt": "--n_max 500 --imbalance 100 --val_per_class 20 --max_test_per_class 200".split(),
    "mnist_family_lt": "--n_max 200 --imbalance 40 --val_per_class 10 --max_test_per_class 100".split(),
    # For smoke tests of this script (generated images; pass a small backbone after --).
    "synthetic": "--num_classes 4 --n_max 12 --imbalance 4 --val_per_class 2".split(),
}
QUICK = ["--epochs_phase1", "1", "--epochs_phase2", "1", "--max_steps_per_epoch", "3", "--probe_epochs", "2"]
ABLATIONS = {
    # The control: phase 2 trained again from the same phase-1 adapter with nothing changed. A phase-2-only run is
    # its own process (its own learning-rate trials, float rounding), so the variants are compared with this, not
    # only with the main run's phase 2.
    "phase2_control": [],
    "no_group_prompts": ["--ablation", "no_group_prompts"],
    "random_groups": ["--ablation", "random_groups"],
    "top_k_1": ["--top_k", "1"],
    "top_k_3": ["--top_k", "3"],
    "more_groups": ["--num_groups", "40"],
    # 3x the phase-2 training of the run: 3x its own --min_images_per_class (set in `ablation_options`).
    "longer_phase2": [],
    # 10x the matching term's weight (0.5 -> 5): the keys' only learning signal, against a loss scaled by 40.
    "matching_weight_x10": ["--matching_weight", "5.0"],
}
CONFIG_VARIANTS = ("top_k_1", "top_k_3", "more_groups")
CE, AGCL, P1, P2, BEST = (
    "Linear probe (CE)",
    "Linear probe (A-GCL, dual sampling)",
    "LPT phase 1",
    "LPT phase 2",
    "LPT (best phase by val)",
)
METRICS = ("overall", "many", "medium", "few")


# ---------------------------------------------------------------------------------------------------- the store
def load_store(path: Path) -> dict:
    """The JSON store (`{"runs": {"set/seed/variant": record}}`); a new one when the file does not exist."""
    if path.is_file():
        return json.loads(path.read_text())
    return {"runs": {}}


def save_store(store: dict, path: Path) -> None:
    """Write atomically: a crash mid-write never loses the finished runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(store, indent=1))
    os.replace(tmp, path)


def run_key(name: str, seed: int, variant: str) -> str:
    return f"{name}/{seed}/{variant}"


# ---------------------------------------------------------------------------------------------------- one run
def training_argv(name: str, seed: int, run_dir: Path, quick: bool, extra: list[str]) -> list[str]:
    """The training options of one run: preset, the set's options, quick schedules, seed, folder, then `extra`."""
    argv = [*PRESET, "--dataset", name, *SETS[name], "--seed", str(seed), "--output_dir", str(run_dir)]
    return [*argv, "--overwrite_output_dir", *(QUICK if quick else []), *extra]


def variant_command(variant: str, argv: list[str], main_dir: Path) -> list[str]:
    """The subprocess command of a variant: the example script, or the ablation entry.

    A variant that keeps the adapter's configuration starts phase 2 from the main run's phase-1 adapter; one that
    changes it (`top_k`, `num_groups`: recorded in the adapter, so phase 2 cannot continue it) trains both phases.
    """
    script = [sys.executable, str(REPO / "examples" / "train_lpt.py")]
    if variant == "main":
        return [*script, *argv]
    options = ablation_options(variant, argv)
    if variant in CONFIG_VARIANTS:
        return [*script, *argv, "--baselines", "none", *options]
    phase2 = ["--phase", "2", "--init_from", str(main_dir / "phase1"), "--baselines", "none"]
    if options and options[0] == "--ablation":
        return [sys.executable, "-m", "lpt_peft.evaluation.ablations", *options, "--", *argv, *phase2]
    return [*script, *argv, *phase2, *options]


def ablation_options(variant: str, argv: list[str]) -> list[str]:
    """The options a variant adds; `longer_phase2` triples the images per class the run's own options give (config
    file, then anything passed after `--`), so it stays 3x the preset when the preset changes."""
    if variant != "longer_phase2":
        return ABLATIONS[variant]
    from lpt_peft.training.arguments import parse_training_args

    base = parse_training_args(argv).min_images_per_class
    if base is None:
        raise ValueError("longer_phase2 triples --min_images_per_class, which this run leaves unset; pass it after --")
    return ["--min_images_per_class", str(3 * base)]


def run_variant(name: str, seed: int, variant: str, args: argparse.Namespace) -> dict:
    """Train one (set, seed, variant) in a subprocess and return its record (test rows, wall time, command)."""
    main_dir = Path(args.output_dir) / "runs" / name / str(seed) / "main"
    run_dir = main_dir if variant == "main" else main_dir.parent / variant
    command = variant_command(variant, training_argv(name, seed, run_dir, args.quick, args.extra), main_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start, cpu_start = time.time(), _children_cpu()
    with open(run_dir.parent / f"{variant}.log", "w") as log:
        done = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall, cpu = time.time() - start, _children_cpu() - cpu_start
    if done.returncode != 0:
        tail = "".join(Path(log.name).read_text().splitlines(keepends=True)[-5:])
        raise RuntimeError(f"{name} seed {seed} {variant} failed (exit {done.returncode}); {log.name} ends:\n{tail}")
    rows = json.loads((run_dir / "results.json").read_text())
    return {"rows": rows, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "command": command[1:]}


def _children_cpu() -> float:
    """CPU seconds (user + system) used by finished child processes: a load-independent cost measure."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def group_heatmap(name: str, seed: int, args: argparse.Namespace) -> dict:
    """Class x group selection counts of the main run's phase-2 adapter on the test set (rows: class index)."""
    import torch

    from lpt_peft.backbones import load_backbone
    from lpt_peft.evaluation.group_stats import class_group_counts, collect_group_selections
    from lpt_peft.training.arguments import parse_training_args
    from lpt_peft.training.builders import make_accelerator
    from lpt_peft.training.data import build_dataset, make_eval_loader

    run_dir = Path(args.output_dir) / "runs" / name / str(seed) / "main"
    train_args = parse_training_args(training_argv(name, seed, run_dir, args.quick, args.extra))
    data = build_dataset(train_args)
    from peft import PeftModel

    backbone = load_backbone(train_args.model_name_or_path, train_args.image_size, train_args.attn_implementation)
    model = PeftModel.from_pretrained(backbone, str(run_dir / "phase2")).eval()
    with torch.inference_mode():
        loader = make_eval_loader(data.test, train_args, make_accelerator(mixed_precision="no"))
        groups, labels = collect_group_selections(model, loader)
    num_groups = model.peft_config["default"].num_groups
    counts = class_group_counts(groups, labels, data.num_classes, num_groups)
    return {"counts": counts.tolist(), "class_names": data.class_names, "train_counts": data.train_class_counts}


# ---------------------------------------------------------------------------------------------------- the plan
def plan(args: argparse.Namespace) -> list[tuple[str, int, str]]:
    """Every (set, seed, variant) the command asks for, in running order (a seed's main run before its ablations)."""
    seeds = [args.first_seed + i for i in range(args.num_seeds)]
    todo = [(name, seed, "main") for seed in seeds for name in args.sets]
    if args.ablations:
        for seed in [args.first_seed + i for i in range(args.ablation_seeds)]:
            if (args.ablation_set, seed, "main") not in todo:
                todo.append((args.ablation_set, seed, "main"))
            todo += [(args.ablation_set, seed, variant) for variant in args.ablation_variants]
    return todo


def execute(args: argparse.Namespace) -> dict:
    """Run what is not in the store yet, saving the store after each run; print progress and an estimate."""
    store_path = Path(args.output_dir) / "store.json"
    store = load_store(store_path)
    todo = plan(args)
    pending = [item for item in todo if args.rerun or run_key(*item) not in store["runs"]]
    print(f"{len(todo)} runs planned, {len(todo) - len(pending)} already in {store_path}, {len(pending)} to do.")
    durations = []
    for i, (name, seed, variant) in enumerate(pending, 1):
        eta = f", about {statistics.mean(durations) * (len(pending) - i + 1) / 60:.0f} min left" if durations else ""
        print(f"[{i}/{len(pending)}] {name} seed {seed} {variant}{eta} ...", flush=True)
        record = run_variant(name, seed, variant, args)
        if variant == "main" and not args.no_heatmaps:
            start = time.time()
            record["group_heatmap"] = group_heatmap(name, seed, args)
            record["heatmap_s"] = round(time.time() - start, 1)
        store["runs"][run_key(name, seed, variant)] = record
        save_store(store, store_path)
        durations.append(record["wall_s"] + record.get("heatmap_s", 0))
        summary = ", ".join(f"{m} {r['overall']:.1f}/{r['few']:.1f}" for m, r in record["rows"].items())
        print(f"    done in {durations[-1]:.0f} s (overall/few: {summary})", flush=True)
    return store


# ---------------------------------------------------------------------------------------------------- the report
def best_phase(rows: dict) -> dict | None:
    """LPT's phase chosen on validation (the training entry's own rule, `best_phase_by_validation`: phase 2 on a tie
    or without scores); the phase there is if only one is; None without either."""
    if P1 not in rows or P2 not in rows:
        return rows.get(P2) or rows.get(P1)
    from lpt_peft.training.recipe import best_phase_by_validation

    return rows[P1] if best_phase_by_validation(rows) == 1 else rows[P2]


def per_seed(store: dict, name: str, variant: str = "main") -> dict[str, dict[str, list]]:
    """`{method: {metric: [value per seed]}}` of a set's runs of `variant`, seeds in increasing order."""
    keys = sorted((k for k in store["runs"] if k.startswith(f"{name}/") and k.endswith(f"/{variant}")),
                  key=lambda k: int(k.split("/")[1]))  # fmt: skip
    table: dict[str, dict[str, list]] = {}
    for key in keys:
        rows = dict(store["runs"][key]["rows"])
        if variant == "main" and best_phase(rows) is not None:
            rows[BEST] = best_phase(rows)
        for method, row in rows.items():
            for metric in (*METRICS, "best_val_overall"):
                table.setdefault(method, {}).setdefault(metric, []).append(row.get(metric))
    return table


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def acceptance(table: dict) -> list[str]:
    """The issue's checks on medians: LPT (best phase by val) >= CE probe overall, and >= CE probe + 10 few."""
    if BEST not in table or CE not in table:
        return ["- acceptance: not enough runs (needs the CE probe and LPT)"]
    best_overall, ce_overall = _median(table[BEST]["overall"]), _median(table[CE]["overall"])
    best_few, ce_few = _median(table[BEST]["few"]), _median(table[CE]["few"])
    lines = []
    for label, ok in (
        (f"LPT best phase overall {_fmt(best_overall)} >= CE probe {_fmt(ce_overall)}", best_overall >= ce_overall),
        (f"LPT best phase few {_fmt(best_few)} >= CE probe few {_fmt(ce_few)} + 10", best_few >= ce_few + 10),
    ):
        lines.append(f"- {label}: **{'met' if ok else 'not met'}**")
    if P1 in table and P2 in table:
        deltas = [b - a for a, b in zip(table[P1]["overall"], table[P2]["overall"])]
        lines.append(f"- phase 2 - phase 1 overall per seed: {', '.join(f'{d:+.2f}' for d in deltas)}")
    return lines


def method_table(table: dict, methods: list[str]) -> list[str]:
    """Markdown rows: medians of overall/many/medium/few and validation, then the per-seed overall and few."""
    lines = [
        "| Method | Overall | Many | Medium | Few | Val (best epoch) | Overall per seed | Few per seed |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for method in methods:
        if method not in table:
            continue
        m = table[method]
        medians = " | ".join(_fmt(_median(m[k])) for k in (*METRICS, "best_val_overall"))
        seeds = [", ".join(_fmt(v) for v in m[k]) for k in ("overall", "few")]
        lines.append(f"| {method} | {medians} | {seeds[0]} | {seeds[1]} |")
    return lines


def set_section(store: dict, name: str, seeds: list[int], output_dir: Path) -> list[str]:
    table = per_seed(store, name)
    if not table:
        return []
    keys = [run_key(name, s, "main") for s in seeds]
    walls = [store["runs"][k]["wall_s"] + store["runs"][k].get("heatmap_s", 0) for k in keys if k in store["runs"]]
    cpus = [store["runs"][k].get("cpu_s") for k in keys if k in store["runs"]]
    lines = [f"## {name}", "", f"{len(walls)} seed(s); wall time per (set, seed), all methods: "
             f"{', '.join(f'{w:.0f} s' for w in walls)} (training CPU time {', '.join(_fmt(c) for c in cpus)} s).",
             ""]  # fmt: skip
    lines += method_table(table, [CE, AGCL, P1, P2, BEST, *[k for k in table if k not in (CE, AGCL, P1, P2, BEST)]])
    lines += ["", *acceptance(table), ""]
    from lpt_peft.evaluation.plots import plot_benchmark_bars

    shown = {k: v for k, v in table.items() if k in (CE, AGCL, P1, P2, BEST)}
    plot_benchmark_bars(shown, output_dir / f"{name}_bars.png", title=f"{name}: median (bars) and seeds (dots)")
    lines.append(f"![{name}]({name}_bars.png)")
    heatmap = heatmap_plot(store, name, output_dir)
    if heatmap:
        lines += ["", f"Phase-2 group selections per class on the test set (rows head to tail): ![]({heatmap})"]
    return [*lines, ""]


def heatmap_plot(store: dict, name: str, output_dir: Path) -> str | None:
    """The first seed's class x group heatmap of `name`, rows sorted from head to tail; the PNG's file name."""
    records = [r for k, r in sorted(store["runs"].items()) if k.startswith(f"{name}/") and "group_heatmap" in r]
    if not records:
        return None
    import numpy as np

    from lpt_peft.evaluation.plots import plot_class_group_heatmap

    info = records[0]["group_heatmap"]
    order = np.argsort(-np.asarray(info["train_counts"]), kind="stable")
    counts = np.asarray(info["counts"])[order]
    names = [f"{info['class_names'][i]} ({info['train_counts'][i]})" for i in order]
    path = output_dir / f"{name}_group_heatmap.png"
    plot_class_group_heatmap(counts, path, names, title=f"{name}: group selections per class (test, row shares)")
    return path.name


def ablation_section(store: dict, args: argparse.Namespace, output_dir: Path) -> list[str]:
    name = args.ablation_set
    main = per_seed(store, name)
    if P2 not in main:
        return []
    table = {"phase 1 (for reference)": main[P1], "phase 2 as shipped": main[P2]}
    for variant in ABLATIONS:
        rows = per_seed(store, name, variant)
        if P2 in rows:
            table[variant] = rows[P2]
    if len(table) == 2:
        return []
    seeds = args.ablation_seeds
    for method in ("phase 1 (for reference)", "phase 2 as shipped"):  # the seeds the ablations ran on
        table[method] = {k: v[:seeds] for k, v in table[method].items()}
    lines = [f"## Phase-2 ablations on {name} ({seeds} seed(s))", "", "phase2_control, no_group_prompts, "
             "random_groups, matching_weight_x10 and longer_phase2 start from the main run's phase-1 adapter; "
             "top_k_1, top_k_3 and more_groups train phase 1 again with the same seed (their adapter configuration "
             "differs).", ""]  # fmt: skip
    lines += method_table(table, list(table))
    from lpt_peft.evaluation.plots import plot_benchmark_bars

    plot_benchmark_bars(table, output_dir / "ablations.png", title=f"{name}: phase-2 ablations")
    return [*lines, "", "![ablations](ablations.png)", ""]


def write_report(store: dict, args: argparse.Namespace) -> Path:
    """`report.md` and the plots, from the store (runs of other seeds/sets already there are included)."""
    output_dir = Path(args.output_dir)
    seeds = [args.first_seed + i for i in range(args.num_seeds)]
    lines = ["# Offline recipe benchmark", "", "Test accuracy (%), medians over seeds; `python "
             f"benchmarks/recipe_benchmark.py{' --quick' if args.quick else ''}`"
             f"{' -- ' + ' '.join(args.extra) if args.extra else ''}.", ""]  # fmt: skip
    for name in args.sets:
        lines += set_section(store, name, seeds, output_dir)
    if args.ablations:
        lines += ablation_section(store, args, output_dir)
    path = output_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------------------------------- the command
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["fashion_mnist_lt", "mnist_lt", "mnist_family_lt"],
                        choices=list(SETS))  # fmt: skip
    parser.add_argument("--num_seeds", type=int, default=3)
    parser.add_argument("--first_seed", type=int, default=42, help="Seeds first_seed, first_seed + 1, ...")
    parser.add_argument("--output_dir", default=str(REPO / "outputs" / "recipe_benchmark"))
    parser.add_argument("--quick", action="store_true", help="Short schedules (1 + 1 epochs of 3 steps), smoke only.")
    parser.add_argument("--ablations", action="store_true", help="Also run the phase-2 ablations.")
    parser.add_argument("--ablation_set", default="mnist_family_lt", choices=list(SETS))
    parser.add_argument("--ablation_seeds", type=int, default=1)
    parser.add_argument("--ablation_variants", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS))
    parser.add_argument("--rerun", action="store_true", help="Run again what the store already holds.")
    parser.add_argument("--no_heatmaps", action="store_true", help="Skip the class x group heatmaps (a test pass).")
    parser.add_argument("--report_only", action="store_true", help="Write report.md and plots from the store.")
    args = parser.parse_args(argv[:split])
    args.extra = argv[split + 1 :]
    if args.num_seeds < 1 or args.ablation_seeds < 1:
        parser.error("--num_seeds and --ablation_seeds must be >= 1.")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    store = load_store(Path(args.output_dir) / "store.json") if args.report_only else execute(args)
    path = write_report(store, args)
    print(f"Report: {path}")
    return path


if __name__ == "__main__":
    main()
