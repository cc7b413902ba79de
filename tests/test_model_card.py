"""The model card of every adapter folder is valid Hub metadata: huggingface_hub parses and validates it.

Reference: huggingface_hub's own readers (`metadata_load`, `ModelCard.load` -> `ModelCardData`, the model-index
parser `model_index_to_eval_results`, which checks each result's task, dataset and metrics) and the run's own
`results.json` for the numbers.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from peft import get_peft_model
from testing_utils import tiny_vit_config
from transformers import ViTModel

import lpt_peft
from lpt_peft.evaluation.model_card import hub_dataset_id
from lpt_peft.inference import adapter_record

GROUPS = {
    "overall": "Top-1 accuracy (overall)",
    "many": "Top-1 accuracy (many-shot)",
    "medium": "Top-1 accuracy (medium-shot)",
    "few": "Top-1 accuracy (few-shot)",
}


def parsed_card(folder: Path) -> tuple[dict, ModelCard]:
    """The card's metadata as a plain dict (`metadata_load`) and as huggingface_hub's `ModelCard`; both must agree."""
    readme = folder / "README.md"
    metadata = metadata_load(readme)
    card = ModelCard.load(readme)
    assert isinstance(card.data, ModelCardData) and metadata is not None
    assert card.data.to_dict() == metadata  # nothing in the metadata is lost or reshaped by the Hub's model
    return metadata, card


def check_common_fields(metadata: dict) -> None:
    assert metadata["library_name"] == "peft"
    assert metadata["pipeline_tag"] == "image-classification"
    assert {"peft", "lpt", "image-classification"} <= set(metadata["tags"])


def eval_metrics(metadata: dict) -> dict[str, float]:
    """`{metric name: value}` of the card's model-index, parsed and validated by huggingface_hub."""
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name and all(isinstance(r, EvalResult) for r in results)
    assert {(r.task_type, r.dataset_split, r.metric_type) for r in results} == {
        ("image-classification", "test", "accuracy")
    }
    return {r.metric_name: r.metric_value for r in results}


# ------------------------------------------------------------------------------------------- a training run
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """Both phases on the built-in synthetic data set and the built-in tiny-random backbone, with checkpoints."""
    from lpt_peft.training.arguments import LPTTrainingArguments
    from lpt_peft.training.run import run_training

    out = tmp_path_factory.mktemp("card_run") / "out"
    args = LPTTrainingArguments(
        dataset="synthetic", model_name_or_path="tiny-random", image_size=16, num_classes=4, n_max=30, imbalance=10,
        val_per_class=2, batch_size=4, num_groups=3, shared_layers=2, num_workers=0, report_to="none",
        epochs_phase1=1, epochs_phase2=1, max_steps_per_epoch=2, checkpointing_steps=1, baselines=["none"],
        output_dir=str(out),
    )  # fmt: skip
    run_training(args)
    return out


def test_every_adapter_folder_of_a_run_has_a_valid_card(finished_run):
    out = finished_run
    rows = json.loads((out / "results.json").read_text())
    adapters = sorted(path.parent for path in out.rglob("adapter_config.json"))
    names = {str(folder.relative_to(out)) for folder in adapters}
    assert {"phase1", "phase2", "best/phase1", "best/phase2"} <= names, names
    cards = sorted(path.parent for path in out.rglob("README.md"))
    assert set(adapters) <= set(cards)  # checkpoints carry no card (accelerate state only); every adapter has one
    for folder in cards:
        metadata, card = parsed_card(folder)
        check_common_fields(metadata)
        # Neither the built-in backbone nor the registered data set is a Hub id: named in the text only.
        assert "base_model" not in metadata and not any(t.startswith("base_model:") for t in metadata["tags"])
        assert "datasets" not in metadata
        assert "- Base model: `tiny-random`" in card.text and "- Data set: synthetic" in card.text
        assert metadata["lpt_data"]["dataset"] == "synthetic"  # where evaluate_lpt.py --adapter reads it
        phase = json.loads((folder / "adapter_config.json").read_text())["phase"]
        if folder.parent == out:  # phase1/, phase2/: saved again after the test evaluation, with its results
            row = rows[f"LPT phase {phase}"]
            expected = {name: round(row[key], 4) for key, name in GROUPS.items() if row[key] is not None}
            assert GROUPS["overall"] in expected and eval_metrics(metadata) == pytest.approx(expected, abs=1e-9)
            assert metadata["model-index"][0]["results"][0]["dataset"]["type"] == "synthetic"
        elif "model-index" in metadata:  # a running best never claims another adapter's results
            expected = rows[f"LPT phase {phase}"]
            assert eval_metrics(metadata)[GROUPS["overall"]] == pytest.approx(expected["overall"], abs=1e-4)


# ---------------------------------------------------------------------------------------- base references
def _save_adapter(base: ViTModel, folder: Path, **card_info) -> Path:
    model = get_peft_model(base, lpt_peft.LPTConfig(num_labels=3, shared_layers=2, num_groups=2))
    model.base_model.card_info = card_info
    model.save_pretrained(folder)
    return folder


def test_a_hub_base_is_metadata_and_a_local_base_is_text(tmp_path, monkeypatch):
    torch.manual_seed(0)
    hub_id = "google/vit-base-patch16-224-in21k"
    hub = _save_adapter(ViTModel(tiny_vit_config(), add_pooling_layer=False), tmp_path / "hub", base_model=hub_id)
    metadata, card = parsed_card(hub)
    check_common_fields(metadata)
    assert metadata["base_model"] == card.data.base_model == hub_id
    assert f"base_model:adapter:{hub_id}" in metadata["tags"]

    # A local folder, even one whose relative name has the shape of a Hub id, is not a Hub id.
    monkeypatch.chdir(tmp_path)
    ViTModel(tiny_vit_config(), add_pooling_layer=False).save_pretrained("owner/vit")
    local = ViTModel.from_pretrained("owner/vit", add_pooling_layer=False)
    metadata, card = parsed_card(_save_adapter(local, tmp_path / "local"))
    check_common_fields(metadata)
    assert "base_model" not in metadata and not any(t.startswith("base_model:") for t in metadata["tags"])
    assert f"- Base model: `{tmp_path / 'owner' / 'vit'}`" in card.text

    # A built-in backbone name looks like a one-word Hub id but is not one.
    builtin = ViTModel(tiny_vit_config(), add_pooling_layer=False)
    metadata, card = parsed_card(_save_adapter(builtin, tmp_path / "demo", base_model="demo"))
    assert "base_model" not in metadata and "- Base model: `demo`" in card.text


def test_results_become_a_model_index_and_leave_with_them(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(
        ViTModel(tiny_vit_config(), add_pooling_layer=False), lpt_peft.LPTConfig(num_labels=3, shared_layers=2)
    )
    results = {"overall": 51.25, "many": 60.0, "medium": 45.5, "few": math.nan}  # no few-shot class: NaN
    model.base_model.card_info = {"dataset": "someone/flowers", "results": results, "repo_id": "me/lpt-flowers"}
    model.save_pretrained(tmp_path / "a")
    metadata, card = parsed_card(tmp_path / "a")
    assert metadata["datasets"] == ["someone/flowers"] and metadata["lpt_data"] == {"dataset": "someone/flowers"}
    assert eval_metrics(metadata) == {GROUPS["overall"]: 51.25, GROUPS["many"]: 60.0, GROUPS["medium"]: 45.5}
    assert card.data.model_name == "me/lpt-flowers" and "| 51.25 | 60.00 | 45.50 | n/a |" in card.text
    # Several methods: only this adapter's row (phase 1) goes into the model-index.
    model.base_model.card_info["results"] = {"linear probe": {**results, "overall": 9.0}, "LPT phase 1": results}
    model.save_pretrained(tmp_path / "a")
    assert eval_metrics(parsed_card(tmp_path / "a")[0])[GROUPS["overall"]] == 51.25
    # Refreshed without results and on a local data set: no model-index, no datasets, still valid.
    model.base_model.card_info = {"dataset": str(tmp_path)}
    model.save_pretrained(tmp_path / "a")
    metadata, _ = parsed_card(tmp_path / "a")
    assert "model-index" not in metadata and "datasets" not in metadata
    assert adapter_record(tmp_path / "a")["dataset"] == str(tmp_path)  # the data set is still recorded
    # `hfds/<id>`: the Hub id in `datasets`, the option as given in the record.
    model.base_model.card_info = {"dataset": "hfds/beans"}
    model.save_pretrained(tmp_path / "a")
    assert parsed_card(tmp_path / "a")[0]["datasets"] == ["beans"]
    assert adapter_record(tmp_path / "a")["dataset"] == "hfds/beans"
    check_common_fields(metadata)


@pytest.mark.parametrize(
    "dataset,expected",
    [
        ("synthetic", None),  # a registered data set
        ("places_lt", None),
        ("someone/flowers", "someone/flowers"),
        ("hfds/beans", "beans"),  # the form for a Hub id without an owner
        ("hfds/someone/flowers", "someone/flowers"),
        ("./flowers", None),
        ("/no/such/folder", None),
        ("a/b/c", None),
        (None, None),
    ],
)
def test_hub_dataset_id(dataset, expected):
    assert hub_dataset_id(dataset) == expected


def test_hub_dataset_id_of_existing_folders_and_the_registry_prefix(tmp_path, monkeypatch):
    from lpt_peft.data.registry import HUB_BUILDER

    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone" / "flowers").mkdir(parents=True)
    assert hub_dataset_id("someone/flowers") is None and hub_dataset_id("hfds/someone/flowers") is None
    assert hub_dataset_id(f"{HUB_BUILDER}/beans") == "beans"  # the card's prefix is the registry's
