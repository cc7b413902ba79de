"""The LPT model card written by `save_pretrained` and `push_to_hub` (see `registration._install_model_card_section`).

The card says what the adapter is (base model, data set, phase, sizes), how it scores (shot-group table when known),
and the exact lines to load and run it, `import lpt_peft` first. Optional facts come from
`peft_model.base_model.card_info`, a dict that training code or a converter sets before saving:

| key | type | shown as |
|---|---|---|
| `dataset` | str | data set line; metadata `lpt_data.dataset`, and `datasets` when it is a Hub id |
| `results_markdown` | str | the Results section, verbatim (e.g. from `format_results_table`) |
| `results` | dict | `{"overall", ...}` or `{row: dict}`: the table (if no `results_markdown`); `model-index` |
| `grouping` | `"standard"` or `"author"` | the shot-group thresholds under the table |
| `base_model` | str | the base shown in the code (e.g. a Hub id) instead of the adapter config's path |
| `repo_id` | str | the adapter id shown in the code instead of a placeholder; the `model-index` name |
| `preprocessing` | dict | `image_size`, `resize_size`, `mean`, `std` |
| `notes` | str or list of str | extra bullet points (e.g. provenance) |
| `data` | dict | data-set options that rebuild the test split (e.g. `max_test_per_class`); metadata `lpt_data` |
| `adapters` | dict | `{adapter_name: {key: value}}`: facts of one adapter, over the shared ones above |

Each adapter folder's card describes the adapter stored there (its phase, classes, sizes); the base is written as a
Hub id, a built-in backbone name (`demo`, `tiny-random`) or an absolute path, never as a path relative to the
directory the model was saved from.

The card's metadata is what the Hub validates (`huggingface_hub.ModelCardData`): `library_name: peft`,
`pipeline_tag: image-classification`, `tags` (peft, lpt, ...), `base_model` only when the base is a Hub id (a
built-in backbone or a local path is named in the text instead), `datasets` only when the data set is a Hub id, and
a `model-index` with the test accuracy (overall / many / medium / few, in %) when `results` holds this adapter's row.

The LPT part of the card sits between two HTML comments and is rewritten on every save; text outside them is kept.
peft's empty template is replaced by the LPT card on the first save.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

from huggingface_hub import EvalResult, ModelCard

_MARKER = "<!-- lpt-peft section -->"
_END_MARKER = "<!-- /lpt-peft section -->"
_TEMPLATE_SIGNS = ("# Model Card for Model ID", "[More Information Needed]")
_CARD_INFO_KEYS = {
    "dataset",
    "results_markdown",
    "results",
    "grouping",
    "base_model",
    "repo_id",
    "preprocessing",
    "notes",
    "data",
    "adapters",
}
_GROUPING = {
    "standard": "many-shot > 100 training images, medium-shot 20-100, few-shot < 20 (the standard split)",
    "author": "many-shot > 100 training images, medium-shot 21-100, few-shot <= 20 (the LPT authors' code)",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_CITATION = """```bibtex
@inproceedings{dong2023lpt,
  title     = {{LPT}: Long-tailed Prompt Tuning for Image Classification},
  author    = {Dong, Bowen and Zhou, Pan and Yan, Shuicheng and Zuo, Wangmeng},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2023}
}
```"""


def looks_like_hub_id(name: str | None) -> bool:
    """True when `name` has the shape of a Hub model id (`name` or `owner/name`); says nothing of whether it exists."""
    return bool(name) and _HUB_ID.fullmatch(name) is not None


def _looks_like_hub_id(name: str | None) -> bool:
    from lpt_peft.backbones import BUILTIN_BACKBONES

    return looks_like_hub_id(name) and name not in BUILTIN_BACKBONES and not os.path.exists(name)


# `--dataset hfds/<id or path>` (lpt_peft.data.registry.HUB_BUILDER); not imported here: the registry needs `datasets`.
_HUB_DATASET_PREFIX = "hfds/"


def hub_dataset_id(dataset: str | None) -> str | None:
    """The Hub id of a training `--dataset`, or None for a registered name, a local folder or nothing.

    Args:
        dataset: The data set as the run recorded it: a registered name (`synthetic`, `places_lt`), an `owner/name`
            Hub id, `hfds/<id or path>`, or a local path.

    Returns:
        `owner/name` (or `name` after `hfds/`) when it can only be a Hub id; None otherwise.
    """
    if not dataset:
        return None
    explicit = dataset.startswith(_HUB_DATASET_PREFIX)
    candidate = dataset.removeprefix(_HUB_DATASET_PREFIX)
    if os.path.exists(os.path.expanduser(candidate)) or not looks_like_hub_id(candidate):
        return None
    # Without the prefix, only `owner/name` is a Hub id: a single word is a registered data set's name.
    return candidate if explicit or "/" in candidate else None


def card_base_reference(base: str | None) -> str | None:
    """The base as a card may record it: a built-in name or Hub id as is, an existing local path made absolute.

    Args:
        base: A built-in backbone name, a Hub id, a path, or None.

    Returns:
        The reference to write (None stays None).
    """
    from lpt_peft.backbones import BUILTIN_BACKBONES

    if not base or base in BUILTIN_BACKBONES or not os.path.exists(base):
        return base
    return os.path.abspath(base)


def _card_info(tuner, adapter_name: str) -> dict[str, Any]:
    info = getattr(tuner, "card_info", None)
    if info is None:
        return {}
    if not isinstance(info, Mapping):
        raise TypeError(f"base_model.card_info must be a dict, got {type(info).__name__}.")
    per_adapter = info.get("adapters") or {}
    if not isinstance(per_adapter, Mapping) or not all(isinstance(v, Mapping) for v in per_adapter.values()):
        raise TypeError("base_model.card_info['adapters'] must map adapter names to dicts of card facts.")
    merged = {**{k: v for k, v in info.items() if k != "adapters"}, **per_adapter.get(adapter_name, {})}
    unknown = sorted(set(merged) - _CARD_INFO_KEYS)
    if unknown:
        warnings.warn(
            f"card_info keys {unknown} are not used by the LPT model card (known: {sorted(_CARD_INFO_KEYS)}).",
            stacklevel=4,
        )
    return {k: v for k, v in merged.items() if v is not None}


def _results_markdown(info: Mapping[str, Any], phase: int) -> str | None:
    if info.get("results_markdown"):
        return str(info["results_markdown"]).strip()
    results = info.get("results")
    if not results:
        return None
    from lpt_peft.evaluation.metrics import format_results_table

    rows = {f"LPT (phase {phase})": results} if "overall" in results else results
    return format_results_table(rows)


def _adapter_parameters(config) -> tuple[int, str]:
    d, depth = config.hidden_size or 0, config.num_hidden_layers or 0
    shared = depth * config.prompt_length * d
    groups = max(depth - config.shared_layers, 0) * config.num_groups * config.group_prompt_length * d
    keys, head = config.num_groups * d, d * config.num_labels
    detail = f"shared prompts {shared:,}, group prompts {groups:,}, keys {keys:,}, cosine classifier {head:,}"
    return shared + groups + keys + head, detail


def _preprocessing_line(info: Mapping[str, Any], image_size: int | None) -> str:
    pre = info.get("preprocessing")
    if isinstance(pre, Mapping) and pre.get("image_size"):
        size = int(pre["image_size"])
        resize = int(pre.get("resize_size") or round(size * 256 / 224))
        mean, std = pre.get("mean", (0.5, 0.5, 0.5)), pre.get("std", (0.5, 0.5, 0.5))
        return (
            f"- Preprocessing (evaluation): resize to {resize}x{resize}, centre crop {size}, scale to [0, 1], "
            f"normalise with mean {list(mean)} and std {list(std)}."
        )
    size = image_size or 224
    return (
        f"- Preprocessing (evaluation): LPT's default, unless this repo holds a `preprocessor_config.json`: resize to "
        f"{round(size * 256 / 224)} square, centre crop {size}, mean = std = (0.5, 0.5, 0.5)."
    )


def _data_lines(info: Mapping[str, Any]) -> list[str]:
    lines = [f"- Data set: {info['dataset']}"] if info.get("dataset") else []
    if isinstance(info.get("data"), Mapping) and info["data"]:
        options = ", ".join(f"{k}={v}" for k, v in info["data"].items())
        lines.append(f"- Data set options (`examples/evaluate_lpt.py` reuses them): {options}")
    return lines


def _classes_line(config) -> str:
    if not config.id2label:
        return f"- Classes: {config.num_labels}"
    names = ", ".join(list(config.id2label.values())[:8]) + (", ..." if config.num_labels > 8 else "")
    return f"- Classes: {config.num_labels} ({names})"


def _base_facts(model) -> tuple[str, str, dict, int | None]:
    """Class name, family name, loading keyword arguments and image size of the base, from the family registry."""
    from lpt_peft.backbones import backbone_image_size
    from lpt_peft.tuner.architectures import family_of

    class_name = type(model).__name__
    try:
        family = family_of(model)
    except (TypeError, ValueError):  # a class registered with register_architecture but no BackboneFamily
        return class_name, class_name, {}, getattr(getattr(model, "config", None), "image_size", None)
    return class_name, family.name, family.load_kwargs(class_name), backbone_image_size(model)


def _section(peft_model, config, info: Mapping[str, Any], with_title: bool) -> list[str]:
    tuner = peft_model.base_model
    base_class, family_name, load_kwargs, image_size = _base_facts(tuner.model)
    base = card_base_reference(info.get("base_model") or config.base_model_name_or_path)
    base = base or "<path or Hub id of the base ViT>"
    repo = info.get("repo_id") or "<this repo id or folder>"
    dataset = info.get("dataset")
    pooling_kwarg = "".join(f", {key}={value!r}" for key, value in load_kwargs.items())
    total, detail = _adapter_parameters(config)
    phase_text = "shared prompts" if config.phase == 1 else "shared prompts + group prompts chosen per image"

    h = "##" if with_title else "###"  # subsection level under the card's title or under our H2
    lines = [_MARKER]
    if with_title:
        lines += [f"# LPT adapter{f' for {dataset}' if dataset else ''} on `{base}`", ""]
    else:
        lines += ["## LPT adapter (Long-tailed Prompt Tuning)", ""]
    lines += [
        "A [Long-tailed Prompt Tuning](https://arxiv.org/abs/2210.01033) (LPT, Dong et al., ICLR 2023) adapter for a "
        "frozen Vision Transformer, made with lpt-peft. peft does not know the LPT method by itself: "
        "**`import lpt_peft` before loading**, otherwise peft fails with `KeyError: 'LPT'`.",
        "",
        f"{h} How to use",
        "",
        'Classify image files (the call shape of `transformers.pipeline("image-classification")`):',
        "",
        "```python",
        "import lpt_peft  # registers the LPT PEFT type with peft: import it first",
        "from lpt_peft.inference import load_classifier",
        "",
        f'classifier = load_classifier("{base}", "{repo}")  # device: cuda when available',
        'print(classifier("image.jpg", top_k=5))  # [{"label": ..., "score": ...}, ...]',
        "```",
        "",
        "Scores are `softmax(logit_scale * cosine)` with the adapter's `logit_scale` "
        f"({config.logit_scale:g}); the ranking is that of the cosine logits.",
        "",
        "With peft directly:",
        "",
        "```python",
        "import torch",
        "import lpt_peft  # registers the LPT PEFT type: import it before PeftModel.from_pretrained",
        "from peft import PeftModel",
        f"from transformers import {base_class}",
        "",
        f'base = {base_class}.from_pretrained("{base}"{pooling_kwarg})',
        f'model = PeftModel.from_pretrained(base, "{repo}").eval()',
        "pixel_values = ...  # (batch, 3, H, W) float, preprocessed as under 'Model details'",
        "with torch.no_grad():",
        "    logits = model(pixel_values=pixel_values).logits  # (batch, classes) cosine similarities; argmax = class",
        "```",
        "",
        "From the command line (lpt-peft's examples): "
        f"`python examples/predict.py --base {base} --adapter {repo} photos/ --top_k 5`.",
        "",
        f"{h} Model details",
        "",
        f"- Base model: `{base}` ({family_name} family, {base_class}, hidden size {config.hidden_size}, "
        f"{config.num_hidden_layers} layers), frozen",
    ]
    lines += _data_lines(info)
    lines += [
        f"- Phase {config.phase}: {phase_text}",
        _classes_line(config),
        f"- Prompts: {config.prompt_length} shared per layer; {config.num_groups} groups x "
        f"{config.group_prompt_length} prompts for layers {config.shared_layers + 1}..{config.num_hidden_layers}; "
        f"top-{config.top_k} groups averaged per image",
        f"- Adapter parameters: {total:,} ({detail})",
        _preprocessing_line(info, image_size),
    ]
    if config.layer_norm_eps is not None:
        lines.append(f"- Backbone LayerNorm eps set to {config.layer_norm_eps:g} when the adapter is loaded")
    notes = info.get("notes")
    for note in [notes] if isinstance(notes, str) else list(notes or []):
        lines.append(f"- {note}")
    lines += _results_lines(info, config.phase, h)
    lines += ["", f"{h} Citation", "", _CITATION, _END_MARKER]
    return lines


def _results_lines(info: Mapping[str, Any], phase: int, h: str) -> list[str]:
    results = _results_markdown(info, phase)
    if not results:
        return []
    lines = ["", f"{h} Results", "", results]
    if info.get("grouping") in _GROUPING:
        lines += ["", f"Shot groups by training images per class: {_GROUPING[info['grouping']]}."]
    return lines


def _clean_metadata(card: ModelCard, base: str | None, info: Mapping[str, Any], phase: int, has_results: bool) -> None:
    data = card.data
    tags = {t for t in (data.get("tags") or []) if not str(t).startswith("base_model:adapter:")}
    tags |= {"peft", "lpt", "long-tailed", "prompt-tuning", "image-classification", "vision"}
    # The Hub rejects a `base_model` that is not a Hub id, and peft writes whatever path the base came from.
    if _looks_like_hub_id(base):
        data["base_model"] = base
        tags.add(f"base_model:adapter:{base}")
    else:
        data.pop("base_model", None)
    data["library_name"] = "peft"
    data["tags"] = sorted(tags)
    data["pipeline_tag"] = "image-classification"
    if info.get("dataset"):
        hub_dataset = hub_dataset_id(info["dataset"])
        if hub_dataset:
            data["datasets"] = [hub_dataset]
        else:  # a registered name or a local folder is not a Hub data set; the card's text names it
            data.pop("datasets", None)
    # Machine-readable, for `examples/evaluate_lpt.py --adapter` (`lpt_peft.inference.adapter_record`): the run's
    # --dataset exactly as given (`datasets` holds Hub ids only) and the options that rebuild its test split.
    recorded = {"dataset": info["dataset"]} if info.get("dataset") else {}
    if isinstance(info.get("data"), Mapping):
        recorded.update(info["data"])
    if recorded:
        data["lpt_data"] = recorded
    if has_results:
        data["metrics"] = sorted(set(data.get("metrics") or []) | {"accuracy"})
    # Results of other weights must not stay: the model-index always describes the weights saved with the card.
    data.eval_results = _eval_results(info, phase) or None
    data.model_name = (info.get("repo_id") or f"lpt-phase{phase}") if data.eval_results else None


# Metric names in the model-index, by key of a `shot_accuracy` result.
_EVAL_METRICS = {
    "overall": "Top-1 accuracy (overall)",
    "many": "Top-1 accuracy (many-shot)",
    "medium": "Top-1 accuracy (medium-shot)",
    "few": "Top-1 accuracy (few-shot)",
}


def _own_results(info: Mapping[str, Any], phase: int) -> Mapping[str, Any] | None:
    """This adapter's row of `results`: the dict itself, or its `LPT phase N` row among several methods."""
    results = info.get("results")
    if not isinstance(results, Mapping) or not results:
        return None
    if "overall" in results:
        return results
    row = results.get(f"LPT phase {phase}", results.get(f"LPT (phase {phase})"))
    return row if isinstance(row, Mapping) else None


def _eval_results(info: Mapping[str, Any], phase: int) -> list[EvalResult]:
    """The test accuracies (%) of this adapter as Hub eval results; groups without a value (no class) are left out."""
    row = _own_results(info, phase)
    dataset = str(info.get("dataset") or "")
    if row is None or not dataset:
        return []
    dataset_id = hub_dataset_id(dataset) or os.path.basename(os.path.normpath(dataset))
    results = []
    for key, name in _EVAL_METRICS.items():
        value = row.get(key)
        if isinstance(value, (int, float)) and value == value:  # NaN: an empty shot group
            results.append(
                EvalResult(
                    task_type="image-classification",
                    task_name="Long-tailed image classification",
                    dataset_type=dataset_id,
                    dataset_name=dataset_id,
                    dataset_split="test",
                    metric_type="accuracy",
                    metric_name=name,
                    metric_value=round(float(value), 4),
                )
            )
    return results


def add_lpt_section(peft_model, card_path: str, adapter_name: str | None = None) -> None:
    """Write (or refresh) the LPT part of the model card at `card_path` for one adapter of `peft_model`.

    Args:
        peft_model: The `PeftModel`.
        card_path: The `README.md` of the folder that holds the adapter's weights.
        adapter_name: The adapter stored in that folder (default: the active adapter).

    Raises:
        TypeError: `base_model.card_info` (or its `adapters` entry) is not a dict.

    Example:

    ```python
    >>> model.base_model.card_info = {"dataset": "places_lt", "results": {"overall": 50.1, "many": 49.3,
    ...                                                                   "medium": 52.3, "few": 46.9}}
    >>> model.save_pretrained("out/adapter")  # out/adapter/README.md now holds the LPT card
    ```
    """
    tuner = peft_model.base_model
    adapter_name = adapter_name or peft_model.active_adapter
    config = peft_model.peft_config[adapter_name]
    info = _card_info(tuner, adapter_name)

    card = ModelCard.load(card_path)
    text = card.text
    start, end = text.find(_MARKER), text.find(_END_MARKER)
    is_template = all(sign in text for sign in _TEMPLATE_SIGNS)
    if start >= 0:
        before = text[:start]
        after = text[end + len(_END_MARKER) :] if end > start else ""
        with_title = text[start + len(_MARKER) :].lstrip().startswith("# ")
    elif is_template:
        # peft's empty template: keep only what peft itself manages (the framework versions block).
        before = ""
        versions = text.find("### Framework versions")
        after = "\n\n" + text[versions:].strip() if versions >= 0 else ""
        with_title = True
    else:
        before, after, with_title = text.rstrip() + "\n\n", "", False

    lines = _section(peft_model, config, info, with_title)
    card.text = before + "\n".join(lines) + after.rstrip() + "\n"
    base = card_base_reference(info.get("base_model") or config.base_model_name_or_path)
    _clean_metadata(card, base, info, config.phase, bool(_results_markdown(info, config.phase)))
    card.save(card_path)
