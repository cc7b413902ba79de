"""Evaluate a saved LPT adapter: overall / many / medium / few-shot accuracy on a data set's test split.

    python examples/evaluate_lpt.py --adapter outputs/demo/phase2
    python examples/evaluate_lpt.py --adapter out/phase2 --dataset places_lt --data_root /data/places365 \
        --split_dir /data/places_lt_splits --model_name_or_path path/to/vit

Defaults come from what the adapter folder records: its base model (adapter_config.json), its preprocessing
(preprocessor_config.json: image size, resize, mean, std), its data set and data-set options (the model card's
metadata). A --config file and flags fill in the rest (e.g. --data_root); flags given on the command line win over
the adapter's record, and the adapter's record wins over a --config file. Accepts the data and backbone options of
train_lpt.py (`--help` lists them), plus --adapter and --json_out.
"""

import json
import sys

from lpt_peft.cli import TRAINING_FLAGS, LPTUsageError, cli_entry
from lpt_peft.evaluation.metrics import format_results_table
from lpt_peft.inference import adapter_record
from lpt_peft.training.arguments import DATASETS, LPTTrainingArguments, parse_training_args
from lpt_peft.training.run import evaluate_adapter

# Options that change which images form the splits and the shot groups (beyond the data set's name).
DATA_OPTIONS = ("n_max", "imbalance", "data_seed", "val_per_class", "max_test_per_class")


@cli_entry(flags={**TRAINING_FLAGS, "base_model": "--model_name_or_path", "image_size": "--image_size"})
def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    adapter = _pop(argv, "--adapter", required=True)
    json_out = _pop(argv, "--json_out")
    argv = recorded_flags(adapter, argv) + argv
    result = evaluate_adapter(adapter, parse_training_args(argv))
    print(format_results_table({f"{adapter} (phase {result['phase']})": result}))
    if json_out:
        with open(json_out, "w") as handle:
            json.dump({k: result[k] for k in ("overall", "many", "medium", "few", "per_class", "phase")}, handle)
    return result


def recorded_flags(adapter: str, argv: list[str]) -> list[str]:
    """The adapter's recorded options as flags, for each option not given on the command line."""
    from lpt_peft.inference import check_base_reference

    given = {item[2:].split("=", 1)[0] for item in argv if item.startswith("--")}
    known = set(LPTTrainingArguments.__dataclass_fields__)
    record = {k: v for k, v in adapter_record(adapter).items() if k in known and k not in given}
    if record.get("dataset") not in DATASETS:
        record.pop("dataset", None)
    if "model_name_or_path" in record:
        check_base_reference(record["model_name_or_path"], recorded_in=adapter)
    flags: list[str] = []
    for key, value in record.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        flags += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    if record:
        shown = ", ".join(f"{k}={v}" for k, v in record.items())
        print(f"From the adapter's record ({adapter}): {shown}. Flags override these.", file=sys.stderr)
    if not any(key in record or key in given for key in DATA_OPTIONS) and "config" not in given:
        print(
            f"The adapter records no data-set options ({', '.join(DATA_OPTIONS)}): their defaults are used; pass the "
            "training run's values (or its --config) to rebuild the same split and shot groups.",
            file=sys.stderr,
        )
    return flags


def _pop(argv: list[str], flag: str, required: bool = False) -> str | None:
    for i, item in enumerate(argv):
        if item.startswith(flag + "="):
            del argv[i]
            return item.split("=", 1)[1]
        if item == flag:
            if i + 1 >= len(argv):
                raise LPTUsageError(f"{flag} needs a value.")
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
    if required:
        raise LPTUsageError(f"{flag} is required (a folder written by save_pretrained, e.g. outputs/demo/phase2).")
    return None


if __name__ == "__main__":
    main()
