import os

import pytest
import torch

# Tests never reach a hub: everything is built or written locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_vit_config(**overrides):
    from transformers import ViTConfig

    values = {
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "image_size": 16,
        "patch_size": 4,
        "layer_norm_eps": 1e-5,
    }
    values.update(overrides)
    return ViTConfig(**values)


@pytest.fixture
def make_vit():
    """Factory of tiny random ViTs with random (not default) LayerNorm parameters, reproducible from a seed."""

    def factory(seed=0, cls=None, attn_implementation="eager", **overrides):
        from transformers import ViTModel

        cls = cls or ViTModel
        torch.manual_seed(seed)
        config = tiny_vit_config(**overrides)
        config._attn_implementation = attn_implementation
        kwargs = {"add_pooling_layer": False} if cls is ViTModel else {}
        model = cls(config, **kwargs)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.weight.normal_(1.0, 0.2)
                    module.bias.normal_(0.0, 0.2)
        return model.eval()

    return factory


def places_lt_split_dir():
    """The standard Places-LT split files: $LPT_PLACES_LT_SPLITS, or shared/ beside the repository (as in CI)."""
    from pathlib import Path

    candidates = [os.environ.get("LPT_PLACES_LT_SPLITS")]
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "places_lt")
    candidates.append("/work/shared/data/places_lt")
    for candidate in candidates:
        if candidate and (Path(candidate) / "Places_LT_train.txt").is_file():
            return Path(candidate)
    if os.environ.get("CI"):
        pytest.fail("CI must find the Places-LT split files in shared/data/places_lt beside the repository")
    pytest.skip("Places-LT split files not found; set LPT_PLACES_LT_SPLITS")


def randomize_adapter(model, seed=1, scale=0.5):
    """Move every adapter weight away from its init so the tests do not depend on it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lpt_" in name:
                param.add_(torch.randn(param.shape, generator=gen) * scale)
