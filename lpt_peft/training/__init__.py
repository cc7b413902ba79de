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

Everything here needs `pip install 'lpt-peft[train]'`; the names load on first access, so that importing the package
costs nothing until one is used.
"""

from lpt_peft._extras import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        "lpt_peft.training.arguments": ["LPTTrainingArguments", "parse_training_args"],
        "lpt_peft.training.builders": ["build_peft_model", "objective_from_args", "sampler_from_args"],
        "lpt_peft.training.checkpointing": ["CheckpointManager", "TrainerState"],
        "lpt_peft.training.data": ["build_dataset", "check_dataset", "make_eval_loader", "make_train_loader"],
        "lpt_peft.training.loop": ["TrainingCallback", "evaluate", "train_phase"],
        "lpt_peft.training.losses": ["LOSSES", "LPTObjective", "build_loss", "register_loss"],
        "lpt_peft.training.run": ["evaluate_adapter", "run_training"],
        "lpt_peft.training.samplers": ["SAMPLERS", "create_sampler", "register_sampler"],
    },
)
