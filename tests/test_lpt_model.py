"""The LPT tuner against independent oracles that run prompts as real tokens (the way VPT and the authors do)."""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from oracles import adapter_tensors, assert_matches_oracle, cosine, model_oracle
from peft import PeftModel, get_peft_model
from testing_utils import randomize_adapter
from transformers import ViTForImageClassification, ViTModel
from transformers.models.vit.modeling_vit import ViTAttention

import lpt_peft
from lpt_peft import LPTAttention, LPTConfig

K = 2  # shared layers of the tiny 4-layer test ViT


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_phase1_equals_vpt_deep_oracle(make_vit, attn):
    vit = make_vit(attn_implementation=attn)
    reference = copy.deepcopy(vit)
    model = get_peft_model(vit, LPTConfig(num_labels=7, shared_layers=K, num_groups=5, prompt_length=3)).eval()
    randomize_adapter(model)
    x = torch.randn(4, 3, 16, 16)
    out = model(pixel_values=x)
    with torch.no_grad():
        expected = model_oracle(reference, model, x)
    assert out.logits.shape == (4, 7)
    assert_matches_oracle(out, expected)  # features, logits; no group outputs in phase 1
    # The prompts matter: without them the oracle gives other logits.
    head = adapter_tensors(model)[3]
    no_prompt = cosine(reference(pixel_values=x).last_hidden_state[:, 0], head)
    assert (no_prompt - out.logits).abs().max() > 1e-2


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_phase2_equals_two_pass_token_oracle(make_vit, attn):
    vit = make_vit(attn_implementation=attn)
    reference = copy.deepcopy(vit)
    config = LPTConfig(num_labels=6, shared_layers=K, num_groups=5, top_k=2, prompt_length=3, group_prompt_length=2)
    model = get_peft_model(vit, config).eval()
    randomize_adapter(model)
    model.base_model.set_phase(2)
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        # Keys placed at the queries of five of the images, so that images pick different groups.
        model.base_model.lpt_keys["default"].copy_(model(pixel_values=x).query[:5])
    out = model(pixel_values=x)
    with torch.no_grad():
        expected = model_oracle(reference, model, x)
    assert_matches_oracle(out, expected)  # groups, logits, match score, query, key similarities
    # Different images select different groups here, so per-sample prompts are exercised.
    assert len({tuple(sorted(row.tolist())) for row in out.group_indices}) > 1


def test_top_k_one_and_vit_for_image_classification(make_vit):
    vit = make_vit(cls=ViTForImageClassification, num_labels=3)
    reference = copy.deepcopy(vit.vit)
    config = LPTConfig(num_labels=4, shared_layers=1, num_groups=3, top_k=1, prompt_length=2)
    model = get_peft_model(vit, config).eval()
    randomize_adapter(model)
    model.base_model.set_phase(2)
    x = torch.randn(3, 3, 16, 16)
    out = model(pixel_values=x)
    with torch.no_grad():
        expected = model_oracle(reference, model, x)  # top_k=1, shared_layers=1 from the adapter config
    # The adapter's cosine head replaces the 3-class linear classifier.
    assert out.logits.shape == (3, 4)
    assert_matches_oracle(out, expected)


@pytest.mark.parametrize("phase, expected_passes", [(1, 4), (2, 4 + (4 - K))])
def test_layer_pass_count(make_vit, phase, expected_passes):
    model = get_peft_model(make_vit(), LPTConfig(num_labels=3, shared_layers=K, phase=phase, num_groups=4)).eval()
    calls = []
    for i, layer in enumerate(model.base_model.model.layers):
        layer.register_forward_hook(lambda module, args, output, i=i: calls.append(i))
    model(pixel_values=torch.randn(2, 3, 16, 16))
    assert len(calls) == expected_passes
    # Layers 1..K run once; each later layer runs twice (query pass, then main pass).
    assert sorted(calls) == sorted(list(range(4)) + list(range(K, 4)) * (phase - 1))


def _grad_names(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_gradients_reach_exactly_the_phase_parameters(make_vit):
    model = get_peft_model(make_vit(), LPTConfig(num_labels=3, shared_layers=K, num_groups=4)).train()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 1])
    adapter = {name for name, _ in model.named_parameters() if ".lpt_" in name}
    shared = {n for n in adapter if "lpt_shared_prompt" in n}
    group = {n for n in adapter if "lpt_group_prompt" in n}
    keys = {n for n in adapter if "lpt_keys" in n}
    head = {n for n in adapter if "lpt_head" in n}
    assert len(shared) == 4 and len(group) == 4 - K and len(keys) == len(head) == 1

    requires_grad = {n for n, p in model.named_parameters() if p.requires_grad}
    assert requires_grad == shared | head
    assert _grad_names(model, model(pixel_values=x, labels=y).loss) == shared | head

    model.base_model.set_phase(2)
    requires_grad = {n for n, p in model.named_parameters() if p.requires_grad}
    assert requires_grad == group | keys | head
    out = model(pixel_values=x, labels=y)
    # Keys get gradient only from the matching term.
    assert _grad_names(model, out.loss) == group | head
    out = model(pixel_values=x, labels=y)
    assert _grad_names(model, out.loss - 0.5 * out.match_score) == group | keys | head
    # The query carries no gradient.
    assert not out.query.requires_grad


def test_trainable_parameter_counts_vit_b16():
    from transformers import ViTConfig

    num_labels = 365
    vit = ViTModel(ViTConfig(), add_pooling_layer=False)  # ViT-B/16 shape, random weights
    base_params = sum(p.numel() for p in vit.parameters())
    model = get_peft_model(vit, LPTConfig(num_labels=num_labels))
    shared, group, keys, head = 12 * 10 * 768, 6 * 20 * 10 * 768, 20 * 768, 768 * num_labels
    assert (shared, group, keys) == (92_160, 921_600, 15_360)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == shared + head
    assert total == base_params + shared + group + keys + head
    model.base_model.set_phase(2)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == group + keys + head


def test_disable_adapter_gives_base_model_exactly(make_vit):
    for cls in (ViTModel, ViTForImageClassification):
        vit = make_vit(cls=cls)
        reference = copy.deepcopy(vit)
        model = get_peft_model(vit, LPTConfig(num_labels=3, shared_layers=K, num_groups=4)).eval()
        model.base_model.set_phase(2)
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            with model.disable_adapter():
                disabled = model(pixel_values=x)
            expected = reference(pixel_values=x)
            enabled = model(pixel_values=x)
        name = "last_hidden_state" if cls is ViTModel else "logits"
        assert torch.equal(disabled[name], expected[name])
        assert enabled.group_indices is not None  # re-enabled afterwards


def test_unload_returns_plain_attention_and_merge_explains(make_vit):
    vit = make_vit()
    reference = copy.deepcopy(vit)
    model = get_peft_model(vit, LPTConfig(num_labels=3, shared_layers=K, num_groups=4))
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    plain = model.unload()
    assert all(type(layer.attention) is ViTAttention for layer in plain.layers)
    assert not any(isinstance(m, LPTAttention) for m in plain.modules())
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(plain(pixel_values=x).last_hidden_state, reference(pixel_values=x).last_hidden_state)


def test_multiple_adapters_and_set_adapter(make_vit):
    model = get_peft_model(make_vit(), LPTConfig(num_labels=3, shared_layers=K, num_groups=4)).eval()
    x = torch.randn(2, 3, 16, 16)
    first = model(pixel_values=x).logits
    model.add_adapter("b", LPTConfig(num_labels=5, shared_layers=1, num_groups=3, phase=2))
    assert torch.equal(model(pixel_values=x).logits, first)  # adding does not activate
    model.set_adapter("b")
    out_b = model(pixel_values=x)
    assert out_b.logits.shape == (2, 5) and out_b.group_indices.shape == (2, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".b") for n in trainable)
    assert not any("lpt_shared_prompt" in n for n in trainable)  # "b" is in phase 2
    model.base_model.set_adapter(["default", "b"])
    with pytest.raises(ValueError, match=r"LPT runs one adapter at a time, but \['default', 'b'\] are active"):
        model(pixel_values=x)
    model.set_adapter("default")
    assert torch.equal(model(pixel_values=x).logits, first)
    model.delete_adapter("b")
    assert "b" not in model.base_model.lpt_head


def test_labels_give_scaled_cross_entropy_and_range_error(make_vit):
    model = get_peft_model(make_vit(), LPTConfig(num_labels=3, shared_layers=K, num_groups=4)).eval()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([2, 0])
    out = model(pixel_values=x, labels=y)
    torch.testing.assert_close(out.loss, F.cross_entropy(20.0 * out.logits, y))
    with pytest.raises(ValueError, match="Label 3 is out of range for num_labels=3"):
        model(pixel_values=x, labels=torch.tensor([3, 0]))


def test_unsupported_base_model_names_supported_ones():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(TypeError, match=r"LPT does not support BertModel\. Supported base models: .*ViTModel"):
        get_peft_model(bert, LPTConfig(num_labels=3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "num_labels is required"),
        ({"num_labels": 1}, r"num_labels must be an integer >= 2, got 1"),
        ({"num_labels": 3, "top_k": 5, "num_groups": 4}, r"top_k=5 must be <= num_groups=4"),
        ({"num_labels": 3, "phase": 3}, "phase must be 1 or 2, got 3"),
        ({"num_labels": 3, "prompt_length": 0}, r"prompt_length must be an integer >= 1, got 0"),
        ({"num_labels": 3, "classifier_dropout": 1.5}, r"classifier_dropout must be in \[0, 1\)"),
        ({"num_labels": 3, "shared_layers": 12, "num_hidden_layers": 12}, r"shared_layers=12 must be < num_hidden"),
        ({"num_labels": 3, "id2label": {0: "a", 1: "b"}}, r"id2label must have exactly the keys 0..2"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LPTConfig(**kwargs)


def test_shared_layers_must_be_below_depth(make_vit):
    with pytest.raises(
        ValueError, match=re.escape("shared_layers=4 must be < the number of layers of the backbone (4)")
    ):
        get_peft_model(make_vit(), LPTConfig(num_labels=3, shared_layers=4))


def test_flex_attention_is_rejected_clearly(make_vit):
    with pytest.raises(NotImplementedError, match="attn_implementation='sdpa' or 'eager'"):
        get_peft_model(make_vit(attn_implementation="flex_attention"), LPTConfig(num_labels=3, shared_layers=K))


def test_layer_norm_eps_override(make_vit):
    model = get_peft_model(make_vit(), LPTConfig(num_labels=3, shared_layers=K, layer_norm_eps=1e-3))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-3 for m in norms)


def test_peft_type_round_trips_as_string():
    config = LPTConfig(num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    assert config.peft_type == "LPT" and config.to_dict()["peft_type"] == "LPT"
    assert config.label2id == {"a": 0, "b": 1, "c": 2}
    assert lpt_peft.LPTPeftType.LPT in __import__("peft").mapping.PEFT_TYPE_TO_TUNER_MAPPING


def test_load_onto_wrong_backbone_fails_clearly(make_vit, tmp_path):
    model = get_peft_model(make_vit(), LPTConfig(num_labels=3, shared_layers=K, num_groups=4))
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="trained on in: hidden_size: adapter 32, base 48"):
        PeftModel.from_pretrained(make_vit(hidden_size=48), tmp_path / "adapter")
    with pytest.raises(ValueError, match="trained on in: num_hidden_layers: adapter 4, base 6"):
        PeftModel.from_pretrained(make_vit(num_hidden_layers=6), tmp_path / "adapter")


def test_deepcopy_runs_the_copy(make_vit):
    model = get_peft_model(make_vit(), LPTConfig(num_labels=3, shared_layers=K, num_groups=4)).eval()
    x = torch.randn(2, 3, 16, 16)
    before = model(pixel_values=x).logits
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.base_model.lpt_head["default"].mul_(-1)
    assert torch.allclose(clone(pixel_values=x).logits, -before, atol=1e-6)
    assert torch.equal(model(pixel_values=x).logits, before)


def test_layer_norm_eps_shared_by_adapters_and_restored_on_unload(make_vit):
    model = get_peft_model(make_vit(), LPTConfig(num_labels=3, shared_layers=K, layer_norm_eps=1e-3))
    with pytest.raises(ValueError, match=r"layer_norm_eps=0.01 of adapter 'b' conflicts with 0.001 of adapter"):
        model.add_adapter("b", LPTConfig(num_labels=3, shared_layers=K, layer_norm_eps=1e-2))
    plain = model.unload()
    assert all(m.eps == 1e-5 for m in plain.modules() if isinstance(m, torch.nn.LayerNorm))


def test_inference_mode_survives_phase_switch_and_disable(make_vit):
    model = get_peft_model(make_vit(), LPTConfig(num_labels=3, shared_layers=K, num_groups=4))
    model.base_model.set_adapter("default", inference_mode=True)
    model.base_model.set_phase(2)
    with model.disable_adapter():
        pass
    assert not any(p.requires_grad for p in model.parameters())


def test_cosines_stay_float32_under_autocast(make_vit):
    model = get_peft_model(make_vit(), LPTConfig(num_labels=3, shared_layers=K, num_groups=4, phase=2)).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(pixel_values=torch.randn(2, 3, 16, 16))
    assert out.logits.dtype == torch.float32 and out.key_similarity.dtype == torch.float32


def test_target_modules_must_be_left_to_lpt():
    with pytest.raises(ValueError, match="target_modules is a regular expression string"):
        LPTConfig(num_labels=3, target_modules=["attention"])


@pytest.mark.parametrize("phase", [1, 2])
def test_class_token_only_last_layer_matches_the_full_layer(make_vit, phase):
    model = get_peft_model(make_vit(), LPTConfig(num_labels=3, shared_layers=K, num_groups=4, phase=phase)).eval()
    randomize_adapter(model)
    x = torch.randn(3, 3, 16, 16)
    fast = model(pixel_values=x)
    full = model(pixel_values=x, output_hidden_states=True)  # needs every token, so runs the full last layers
    assert len(full.hidden_states) == 1 + 4
    torch.testing.assert_close(fast.logits, full.logits, atol=1e-6, rtol=0)
    if phase == 2:
        assert torch.equal(fast.group_indices, full.group_indices)
