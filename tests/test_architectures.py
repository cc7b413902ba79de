"""LPT on every built-in backbone family (ViT, DeiT, DINOv2 with and without registers, CLIP's vision tower).

The common tester (`TestFamilyPhase`) runs each family x phase through the same checks, as peft's
`testing_common` does for its methods: the logits equal the prompts-as-tokens oracle of tests/oracles.py (eager and
sdpa), a saved adapter reloads exactly, and `load_classifier` loads it from a saved base folder with the same logits
and a card that names the family. The oracle is written per family from the family's own modules, without
`lpt_peft.tuner.architectures`.
"""

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from oracles import adapter_tensors, assert_matches_oracle, model_oracle, token_features, vpt_deep
from peft import PeftModel, get_peft_model
from testing_utils import (
    BASE_CLASSES,
    FAMILIES,
    HEAD_CLASSES,
    TINY,
    encoder_of,
    randomize_adapter,
    tiny_backbone,
)
from torch import nn
from transformers import (
    CLIPForImageClassification,
    DeiTForImageClassification,
    ViTConfig,
)

from lpt_peft import LPTAttention, LPTConfig
from lpt_peft.backbones import load_backbone
from lpt_peft.inference import load_classifier
from lpt_peft.tuner import architectures
from lpt_peft.tuner.architectures import (
    AttentionSpec,
    BackboneFamily,
    LPTArchitecture,
    deit_architectures,
    get_architecture,
    get_backbone_family,
    register_architecture,
    register_backbone_family,
)

K = 2  # shared layers of the 4-layer test backbones
LAYERS, HIDDEN, HEADS, IMAGE, PATCH = 4, 32, 4, 16, 4
COMMON = {**TINY, "layer_norm_eps": 1e-5}
NO_PROMPTS = [torch.zeros(1, 0, HIDDEN)] * LAYERS
# family -> (family name the card shows, loading keyword arguments the card's code passes)
CARD_FACTS = {
    "vit": ("ViT", ", add_pooling_layer=False"),
    "deit": ("DeiT", ", add_pooling_layer=False"),
    "dinov2": ("DINOv2", ""),
    "dinov2_registers": ("DINOv2 with registers", ""),
    "clip": ("CLIP vision tower", ""),
}


def lpt(model, **overrides):
    values = {"num_labels": 5, "shared_layers": K, "num_groups": 5, "prompt_length": 3, "group_prompt_length": 2}
    values.update(overrides)
    return get_peft_model(model, LPTConfig(**values)).eval()


def spread_keys(model, pixel_values):
    """Keys at the queries of the first five images, so that images select different groups in phase 2."""
    with torch.no_grad():
        model.base_model.lpt_keys["default"].copy_(model(pixel_values=pixel_values).query[:5])


def prepared(base, phase, pixel_values):
    """`lpt(base)` with adapter weights off their init, in `phase`, keys spread over the images in phase 2."""
    model = lpt(base)
    randomize_adapter(model)
    if phase == 2:
        model.base_model.set_phase(2)
        spread_keys(model, pixel_values)
    return model


# ---------------------------------------------------------------- the oracle itself


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_without_prompts_is_the_familys_own_pooled_feature(family):
    model = tiny_backbone(family)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        out = model(pixel_values=x)
        oracle = token_features(model, NO_PROMPTS, x)
    if family in ("vit", "deit"):
        # ViTModel and DeiTForImageClassification classify last_hidden_state[:, 0] (CLS; DeiT's index 1 is the
        # distillation token).
        torch.testing.assert_close(oracle, out.last_hidden_state[:, 0], atol=1e-6, rtol=0)
    if family == "deit":
        distillation = token_features(model, NO_PROMPTS, x, token=1)
        torch.testing.assert_close(distillation, out.last_hidden_state[:, 1], atol=1e-6, rtol=0)
    if family not in ("vit", "deit"):
        # DINOv2: layernorm(sequence)[:, 0]. CLIP: post_layernorm(last_hidden_state[:, 0]), and CLIP's
        # last_hidden_state itself is not normalised, so the pooled output is the feature to match.
        torch.testing.assert_close(oracle, out.pooler_output, atol=1e-6, rtol=0)
    if family == "clip":
        assert (out.last_hidden_state[:, 0] - out.pooler_output).abs().max() > 1e-2
    # The same feature through the entry, as a linear probe on the frozen backbone would compute it.
    with torch.no_grad():
        torch.testing.assert_close(get_architecture(model).image_features(model, x), oracle, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the common tester: families x phases


@pytest.mark.parametrize("phase", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
class TestFamilyPhase:
    """The same checks for every backbone family in both phases."""

    @pytest.mark.parametrize("attn", ["eager", "sdpa"])
    def test_logits_equal_the_token_oracle(self, family, phase, attn):
        base = tiny_backbone(family, attn=attn)
        reference = copy.deepcopy(base)
        x = torch.randn(6, 3, IMAGE, IMAGE)
        model = prepared(base, phase, x)
        assert base.config._attn_implementation == attn
        out = model(pixel_values=x)
        with torch.no_grad():
            expected = model_oracle(reference, model, x)
            without_prompts = token_features(reference, NO_PROMPTS, x)
        assert out.logits.shape == (6, 5)
        assert_matches_oracle(out, expected)
        assert (out.features - without_prompts).abs().max() > 1e-2  # the prompts change the feature
        if phase == 2:  # different images select different groups, so per-image prompts are exercised
            assert len({tuple(sorted(row.tolist())) for row in out.group_indices}) > 1

    def test_save_and_reload_is_exact(self, family, phase, tmp_path):
        x = torch.randn(6, 3, IMAGE, IMAGE)
        model = prepared(tiny_backbone(family), phase, x)
        model.save_pretrained(tmp_path / "adapter")
        loaded = PeftModel.from_pretrained(tiny_backbone(family), tmp_path / "adapter").eval()
        assert loaded.peft_config["default"].phase == phase
        with torch.no_grad():
            expected, got = model(pixel_values=x), loaded(pixel_values=x)
        assert torch.equal(got.logits, expected.logits)

    def test_load_classifier_equals_the_in_memory_model(self, family, phase, tmp_path):
        tiny_backbone(family).save_pretrained(tmp_path / "base")
        base = load_backbone(str(tmp_path / "base"), image_size=IMAGE, attn_implementation="eager")  # as training
        assert type(base) is BASE_CLASSES[family]
        x = torch.randn(6, 3, IMAGE, IMAGE)
        model = prepared(base, phase, x)
        model.save_pretrained(tmp_path / "adapter")
        # The base is the one the adapter recorded (an absolute folder), as in a fresh process after training.
        classifier = load_classifier(None, tmp_path / "adapter", device="cpu", attn_implementation="eager")
        assert type(classifier.model.get_base_model()) is BASE_CLASSES[family]
        assert classifier.transform.image_size == IMAGE
        with torch.no_grad():
            expected = model(pixel_values=x).logits
            got = classifier.model(pixel_values=x).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        # The card names the family and the class, with the loading arguments the loader uses.
        card = (tmp_path / "adapter" / "README.md").read_text()
        name, kwargs = CARD_FACTS[family]
        cls = BASE_CLASSES[family].__name__
        assert f"{name} family, {cls}, hidden size {HIDDEN}" in card
        assert f"from transformers import {cls}\n" in card
        assert f'base = {cls}.from_pretrained("{tmp_path / "base"}"{kwargs})' in card


@pytest.mark.parametrize("family", FAMILIES)
def test_image_size_rule_comes_from_the_family(family, tmp_path):
    """DINOv2 resamples its position grid to any input; the other families refuse another size, naming the flag."""
    tiny_backbone(family).save_pretrained(tmp_path / "base")
    if get_backbone_family(BASE_CLASSES[family].config_class.model_type).any_image_size:
        assert family.startswith("dinov2")
        model = load_backbone(str(tmp_path / "base"), image_size=2 * IMAGE)
        with torch.no_grad():
            assert model(pixel_values=torch.randn(1, 3, 2 * IMAGE, 2 * IMAGE)).last_hidden_state.shape[1] > 17
    else:
        with pytest.raises(ValueError, match=rf"base model expects {IMAGE} px images but image_size= is {2 * IMAGE}"):
            load_backbone(str(tmp_path / "base"), image_size=2 * IMAGE)


def test_task_checkpoint_loads_as_its_class_and_unknown_families_are_named(tmp_path):
    tiny_backbone("deit", cls=DeiTForImageClassification).save_pretrained(tmp_path / "deit")
    assert type(load_backbone(str(tmp_path / "deit"))) is DeiTForImageClassification  # layer names kept
    # A full CLIP checkpoint (model_type "clip") loads its vision tower.
    tiny_backbone("clip", cls=CLIPForImageClassification).save_pretrained(tmp_path / "clip")
    assert type(load_backbone(str(tmp_path / "clip"))).__name__ == "CLIPVisionModel"
    from transformers import BertConfig, BertModel

    bert = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(bert).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"cannot load a 'bert' checkpoint.*clip_vision_model, deit, dinov2"):
        load_backbone(str(tmp_path / "bert"))
    with pytest.raises(ValueError, match="Cannot load the base model .*base_model="):
        load_backbone(str(tmp_path / "nowhere"))


def test_registered_family_loads(monkeypatch, tmp_path):
    """A family registered with register_backbone_family (docs/architectures.md's snippet) is loaded by the loader."""
    from transformers import ViTMSNConfig, ViTMSNModel

    monkeypatch.setattr(architectures, "BACKBONE_FAMILIES", list(architectures.BACKBONE_FAMILIES))
    ViTMSNModel(ViTMSNConfig(**COMMON, intermediate_size=64)).save_pretrained(tmp_path / "msn")
    with pytest.raises(ValueError, match="cannot load a 'vit_msn' checkpoint"):
        load_backbone(str(tmp_path / "msn"))
    exec(compile(_docs_example(1), "docs/architectures.md", "exec"), {})  # the docs' snippet, as written
    assert get_backbone_family("vit_msn") == BackboneFamily("vit_msn", "ViTMSNModel", "ViT-MSN")
    assert type(load_backbone(str(tmp_path / "msn"), image_size=IMAGE)) is ViTMSNModel
    with pytest.raises(TypeError, match="expects BackboneFamily entries, got dict"):
        register_backbone_family({"model_type": "x"})


# ---------------------------------------------------------------- task models, DeiT's distillation token


@pytest.mark.parametrize("cls", list(HEAD_CLASSES), ids=lambda c: c.__name__)
def test_task_models_use_the_encoder_and_lpts_cosine_head(cls):
    family, _ = HEAD_CLASSES[cls]
    base = tiny_backbone(family, cls=cls, attn="sdpa")
    reference = copy.deepcopy(encoder_of(base))
    model = lpt(base, num_labels=4, shared_layers=1, top_k=1)
    randomize_adapter(model)
    model.base_model.set_phase(2)
    x = torch.randn(3, 3, IMAGE, IMAGE)
    out = model(pixel_values=x)
    with torch.no_grad():
        expected = model_oracle(reference, model, x)
    assert out.logits.shape == (3, 4)  # LPT's 4-class cosine head, not the model's 3-class head
    assert_matches_oracle(out, expected)


def test_deit_distillation_token_can_be_the_feature(monkeypatch):
    monkeypatch.setattr(architectures, "ARCHITECTURES", list(architectures.ARCHITECTURES))
    register_architecture(*deit_architectures("distillation"))
    base = tiny_backbone("deit")
    reference = copy.deepcopy(base)
    model = lpt(base)
    randomize_adapter(model)
    model.base_model.set_phase(2)
    x = torch.randn(4, 3, IMAGE, IMAGE)
    out = model(pixel_values=x)
    with torch.no_grad():
        expected = model_oracle(reference, model, x, token=1)
        cls_query = token_features(reference, [p.unsqueeze(0) for p in adapter_tensors(model)[0]], x)
    assert_matches_oracle(out, expected)
    assert (out.query - cls_query).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"feature_token must be one of \['cls', 'distillation'\], got 'mean'"):
        deit_architectures("mean")


# ---------------------------------------------------------------- disable, unload


@pytest.mark.parametrize(
    "family, cls", [(f, None) for f in FAMILIES] + [(f, c) for c, (f, _) in HEAD_CLASSES.items()], ids=str
)
def test_disable_adapter_gives_the_base_model_exactly(family, cls):
    base = tiny_backbone(family, cls=cls, attn="sdpa")
    reference = copy.deepcopy(base)
    model = lpt(base)
    randomize_adapter(model)
    model.base_model.set_phase(2)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        with model.disable_adapter():
            disabled = model(pixel_values=x)
        expected = reference(pixel_values=x)
        enabled = model(pixel_values=x)
    names = [
        n for n in ("last_hidden_state", "pooler_output", "logits", "image_embeds") if expected.get(n) is not None
    ]
    assert names
    for name in names:
        assert torch.equal(disabled[name], expected[name]), name
    assert enabled.group_indices is not None  # LPT is back on afterwards


@pytest.mark.parametrize("family", FAMILIES)
def test_unload_restores_the_original_attention_classes(family):
    base = tiny_backbone(family)
    reference = copy.deepcopy(base)
    original = {name: type(m) for name, m in base.named_modules() if name.endswith(("attention", "self_attn"))}
    assert len(original) == LAYERS
    model = lpt(base)
    assert all(isinstance(model.base_model.model.get_submodule(name), LPTAttention) for name in original)
    plain = model.unload()
    assert {name: type(plain.get_submodule(name)) for name in original} == original
    assert not any(isinstance(m, LPTAttention) for m in plain.modules())
    assert "forward" not in plain.__dict__
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        assert torch.equal(plain(pixel_values=x).last_hidden_state, reference(pixel_values=x).last_hidden_state)


# ---------------------------------------------------------------- unsupported models and bad entries


def _tiny_bert():
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))


def _tiny_swin():
    from transformers import SwinConfig, SwinModel

    return SwinModel(SwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[1], num_heads=[2], window_size=2))


@pytest.mark.parametrize("make, name", [(_tiny_bert, "BertModel"), (_tiny_swin, "SwinModel")])
def test_unsupported_model_names_supported_classes_and_how_to_add_one(make, name):
    with pytest.raises(TypeError) as info:
        get_peft_model(make(), LPTConfig(num_labels=3))
    message = str(info.value)
    assert message.startswith(f"LPT does not support {name}. Supported base models: ")
    for supported in ("CLIPVisionModel", "DeiTForImageClassification", "Dinov2Model", "ViTModel"):
        assert supported in message
    assert "lpt_peft.tuner.architectures.register_architecture" in message and "docs/architectures.md" in message


def test_wrong_entries_fail_at_get_peft_model_naming_the_field(monkeypatch):
    monkeypatch.setattr(architectures, "ARCHITECTURES", list(architectures.ARCHITECTURES))
    clip_layout = {"layers_attr": "encoder.layers", "attention_attr": "self_attn", "norm_attr": "layer_norm1"}
    clip_layout |= {"final_norm_attr": "post_layernorm"}
    # The ViT attention layout on CLIP: CLIPAttention has out_proj/scale/dropout, not o_proj/scaling/...
    register_architecture(LPTArchitecture(model_classes=("CLIPVisionModel",), backbone_attr=None, **clip_layout))
    with pytest.raises(ValueError, match=r"LPT cannot wrap CLIPAttention: .*output_attr='o_proj', scaling_attr="):
        lpt(tiny_backbone("clip"))
    register_architecture(
        LPTArchitecture(
            model_classes=("CLIPVisionModel",), backbone_attr=None, **(clip_layout | {"layers_attr": "layers"})
        )
    )
    with pytest.raises(ValueError, match=r"layer list \(layers_attr\) is at `layers`, but CLIPVisionModel has no"):
        lpt(tiny_backbone("clip"))
    with pytest.raises(TypeError, match="register_architecture expects LPTArchitecture entries, got dict"):
        register_architecture(clip_layout)
    with pytest.raises(TypeError, match="model_classes must be a non-empty tuple"):
        LPTArchitecture(model_classes=(), backbone_attr=None, **clip_layout)
    with pytest.raises(TypeError, match="cls_index must be an integer >= 0"):
        LPTArchitecture(model_classes="CLIPVisionModel", backbone_attr=None, cls_index=-1, **clip_layout)


def test_unsupported_embedding_option_is_an_error_not_ignored():
    model = lpt(tiny_backbone("clip"))
    x = torch.randn(1, 3, IMAGE, IMAGE)
    with pytest.raises(ValueError, match="CLIPVisionModel does not support `bool_masked_pos`"):
        model(pixel_values=x, bool_masked_pos=torch.zeros(1, (IMAGE // PATCH) ** 2, dtype=torch.bool))


# ---------------------------------------------------------------- registering another backbone


def _docs_example(index: int = 0) -> str:
    """The `index`-th python snippet of docs/architectures.md's "Supporting another backbone" section."""
    text = (Path(__file__).parents[1] / "docs" / "architectures.md").read_text()
    section = text.split("## Supporting another backbone", 1)[1]
    return re.findall(r"```python\n(.*?)```", section, re.S)[index]


def test_docs_worked_example_vit_msn(monkeypatch):
    """The snippet of docs/architectures.md, run as written, then checked against a ViT-style token oracle."""
    from transformers import ViTMSNConfig, ViTMSNModel

    monkeypatch.setattr(architectures, "ARCHITECTURES", list(architectures.ARCHITECTURES))
    with pytest.raises(TypeError, match="LPT does not support ViTMSNModel"):
        lpt(ViTMSNModel(ViTMSNConfig(**COMMON, intermediate_size=64)))
    exec(compile(_docs_example(), "docs/architectures.md", "exec"), {})
    torch.manual_seed(0)
    base = ViTMSNModel(ViTMSNConfig(**COMMON, intermediate_size=64)).eval()
    reference = copy.deepcopy(base)
    model = lpt(base)
    randomize_adapter(model)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    out = model(pixel_values=x)
    shared = adapter_tensors(model)[0]
    with torch.no_grad():
        expected = token_features(reference, [p.unsqueeze(0) for p in shared], x)  # ViT's layout, by hand
    torch.testing.assert_close(out.features, expected, atol=1e-5, rtol=0)


class ToyAttention(nn.Module):
    """An attention module with its own names, no head_dim/scaling attributes, no `is_causal`, returning a tensor."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        b, n, d = hidden_states.shape
        split = lambda t: t.view(b, n, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(hidden_states)), split(self.key(hidden_states)), split(self.value(hidden_states))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class ToyBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size)
        self.attn = ToyAttention(config)
        self.ln_2 = nn.LayerNorm(config.hidden_size)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, 64), nn.GELU(), nn.Linear(64, config.hidden_size))

    forward_kwargs = True

    def forward(self, x, attention_mask=None, **kwargs):
        # LPT's per-call inputs reach the attention module through the layer's keyword arguments.
        x = x + self.attn(self.ln_1(x), attention_mask, **(kwargs if self.forward_kwargs else {}))
        return x + self.mlp(self.ln_2(x))


class ToyViT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.patch = nn.Conv2d(3, config.hidden_size, PATCH, PATCH)
        self.cls = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.blocks = nn.ModuleList(ToyBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)

    def embed(self, pixel_values):
        patches = self.patch(pixel_values).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(patches), -1, -1), patches], dim=1)

    def forward(self, pixel_values):
        x = self.embed(pixel_values)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_custom_attention_layout(monkeypatch, attn):
    monkeypatch.setattr(architectures, "ARCHITECTURES", list(architectures.ARCHITECTURES))
    register_architecture(
        LPTArchitecture(
            model_classes=("ToyViT",),
            backbone_attr=None,
            layers_attr="blocks",
            attention_attr="attn",
            norm_attr="ln_1",
            final_norm_attr="norm",
            embed=lambda encoder, pixel_values, **kwargs: encoder.embed(pixel_values),
            make_mask=lambda encoder, hidden, mask: mask,
            attention=AttentionSpec(
                query_attr="query",
                key_attr="key",
                value_attr="value",
                output_attr="proj",
                scaling_attr=None,
                dropout_attr=None,
                head_dim=lambda module: module.query.out_features // module.heads,
                returns_weights=False,
            ),
        )
    )
    config = ViTConfig(hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS)
    config._attn_implementation = attn
    torch.manual_seed(0)
    base = ToyViT(config).eval()
    reference = copy.deepcopy(base)
    model = lpt(base, shared_layers=1)
    randomize_adapter(model)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    out = model(pixel_values=x)
    shared = adapter_tensors(model)[0]
    with torch.no_grad():
        hidden = vpt_deep(reference.embed(x), list(reference.blocks), [p.unsqueeze(0) for p in shared])
        expected = reference.norm(hidden)[:, 0]
        with model.disable_adapter():
            assert torch.equal(model(pixel_values=x), reference(x))
    torch.testing.assert_close(out.features, expected, atol=1e-5, rtol=0)
    # A layer that drops keyword arguments would silently lose the group prompts: it gets a clear error instead.
    monkeypatch.setattr(ToyBlock, "forward_kwargs", False)
    with pytest.raises(ValueError, match="does not pass keyword arguments on to its attention module"):
        model(pixel_values=x)
