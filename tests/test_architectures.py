"""LPT on DeiT, DINOv2 (with and without registers) and CLIP's vision tower, against token-prompt oracles.

Every oracle here is written per family from the family's own modules (embeddings, layers, final norm), without
`lpt_peft.tuner.architectures`: prompts are inserted as real tokens after the family's prefix tokens (CLS, DeiT's
distillation token, DINOv2's registers), run through the unmodified layer, and their outputs dropped before the next
layer (VPT-deep, the way the LPT authors run it).
"""

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapter
from peft import get_peft_model
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPForImageClassification,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    Dinov2WithRegistersModel,
    ViTConfig,
)

from lpt_peft import LPTAttention, LPTConfig
from lpt_peft.tuner import architectures
from lpt_peft.tuner.architectures import (
    AttentionSpec,
    LPTArchitecture,
    deit_architectures,
    get_architecture,
    register_architecture,
)

K = 2  # shared layers of the 4-layer test backbones
LAYERS, HIDDEN, HEADS, IMAGE, PATCH = 4, 32, 4, 16, 4
REGISTERS = 2
COMMON = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "image_size": IMAGE}
COMMON |= {"patch_size": PATCH, "layer_norm_eps": 1e-5}


def _config(family):
    if family == "deit":
        return DeiTConfig(intermediate_size=64, **COMMON)
    if family == "dinov2":
        return Dinov2Config(mlp_ratio=2, **COMMON)
    if family == "dinov2_registers":
        return Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=REGISTERS, **COMMON)
    if family == "clip":
        return CLIPVisionConfig(intermediate_size=64, **COMMON)
    raise AssertionError(family)


BASE_CLASSES = {
    "deit": DeiTModel,
    "dinov2": Dinov2Model,
    "dinov2_registers": Dinov2WithRegistersModel,
    "clip": CLIPVisionModel,
}
# task class -> (family, attribute holding the encoder)
HEAD_CLASSES = {
    DeiTForImageClassification: ("deit", "deit"),
    DeiTForImageClassificationWithTeacher: ("deit", "deit"),
    Dinov2ForImageClassification: ("dinov2", "dinov2"),
    Dinov2WithRegistersForImageClassification: ("dinov2_registers", "dinov2_with_registers"),
    CLIPForImageClassification: ("clip", "vision_model"),
    CLIPVisionModelWithProjection: ("clip", "vision_model"),
}
FAMILIES = list(BASE_CLASSES)


def build(family, cls=None, attn="eager", seed=0):
    """A tiny random model whose norms, special tokens and LayerScales are all away from their (often trivial) init."""
    cls = cls or BASE_CLASSES[family]
    config = _config(family)
    kwargs = {}
    if cls is DeiTModel:
        kwargs["add_pooling_layer"] = False
    if cls is CLIPForImageClassification:
        config = CLIPConfig(
            vision_config=config.to_dict(),
            text_config={"hidden_size": HIDDEN, "num_hidden_layers": 1, "num_attention_heads": HEADS},
            num_labels=3,
        )
    elif cls not in BASE_CLASSES.values():
        config.num_labels = 3
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation=attn, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):  # unit-gain weights, so prompts move the features visibly
                module.weight.normal_(0.0, module.in_features**-0.5)
            elif isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
        for name, param in model.named_parameters():
            if name.endswith(("cls_token", "distillation_token", "register_tokens", "class_embedding")):
                param.normal_(0.0, 1.0)
            elif name.endswith("position_embeddings"):
                param.normal_(0.0, 0.3)
            elif name.endswith("lambda1"):
                param.uniform_(0.2, 1.5)  # LayerScale
    return model.eval()


def encoder_of(model):
    for cls, (_, attr) in HEAD_CLASSES.items():
        if type(model) is cls:
            return getattr(model, attr)
    return model


def num_prefix_tokens(family):
    return {"deit": 2, "dinov2": 1, "dinov2_registers": 1 + REGISTERS, "clip": 1}[family]


def token_oracle(family, encoder, prompts, pixel_values, token=0):
    """VPT-deep by hand: `prompts[i]` `(1 or batch, P_i, hidden)` join layer i as tokens after the prefix tokens.

    Returns the image feature: the final state of `token` after the family's final norm.
    """
    if family == "clip":
        hidden = encoder.pre_layrnorm(encoder.embeddings(pixel_values))
        layers = encoder.encoder.layers
    elif family in ("dinov2", "dinov2_registers"):
        hidden = encoder.embeddings(pixel_values)
        layers = encoder.encoder.layer
    else:
        hidden = encoder.embeddings(pixel_values)
        layers = encoder.layers
    n = num_prefix_tokens(family)
    batch = hidden.shape[0]
    for i, layer in enumerate(layers):
        p = prompts[i].expand(batch, -1, -1)
        x = layer(torch.cat([hidden[:, :n], p, hidden[:, n:]], dim=1), None)
        hidden = torch.cat([x[:, :n], x[:, n + p.shape[1] :]], dim=1)
    if family == "clip":
        return encoder.post_layernorm(hidden[:, token])  # CLIP normalises only the pooled CLS token
    return encoder.layernorm(hidden)[:, token]


def cosine(a, b_columns):
    return (a / a.norm(dim=-1, keepdim=True)) @ (b_columns / b_columns.norm(dim=0, keepdim=True))


def adapter_tensors(model, name="default"):
    layers = sorted((m for m in model.modules() if isinstance(m, LPTAttention)), key=lambda m: m.layer_idx)
    assert [m.layer_idx for m in layers] == list(range(len(layers)))
    shared = [m.lpt_shared_prompt[name].detach() for m in layers]
    pool = {m.layer_idx: m.lpt_group_prompt[name].detach() for m in layers if name in m.lpt_group_prompt}
    tuner = model.base_model
    return shared, pool, tuner.lpt_keys[name].detach(), tuner.lpt_head[name].detach()


def two_pass_oracle(family, encoder, model, pixel_values, top_k=2, shared_layers=K, token=0):
    """LPT phase 2 as the authors run it: a query pass, then a full main pass with per-image group prompts."""
    shared, pool, keys, head = adapter_tensors(model)
    query = token_oracle(family, encoder, [p.unsqueeze(0) for p in shared], pixel_values, token)
    sim = cosine(query, keys.T)
    idx = sim.topk(top_k, dim=-1).indices
    batch = pixel_values.shape[0]
    prompts = []
    for i, p in enumerate(shared):
        if i < shared_layers:
            prompts.append(p.unsqueeze(0))
        else:
            group = torch.stack([pool[i][idx[b]].mean(dim=0) for b in range(batch)])
            prompts.append(torch.cat([p.unsqueeze(0).expand(batch, -1, -1), group], dim=1))
    features = token_oracle(family, encoder, prompts, pixel_values, token)
    match = torch.stack([sim[b, idx[b]].sum() for b in range(batch)]).mean()
    return features, cosine(features, head), idx, match, query


def lpt(model, **overrides):
    values = {"num_labels": 5, "shared_layers": K, "num_groups": 5, "prompt_length": 3, "group_prompt_length": 2}
    values.update(overrides)
    return get_peft_model(model, LPTConfig(**values)).eval()


# ---------------------------------------------------------------- the oracle itself


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_without_prompts_is_the_familys_own_pooled_feature(family):
    model = build(family)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    no_prompts = [torch.zeros(1, 0, HIDDEN)] * LAYERS
    with torch.no_grad():
        out = model(pixel_values=x)
        oracle = token_oracle(family, model, no_prompts, x)
    if family == "deit":
        # DeiTForImageClassification classifies last_hidden_state[:, 0] (CLS; index 1 is the distillation token).
        torch.testing.assert_close(oracle, out.last_hidden_state[:, 0], atol=1e-6, rtol=0)
        torch.testing.assert_close(
            token_oracle(family, model, no_prompts, x, token=1), out.last_hidden_state[:, 1], atol=1e-6, rtol=0
        )
    else:
        # DINOv2: layernorm(sequence)[:, 0]. CLIP: post_layernorm(last_hidden_state[:, 0]), and CLIP's
        # last_hidden_state itself is not normalised, so the pooled output is the feature to match.
        torch.testing.assert_close(oracle, out.pooler_output, atol=1e-6, rtol=0)
    if family == "clip":
        assert (out.last_hidden_state[:, 0] - out.pooler_output).abs().max() > 1e-2
    # The same feature through the entry, as a linear probe on the frozen backbone would compute it.
    with torch.no_grad():
        torch.testing.assert_close(get_architecture(model).image_features(model, x), oracle, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- phase 1 and phase 2 against the oracles


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_phase1_equals_token_oracle(family, attn):
    base = build(family, attn=attn)
    reference = copy.deepcopy(base)
    model = lpt(base)
    assert base.config._attn_implementation == attn
    randomize_adapter(model)
    x = torch.randn(3, 3, IMAGE, IMAGE)
    out = model(pixel_values=x)
    shared, _, _, head = adapter_tensors(model)
    assert len(shared) == LAYERS
    with torch.no_grad():
        expected = token_oracle(family, reference, [p.unsqueeze(0) for p in shared], x)
        without_prompts = token_oracle(family, reference, [torch.zeros(1, 0, HIDDEN)] * LAYERS, x)
    torch.testing.assert_close(out.features, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, cosine(expected, head), atol=1e-5, rtol=0)
    assert (out.features - without_prompts).abs().max() > 1e-2  # the prompts change the feature


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_phase2_equals_two_pass_oracle(family, attn):
    base = build(family, attn=attn)
    reference = copy.deepcopy(base)
    model = lpt(base)
    randomize_adapter(model)
    model.base_model.set_phase(2)
    x = torch.randn(6, 3, IMAGE, IMAGE)
    with torch.no_grad():
        # Keys at the queries of five images, so that the images select different groups.
        model.base_model.lpt_keys["default"].copy_(model(pixel_values=x).query[:5])
    out = model(pixel_values=x)
    with torch.no_grad():
        features, logits, idx, match, query = two_pass_oracle(family, reference, model, x)
    assert torch.equal(out.group_indices, idx)
    assert len({tuple(sorted(row.tolist())) for row in idx}) > 1
    torch.testing.assert_close(out.query, query, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.features, features, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.match_score, match, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", list(HEAD_CLASSES), ids=lambda c: c.__name__)
def test_task_models_use_the_encoder_and_lpts_cosine_head(cls):
    family, _ = HEAD_CLASSES[cls]
    base = build(family, cls=cls, attn="sdpa")
    reference = copy.deepcopy(encoder_of(base))
    model = lpt(base, num_labels=4, shared_layers=1, top_k=1)
    randomize_adapter(model)
    model.base_model.set_phase(2)
    x = torch.randn(3, 3, IMAGE, IMAGE)
    out = model(pixel_values=x)
    with torch.no_grad():
        _, logits, idx, _, _ = two_pass_oracle(family, reference, model, x, top_k=1, shared_layers=1)
    assert out.logits.shape == (3, 4)  # LPT's 4-class cosine head, not the model's 3-class head
    assert torch.equal(out.group_indices, idx)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)


def test_deit_distillation_token_can_be_the_feature(monkeypatch):
    monkeypatch.setattr(architectures, "ARCHITECTURES", list(architectures.ARCHITECTURES))
    register_architecture(*deit_architectures("distillation"))
    base = build("deit")
    reference = copy.deepcopy(base)
    model = lpt(base)
    randomize_adapter(model)
    model.base_model.set_phase(2)
    x = torch.randn(4, 3, IMAGE, IMAGE)
    out = model(pixel_values=x)
    with torch.no_grad():
        features, logits, idx, _, query = two_pass_oracle("deit", reference, model, x, token=1)
        cls_query = token_oracle("deit", reference, [p.unsqueeze(0) for p in adapter_tensors(model)[0]], x)
    torch.testing.assert_close(out.query, query, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.features, features, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)
    assert (out.query - cls_query).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"feature_token must be one of \['cls', 'distillation'\], got 'mean'"):
        deit_architectures("mean")


# ---------------------------------------------------------------- disable, unload


@pytest.mark.parametrize(
    "family, cls", [(f, None) for f in FAMILIES] + [(f, c) for c, (f, _) in HEAD_CLASSES.items()], ids=str
)
def test_disable_adapter_gives_the_base_model_exactly(family, cls):
    base = build(family, cls=cls, attn="sdpa")
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
    base = build(family)
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
        lpt(build("clip"))
    register_architecture(
        LPTArchitecture(
            model_classes=("CLIPVisionModel",), backbone_attr=None, **(clip_layout | {"layers_attr": "layers"})
        )
    )
    with pytest.raises(ValueError, match=r"layer list \(layers_attr\) is at `layers`, but CLIPVisionModel has no"):
        lpt(build("clip"))
    with pytest.raises(TypeError, match="register_architecture expects LPTArchitecture entries, got dict"):
        register_architecture(clip_layout)
    with pytest.raises(TypeError, match="model_classes must be a non-empty tuple"):
        LPTArchitecture(model_classes=(), backbone_attr=None, **clip_layout)
    with pytest.raises(TypeError, match="cls_index must be an integer >= 0"):
        LPTArchitecture(model_classes="CLIPVisionModel", backbone_attr=None, cls_index=-1, **clip_layout)


def test_unsupported_embedding_option_is_an_error_not_ignored():
    model = lpt(build("clip"))
    x = torch.randn(1, 3, IMAGE, IMAGE)
    with pytest.raises(ValueError, match="CLIPVisionModel does not support `bool_masked_pos`"):
        model(pixel_values=x, bool_masked_pos=torch.zeros(1, (IMAGE // PATCH) ** 2, dtype=torch.bool))


# ---------------------------------------------------------------- registering another backbone


def _docs_example() -> str:
    text = (Path(__file__).parents[1] / "docs" / "architectures.md").read_text()
    section = text.split("## Supporting another backbone", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


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
        hidden = reference.embeddings(x)
        for i, layer in enumerate(reference.layers):
            p = shared[i].expand(2, -1, -1)
            h = layer(torch.cat([hidden[:, :1], p, hidden[:, 1:]], dim=1), None)
            hidden = torch.cat([h[:, :1], h[:, 1 + p.shape[1] :]], dim=1)
        expected = reference.layernorm(hidden)[:, 0]
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
        hidden = reference.embed(x)
        for i, block in enumerate(reference.blocks):
            p = shared[i].expand(2, -1, -1)
            h = block(torch.cat([hidden[:, :1], p, hidden[:, 1:]], dim=1))
            hidden = torch.cat([h[:, :1], h[:, 1 + p.shape[1] :]], dim=1)
        expected = reference.norm(hidden)[:, 0]
        with model.disable_adapter():
            assert torch.equal(model(pixel_values=x), reference(x))
    torch.testing.assert_close(out.features, expected, atol=1e-5, rtol=0)
    # A layer that drops keyword arguments would silently lose the group prompts: it gets a clear error instead.
    monkeypatch.setattr(ToyBlock, "forward_kwargs", False)
    with pytest.raises(ValueError, match="does not pass keyword arguments on to its attention module"):
        model(pixel_values=x)
