"""What a run builds from its [`LPTTrainingArguments`]: the accelerator, the LPT model, the phase objective and the
batch sampler (the last two looked up in the `LOSSES` / `SAMPLERS` registries by `--loss` / `--sampler`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from peft import PeftModel, get_peft_model
from torch import nn

from lpt_peft.training.arguments import LPTTrainingArguments
from lpt_peft.training.losses import LPTObjective
from lpt_peft.training.samplers import SAMPLERS, create_sampler
from lpt_peft.tuner.config import LPTConfig

__all__ = ["build_peft_model", "lpt_config_from_args", "make_accelerator", "objective_from_args", "sampler_from_args"]


def lpt_config_from_args(args: LPTTrainingArguments, num_labels: int, id2label: dict[int, str] | None) -> LPTConfig:
    return LPTConfig(
        num_labels=num_labels,
        prompt_length=args.prompt_length,
        num_groups=args.num_groups,
        group_prompt_length=args.group_prompt_length,
        top_k=args.top_k,
        shared_layers=args.shared_layers,
        classifier_dropout=args.classifier_dropout,
        layer_norm_eps=args.layer_norm_eps,
        id2label=id2label,
    )


def build_peft_model(
    backbone: nn.Module,
    args: LPTTrainingArguments,
    num_labels: int,
    id2label: dict[int, str] | None = None,
    init_from: str | None = None,
) -> PeftModel:
    """A trainable LPT model: a fresh phase-1 adapter, or the phase-1 adapter saved in `init_from` (checked first)."""
    if init_from is None:
        return get_peft_model(backbone, lpt_config_from_args(args, num_labels, id2label))
    from peft import PeftConfig

    adapter_config = Path(init_from) / "adapter_config.json"
    if not adapter_config.is_file():
        raise FileNotFoundError(
            f"--init_from {init_from!r} holds no adapter_config.json. Point it at a folder written by "
            "save_pretrained (e.g. <output_dir>/phase1)."
        )
    config = PeftConfig.from_pretrained(init_from)
    if not isinstance(config, LPTConfig):
        raise ValueError(f"--init_from {init_from!r} is a {config.peft_type} adapter, not an LPT adapter.")
    if config.phase != 1:
        raise ValueError(
            f"--init_from {init_from!r} is a phase-{config.phase} adapter; phase 2 starts from a phase-1 adapter "
            "(<output_dir>/phase1). To continue an interrupted run use --resume_from_checkpoint."
        )
    if config.num_labels != num_labels:
        raise ValueError(
            f"--init_from {init_from!r} has num_labels={config.num_labels} but the data set has {num_labels} classes."
        )
    return PeftModel.from_pretrained(backbone, init_from, is_trainable=True)


def make_accelerator(**kwargs: Any) -> Accelerator:
    """An `Accelerator` that also runs several processes on a machine without GPUs (gloo).

    `accelerate launch --multi_gpu --num_processes N` starts N processes either way, but accelerate only joins them
    into one CPU process group when asked for the CPU explicitly; otherwise each would train alone.
    """
    cpu_group = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(cpu=cpu_group or kwargs.pop("cpu", False), **kwargs)


def objective_from_args(
    args: LPTTrainingArguments, class_counts: Sequence[int], num_epochs: int, device: torch.device | str = "cpu"
) -> LPTObjective:
    """The dual-sampling objective of one phase: `--loss` (a registered loss) on both branches, `--eta`,
    `--matching_weight` and `--instance_balanced_gammas`, over `num_epochs` epochs (for the `beta(e)` schedule)."""
    return LPTObjective(
        class_counts,
        num_epochs=num_epochs,
        loss_name=args.loss,
        matching_weight=args.matching_weight,
        eta=args.eta,
        instance_balanced_branch="instance_balanced"
        if args.instance_balanced_gammas == "authors"
        else "class_balanced",
    ).to(device)


def sampler_from_args(args: LPTTrainingArguments, labels: np.ndarray, accelerator: Accelerator):
    """The registered batch sampler `args.sampler_name`, sharded by the accelerator's process index and count.

    `--samples_per_class` goes to samplers that accept it; any other sampler rejects a non-default value.
    """
    name = args.sampler_name
    options: dict[str, Any] = {}
    accepts = "samples_per_class" in _parameters(SAMPLERS[name])
    default = next(f.default for f in dataclasses.fields(args) if f.name == "samples_per_class")
    if accepts or args.samples_per_class != default:
        options["samples_per_class"] = args.samples_per_class
    return create_sampler(
        name,
        labels,
        args.batch_size,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        seed=args.seed,
        **options,
    )


def _parameters(factory) -> set[str]:
    import inspect

    return set(inspect.signature(factory).parameters)
