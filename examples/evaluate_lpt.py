"""Evaluate a saved LPT adapter: overall / many / medium / few-shot accuracy on a data set's test split.

    python examples/evaluate_lpt.py --adapter out/phase2 --dataset places_lt --data_root /data/places365 \
        --split_dir /data/places_lt_splits --model_name_or_path path/to/vit

Accepts the same data and backbone options as train_lpt.py (`--help` lists them), plus --adapter and --json_out.
"""

import json
import sys

from lpt_peft.metrics import format_results_table
from lpt_peft.training import evaluate_adapter
from lpt_peft.training_args import parse_training_args


def main() -> None:
    argv = sys.argv[1:]
    adapter = _pop(argv, "--adapter", required=True)
    json_out = _pop(argv, "--json_out")
    result = evaluate_adapter(adapter, parse_training_args(argv))
    print(format_results_table({f"{adapter} (phase {result['phase']})": result}))
    if json_out:
        with open(json_out, "w") as handle:
            json.dump({k: result[k] for k in ("overall", "many", "medium", "few", "per_class", "phase")}, handle)


def _pop(argv: list[str], flag: str, required: bool = False) -> str | None:
    if flag in argv:
        i = argv.index(flag)
        value = argv[i + 1]
        del argv[i : i + 2]
        return value
    if required:
        sys.exit(f"{flag} is required (a folder written by save_pretrained, e.g. outputs/lpt/phase2).")
    return None


if __name__ == "__main__":
    main()
