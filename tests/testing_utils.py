"""Helpers for the PEFT-contract battery (tests/test_peft_contract.py): cases, tiny models, adapter bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from conftest import randomize_adapter, tiny_vit_config
from peft import PeftModel, get_peft_model
from transformers import ViTForImageClassification, ViTModel

import lpt_peft  # noqa: F401  (registers "LPT" with peft)
from lpt_peft import LPTConfig

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
    torch.manual_seed(seed)
    config = tiny_vit_config()
    config._attn_implementation = case.attn
    kwargs = {"add_pooling_layer": False} if case.model_cls is ViTModel else {}
    model = case.model_cls(config, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


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

