"""Median over seeds of finished runs: python examples/summarize_runs.py outputs/demo_seed1 outputs/demo_seed2 ..."""

import json
import sys

from lpt_peft.cli import LPTUsageError, cli_entry
from lpt_peft.evaluation.reports import summarize_runs, summary_table


@cli_entry()
def main(argv=None) -> dict:
    args = list(sys.argv[1:] if argv is None else argv)
    json_out = None
    if "--json_out" in args:
        i = args.index("--json_out")
        if i + 1 >= len(args):
            raise LPTUsageError("--json_out needs a file name.")
        json_out = args[i + 1]
        del args[i : i + 2]
    if not args:
        raise LPTUsageError("usage: python examples/summarize_runs.py OUTPUT_DIR [OUTPUT_DIR ...] [--json_out FILE]")
    summary = summarize_runs(args)
    print(summary_table(summary))
    if json_out:
        with open(json_out, "w") as handle:
            json.dump(summary, handle, indent=2)
    return summary


if __name__ == "__main__":
    main()
