"""LPT's two-phase training recipe (paper Sec. 3.3-3.4) on top of accelerate, by concern:

- `arguments`: every option of `examples/train_lpt.py` ([`LPTTrainingArguments`], [`parse_training_args`]);
- `losses`: A-GCL, the baselines and the phase objective [`LPTObjective`]; registry `LOSSES` / [`register_loss`];
- `samplers`: class-balanced, instance-balanced and dual batch samplers; registry `SAMPLERS` / [`register_sampler`];
- `seeding`: the one seeding scheme (SeedSequence-seeded torch generators);
- `data`: the transformed data set, label checks, loaders, the data set named by the options;
- `builders`: accelerator, LPT model, objective and sampler from the options;
- `checkpointing`: trainer state, atomic checkpoints, resume checks, adapter saves;
- `loop`: [`train_phase`] (objective and sampler as arguments), [`evaluate`], callbacks;
- `run`: the whole run ([`run_training`]) with baselines, results, plots and Hub push; [`evaluate_adapter`];
- `baselines`: linear probes on frozen features.
"""

from lpt_peft.training.arguments import LPTTrainingArguments, parse_training_args
from lpt_peft.training.builders import build_peft_model, objective_from_args, sampler_from_args
from lpt_peft.training.checkpointing import CheckpointManager, TrainerState
from lpt_peft.training.data import build_dataset, check_dataset, make_eval_loader, make_train_loader
from lpt_peft.training.loop import TrainingCallback, evaluate, train_phase
from lpt_peft.training.losses import LOSSES, LPTObjective, build_loss, register_loss
from lpt_peft.training.run import evaluate_adapter, run_training
from lpt_peft.training.samplers import SAMPLERS, create_sampler, register_sampler

__all__ = [
    "LOSSES",
    "SAMPLERS",
    "CheckpointManager",
    "LPTObjective",
    "LPTTrainingArguments",
    "TrainerState",
    "TrainingCallback",
    "build_dataset",
    "build_loss",
    "build_peft_model",
    "check_dataset",
    "create_sampler",
    "evaluate",
    "evaluate_adapter",
    "make_eval_loader",
    "make_train_loader",
    "objective_from_args",
    "parse_training_args",
    "register_loss",
    "register_sampler",
    "run_training",
    "sampler_from_args",
    "train_phase",
]
