"""Train LPT (phase 1, then phase 2) with accelerate on one CPU, one GPU or many GPUs.

    accelerate launch --num_cpu_threads_per_process $(nproc) examples/train_lpt.py  # the offline demo, on CPU cores
    accelerate launch examples/train_lpt.py --config configs/places_lt.yaml
    accelerate launch examples/train_lpt.py --config configs/places_lt.yaml --phase 2 --init_from out/phase1
    accelerate launch examples/train_lpt.py --config configs/places_lt.yaml --resume_from_checkpoint latest
    accelerate launch --multi_gpu --num_processes 8 examples/train_lpt.py --config configs/places_lt.yaml

Every option can be set in the YAML file or on the command line (`--help` lists them). The logic lives in
`lpt_peft.training.run`. A bad option or missing data prints `error: <message>` and exits with status 2 (`LPT_DEBUG=1`
for a traceback); under `accelerate launch` the launcher then adds its own CalledProcessError traceback, which
`accelerate launch --quiet` leaves out.
"""

import sys
from pathlib import Path

from lpt_peft.cli import TRAINING_FLAGS, cli_entry
from lpt_peft.training.arguments import parse_training_args
from lpt_peft.training.run import run_training

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_fashion_mnist.yaml"


@cli_entry(flags=TRAINING_FLAGS)
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv) or ["--config", str(DEMO_CONFIG)]
    run_training(parse_training_args(argv))


if __name__ == "__main__":
    main()
