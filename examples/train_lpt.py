"""Train LPT (phase 1, then phase 2) with accelerate on one CPU, one GPU or many GPUs.

    accelerate launch examples/train_lpt.py --config configs/places_lt.yaml
    accelerate launch examples/train_lpt.py --config configs/places_lt.yaml --phase 2 --init_from out/phase1
    accelerate launch examples/train_lpt.py --config configs/places_lt.yaml --resume_from_checkpoint latest
    accelerate launch --multi_gpu --num_processes 8 examples/train_lpt.py --config configs/places_lt.yaml

Every option can be set in the YAML file or on the command line (`--help` lists them). The logic lives in
`lpt_peft.training`.
"""

from lpt_peft.training import run_training
from lpt_peft.training_args import parse_training_args


def main() -> None:
    run_training(parse_training_args())


if __name__ == "__main__":
    main()
