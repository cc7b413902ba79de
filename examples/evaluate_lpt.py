"""Evaluate a saved LPT adapter: overall / many / medium / few-shot accuracy on a data set's test split.

    python examples/evaluate_lpt.py --adapter outputs/demo/phase2
    python examples/evaluate_lpt.py --adapter out/phase2 --dataset places_lt --data_root /data/places365 \
        --split_dir /data/places_lt_splits --model_name_or_path path/to/vit

Defaults come from what the adapter folder records: its base model (adapter_config.json), its preprocessing
(preprocessor_config.json: image size, resize, mean, std), its data set and data-set options (the model card's
metadata: a registered name, a Hub id or a local data-set folder, with the options that data set takes, e.g. its image
folders). Recorded data options apply only to the recorded data set: with another --dataset they are left out. A
--config file and flags fill in the rest (e.g. --data_root); flags given on the command line win over the adapter's
record, and the adapter's record wins over a --config file. Accepts the data and backbone options of train_lpt.py
(`--help` lists them), plus --adapter and --json_out.
"""

import json
import os
import sys

from lpt_peft.cli import TRAINING_FLAGS, LPTUsageError, check_output_file, cli_entry, write_output_file
from lpt_peft.data.registry import dataset_options, resolve_dataset
from lpt_peft.evaluation.metrics import format_results_table
from lpt_peft.inference import adapter_record
from lpt_peft.training.arguments import DATASET_ARGUMENTS, LPTTrainingArguments, parse_training_args
from lpt_peft.training.run import evaluate_adapter


@cli_entry(flags={**TRAINING_FLAGS, "base_model": "--model_name_or_path", "image_size": "--image_size"})
def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    adapter = _pop(argv, "--adapter", required=True)
    json_out = _pop(argv, "--json_out")
    check_output_file(json_out, "--json_out")  # before the evaluation, not after it
    argv = recorded_flags(adapter, argv) + argv
    result = evaluate_adapter(adapter, parse_training_args(argv))
    print(format_results_table({f"{adapter} (phase {result['phase']})": result}))
    if json_out:
        summary = {k: result[k] for k in ("overall", "many", "medium", "few", "per_class", "phase")}
        write_output_file(json_out, "--json_out", lambda handle: json.dump(summary, handle))
    return result


def recorded_flags(adapter: str, argv: list[str]) -> list[str]:
    """The adapter's recorded options as flags, for each option not given on the command line.

    Data-set options are passed only for the data set they were recorded with, and only those that data set takes
    (the class count of `adapter_config.json` reaches a synthetic set as `--num_classes`, never image folders).
    """
    from lpt_peft.inference import check_base_reference

    given = {item[2:].split("=", 1)[0] for item in argv if item.startswith("--")}
    known = set(LPTTrainingArguments.__dataclass_fields__)
    recorded = adapter_record(adapter)
    record = {k: v for k, v in recorded.items() if k in known and k not in given and k != "dataset"}
    dataset = _recorded_dataset(adapter, recorded.get("dataset"), record, argv, given)
    for key in set(record) & set(DATASET_ARGUMENTS):
        if dataset is None or key not in dataset_options(dataset):
            del record[key]  # recorded for another data set (or none known): its defaults or the flags apply
    _check_recorded_paths(adapter, record)
    if "model_name_or_path" in record:
        check_base_reference(record["model_name_or_path"], recorded_in=adapter)
    flags: list[str] = []
    for key, value in record.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        flags += [f"--{key}", *(str(v).lower() if isinstance(v, bool) else str(v) for v in values)]
    if record:
        shown = ", ".join(f"{k}={v}" for k, v in record.items())
        print(f"From the adapter's record ({adapter}): {shown}. Flags override these.", file=sys.stderr)
    shaping = set(dataset_options(dataset)) - {"verify_images", "num_workers"} if dataset else set()
    if shaping and not (shaping & (set(record) | given)) and "config" not in given:
        print(
            f"The adapter records no options of data set {dataset} ({', '.join(sorted(shaping))}): their defaults "
            "are used; pass the training run's values (or its --config) to rebuild the same split and shot groups.",
            file=sys.stderr,
        )
    return flags


def _recorded_dataset(
    adapter: str, recorded: str | None, record: dict, argv: list[str], given: set[str]
) -> str | None:
    """The data set the evaluation uses if the adapter's record decides it (None when a flag or --config does).

    A recorded name is kept when this installation knows it (registered, `hfds/...`, a Hub id or a local folder);
    a data set given with --dataset that differs from the recorded one drops the recorded name and options.
    """
    if "dataset" in given:
        return recorded if _flag_value(argv, "--dataset") == recorded else None
    if recorded is None:
        return None
    try:
        resolve_dataset(recorded)
    except ValueError as err:
        if "config" in given:
            return None  # the --config file names the data set
        raise LPTUsageError(
            f"The adapter {adapter} was trained on data set {recorded!r}, which this installation does not know "
            f"({err}). Register it (docs/extending.md) or pass --dataset and its options."
        ) from None
    record["dataset"] = recorded
    return recorded


# Data options that name a file system location (the iNaturalist JSON names are relative to --data_root).
RECORDED_PATHS = ("data_root", "split_dir", "train_dir", "val_dir", "test_dir")


def _check_recorded_paths(adapter: str, record: dict) -> None:
    """A recorded data folder that is not there (moved, another machine, relative to another directory): say so."""
    for key in RECORDED_PATHS:
        value = record.get(key)
        if isinstance(value, str) and not os.path.exists(os.path.expanduser(value)):
            where = "" if os.path.isabs(value) else f" (a relative path; this run is in {os.getcwd()})"
            raise LPTUsageError(
                f"The adapter {adapter} records --{key} {value} from its training run, which does not exist "
                f"here{where}. Pass --{key} with the folder's location here."
            )


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, item in enumerate(argv):
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
        if item == flag and i + 1 < len(argv):
            return argv[i + 1]
    return None


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
