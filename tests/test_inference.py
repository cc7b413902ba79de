"""The inference helper, the predict script and the model card, against references written here."""

import csv
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from peft import PeftModel, get_peft_model
from testing_utils import randomize_adapter, tiny_vit_config
from transformers import AutoImageProcessor, ViTModel

import lpt_peft
from lpt_peft.inference import LPTImageClassifier, load_classifier, load_preprocessing, save_preprocessing

REPO = Path(__file__).resolve().parents[1]
LABELS = {0: "apple", 1: "bear", 2: "castle", 3: "dolphin", 4: "elephant"}
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
SIZE, RESIZE = 16, 20


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny base ViT and phase-2 adapter (weights moved off their init) with non-default preprocessing."""
    path = tmp_path_factory.mktemp("lpt")
    torch.manual_seed(0)
    config = tiny_vit_config()
    config._attn_implementation = "eager"
    ViTModel(config, add_pooling_layer=False).save_pretrained(path / "base")
    vit = ViTModel.from_pretrained(path / "base", add_pooling_layer=False, attn_implementation="eager")
    lpt = lpt_peft.LPTConfig(num_labels=5, shared_layers=2, num_groups=4, prompt_length=3, id2label=LABELS)
    model = get_peft_model(vit, lpt)
    randomize_adapter(model, seed=1, scale=0.5)
    model.base_model.set_phase(2)
    model.eval().save_pretrained(path / "adapter")
    save_preprocessing(path / "adapter", image_size=SIZE, resize_size=RESIZE, mean=MEAN, std=STD)
    return path, model


def images(tmp_path):
    rng = np.random.default_rng(0)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8))
    gray = PIL.Image.fromarray(rng.integers(0, 256, (25, 25), dtype=np.uint8))
    array = rng.integers(0, 256, (40, 22, 3), dtype=np.uint8)
    file = tmp_path / "photo.png"
    PIL.Image.fromarray(rng.integers(0, 256, (33, 28, 3), dtype=np.uint8)).save(file)
    return [rgb, gray, array, str(file)]


def reference_pixels(image, size=SIZE, resize=RESIZE, mean=MEAN, std=STD):
    """Resize to a square (bilinear), centre crop, scale, normalise: written out by hand."""
    if isinstance(image, (str, Path)):
        image = PIL.Image.open(image)
    if isinstance(image, np.ndarray):
        image = PIL.Image.fromarray(image)
    image = image.convert("RGB").resize((resize, resize), PIL.Image.Resampling.BILINEAR)
    top = (resize - size) // 2
    array = np.asarray(image, dtype=np.float32)[top : top + size, top : top + size] / 255.0
    array = (array - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)


def reference_top_k(model, imgs, k, scale=20.0):
    with torch.no_grad():
        logits = model(pixel_values=torch.stack([reference_pixels(i) for i in imgs])).logits
    probs = torch.softmax(scale * logits, dim=-1)
    out = []
    for row in probs:
        order = sorted(range(len(row)), key=lambda c: -row[c].item())[:k]
        out.append([(LABELS[c], row[c].item()) for c in order])
    return out, logits


def as_pairs(result):
    return [(d["label"], d["score"]) for d in result]


def assert_same(results, expected):
    assert len(results) == len(expected)
    for got, want in zip(results, expected):
        assert [label for label, _ in as_pairs(got)] == [label for label, _ in want]
        np.testing.assert_allclose([s for _, s in as_pairs(got)], [s for _, s in want], atol=1e-5, rtol=0)


def test_classifier_matches_reference(saved, tmp_path):
    path, model = saved
    clf = load_classifier(path / "base", path / "adapter", device="cpu", attn_implementation="eager")
    assert clf.device == torch.device("cpu") and clf.model.peft_config["default"].phase == 2
    assert (clf.transform.image_size, clf.transform.resize_size, clf.transform.mean) == (SIZE, RESIZE, MEAN)
    imgs = images(tmp_path)
    expected, logits = reference_top_k(model, imgs, 3)
    assert_same(clf(imgs, top_k=3), expected)
    torch.testing.assert_close(clf.logits(imgs), logits, atol=1e-5, rtol=0)
    # One image in, one list of dicts out (the pipeline's shape); scores over all classes sum to 1.
    single = clf(imgs[0], top_k=None)
    assert isinstance(single, list) and isinstance(single[0], dict) and len(single) == 5
    assert sum(d["score"] for d in single) == pytest.approx(1.0, abs=1e-5)
    assert len(clf(imgs[0], top_k=50)) == 5
    # Batching does not change anything.
    for batch_size in (1, 3):
        assert_same(clf(imgs, top_k=3, batch_size=batch_size), expected)


def test_base_defaults_to_adapter_record_and_preprocessing_defaults(saved, tmp_path):
    path, model = saved
    clf = load_classifier(None, path / "adapter", attn_implementation="eager")  # base recorded in the adapter
    assert clf.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert clf.transform.image_size == SIZE
    # Explicit settings win field by field.
    clf = load_classifier(path / "base", path / "adapter", device="cpu", mean=(0.5, 0.5, 0.5))
    assert clf.transform.mean == (0.5, 0.5, 0.5) and clf.transform.std == STD
    # Without a preprocessor file: LPT's defaults at the base's size (resize 16 * 256 / 224 -> 18, 0.5 / 0.5).
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(path / "adapter", bare)
    (bare / "preprocessor_config.json").unlink()
    clf = load_classifier(path / "base", bare, device="cpu")
    assert (clf.transform.image_size, clf.transform.resize_size, clf.transform.mean) == (16, 18, (0.5,) * 3)
    with pytest.raises(ValueError, match="base model expects 16 px"):
        load_classifier(path / "base", bare, image_size=24)


def test_bad_inputs(saved, tmp_path):
    path, model = saved
    clf = LPTImageClassifier(model, transform=load_preprocessing(path / "adapter"), device="cpu", batch_size=2)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    good = images(tmp_path)[:2]
    with pytest.raises(ValueError, match="broken.jpg"):
        clf([good[0], str(bad)])
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        clf(str(tmp_path / "nowhere.png"))
    with pytest.warns(UserWarning, match="broken.jpg"):
        results = clf([good[0], str(bad), good[1]], top_k=2, on_error="skip")
    assert results[1] is None and "broken.jpg" in clf.last_errors[1]
    expected, _ = reference_top_k(model, good, 2)
    assert_same([results[0], results[2]], expected)
    with pytest.raises(ValueError, match="top_k"):
        clf(good, top_k=0)
    with pytest.raises(ValueError, match="batch_size"):
        clf(good, batch_size=0)
    with pytest.raises(TypeError, match="pixel_values"):
        clf(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="on_error"):
        clf(good, on_error="ignore")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            LPTImageClassifier(model, device="cuda")
    with pytest.raises(TypeError, match="LPT adapter"):
        LPTImageClassifier(torch.nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_classifier(path / "base", path / "base")


def test_preprocessor_file_is_an_hf_image_processor(saved, tmp_path):
    """The saved preprocessing loads with AutoImageProcessor and gives the same pixels as the reference."""
    path, _ = saved
    processor = AutoImageProcessor.from_pretrained(path / "adapter")
    for image in images(tmp_path):
        pil = PIL.Image.open(image) if isinstance(image, str) else image
        pil = PIL.Image.fromarray(pil) if isinstance(pil, np.ndarray) else pil
        hf = processor(pil.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(hf, reference_pixels(image), atol=1e-6, rtol=0)


def test_transformers_pipeline_needs_the_workaround(saved, tmp_path):
    """Why the helper exists: the pipeline reads labels from the base config and softmaxes unscaled cosines."""
    from transformers import pipeline

    path, _ = saved
    base = ViTModel.from_pretrained(path / "base", add_pooling_layer=False, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, path / "adapter").eval()
    processor = AutoImageProcessor.from_pretrained(path / "adapter")
    image = images(tmp_path)[0]
    classify = pipeline("image-classification", model=model, image_processor=processor, device="cpu")
    with pytest.raises(KeyError):
        classify(image, top_k=5)  # a ViTModel config knows 2 labels, LPT has 5
    # The documented workaround: give the base config the adapter's labels and ask for the raw cosines.
    model.config.id2label = dict(LABELS)
    model.config.label2id = {v: k for k, v in LABELS.items()}
    raw = classify(image, top_k=5, function_to_apply="none")
    clf = LPTImageClassifier(model, transform=load_preprocessing(path / "adapter"), device="cpu")
    cosines = clf.logits([image])[0]
    expected = sorted(((LABELS[c], cosines[c].item()) for c in range(5)), key=lambda p: -p[1])
    assert [d["label"] for d in raw] == [label for label, _ in expected]
    np.testing.assert_allclose([d["score"] for d in raw], [s for _, s in expected], atol=1e-5)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_predict_script(saved, tmp_path, capsys):
    path, model = saved
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(3)
    for name in ("b.png", "a.jpg"):
        PIL.Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")  # not an image suffix: ignored
    (folder / "c.png").write_bytes(b"corrupt")
    predict = load_script("predict")
    common = ["--adapter", str(path / "adapter"), "--base", str(path / "base"), "--device", "cpu", "--top_k", "2"]
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(folder), *common])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "c.png" in error and "--skip_bad" in error and "Traceback" not in error
    with pytest.warns(UserWarning, match="c.png"):
        records = predict.main(
            [str(folder), *common, "--skip_bad", "--batch_size", "1",
             "--json_out", str(tmp_path / "p.json"), "--csv_out", str(tmp_path / "p.csv")]
        )  # fmt: skip
    printed = capsys.readouterr().out
    files = [str(folder / n) for n in ("a.jpg", "b.png", "c.png")]
    assert [r["image"] for r in records] == files
    expected, _ = reference_top_k(model, files[:2], 2)
    assert_same([r["predictions"] for r in records[:2]], expected)
    assert "c.png: skipped" in printed and expected[0][0][0] in printed
    assert json.loads((tmp_path / "p.json").read_text()) == records
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == 5 and rows[0]["image"] == files[0] and rows[0]["rank"] == "1"
    assert rows[-1]["image"] == files[2] and rows[-1]["error"]
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(tmp_path / "missing"), *common])
    assert exit_info.value.code == 2 and "neither an image file nor a folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the model card
TABLE = "\n".join(
    [
        "| Method | Overall | Many | Medium | Few |",
        "|---|---:|---:|---:|---:|",
        "| LPT | 50.07 | 49.27 | 52.31 | 46.88 |",
    ]
)


def test_model_card_holds_card_info(saved, tmp_path):
    _, model = saved
    model.base_model.card_info = {
        "dataset": "places_lt",
        "results_markdown": TABLE,
        "grouping": "standard",
        "base_model": "google/vit-base-patch16-224-in21k",
        "repo_id": "someone/lpt-places-lt",
        "notes": ["Trained for 90 epochs."],
    }
    try:
        model.save_pretrained(tmp_path / "a")
        card = (tmp_path / "a" / "README.md").read_text()
        assert TABLE in card and "places_lt" in card and "Trained for 90 epochs." in card
        assert "many-shot > 100" in card and "[More Information Needed]" not in card
        assert "base_model: google/vit-base-patch16-224-in21k" in card and "library_name: peft" in card
        load_line = 'load_classifier("google/vit-base-patch16-224-in21k", "someone/lpt-places-lt")'
        assert load_line in card
        assert 'PeftModel.from_pretrained(base, "someone/lpt-places-lt")' in card
        assert card.index("import lpt_peft") < card.index("load_classifier(") < card.index("PeftModel.from_pretrained")
        # 4 layers x 3 x 32 + 2 layers x 4 groups x 10 x 32 + 4 x 32 + 32 x 5 shared / group / keys / head
        assert f"{4 * 3 * 32 + 2 * 4 * 10 * 32 + 4 * 32 + 32 * 5:,}" in card
        assert "resize to 20x20, centre crop 16" not in card  # not given in card_info: the defaults are described

        # A user's own text survives; the LPT section is refreshed in place, never duplicated.
        readme = tmp_path / "a" / "README.md"
        readme.write_text(readme.read_text() + "\n## My notes\n\nKeep me.\n")
        model.base_model.card_info = {
            "dataset": "places_lt",
            "results": {"overall": 1.5, "many": 2.5, "medium": 3.5, "few": 4.5},
        }
        model.save_pretrained(tmp_path / "a")
        card = readme.read_text()
        assert card.count("<!-- lpt-peft section -->") == 1 and "Keep me." in card
        assert TABLE not in card and "| LPT (phase 2) | 1.50 | 2.50 | 3.50 | 4.50 |" in card
        assert "- PEFT" in card and card.count("### Framework versions") == 1
        # A local base path is not written as Hub metadata (the Hub rejects it).
        assert "\nbase_model:" not in card.split("---")[1]
    finally:
        model.base_model.card_info = None


def test_model_card_rejects_bad_card_info(saved, tmp_path):
    _, model = saved
    model.base_model.card_info = ["places_lt"]
    try:
        with pytest.raises(TypeError, match="card_info must be a dict"):
            model.save_pretrained(tmp_path / "a")
        model.base_model.card_info = {"datset": "typo"}
        with pytest.warns(UserWarning, match="datset"):
            model.save_pretrained(tmp_path / "b")
    finally:
        model.base_model.card_info = None


# ---------------------------------------------------------------------------------------------- validate first
def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, [type(m) for m in module.modules()]


def assert_unchanged(module, before):
    state, types = before
    after = module.state_dict()
    assert list(after) == list(state) and [type(m) for m in module.modules()] == types
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_load_classifier_checks_everything_before_touching_a_passed_model(saved, tmp_path):
    path, _ = saved
    base = ViTModel.from_pretrained(path / "base", add_pooling_layer=False, attn_implementation="eager")
    before = snapshot(base)
    bad_calls = [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"device": "bogus-device"}, ValueError, "Unknown device"),
        ({"image_size": 24}, ValueError, "base model expects 16 px"),
        ({"mean": (0.5, 0.5)}, ValueError, "mean"),
    ]
    for kwargs, error, message in bad_calls:
        with pytest.raises(error, match=message):
            load_classifier(base, path / "adapter", **kwargs)
        assert_unchanged(base, before)
    # An adapter folder without its weights is refused before the base is wrapped.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(path / "adapter", broken)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        load_classifier(base, broken)
    assert_unchanged(base, before)

    # A base that already carries the adapter: refused, the existing PeftModel keeps every weight.
    wrapped = PeftModel.from_pretrained(base, path / "adapter")
    before = snapshot(wrapped)
    for candidate, message in ((wrapped, "already a PeftModel"), (wrapped.get_base_model(), "already carries LPT")):
        with pytest.raises(ValueError, match=message):
            load_classifier(candidate, path / "adapter", device="cpu")
        assert_unchanged(wrapped, before)


def test_predict_script_names_an_unwritable_output_flag_before_classifying(saved, tmp_path, capsys, monkeypatch):
    """Before: --json_out /nonexist/x.json failed after classifying, with a message that did not name the flag."""
    path, _ = saved
    PIL.Image.new("RGB", (20, 20), (10, 200, 10)).save(tmp_path / "green.png")
    predict = load_script("predict")
    common = [str(tmp_path / "green.png"), "--adapter", str(path / "adapter"), "--base", str(path / "base")]
    common += ["--device", "cpu"]
    loaded = []
    monkeypatch.setattr(predict, "load_classifier", lambda *a, **k: loaded.append(a) or pytest.fail("loaded"))
    cases = [
        ("--json_out", str(tmp_path / "nonexist" / "x.json"), "the folder .*nonexist does not exist"),
        ("--csv_out", str(tmp_path / "nonexist" / "x.csv"), "the folder .*nonexist does not exist"),
        ("--json_out", str(tmp_path), "is a folder"),
    ]
    for flag, target, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            predict.main([*common, flag, target])
        error = capsys.readouterr().err
        assert exit_info.value.code == 2 and error.startswith(f"error: {flag} {target}"), error
        assert re.search(message, error) and "Traceback" not in error
    assert not loaded and not (tmp_path / "nonexist").exists()


def test_predict_script_names_the_flag_when_writing_fails(saved, tmp_path, capsys, monkeypatch):
    """A write that fails after the check (a full disk): the flag, the path and the cause, exit 2."""
    import builtins

    path, _ = saved
    PIL.Image.new("RGB", (20, 20), (10, 200, 10)).save(tmp_path / "green.png")
    predict = load_script("predict")
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):
        if str(file).endswith("x.json") and "w" in mode:
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk)
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(tmp_path / "green.png"), "--adapter", str(path / "adapter"), "--base", str(path / "base"),
                      "--device", "cpu", "--json_out", str(tmp_path / "x.json")])  # fmt: skip
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--json_out {tmp_path / 'x.json'}: cannot write" in error
    assert "No space left on device" in error


def test_compiled_classifier_equals_eager_without_recompiling(saved):
    """`compile=True`: logits equal the eager classifier's to 1e-5 (fp32); batches of one size reuse one graph
    whatever phase 2's per-image group choice (different images pick different groups), so no recompilation."""
    from torch._dynamo.utils import counters

    path, model = saved  # the phase-2 adapter: per-image group choice
    transform = load_preprocessing(path / "adapter")
    eager = LPTImageClassifier(model, transform=transform, device="cpu", batch_size=4)
    compiled = LPTImageClassifier(model, transform=transform, device="cpu", batch_size=4, compile=True)
    assert compiled.compile_mode == "default" and eager.compile_mode is None
    rng = np.random.default_rng(0)
    batches = [[rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(4)] for _ in range(3)]
    torch._dynamo.reset()
    counters.clear()
    groups = []
    for i, images in enumerate(batches):
        torch.testing.assert_close(compiled.logits(images), eager.logits(images), rtol=0, atol=1e-5)
        with torch.no_grad():
            out = model(pixel_values=torch.stack([eager.preprocess(image) for image in images]))
        groups.append(out.group_indices)
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 1
    assert counters["stats"]["unique_graphs"] == graphs, "a batch of the same size recompiled"
    assert any(not torch.equal(groups[0], g) for g in groups[1:]), "the batches should choose different groups"


def test_compile_argument_is_checked_before_loading(saved):
    path, model = saved
    with pytest.raises(ValueError, match="torch.compile mode"):
        load_classifier(path / "base", path / "adapter", device="cpu", compile="fastest")
    with pytest.raises(ValueError, match="reduce-overhead"):
        LPTImageClassifier(model, device="cpu", compile=1)
