"""Inference smoke test for the core install (`pip install lpt-peft`, no training extras).

Builds a tiny random ViT from a config, wraps it with `get_peft_model`, saves base and adapter, loads them back with
`PeftModel.from_pretrained` and with `lpt_peft.load_classifier`, and checks that all three give the same logits and
that the classifier predicts. Then checks that a training module refuses to import with the install command.
Prints one JSON line (what was imported, which file `lpt_peft` came from); exits non-zero on any failure.

    python -I scripts/smoke_core.py WORK_DIR     # CI (scripts/ci_package.sh) in a fresh venv; tests/test_packaging.py
"""

import json
import sys
from pathlib import Path

import PIL.Image
import torch
from peft import PeftModel, get_peft_model
from transformers import ViTConfig, ViTModel

import lpt_peft

TINY = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 64}
INSTALL_HINT = "needs the training extras: pip install 'lpt-peft[train]'"


def tiny_vit() -> ViTModel:
    torch.manual_seed(0)
    config = ViTConfig(**TINY, image_size=16, patch_size=4, layer_norm_eps=1e-5)
    return ViTModel(config, add_pooling_layer=False).eval()


def check_round_trip(work: Path) -> dict:
    base = tiny_vit()
    base.save_pretrained(work / "base")
    model = get_peft_model(base, lpt_peft.LPTConfig(num_labels=5, shared_layers=2, num_groups=3))
    with torch.no_grad():  # trained-looking prompts and head, so equal logits are not those of a fresh init
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    model.eval().save_pretrained(work / "adapter")
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits

    fresh = ViTModel.from_pretrained(work / "base", add_pooling_layer=False)
    loaded = PeftModel.from_pretrained(fresh, work / "adapter").eval()
    classifier = lpt_peft.load_classifier(work / "base", work / "adapter", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(classifier.model(pixel_values=pixels).logits, expected, atol=1e-5, rtol=0)
    predictions = classifier(PIL.Image.new("RGB", (20, 20), (200, 30, 30)), top_k=5)
    assert len(predictions) == 5 and abs(sum(p["score"] for p in predictions) - 1) < 1e-5, predictions
    return {"max_abs_logit": float(expected.abs().max()), "top_label": predictions[0]["label"]}


def check_training_refuses() -> str:
    try:
        import lpt_peft.training.run  # noqa: F401
    except ImportError as err:
        assert INSTALL_HINT in str(err), str(err)
        return str(err)
    return ""  # the training extras are installed here


def main(work: str) -> None:
    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    report = check_round_trip(work_dir)
    report["training_import_error"] = check_training_refuses()
    report["lpt_peft_file"] = lpt_peft.__file__
    report["modules"] = sorted({name.partition(".")[0] for name in sys.modules})
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
