"""Configuration of Long-tailed Prompt Tuning (LPT) adapters."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from peft import PeftConfig

from lpt_peft.checks import check_int


class LPTPeftType(str, enum.Enum):
    """PEFT type of LPT.

    peft's own `PeftType` enum is closed to methods defined outside peft, so LPT carries a `str`-valued enum of
    its own (built like `PeftType`). A member hashes and compares equal to the string `"LPT"` stored in
    `adapter_config.json`, which is what peft's mappings are keyed by.
    """

    LPT = "LPT"

    # Print as "LPT" (not "LPTPeftType.LPT") in messages, including peft's own f-strings.
    __str__ = str.__str__
    __format__ = str.__format__


# The 0.1 spelling, kept so code written against it still imports.
LptPeftType = LPTPeftType


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> None:
    check_int(value, f"LPTConfig.{name}", minimum)


@dataclass
class LPTConfig(PeftConfig):
    """Configuration of an LPT adapter (Dong et al., "LPT: Long-tailed Prompt Tuning for Image Classification").

    LPT adds to a frozen Vision Transformer (1) shared prompts, attended to as extra keys and values in every
    layer, and a cosine classifier (phase 1), then (2) a pool of group prompts with matching keys: each image picks
    the `top_k` groups whose keys are closest to its phase-1 feature, and their mean prompts join layers
    `shared_layers + 1 .. L` (phase 2). Defaults are the paper's.

    Example:

    ```python
    >>> import lpt_peft
    >>> from peft import get_peft_model
    >>> from transformers import ViTConfig, ViTModel

    >>> vit = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128))
    >>> model = get_peft_model(vit, lpt_peft.LPTConfig(num_labels=10, shared_layers=2))
    >>> model.base_model.set_phase(2)  # after phase-1 training: train the group pool, keys and head
    ```
    """

    num_labels: int = field(default=None, metadata={"help": "Number of classes of the cosine classifier (>= 2)."})
    prompt_length: int = field(
        default=10, metadata={"help": "Shared prompts per layer (N_p in the paper). They act as extra keys/values."}
    )
    num_groups: int = field(default=20, metadata={"help": "Number of prompt groups in the phase-2 pool (m)."})
    group_prompt_length: int = field(default=10, metadata={"help": "Prompts per layer in each group of the pool."})
    top_k: int = field(
        default=2, metadata={"help": "Groups selected per image; their prompts are averaged (unweighted mean)."}
    )
    shared_layers: int = field(
        default=6,
        metadata={
            "help": "K: layers 1..K use only the shared prompts and are computed once per image; layers K+1..L also "
            "receive the group prompts. Must be smaller than the number of layers of the backbone."
        },
    )
    prompt_init_std: float = field(
        default=0.02, metadata={"help": "Standard deviation of the truncated-normal init of prompts and keys."}
    )
    classifier_dropout: float = field(
        default=0.1, metadata={"help": "Dropout on the CLS feature before the cosine classifier (training only)."}
    )
    phase: int = field(
        default=1,
        metadata={
            "help": "1: shared prompts + cosine head train. 2: shared prompts frozen; group prompts, keys and head "
            "train, and the forward runs the two-pass group selection. Saved adapters infer in their saved phase."
        },
    )
    logit_scale: float = field(
        default=20.0,
        metadata={
            "help": "Scale applied to the cosine logits only when `labels` are passed to forward, for the built-in "
            "cross-entropy loss. The logits returned are always the raw cosines (the paper's A-GCL applies its own "
            "scale of 20)."
        },
    )
    layer_norm_eps: float | None = field(
        default=None,
        metadata={
            "help": "If set, overrides the LayerNorm eps of the backbone (the authors run their ViT-B/16 with 1e-5). "
            "Changes the base model in place; None keeps the backbone's own value."
        },
    )
    id2label: dict[int, str] | None = field(
        default=None, metadata={"help": "Class index -> name, for inference and model cards. Keys 0..num_labels-1."}
    )
    label2id: dict[str, int] | None = field(
        default=None, metadata={"help": "Class name -> index (inverse of id2label)."}
    )
    hidden_size: int | None = field(
        default=None,
        metadata={"help": "Width of the backbone the adapter was built for. Filled in at injection; checked on load."},
    )
    num_hidden_layers: int | None = field(
        default=None,
        metadata={"help": "Depth of the backbone the adapter was built for. Filled in at injection; checked on load."},
    )
    base_fingerprint: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "What the adapter depends on in its backbone besides hidden_size and num_hidden_layers: "
            "model_type, num_attention_heads, patch_size, image_size and a sample of its weights (see "
            "`architectures.base_fingerprint`). Filled in at injection; loading onto a base that differs in "
            "any recorded field is refused. None (adapters saved before it existed) skips the check."
        },
    )
    target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Attention modules that receive prompts. Filled in from the backbone's architecture; leave None."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LPTPeftType.LPT
        if self.num_labels is None:
            raise ValueError(
                "LPTConfig.num_labels is required: pass the number of classes of your data set, "
                "e.g. LPTConfig(num_labels=365) for Places-LT."
            )
        _check_positive_int("num_labels", self.num_labels, minimum=2)
        _check_positive_int("prompt_length", self.prompt_length)
        _check_positive_int("num_groups", self.num_groups)
        _check_positive_int("group_prompt_length", self.group_prompt_length)
        _check_positive_int("top_k", self.top_k)
        _check_positive_int("shared_layers", self.shared_layers, minimum=0)
        if self.top_k > self.num_groups:
            raise ValueError(
                f"LPTConfig.top_k={self.top_k} must be <= num_groups={self.num_groups}: an image cannot select more "
                "groups than the pool holds. Lower top_k or raise num_groups."
            )
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError(
                "LPTConfig.target_modules is a regular expression string that LPT fills in from the backbone's "
                f"architecture; leave it None. Got {self.target_modules!r}."
            )
        if self.phase not in (1, 2):
            raise ValueError(f"LPTConfig.phase must be 1 or 2, got {self.phase!r}.")
        if not 0.0 <= float(self.classifier_dropout) < 1.0:
            raise ValueError(f"LPTConfig.classifier_dropout must be in [0, 1), got {self.classifier_dropout!r}.")
        if not float(self.prompt_init_std) > 0.0:
            raise ValueError(f"LPTConfig.prompt_init_std must be > 0, got {self.prompt_init_std!r}.")
        if not float(self.logit_scale) > 0.0:
            raise ValueError(f"LPTConfig.logit_scale must be > 0, got {self.logit_scale!r}.")
        if self.layer_norm_eps is not None and not float(self.layer_norm_eps) > 0.0:
            raise ValueError(f"LPTConfig.layer_norm_eps must be > 0 or None, got {self.layer_norm_eps!r}.")
        if self.num_hidden_layers is not None and self.shared_layers >= self.num_hidden_layers:
            raise ValueError(
                f"LPTConfig.shared_layers={self.shared_layers} must be < num_hidden_layers={self.num_hidden_layers} "
                f"(valid range 0..{self.num_hidden_layers - 1}), so that at least one layer receives group prompts."
            )
        if self.base_fingerprint is not None and not isinstance(self.base_fingerprint, dict):
            raise ValueError(
                f"LPTConfig.base_fingerprint is filled in by LPT (a dict) or None, got {self.base_fingerprint!r}."
            )
        self._check_labels()

    def _check_labels(self) -> None:
        if self.id2label is not None:
            # JSON turns int keys into strings; normalise so a saved config round-trips.
            try:
                self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            except (TypeError, ValueError) as err:
                raise ValueError(f"LPTConfig.id2label keys must be class indices, got {self.id2label!r}.") from err
            if sorted(self.id2label) != list(range(self.num_labels)):
                raise ValueError(
                    f"LPTConfig.id2label must have exactly the keys 0..{self.num_labels - 1} (num_labels="
                    f"{self.num_labels}), got {len(self.id2label)} keys. Fix num_labels or the label map."
                )
            if self.label2id is None:
                self.label2id = {v: k for k, v in self.id2label.items()}
        if self.label2id is not None:
            self.label2id = {str(k): int(v) for k, v in self.label2id.items()}
            if self.id2label is None:
                self.id2label = {v: k for k, v in self.label2id.items()}
                self._check_labels()

    @property
    def is_prompt_learning(self) -> bool:
        # LPT injects layers like LoRA does (peft's "prompt learning" path assumes word embeddings).
        return False
