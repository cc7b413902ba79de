"""A one-minute tour of lpt-peft on a tiny random ViT: phase 1, phase 2, save, reload. No downloads.

python examples/quickstart.py
"""

import tempfile
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import ViTConfig, ViTModel

import lpt_peft  # registers the "LPT" PEFT type; import it before PeftModel.from_pretrained
from lpt_peft.cli import cli_entry


@cli_entry()
def main() -> None:
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    vit_config = ViTConfig(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8
    )
    ViTModel(vit_config, add_pooling_layer=False).save_pretrained(tmp / "base")  # stands in for a pretrained backbone

    vit = ViTModel.from_pretrained(tmp / "base", add_pooling_layer=False)
    model = get_peft_model(vit, lpt_peft.LPTConfig(num_labels=5, shared_layers=2, num_groups=6))
    model.print_trainable_parameters()  # phase 1: shared prompts + cosine head

    pixel_values, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for _ in range(5):
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"phase 1 loss after 5 steps: {loss.item():.3f}")

    model.base_model.set_phase(2)  # shared prompts frozen; group pool, keys and head train
    model.print_trainable_parameters()
    out = model(pixel_values=pixel_values)
    print("groups selected by the first images:", out.group_indices[:3].tolist(), f"match score {out.match_score:.3f}")

    model.eval().save_pretrained(tmp / "adapter")
    reloaded = PeftModel.from_pretrained(
        ViTModel.from_pretrained(tmp / "base", add_pooling_layer=False), tmp / "adapter"
    )
    with torch.no_grad():
        same = torch.equal(reloaded.eval()(pixel_values=pixel_values).logits, model(pixel_values=pixel_values).logits)
    print(f"reloaded adapter infers in phase {reloaded.peft_config['default'].phase}; identical logits: {same}")
    print(f"files written to {tmp / 'adapter'}: {sorted(p.name for p in (tmp / 'adapter').iterdir())}")


if __name__ == "__main__":
    main()
