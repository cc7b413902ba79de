"""Median over seeds of finished runs: python examples/summarize_runs.py outputs/demo_seed1 outputs/demo_seed2 ..."""

import json
import sys

from lpt_peft.reports import summarize_runs, summary_table

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python examples/summarize_runs.py OUTPUT_DIR [OUTPUT_DIR ...] [--json_out FILE]")
    args = sys.argv[1:]
    json_out = None
    if "--json_out" in args:
        i = args.index("--json_out")
        json_out = args[i + 1]
        del args[i : i + 2]
    summary = summarize_runs(args)
    print(summary_table(summary))
    if json_out:
        with open(json_out, "w") as handle:
            json.dump(summary, handle, indent=2)
