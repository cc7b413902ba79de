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

__all__ = [
    "build_peft_model",
    "check_init_adapter",
    "check_options_before_data",
    "lpt_config_from_args",
    "make_accelerator",
    "objective_from_args",
    "sampler_from_args",
]

# LPTTrainingArguments field -> the LPTConfig field it sets (same names).
ADAPTER_OPTIONS = (
    "prompt_length", "num_groups", "group_prompt_length", "top_k", "shared_layers", "classifier_dropout",
    "layer_norm_eps",
)  # fmt: skip


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
        logit_scale=args.logit_scale,
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

    adapter_config = Path(init_from) / "adapter_config.json"
    if not adapter_config.is_file():
        raise FileNotFoundError(
            f"--init_from {init_from!r} holds no adapter_config.json. Point it at a folder written by "
            "save_pretrained (e.g. <output_dir>/phase1)."
        )
    config = check_init_adapter(args, init_from)
    if config.num_labels != num_labels:
        raise ValueError(
            f"--init_from {init_from!r} has num_labels={config.num_labels} but the data set has {num_labels} classes."
        )
    return PeftModel.from_pretrained(backbone, init_from, is_trainable=True)


def check_init_adapter(args: LPTTrainingArguments, init_from: str) -> LPTConfig:
    """The LPTConfig of the phase-1 adapter `init_from`, checked against the run's explicitly given options.

    Phase 2 continues the adapter with its own architecture, so an adapter option given explicitly (command line or
    `--config` file; for arguments built in Python: a value other than the dataclass default) that differs from the
    adapter's is a contradiction, not something to ignore silently.

    Raises:
        FileNotFoundError: no adapter_config.json in `init_from`.
        ValueError: not an LPT phase-1 adapter, or explicit options that differ from it (each named with both values).
    """
    from peft import PeftConfig

    from lpt_peft.training.arguments import explicit_options

    if not (Path(init_from) / "adapter_config.json").is_file():
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
    given = explicit_options(args)
    differ = [
        f"--{name} {getattr(args, name)} (the adapter has {getattr(config, name)})"
        for name in ADAPTER_OPTIONS
        if name in given and getattr(args, name) != getattr(config, name)
    ]
    if differ:
        raise ValueError(
            f"--init_from {init_from!r}: phase 2 continues that adapter with its own options, but this run was given "
            f"other values: {'; '.join(differ)}. Remove these options (or set them to the adapter's values), or "
            "train a new phase-1 adapter with them."
        )
    return config


def check_options_before_data(args: LPTTrainingArguments) -> None:
    """Everything that can be checked without the data and the backbone's weights, so a bad option fails in seconds.

    Checks the base model reference (`--model_name_or_path`: a folder that exists, or a Hub id that is cached when
    offline), the normalisation and crop options, the adapter options (as an `LPTConfig`), `--shared_layers` against
    the backbone's depth (from its config, when available without loading weights) and the `--init_from` adapter.

    Raises:
        ValueError (`lpt_peft.cli.LPTUsageError` for the base reference): naming the option and the fix.
    """
    from lpt_peft.data.transforms import LPTImageTransform
    from lpt_peft.inference import check_base_reference

    check_base_reference(args.model_name_or_path)
    LPTImageTransform(
        args.image_size, train=True, resize_size=args.resize_size, mean=args.mean, std=args.std,
        scale=(args.crop_scale_min, 1.0),
    )  # fmt: skip
    if args.phase == "2" and args.init_from:  # phase 2 takes the adapter options from the init adapter
        if not args.resume_from_checkpoint:
            check_init_adapter(args, args.init_from)
        return
    lpt_config_from_args(args, num_labels=2, id2label=None)  # LPTConfig's own checks (top_k <= num_groups, ...)
    depth = _backbone_depth(args.model_name_or_path, args.image_size)
    if depth is not None and args.shared_layers >= depth:
        raise ValueError(
            f"--shared_layers {args.shared_layers} must be < the {depth} layers of --model_name_or_path "
            f"{args.model_name_or_path!r}: phase 2 adds group prompts to layers shared_layers+1..{depth}."
        )


def _backbone_depth(name_or_path: str, image_size: int) -> int | None:
    """The backbone's number of layers from its config.json (no weights loaded); None when not known cheaply."""
    import json

    if name_or_path == "tiny-random":
        from lpt_peft.backbones import tiny_random_vit

        return tiny_random_vit(image_size=16).config.num_hidden_layers
    if name_or_path == "demo":
        from lpt_peft.interop.demo_backbone import default_demo_cache_dir

        config_file = default_demo_cache_dir(image_size) / "config.json"
    else:
        config_file = Path(name_or_path).expanduser() / "config.json"
    if not config_file.is_file():
        return None  # a Hub id: checked when the backbone is loaded
    config = json.loads(config_file.read_text())
    config = config.get("vision_config") or config
    depth = config.get("num_hidden_layers")
    return int(depth) if isinstance(depth, int) else None


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
    `--matching_weight` and `--instance_balanced_gammas`, over `num_epochs` epochs (for the `beta(e)` schedule).
    `--logit_scale` is the loss's `scale` when the loss declares one (a registered loss without it scales its own)."""
    return LPTObjective(
        class_counts,
        num_epochs=num_epochs,
        loss_name=args.loss,
        matching_weight=args.matching_weight,
        eta=args.eta,
        instance_balanced_branch="instance_balanced"
        if args.instance_balanced_gammas == "authors"
        else "class_balanced",
        **loss_scale_kwargs(args.loss, args.logit_scale),
    ).to(device)


def loss_scale_kwargs(loss_name: str, logit_scale: float | None) -> dict[str, float]:
    """`{"scale": logit_scale}` for a registered loss whose constructor takes `scale` (agcl, ce, logit_adjusted), else
    `{}` (a loss registered without it receives unscaled cosines and scales them itself)."""
    from lpt_peft.training.losses import LOSSES, _normalize_choice

    loss_cls = LOSSES[_normalize_choice(loss_name, "loss name", tuple(LOSSES))]
    if logit_scale is None or "scale" not in _parameters(loss_cls.__init__):
        return {}
    return {"scale": float(logit_scale)}


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
