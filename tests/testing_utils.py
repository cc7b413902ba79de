"""Shared test helpers (imported by test modules and by conftest's fixtures; never import conftest from here).

- tiny models: `tiny_vit_config`, `make_tiny_vit`, and `tiny_backbone` for every built-in backbone family
  (`FAMILIES`, with the task classes in `HEAD_CLASSES`);
- adapter helpers: `randomize_adapter`, and the PEFT-contract battery's cases and bookkeeping
  (tests/test_peft_contract.py);
- data: `places_lt_split_dir`.

The reference forward (prompts as real tokens) is in tests/oracles.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPForImageClassification,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import lpt_peft  # noqa: F401  (registers "LPT" with peft)
from lpt_peft import LPTConfig

# ---------------------------------------------------------------------------------------------- tiny models
TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": 16, "patch_size": 4}
TINY_REGISTERS = 2


def tiny_vit_config(**overrides) -> ViTConfig:
    """The test suite's tiny ViT: hidden 32, 4 layers, 4 heads, MLP 64, 16 px images in 4 px patches, eps 1e-5."""
    values = {**TINY, "intermediate_size": 64, "layer_norm_eps": 1e-5}
    values.update(overrides)
    return ViTConfig(**values)


def randomize_layer_norms(model: nn.Module) -> nn.Module:
    """LayerNorm weights ~ N(1, 0.2) and biases ~ N(0, 0.2), so a test cannot pass by the norms' trivial init."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return model


def make_tiny_vit(seed=0, cls=None, attn_implementation="eager", **overrides):
    """A tiny random ViT (`tiny_vit_config(**overrides)`) with random LayerNorms, the same for the same seed."""
    cls = cls or ViTModel
    torch.manual_seed(seed)
    config = tiny_vit_config(**overrides)
    config._attn_implementation = attn_implementation
    kwargs = {"add_pooling_layer": False} if cls is ViTModel else {}
    return randomize_layer_norms(cls(config, **kwargs)).eval()


def _family_config(family: str):
    common = {**TINY, "layer_norm_eps": 1e-5}
    if family == "vit":
        return ViTConfig(intermediate_size=64, **common)
    if family == "deit":
        return DeiTConfig(intermediate_size=64, **common)
    if family == "dinov2":
        return Dinov2Config(mlp_ratio=2, **common)
    if family == "dinov2_registers":
        return Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=TINY_REGISTERS, **common)
    if family == "clip":
        return CLIPVisionConfig(intermediate_size=64, **common)
    raise AssertionError(family)


# family -> bare encoder class; every built-in backbone family
BASE_CLASSES = {
    "vit": ViTModel,
    "deit": DeiTModel,
    "dinov2": Dinov2Model,
    "dinov2_registers": Dinov2WithRegistersModel,
    "clip": CLIPVisionModel,
}
FAMILIES = list(BASE_CLASSES)
# task class -> (family, attribute holding the encoder)
HEAD_CLASSES = {
    ViTForImageClassification: ("vit", "vit"),
    DeiTForImageClassification: ("deit", "deit"),
    DeiTForImageClassificationWithTeacher: ("deit", "deit"),
    Dinov2ForImageClassification: ("dinov2", "dinov2"),
    Dinov2WithRegistersForImageClassification: ("dinov2_registers", "dinov2_with_registers"),
    CLIPForImageClassification: ("clip", "vision_model"),
    CLIPVisionModelWithProjection: ("clip", "vision_model"),
}


def tiny_backbone(family: str, cls=None, attn: str = "eager", seed: int = 0) -> nn.Module:
    """A tiny random model of `family` whose norms, special tokens and LayerScales are all away from their init.

    Args:
        family: One of `FAMILIES`.
        cls: The class to build (default the family's bare encoder; a task class of `HEAD_CLASSES` gets 3 labels).
        attn: `"eager"` or `"sdpa"`.
        seed: Seed of every weight.
    """
    cls = cls or BASE_CLASSES[family]
    config = _family_config(family)
    kwargs = {"add_pooling_layer": False} if cls in (ViTModel, DeiTModel) else {}
    if cls is CLIPForImageClassification:
        config = CLIPConfig(
            vision_config=config.to_dict(),
            text_config={"hidden_size": TINY["hidden_size"], "num_hidden_layers": 1, "num_attention_heads": 4},
            num_labels=3,
        )
    elif cls not in BASE_CLASSES.values():
        config.num_labels = 3
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation=attn, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):  # unit-gain weights, so prompts move the features visibly
                module.weight.normal_(0.0, module.in_features**-0.5)
        randomize_layer_norms(model)
        for name, param in model.named_parameters():
            if name.endswith(("cls_token", "distillation_token", "register_tokens", "class_embedding")):
                param.normal_(0.0, 1.0)
            elif name.endswith("position_embeddings"):
                param.normal_(0.0, 0.3)
            elif name.endswith("lambda1"):
                param.uniform_(0.2, 1.5)  # LayerScale
    return model.eval()


def encoder_of(model: nn.Module) -> nn.Module:
    """The bare encoder of a tiny model: the model itself, or a task class's encoder attribute."""
    for cls, (_, attr) in HEAD_CLASSES.items():
        if type(model) is cls:
            return getattr(model, attr)
    return model


def randomize_adapter(model, seed=1, scale=0.5):
    """Move every adapter weight away from its init (seeded), so the tests do not depend on it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lpt_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * scale)


# ---------------------------------------------------------------------------------------------- data
def places_lt_split_dir() -> Path:
    """The standard Places-LT split files: $LPT_PLACES_LT_SPLITS, or shared/ beside the repository (as in CI)."""
    candidates = [os.environ.get("LPT_PLACES_LT_SPLITS")]
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "places_lt")
    candidates.append("/work/shared/data/places_lt")
    for candidate in candidates:
        if candidate and (Path(candidate) / "Places_LT_train.txt").is_file():
            return Path(candidate)
    if os.environ.get("CI"):
        pytest.fail("CI must find the Places-LT split files in shared/data/places_lt beside the repository")
    pytest.skip("Places-LT split files not found; set LPT_PLACES_LT_SPLITS")


# ---------------------------------------------------------------------------------------------- PEFT-contract battery
NUM_LABELS = 3
SHARED_LAYERS = 2  # K of the 4-layer tiny ViT
PROMPT_LENGTH = 2
NUM_GROUPS = 4
GROUP_PROMPT_LENGTH = 3
TOP_K = 2


@dataclass(frozen=True)
class Case:
    """One row of the battery: LPT phase x transformers model class x attention implementation."""

    phase: int
    model_cls: type
    attn: str

    @property
    def id(self) -> str:
        return f"phase{self.phase}-{self.model_cls.__name__}-{self.attn}"

    @property
    def output_name(self) -> str:
        """The base model's own main output (used to compare with adapters disabled / unloaded)."""
        return "last_hidden_state" if self.model_cls is ViTModel else "logits"


TEST_CASES = [
    Case(phase, model_cls, attn)
    for phase in (1, 2)
    for model_cls in (ViTModel, ViTForImageClassification)
    for attn in ("eager", "sdpa")
]


def tiny_vit(case: Case, seed: int = 0, dtype: torch.dtype | None = None):
    """A tiny random ViT (hidden 32, 4 layers, 16 px) with random LayerNorms, the same for the same seed."""
    model = make_tiny_vit(seed=seed, cls=case.model_cls, attn_implementation=case.attn)
    return model.to(dtype) if dtype is not None else model


def lpt_config(case: Case, **overrides) -> LPTConfig:
    values = {
        "num_labels": NUM_LABELS,
        "prompt_length": PROMPT_LENGTH,
        "num_groups": NUM_GROUPS,
        "group_prompt_length": GROUP_PROMPT_LENGTH,
        "top_k": TOP_K,
        "shared_layers": SHARED_LAYERS,
        "phase": case.phase,
        "classifier_dropout": 0.0,  # deterministic train-mode forwards, so runs can be compared
    }
    values.update(overrides)
    return LPTConfig(**values)


def make_model(case: Case, seed: int = 0, adapter_seed: int = 1, **config_overrides) -> PeftModel:
    """`get_peft_model` over a tiny ViT, adapter weights moved away from their init (so a lost load shows)."""
    base = tiny_vit(case, seed=seed)
    torch.manual_seed(adapter_seed)
    model = get_peft_model(base, lpt_config(case, **config_overrides))
    randomize_adapter(model, seed=adapter_seed)
    return model.eval()


def pixels(batch: int = 4, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def labels(batch: int = 4) -> torch.Tensor:
    return torch.arange(batch) % NUM_LABELS


def training_loss(output, phase: int) -> torch.Tensor:
    """LPT's objective in miniature: cross-entropy, minus the key-matching score in phase 2 (so keys get gradient)."""
    return output.loss - output.match_score if phase == 2 else output.loss


def adapter_params(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    """Detached copies of one adapter's weights, keyed by parameter name."""
    return {
        name: param.detach().clone()
        for name, param in model.named_parameters()
        if ".lpt_" in name and name.endswith(f".{adapter}")
    }


def trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def phase_param_names(model, adapter: str = "default", phase: int = 1) -> set[str]:
    """The parameter names that the phase rules train: shared prompts + head (1); group prompts + keys + head (2)."""
    kinds = ("lpt_shared_prompt", "lpt_head") if phase == 1 else ("lpt_group_prompt", "lpt_keys", "lpt_head")
    return {
        name
        for name, _ in model.named_parameters()
        if name.endswith(f".{adapter}") and any(f".{kind}." in name for kind in kinds)
    }


def expected_trainable_count(phase: int, hidden: int = 32, layers: int = 4) -> int:
    """Hand count of what the phase trains (LPT paper, Sec. 3): no backbone weight ever trains."""
    head = hidden * NUM_LABELS
    if phase == 1:
        return layers * PROMPT_LENGTH * hidden + head
    group_pool = (layers - SHARED_LAYERS) * NUM_GROUPS * GROUP_PROMPT_LENGTH * hidden
    keys = NUM_GROUPS * hidden
    return group_pool + keys + head


def expected_total_adapter_count(hidden: int = 32, layers: int = 4) -> int:
    """Every weight one adapter stores, whatever its phase: shared prompts, group pool, keys and head."""
    shared = layers * PROMPT_LENGTH * hidden
    group_pool = (layers - SHARED_LAYERS) * NUM_GROUPS * GROUP_PROMPT_LENGTH * hidden
    return shared + group_pool + NUM_GROUPS * hidden + hidden * NUM_LABELS


def parameter_grads(model) -> dict[str, torch.Tensor]:
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def assert_params_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """Import `examples/<name>.py` as a module (the scripts are not a package), to call its `main(argv)`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
