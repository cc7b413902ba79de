"""Fixtures only; the helpers they use live in tests/testing_utils.py (import those from there, not from here)."""

import os

import pytest
import torch

# Tests never reach a hub: everything is built or written locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Re-exported for test modules that still write `from conftest import ...` (test_data, test_metrics,
# test_entry_points); new code imports them from testing_utils.
from testing_utils import make_tiny_vit, places_lt_split_dir, randomize_adapter, tiny_vit_config  # noqa: E402, F401


@pytest.fixture
def make_vit():
    """Factory of tiny random ViTs with random (not default) LayerNorm parameters, reproducible from a seed.

    `make_vit(seed=0, cls=ViTModel, attn_implementation="eager", **config_overrides)`; see
    `testing_utils.make_tiny_vit`.
    """
    return make_tiny_vit
