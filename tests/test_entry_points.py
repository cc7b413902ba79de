"""Every entry point that attaches, loads, saves or switches an LPT adapter checks before it changes anything.

Issue 9, sections 1 (validate before you mutate), 7 (loading is strict) and the method-level part of 5 (metadata).
Each failing call of the tables below must leave every tensor of the base and of the existing PeftModel, the active
adapter, the phases and the configs bit-identical, with an error that names the real cause.
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from testing_utils import randomize_adapter
from transformers import ViTForImageClassification

from lpt_peft import LPTAttention, LPTConfig
from lpt_peft.tuner.architectures import base_fingerprint, fingerprint_differences

K = 2
SMALL = {"num_labels": 3, "shared_layers": K, "num_groups": 4, "prompt_length": 3, "group_prompt_length": 2}


def lpt_config(**overrides):
    return LPTConfig(**(SMALL | overrides))


@dataclass
class Context:
    model: PeftModel
    vit: torch.nn.Module
    adapter: Path  # a good saved adapter of `model` ("default")
    other_adapter: Path  # a good adapter saved from a ViT with other weights
    tmp: Path
    make_vit: object

    def broken_copy(self, name, edit):
        """A copy of the good adapter whose weights dict went through `edit` (None: no weights file at all)."""
        folder = self.tmp / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text((self.adapter / "adapter_config.json").read_text())
        weights = load_file(self.adapter / "adapter_model.safetensors")
        if edit is not None:
            edited = edit(weights)
            if isinstance(edited, bytes):
                (folder / "adapter_model.safetensors").write_bytes(edited)
            else:
                save_file(edited, folder / "adapter_model.safetensors")
        return folder


@pytest.fixture
def ctx(make_vit, tmp_path):
    vit = make_vit(seed=0)
    # layer_norm_eps equal to the ViT's own 1e-5: changes nothing numerically, but a second adapter must agree with it.
    model = get_peft_model(vit, lpt_config(layer_norm_eps=1e-5)).eval()
    model.add_adapter("b", lpt_config(num_labels=5))
    randomize_adapter(model, seed=1)
    model.base_model.set_phase(2)
    model.save_pretrained(tmp_path / "saved", selected_adapters=["default"])
    other = get_peft_model(make_vit(seed=7), lpt_config())
    other.save_pretrained(tmp_path / "other")
    return Context(model, vit, tmp_path / "saved", tmp_path / "other", tmp_path, make_vit)


def snapshot(model: PeftModel) -> dict:
    tuner = model.base_model
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "active": model.active_adapter,
        "tuner_active": list(tuner.active_adapters),
        "layer_active": [m.active_adapters for m in model.modules() if isinstance(m, LPTAttention)],
        "configs": {name: config.to_dict() for name, config in model.peft_config.items()},
        "phases": {name: config.phase for name, config in model.peft_config.items()},
        "modules": [(name, type(m).__name__) for name, m in model.named_modules()],
        "eps": [m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)],
        "forward": tuner.model.__dict__.get("forward"),
        "peft_config_is_shared": tuner.model.__dict__.get("peft_config") is tuner.peft_config,
    }


def assert_same(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    changed = [k for k, v in before["state"].items() if not torch.equal(v, after["state"][k])]
    assert not changed, f"tensors changed: {changed[:5]}"
    for key in before:
        if key != "state":
            assert before[key] == after[key], key


def drop(key):
    return lambda weights: {k: v for k, v in weights.items() if k != key}


def reshape_keys(weights):
    return weights | {"base_model.lpt_keys": torch.zeros(6, 32)}


# (id, call, exception, message): each call fails on the model of `ctx`, which must stay exactly as it was.
EXISTING_MODEL_CASES = [
    (
        "get_peft_model-again",
        lambda c: get_peft_model(c.vit, lpt_config()),
        ValueError,
        r"ViTModel already has LPT adapter\(s\) \['b', 'default'\].*re-initialise"
        r".*load_adapter.*add_adapter.*unload\(\)",
    ),
    (
        "from_pretrained-on-wrapped-base",
        lambda c: PeftModel.from_pretrained(c.vit, c.adapter),
        ValueError,
        r"already has LPT adapter\(s\) \['b', 'default'\]",
    ),
    (
        "inject_adapter_in_model",
        lambda c: peft.inject_adapter_in_model(lpt_config(), c.vit),
        ValueError,
        r"does not support LPT because it uses shared state.*get_peft_model",
    ),
    (
        "add_adapter-name-taken",
        lambda c: c.model.add_adapter("default", lpt_config()),
        ValueError,
        r"Adapter with name 'default' already exists",
    ),
    (
        "add_adapter-other-hidden-size",
        lambda c: c.model.add_adapter("c", lpt_config(hidden_size=48, num_hidden_layers=4)),
        ValueError,
        r"hidden_size: adapter 48, base 32",
    ),
    (
        "add_adapter-shared_layers-too-big",
        lambda c: c.model.add_adapter("c", lpt_config(shared_layers=4)),
        ValueError,
        r"shared_layers=4 must be < the number of layers of the backbone \(4\)",
    ),
    (
        "add_adapter-conflicting-layer_norm_eps",
        lambda c: c.model.add_adapter("c", lpt_config(layer_norm_eps=1e-3)),
        ValueError,
        r"layer_norm_eps=0.001 of adapter 'c' conflicts with None \(the backbone's own eps, 1e-05\) of adapter 'b', "
        r"1e-05 of adapter 'default'",
    ),
    (
        "add_adapter-other-peft-type",
        lambda c: c.model.add_adapter("lora", LoraConfig(target_modules=["q_proj"])),
        ValueError,
        r"Cannot combine adapters with different peft types",
    ),
    (
        "load_adapter-new-name-missing-head",
        lambda c: c.model.load_adapter(c.broken_copy("nohead", drop("base_model.lpt_head")), adapter_name="c"),
        ValueError,
        r"missing tensors \['base_model.lpt_head'\].*Nothing was loaded",
    ),
    (
        "load_adapter-existing-name-missing-keys",
        lambda c: c.model.load_adapter(c.broken_copy("nokeys", drop("base_model.lpt_keys")), adapter_name="default"),
        ValueError,
        r"missing tensors \['base_model.lpt_keys'\]",
    ),
    (
        "load_adapter-wrong-shape",
        lambda c: c.model.load_adapter(c.broken_copy("shape", reshape_keys), adapter_name="c"),
        ValueError,
        r"wrong shapes \['base_model.lpt_keys \(file \(6, 32\), adapter \(4, 32\)\)'\]",
    ),
    (
        "load_adapter-other-backbone-weights",
        lambda c: c.model.load_adapter(c.other_adapter, adapter_name="c"),
        ValueError,
        r"trained on in: weights_sample .*not the ones it was trained on",
    ),
    (
        "load_adapter-no-weights-file",
        lambda c: c.model.load_adapter(c.broken_copy("noweights", None), adapter_name="c"),
        FileNotFoundError,
        r"adapter_model.safetensors is missing in the adapter folder .*noweights",
    ),
    (
        "load_adapter-corrupt-file",
        lambda c: c.model.load_adapter(c.broken_copy("corrupt", lambda w: b"\x00garbage" * 9), adapter_name="c"),
        OSError,
        r"Could not read the LPT adapter weights .*corrupt.adapter_model\.safetensors.*damaged",
    ),
    (
        "load_adapter-missing-folder",
        lambda c: c.model.load_adapter(c.tmp / "nowhere", adapter_name="c"),
        FileNotFoundError,
        r"adapter folder .*nowhere does not exist",
    ),
    ("set_phase-3", lambda c: c.model.base_model.set_phase(3), ValueError, r"phase must be 1 or 2, got 3"),
    ("set_phase-bool", lambda c: c.model.base_model.set_phase(True), ValueError, r"phase must be 1 or 2, got True"),
    (
        "set_phase-unknown-adapter",
        lambda c: c.model.base_model.set_phase(1, adapter_name="nope"),
        ValueError,
        r"No LPT adapter named 'nope'; available: \['b', 'default'\]",
    ),
    (
        "PeftModel.set_adapter-unknown",
        lambda c: c.model.set_adapter("nope"),
        ValueError,
        r"No LPT adapter named 'nope'; available: \['b', 'default'\]",
    ),
    (
        "PeftModel.set_adapter-several",
        lambda c: c.model.set_adapter(["default", "b"]),
        ValueError,
        r"LPT runs one adapter at a time, but \['default', 'b'\] were passed",
    ),
    (
        "LPTModel.set_adapter-unknown",
        lambda c: c.model.base_model.set_adapter("nope"),
        ValueError,
        r"No LPT adapter named 'nope'",
    ),
]


@pytest.mark.parametrize(
    "call, error, message", [c[1:] for c in EXISTING_MODEL_CASES], ids=[c[0] for c in EXISTING_MODEL_CASES]
)
def test_failing_call_leaves_the_existing_model_unchanged(ctx, call, error, message):
    x = torch.randn(2, 3, 16, 16)
    logits = ctx.model(pixel_values=x).logits
    before = snapshot(ctx.model)
    with pytest.raises(error, match=message):
        call(ctx)
    assert_same(before, snapshot(ctx.model))
    assert torch.equal(ctx.model(pixel_values=x).logits, logits)  # and it still runs, with the same adapter


def _no_scaling_in_last_layer(vit):
    del vit.layers[-1].attention.scaling  # only the last layer is unfit: nothing before it may be wrapped
    return vit


def _with_corrupt_config(c):
    folder = c.broken_copy("badconfig", lambda weights: weights)
    (folder / "adapter_config.json").write_text('{"peft_type": "LPT", "num_labels": ')
    return folder


# (id, base overrides, call(base, ctx), exception, message): each call fails on a fresh base, which must stay plain.
FRESH_BASE_CASES = [
    (
        "get_peft_model-flex-attention",
        {"attn_implementation": "flex_attention"},
        lambda base, c: get_peft_model(base, lpt_config()),
        NotImplementedError,
        r"attn_implementation='sdpa' or 'eager'",
    ),
    (
        "get_peft_model-shared_layers-too-big",
        {},
        lambda base, c: get_peft_model(base, lpt_config(shared_layers=4)),
        ValueError,
        r"shared_layers=4 must be <",
    ),
    (
        "get_peft_model-last-layer-unfit",
        {},
        lambda base, c: get_peft_model(_no_scaling_in_last_layer(base), lpt_config()),
        ValueError,
        r"LPT cannot wrap ViTAttention: .*scaling_attr='scaling'",
    ),
    (
        "get_peft_model-on-a-PeftModel",
        {},
        lambda base, c: get_peft_model(c.model, lpt_config()),
        ValueError,
        r"LPT was given a PeftModel.*add_adapter",
    ),
    (
        "from_pretrained-patch-size-8",
        {"patch_size": 8},
        lambda base, c: PeftModel.from_pretrained(base, c.adapter),
        ValueError,
        r"trained on in: patch_size: adapter 4, base 8",
    ),
    (
        "from_pretrained-other-weights",
        {"seed": 1},
        lambda base, c: PeftModel.from_pretrained(base, c.adapter),
        ValueError,
        r"weights_sample \(key projections of the first and last layer, final norm\): adapter \[",
    ),
    (
        "from_pretrained-missing-head",
        {},
        lambda base, c: PeftModel.from_pretrained(base, c.broken_copy("nohead", drop("base_model.lpt_head"))),
        ValueError,
        r"missing tensors \['base_model.lpt_head'\]",
    ),
    (
        "from_pretrained-no-weights-file",
        {},
        lambda base, c: PeftModel.from_pretrained(base, c.broken_copy("noweights", None)),
        FileNotFoundError,
        r"adapter_model.safetensors is missing in the adapter folder .*noweights.*it holds \['adapter_config.json'\]",
    ),
    (
        "from_pretrained-corrupt-file",
        {},
        lambda base, c: PeftModel.from_pretrained(base, c.broken_copy("corrupt", lambda w: b"\x00garbage" * 9)),
        OSError,
        r"Could not read the LPT adapter weights .*corrupt.adapter_model\.safetensors",
    ),
    (
        "from_pretrained-corrupt-config",
        {},
        lambda base, c: PeftModel.from_pretrained(base, _with_corrupt_config(c)),
        OSError,
        r"Could not read the adapter config .*badconfig.adapter_config\.json",
    ),
    (
        "from_pretrained-no-config",
        {},
        lambda base, c: PeftModel.from_pretrained(base, (c.tmp / "empty").mkdir() or c.tmp / "empty"),
        FileNotFoundError,
        r"adapter_config.json is missing in the adapter folder .*empty",
    ),
]


@pytest.mark.parametrize(
    "overrides, call, error, message", [c[1:] for c in FRESH_BASE_CASES], ids=[c[0] for c in FRESH_BASE_CASES]
)
def test_failing_call_leaves_a_fresh_base_plain(ctx, overrides, call, error, message):
    base = ctx.make_vit(**({"seed": 0} | overrides))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    modules = [(name, type(m).__name__) for name, m in base.named_modules()]
    model_before = snapshot(ctx.model)
    with pytest.raises(error, match=message):
        call(base, ctx)
    assert base.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    assert [(name, type(m).__name__) for name, m in base.named_modules()] == modules
    assert "peft_config" not in base.__dict__ and "forward" not in base.__dict__
    assert_same(model_before, snapshot(ctx.model))


def test_first_model_keeps_its_trained_prompts_after_a_refused_second_wrap(ctx):
    """The observed data loss: a re-run notebook cell used to re-initialise the first model's prompts."""
    x = torch.randn(2, 3, 16, 16)
    before = ctx.model(pixel_values=x).logits
    with pytest.raises(ValueError, match="already has LPT adapter"):
        get_peft_model(ctx.vit, lpt_config())
    after_unload = ctx.model.unload()  # the way out the message gives works
    model = get_peft_model(after_unload, lpt_config())
    assert model.peft_config["default"].phase == 1
    assert not torch.equal(model(pixel_values=x).logits, before)


def test_fingerprint_is_recorded_saved_and_dtype_robust(ctx, make_vit):
    fingerprint = ctx.model.peft_config["default"].base_fingerprint
    assert {k: fingerprint[k] for k in ("model_type", "num_attention_heads", "patch_size", "image_size")} == {
        "model_type": "vit",
        "num_attention_heads": 4,
        "patch_size": 4,
        "image_size": 16,
    }
    vit = make_vit(seed=0)
    # 8 values at fixed positions of the first and last key projections and of the final norm weight.
    for i, tensor in enumerate([vit.layers[0].attention.k_proj.weight, vit.layers[3].attention.k_proj.weight]):
        flat = tensor.detach().reshape(-1)
        expected = [flat[round(j * (flat.numel() - 1) / 7)].item() for j in range(8)]
        assert fingerprint["weights_sample"][8 * i : 8 * i + 8] == pytest.approx(expected, rel=1e-5)
    norm = vit.layernorm.weight.detach()[[0, 4, 9, 13, 18, 22, 27, 31]].tolist()  # round(j * 31 / 7)
    assert fingerprint["weights_sample"][16:] == pytest.approx(norm, rel=1e-5)
    saved = json.loads((ctx.adapter / "adapter_config.json").read_text())["base_fingerprint"]
    assert saved == fingerprint
    # The same weights in bfloat16 or float16 match; a different initialisation does not.
    for dtype in (torch.bfloat16, torch.float16):
        assert fingerprint_differences(fingerprint, base_fingerprint(make_vit(seed=0).to(dtype))) == []
    assert [d.split(":")[0] for d in fingerprint_differences(fingerprint, base_fingerprint(make_vit(seed=1)))] == [
        "weights_sample (key projections of the first and last layer, final norm)"
    ]


def test_each_differing_field_is_named_with_both_values(ctx, make_vit):
    base = make_vit(seed=1, patch_size=8, num_attention_heads=2)
    with pytest.raises(ValueError) as info:
        PeftModel.from_pretrained(base, ctx.adapter)
    message = str(info.value)
    assert "num_attention_heads: adapter 4, base 2" in message
    assert "patch_size: adapter 4, base 8" in message
    assert "weights_sample" in message and "hidden_size: adapter" not in message
    assert "base_fingerprint=None" in message  # how to override deliberately
    config = LPTConfig.from_pretrained(ctx.adapter)
    config.base_fingerprint = None
    with pytest.raises(ValueError, match=r"patch_size: adapter 4, base 8"):  # config= is checked like a saved one
        PeftModel.from_pretrained(base, ctx.adapter, config=LPTConfig.from_pretrained(ctx.adapter))
    PeftModel.from_pretrained(make_vit(seed=1, patch_size=8, num_attention_heads=2), ctx.adapter, config=config)


def test_set_phase_without_an_active_adapter_names_the_fix(ctx):
    ctx.model.base_model.set_adapter([])
    before = snapshot(ctx.model)
    with pytest.raises(ValueError, match=r"No LPT adapter is active.*adapter_name= one of \['b', 'default'\]"):
        ctx.model.base_model.set_phase(2)
    assert_same(before, snapshot(ctx.model))


def test_adapter_config_without_the_new_fields_still_loads(ctx, make_vit):
    """Adapters saved before the fingerprint existed: the fields are None and not checked."""
    folder = ctx.broken_copy("old", lambda weights: weights)
    config = json.loads((folder / "adapter_config.json").read_text())
    for key in ("base_fingerprint", "hidden_size", "num_hidden_layers"):
        del config[key]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    x = torch.randn(2, 3, 16, 16)
    reloaded = PeftModel.from_pretrained(make_vit(seed=0), folder)
    ctx.model.set_adapter("default")
    assert torch.equal(reloaded(pixel_values=x).logits, ctx.model(pixel_values=x).logits)
    assert reloaded.peft_config["default"].base_fingerprint is not None  # recorded for the next save
    PeftModel.from_pretrained(make_vit(seed=1), folder)  # other weights: nothing recorded, so not refused


def test_good_adapter_loads_bit_exact_with_strict_checks(ctx, make_vit):
    x = torch.randn(2, 3, 16, 16)
    reloaded = PeftModel.from_pretrained(make_vit(seed=0), ctx.adapter)
    assert torch.equal(reloaded(pixel_values=x).logits, ctx.model(pixel_values=x).logits)
    # A base loaded in bfloat16 passes the fingerprint check (same weights).
    PeftModel.from_pretrained(make_vit(seed=0).to(torch.bfloat16), ctx.adapter)


def _fake_disk_full(tensors, filename, metadata=None):
    with open(filename, "wb") as file:
        file.write(b"half an adapter")
    raise OSError(28, "No space left on device")


def test_failed_save_names_the_folder_and_cause_and_keeps_the_old_files(ctx, monkeypatch):
    folder = ctx.tmp / "atomic"
    ctx.model.save_pretrained(folder)
    files = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert Path("b/adapter_model.safetensors") in files  # a second adapter goes to its subfolder
    randomize_adapter(ctx.model, seed=5)  # what a later save would write
    monkeypatch.setattr(peft.peft_model, "safe_save_file", _fake_disk_full)
    with pytest.raises(
        OSError,
        match=rf"Could not save the LPT adapter to {re.escape(str(folder))}: No space left on "
        r"device; \d+ MiB are free on that disk\. The files already there were left as they were",
    ) as e:
        ctx.model.save_pretrained(folder)
    assert e.value.errno == 28
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "b"]


def test_failed_pickle_save_is_reported_and_atomic_too(ctx, monkeypatch):
    folder = ctx.tmp / "atomic_bin"
    ctx.model.save_pretrained(folder, safe_serialization=False, selected_adapters=["default"])
    before = (folder / "adapter_model.bin").read_bytes()

    def iostream_error(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise RuntimeError(
            "[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file: "
            "basic_ios::clear: iostream error"
        )

    monkeypatch.setattr(torch, "save", iostream_error)
    with pytest.raises(OSError, match=rf"{re.escape(str(folder))}: .*iostream error; \d+ MiB are free"):
        ctx.model.save_pretrained(folder, safe_serialization=False, selected_adapters=["default"])
    assert (folder / "adapter_model.bin").read_bytes() == before
    assert not [p for p in os.listdir(folder) if p.startswith(".lpt-saving")]


def test_successful_save_replaces_the_files_and_keeps_an_edited_card(ctx, make_vit):
    folder = ctx.tmp / "resave"
    ctx.model.save_pretrained(folder, selected_adapters=["default"])
    with open(folder / "README.md", "a") as file:
        file.write("\nMy own notes.\n")
    randomize_adapter(ctx.model, seed=9)
    ctx.model.save_pretrained(folder, selected_adapters=["default"])
    assert "My own notes." in (folder / "README.md").read_text()
    assert not [p for p in os.listdir(folder) if p.startswith(".lpt-saving")]
    x = torch.randn(2, 3, 16, 16)
    ctx.model.set_adapter("default")
    reloaded = PeftModel.from_pretrained(make_vit(seed=0), folder)
    assert torch.equal(reloaded(pixel_values=x).logits, ctx.model(pixel_values=x).logits)


def test_class_names_come_from_the_base_config(make_vit):
    names = {0: "cat", 1: "dog", 2: "bird"}
    base = make_vit(cls=ViTForImageClassification, num_labels=3, id2label=names, label2id=None)
    config = get_peft_model(base, LPTConfig(num_labels=3, shared_layers=K)).peft_config["default"]
    assert config.id2label == names and config.label2id == {"cat": 0, "dog": 1, "bird": 2}
    # The LPTConfig's own names win; transformers' default LABEL_i and a different class count are not names.
    own = {0: "a", 1: "b", 2: "c"}
    base = make_vit(cls=ViTForImageClassification, num_labels=3, id2label=names, label2id=None)
    assert (
        get_peft_model(base, LPTConfig(num_labels=3, shared_layers=K, id2label=own)).peft_config["default"].id2label
        == own
    )
    base = make_vit(cls=ViTForImageClassification, num_labels=3)
    assert base.config.id2label[0] == "LABEL_0"
    assert get_peft_model(base, LPTConfig(num_labels=3, shared_layers=K)).peft_config["default"].id2label is None
    base = make_vit(cls=ViTForImageClassification, num_labels=3, id2label=names, label2id=None)
    assert get_peft_model(base, LPTConfig(num_labels=4, shared_layers=K)).peft_config["default"].id2label is None


def test_relative_base_path_is_stored_absolute_and_hub_id_as_is(make_vit, tmp_path, monkeypatch):
    from transformers import ViTModel

    make_vit(seed=0).save_pretrained(tmp_path / "bases" / "vit")
    monkeypatch.chdir(tmp_path)
    base = ViTModel.from_pretrained("bases/vit", add_pooling_layer=False, attn_implementation="eager")
    model = get_peft_model(base, lpt_config())
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "bases" / "vit")
    model.save_pretrained("adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "bases" / "vit")

    hub = make_vit(seed=0)
    hub.name_or_path = hub.config._name_or_path = "google/vit-base-patch16-224"
    model = get_peft_model(hub, lpt_config())
    assert model.peft_config["default"].base_model_name_or_path == "google/vit-base-patch16-224"


def test_an_adapter_keeping_the_backbone_eps_and_one_overriding_it_cannot_share_a_backbone(make_vit):
    # The first adapter runs on the ViT's own eps (None); a second one with its own eps would change the first one's
    # predictions through the shared LayerNorms, even while the first one stays active.
    model = get_peft_model(make_vit(), lpt_config()).eval()
    model.add_adapter("same", lpt_config(layer_norm_eps=1e-5))  # the ViT's own eps spelled out: no conflict
    x = torch.randn(2, 3, 16, 16)
    before = model(pixel_values=x).logits
    with pytest.raises(ValueError, match=r"layer_norm_eps=0.1 of adapter 'c' conflicts with None \(the backbone's"):
        model.add_adapter("c", lpt_config(layer_norm_eps=1e-1))
    assert sorted(model.peft_config) == ["default", "same"]
    assert torch.equal(model(pixel_values=x).logits, before)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


def _safetensors_disk_full(tensors, filename, metadata=None):
    from safetensors import SafetensorError

    Path(filename).write_bytes(b"half")
    raise SafetensorError("Error while serializing: IoError(Os { code: 28, message: 'No space left on device' })")


def _torch_save_disk_full(obj, f, *args, **kwargs):
    Path(f).write_bytes(b"half")
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9600 vs 9488")


@pytest.mark.parametrize(
    "patch, safe, cause",
    [
        ((peft.peft_model, "safe_save_file", _safetensors_disk_full), True, r"no space left on the device"),
        ((torch, "save", _torch_save_disk_full), False, r"unexpected pos 9600 vs 9488"),
    ],
    ids=["safetensors-error", "torch-save-unexpected-pos"],
)
def test_write_failures_as_the_writers_report_them_name_the_folder(ctx, monkeypatch, patch, safe, cause):
    # How safetensors and torch.save report a full disk in practice (seen on a 64 KiB tmpfs): not as OSError.
    folder = ctx.tmp / f"full-{safe}"
    ctx.model.save_pretrained(folder, safe_serialization=safe, selected_adapters=["default"])
    files = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    monkeypatch.setattr(*patch)
    with pytest.raises(OSError, match=rf"Could not save the LPT adapter to {re.escape(str(folder))}: .*{cause}"):
        ctx.model.save_pretrained(folder, safe_serialization=safe, selected_adapters=["default"])
    assert {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files


def test_a_backbone_mismatch_names_only_the_fields_that_differ(make_vit, ctx):
    with pytest.raises(ValueError) as e:
        PeftModel.from_pretrained(make_vit(patch_size=8), ctx.adapter)
    assert "patch_size: adapter 4, base 8" in str(e.value)
    assert "hidden_size" not in str(e.value) and "num_hidden_layers" not in str(e.value)


def test_an_adapter_of_another_model_class_names_the_class_mismatch(make_vit, tmp_path):
    # Same backbone weights, but the adapter was trained on the ViTModel and is loaded onto the classification model
    # (whose ViT is `.vit`): the keys differ by that prefix, and the message says so instead of blaming the file.
    inner = make_vit(seed=0)
    get_peft_model(inner, lpt_config()).save_pretrained(tmp_path / "vitmodel")
    classifier = ViTForImageClassification(inner.config)
    classifier.vit.load_state_dict(make_vit(seed=0).state_dict(), strict=False)
    with pytest.raises(ValueError, match=r"trained on a different model class than this base .*pass the inner"):
        PeftModel.from_pretrained(classifier, tmp_path / "vitmodel")
    assert not any(isinstance(m, LPTAttention) for m in classifier.modules())
    PeftModel.from_pretrained(classifier.vit, tmp_path / "vitmodel")  # the fix the message names works
