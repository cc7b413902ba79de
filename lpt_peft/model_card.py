"""The LPT section of the model card written by `save_pretrained` and `push_to_hub`."""

from __future__ import annotations

from huggingface_hub import ModelCard

_MARKER = "<!-- lpt-peft section -->"


def add_lpt_section(peft_model, card_path: str) -> None:
    """Add (or refresh) the part of the card that tells users how to load and run an LPT adapter."""
    tuner = peft_model.base_model
    adapter = peft_model.active_adapter
    config = peft_model.peft_config[adapter]
    base = config.base_model_name_or_path or "<path or Hub id of the base ViT>"
    base_class = type(tuner.model).__name__
    info = dict(getattr(tuner, "card_info", {}) or {})

    card = ModelCard.load(card_path)
    tags = set(card.data.get("tags") or [])
    card.data["tags"] = sorted(tags | {"lpt", "long-tailed", "prompt-tuning", "image-classification"})
    card.data["pipeline_tag"] = "image-classification"
    if info.get("dataset"):
        card.data["datasets"] = [info["dataset"]]

    lines = [
        _MARKER,
        "## LPT adapter (Long-tailed Prompt Tuning)",
        "",
        "This adapter was made with [lpt-peft](https://github.com/) (Dong et al., ICLR 2023). peft does not know the "
        "LPT method by itself: **`import lpt_peft` before loading**, otherwise peft fails with `KeyError: 'LPT'`.",
        "",
        "```python",
        "import lpt_peft  # registers the LPT PEFT type: import it first",
        f"from transformers import {base_class}",
        "from peft import PeftModel",
        "",
        f'base = {base_class}.from_pretrained("{base}")',
        'model = PeftModel.from_pretrained(base, "<this repo id or folder>").eval()',
        "logits = model(pixel_values=pixel_values).logits  # cosine logits; argmax is the class",
        "```",
        "",
        f"- Base model: `{base}` ({base_class}), hidden size {config.hidden_size}, {config.num_hidden_layers} layers",
        f"- Phase: {config.phase} ({'shared prompts' if config.phase == 1 else 'shared + group prompts'})",
        f"- Classes: {config.num_labels}; shared prompts {config.prompt_length} per layer; "
        f"{config.num_groups} groups x {config.group_prompt_length} prompts for layers > {config.shared_layers}; "
        f"top-{config.top_k} selection",
    ]
    if info.get("dataset"):
        lines.append(f"- Data set: {info['dataset']}")
    if info.get("results_markdown"):
        lines += ["", "### Results", "", info["results_markdown"]]
    text = card.text.split(_MARKER)[0].rstrip()
    card.text = text + "\n\n" + "\n".join(lines) + "\n"
    card.save(card_path)
