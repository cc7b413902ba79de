"""PEFT's generic tuner contract, checked for LPT the way peft's own common tester checks its methods.

Written on peft's documented API (`get_peft_model`, `PeftModel.from_pretrained` / `save_pretrained` /
`load_adapter` / `add_adapter` / `set_adapter` / `delete_adapter` / `disable_adapter` / `set_requires_grad` /
`unload`, `get_peft_model_state_dict` / `set_peft_model_state_dict`), over the `TEST_CASES` table of
tests/testing_utils.py: LPT phase 1 and 2 x `ViTModel` / `ViTForImageClassification` x eager / sdpa attention.
References are independent of the code under test: the model's own outputs and weights before a save / copy /
reload, the untouched base model, a hand count of trainable weights, the run without gradient checkpointing.
Outputs are compared with `torch.testing.assert_close`, weights with `torch.equal`.

Which checks run on which cases (the module must stay well under 2 minutes on 2 cores):
- ALL 8 cases: whatever touches the forward or the phase rules (save/load, trainability, counts, disable_adapter,
  gradient checkpointing, training, unload, state-dict round trip): phase decides which tensors exist and train,
  the model class decides parameter names and the forward that LPT replaces, and the attention kernel decides the
  numerics of every forward and backward.
- EAGER (4 cases): bookkeeping that never depends on the attention kernel (several adapters, selected adapters and
  subfolders, low_cpu_mem_usage, deepcopy/pickle).
- PHASES (one case per phase): dtype handling, merge refusal, in_features (phase decides which tensors are cast).
- torch.compile: one inference case by default; training steps (both phases, aot_eager and inductor) marked slow,
  as each compile takes 10-30 s on 2 cores.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from peft import (
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from testing_utils import (
    NUM_LABELS,
    TEST_CASES,
    Case,
    adapter_params,
    assert_params_equal,
    expected_total_adapter_count,
    expected_trainable_count,
    labels,
    lpt_config,
    make_model,
    parameter_grads,
    phase_param_names,
    pixels,
    tiny_vit,
    trainable_names,
    training_loss,
)
from transformers import ViTForImageClassification, ViTModel
from transformers.models.vit.modeling_vit import ViTAttention

from lpt_peft import LPTAttention

# Checks of peft's common tester that do not apply to a prompt method like LPT, and why. Where peft offers the
# operation on every PeftModel, the test below checks that LPT refuses it with a clear error instead.
NOT_APPLICABLE = {
    "merge_adapter / merge_and_unload / safe_merge / unmerge round trip": "prompts are extra keys and values (in "
    "phase 2 chosen per image), not a weight update, so nothing can be merged; refusal tested below",
    "add_weighted_adapter / adapter arithmetic": "prompts of different adapters are not summable weight deltas, and "
    "each adapter has its own classifier and key pool",
    "mixed adapter batches (forward(adapter_names=...))": "one forward runs one adapter's classifier and group "
    "selection; refusal tested below",
    "several active adapters at once": "LPT runs one adapter per forward; refusal tested in test_lpt_model.py",
    "DoRA, rank_pattern / alpha_pattern, init_lora_weights variants, bias, use_rslora": "LoRA options; LPT has no "
    "low-rank matrices",
    "target_modules / exclude_modules / layers_to_transform / target_parameters": "LPT derives the targeted "
    "attention modules from the architecture (every layer receives prompts); target_modules is refused",
    "modules_to_save": "the cosine classifier belongs to the adapter (saved with it) instead of a wrapped base module",
    "identity at init (adapter output equals base output before training)": "prompts change the attention and the "
    "head replaces the base classifier from the start, as in the LPT paper",
    "generate / past_key_values / prompt-learning (virtual tokens) checks": "image classifier without generation "
    "or word embeddings",
    "quantized bases (bnb, GPTQ, AWQ, HQQ, torchao), ephemeral GPU offload, device_map offloading": "no quantized "
    "Linear adapter layers; LPT runs its own two-pass forward on one device and refuses a forward already "
    "replaced by accelerate's device_map hooks",
    "hotswap_adapter": "peft implements it for LoRA only",
    "inject_adapter_in_model": "peft refuses tuners whose weights live on the tuner (uses_shared_state); tested below",
    "tied weights / ensure_weight_tying": "LPT adapts no embedding or output matrix",
}

ALL = TEST_CASES
EAGER = [case for case in TEST_CASES if case.attn == "eager"]
PHASES = [Case(1, ViTForImageClassification, "eager"), Case(2, ViTModel, "sdpa")]


def _ids(cases):
    return [case.id for case in cases]


def _run(model, x=None):
    with torch.no_grad():
        return model(pixel_values=pixels() if x is None else x)


def _assert_same_prediction(got, expected, phase: int) -> None:
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
    if phase == 2:
        assert torch.equal(got.group_indices, expected.group_indices)


# ---------------------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_save_pretrained_then_from_pretrained_reproduces_the_model(case, safe_serialization, tmp_path):
    model = make_model(case)
    reference, weights = _run(model), adapter_params(model)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    written = "adapter_model.safetensors" if safe_serialization else "adapter_model.bin"
    other = "adapter_model.bin" if safe_serialization else "adapter_model.safetensors"
    assert (tmp_path / written).is_file() and not (tmp_path / other).exists()

    loaded = PeftModel.from_pretrained(tiny_vit(case), tmp_path)
    assert_params_equal(adapter_params(loaded), weights)
    _assert_same_prediction(_run(loaded), reference, case.phase)
    assert loaded.peft_config["default"].phase == case.phase


@pytest.mark.parametrize("is_trainable", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_from_pretrained_is_trainable_follows_the_phase_rules(case, is_trainable, tmp_path):
    make_model(case).save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_vit(case), tmp_path, is_trainable=is_trainable)
    if is_trainable:
        assert trainable_names(loaded) == phase_param_names(loaded, phase=case.phase)
        assert loaded.get_nb_trainable_parameters()[0] == expected_trainable_count(case.phase)
    else:
        assert trainable_names(loaded) == set()
        assert not any(module.training for module in loaded.modules())  # peft's rule: inference models in eval


@pytest.mark.parametrize("is_trainable", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_load_adapter_is_trainable_reaches_head_and_keys(case, is_trainable, tmp_path):
    make_model(case, adapter_seed=4).save_pretrained(tmp_path)
    model = make_model(case)
    before = trainable_names(model)
    model.load_adapter(tmp_path, adapter_name="other", is_trainable=is_trainable)
    other = phase_param_names(model, "other", phase=case.phase) if is_trainable else set()
    # peft: loading keeps the trainability of the existing adapter, and is_trainable=True enables the new one
    # (all of it that its phase trains: prompts, and the keys and cosine head held by the tuner).
    assert trainable_names(model) == before | other
    assert model.active_adapter == "default"


# ---------------------------------------------------------------------------------------------------- trainability
@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_set_requires_grad_switches_the_whole_adapter(case):
    model = make_model(case)
    default = phase_param_names(model, phase=case.phase)
    assert trainable_names(model) == default
    model.set_requires_grad("default", requires_grad=False)
    assert trainable_names(model) == set()
    model.base_model.set_phase(3 - case.phase)  # the choice survives a phase switch ...
    assert trainable_names(model) == set()
    model.base_model.set_phase(case.phase)
    model.set_requires_grad("default")
    assert trainable_names(model) == default

    model.add_adapter("other", lpt_config(case))
    assert trainable_names(model) == default  # ... and adding an adapter (which starts frozen: it is not active)
    model.set_requires_grad(["other"])
    other = phase_param_names(model, "other", phase=case.phase)
    assert trainable_names(model) == default | other
    with model.disable_adapter():
        assert trainable_names(model) == set()  # disabled adapters never train
    assert trainable_names(model) == default | other

    with pytest.raises(ValueError, match=r"No LPT adapter named \['missing'\]"):
        model.set_requires_grad(["other", "missing"], requires_grad=False)
    assert trainable_names(model) == default | other  # validated before anything changed


@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_trainable_parameter_counts_match_the_hand_count(case):
    model = make_model(case)
    base_total = sum(p.numel() for p in tiny_vit(case).parameters())
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == expected_trainable_count(case.phase)
    assert total == base_total + expected_total_adapter_count()
    model.base_model.set_phase(3 - case.phase)
    assert model.get_nb_trainable_parameters()[0] == expected_trainable_count(3 - case.phase)


@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_training_reduces_the_loss_and_changes_only_trainable_weights(case):
    model = make_model(case).train()
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x, y = pixels(), labels()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        output = model(pixel_values=x, labels=y)
        losses.append(output.loss.item())
        training_loss(output, case.phase).backward()
        optimizer.step()
    assert losses[-1] < 0.8 * losses[0], losses
    changed = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert changed == phase_param_names(model, phase=case.phase)


# ---------------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("case", EAGER, ids=_ids(EAGER))
def test_several_adapters_add_set_delete(case):
    model = make_model(case)
    reference = _run(model)
    model.add_adapter("other", lpt_config(case, num_labels=NUM_LABELS + 2))
    _assert_same_prediction(_run(model), reference, case.phase)  # adding does not activate
    model.set_adapter("other")
    assert model.active_adapter == "other" and _run(model).logits.shape == (4, NUM_LABELS + 2)
    assert trainable_names(model) == phase_param_names(model, "other", phase=case.phase)
    model.set_adapter("default")
    _assert_same_prediction(_run(model), reference, case.phase)

    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(name.endswith(".other") for name, _ in model.named_parameters())
    _assert_same_prediction(_run(model), reference, case.phase)


@pytest.mark.parametrize("case", EAGER, ids=_ids(EAGER))
def test_deleting_the_active_adapter_activates_the_remaining_one(case, tmp_path):
    model = make_model(case, adapter_seed=4)
    expected = _run(model)
    model.save_pretrained(tmp_path)
    model = make_model(case)
    model.load_adapter(tmp_path, adapter_name="other")
    with pytest.warns(UserWarning, match="Setting active adapter to other"):
        model.delete_adapter("default")
    assert model.active_adapters == ["other"]
    _assert_same_prediction(_run(model), expected, case.phase)


@pytest.mark.parametrize("case", EAGER, ids=_ids(EAGER))
def test_selected_adapters_and_subfolder(case, tmp_path):
    model = make_model(case)
    model.add_adapter("other", lpt_config(case))
    model.set_adapter("other")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".other"):
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    expected_other, other_weights = _run(model), adapter_params(model, "other")
    model.save_pretrained(tmp_path / "one", selected_adapters=["other"])
    assert (tmp_path / "one" / "other" / "adapter_config.json").is_file()
    assert not (tmp_path / "one" / "adapter_config.json").exists()  # "default" was not selected

    loaded = PeftModel.from_pretrained(tiny_vit(case), tmp_path / "one", subfolder="other", adapter_name="other")
    assert_params_equal(adapter_params(loaded, "other"), other_weights)
    _assert_same_prediction(_run(loaded), expected_other, case.phase)

    model.set_adapter("default")
    expected_default = _run(model)
    model.save_pretrained(tmp_path / "all")
    both = PeftModel.from_pretrained(tiny_vit(case), tmp_path / "all")
    both.load_adapter(tmp_path / "all" / "other", adapter_name="other")
    _assert_same_prediction(_run(both), expected_default, case.phase)
    both.set_adapter("other")
    _assert_same_prediction(_run(both), expected_other, case.phase)


@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_disable_adapter_nested_and_with_an_exception(case):
    base = tiny_vit(case)
    reference_base = copy.deepcopy(base)
    torch.manual_seed(1)
    model = get_peft_model(base, lpt_config(case)).eval()
    enabled, plain = _run(model), _run(reference_base)
    trainable = trainable_names(model)
    with model.disable_adapter():
        with model.disable_adapter():
            torch.testing.assert_close(_run(model)[case.output_name], plain[case.output_name], rtol=0, atol=0)
        # Leaving the inner context must not re-enable the adapter of the outer one.
        torch.testing.assert_close(_run(model)[case.output_name], plain[case.output_name], rtol=0, atol=0)
    _assert_same_prediction(_run(model), enabled, case.phase)
    with pytest.raises(RuntimeError, match="inside the context"):
        with model.disable_adapter():
            raise RuntimeError("inside the context")
    _assert_same_prediction(_run(model), enabled, case.phase)
    assert trainable_names(model) == trainable


# ---------------------------------------------------------------------------------------------------- checkpointing
def _grads(model, case, x, y):
    model.zero_grad(set_to_none=True)
    training_loss(model(pixel_values=x, labels=y), case.phase).backward()
    return parameter_grads(model)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("error:None of the inputs have requires_grad:UserWarning")  # frozen layers run plainly
@pytest.mark.parametrize("mode", ["peft-prepared-reentrant", "reentrant", "non-reentrant"])
@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_gradient_checkpointing_gives_the_same_gradients(case, mode):
    """Both reentrant modes, both phases: gradients equal those of the run without checkpointing.

    "peft-prepared-reentrant": checkpointing enabled on the base before `get_peft_model`, which then calls
    `enable_input_require_grads` (peft's preparation); "reentrant": enabled afterwards, without that call.
    """
    x, y = pixels(), labels()
    plain = make_model(case).train()
    expected = _grads(plain, case, x, y)
    assert expected.keys() == phase_param_names(plain, phase=case.phase)

    kwargs = {"use_reentrant": mode != "non-reentrant"}
    if mode == "peft-prepared-reentrant":
        base = tiny_vit(case)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model = get_peft_model(base, lpt_config(case))
        set_peft_model_state_dict(model, get_peft_model_state_dict(plain))
    else:
        model = make_model(case)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    got = _grads(model, case, x, y)
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("autocast_adapter_dtype", [True, False], ids=["autocast", "no-autocast"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", PHASES, ids=_ids(PHASES))
def test_autocast_adapter_dtype(case, dtype, autocast_adapter_dtype, tmp_path):
    """peft's documented rule: half-precision adapter weights are upcast to float32 unless told not to."""
    expected = torch.float32 if autocast_adapter_dtype else dtype
    torch.manual_seed(1)
    base = tiny_vit(case, dtype=dtype)
    model = get_peft_model(base, lpt_config(case), autocast_adapter_dtype=autocast_adapter_dtype)
    adapter = adapter_params(model)
    assert len(adapter) == 4 + 2 + 2  # shared prompts of 4 layers, group pools of 2, keys, head
    assert {t.dtype for t in adapter.values()} == {expected}
    assert trainable_names(model) == phase_param_names(model, phase=case.phase)  # the cast keeps the phase rules
    output = _run(model)
    assert output.logits.dtype == torch.float32 and torch.isfinite(output.logits).all()

    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(
        tiny_vit(case, dtype=dtype), tmp_path, autocast_adapter_dtype=autocast_adapter_dtype
    )
    assert_params_equal(adapter_params(loaded), adapter)
    base = make_model(case)
    base.load_adapter(tmp_path, adapter_name="other", autocast_adapter_dtype=autocast_adapter_dtype)
    # A float32 base keeps float32 adapter weights either way (peft only upcasts).
    assert {t.dtype for t in adapter_params(base, "other").values()} == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", PHASES, ids=_ids(PHASES))
def test_mixed_precision_training_step_under_autocast(case, dtype):
    model = make_model(case).train()
    with torch.autocast("cpu", dtype=dtype):
        output = model(pixel_values=pixels(), labels=labels())
    assert output.logits.dtype == torch.float32  # cosine logits stay float32
    training_loss(output, case.phase).backward()
    grads = parameter_grads(model)
    assert grads.keys() == phase_param_names(model, phase=case.phase)
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


# ---------------------------------------------------------------------------------------------------- merging, unload
@pytest.mark.parametrize("case", PHASES, ids=_ids(PHASES))
def test_merging_is_refused_clearly_and_changes_nothing(case):
    model = make_model(case)
    reference, weights = _run(model), adapter_params(model)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_adapter()
    with pytest.warns(UserWarning, match="never merged"):
        model.unmerge_adapter()
    assert_params_equal(adapter_params(model), weights)
    _assert_same_prediction(_run(model), reference, case.phase)
    assert any(isinstance(module, LPTAttention) for module in model.modules())


@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_unload_returns_the_original_base(case):
    base = tiny_vit(case)
    reference = copy.deepcopy(base)
    model = get_peft_model(base, lpt_config(case))
    plain = model.unload()
    assert plain is base
    assert not any(isinstance(module, LPTAttention) for module in plain.modules())
    assert "forward" not in plain.__dict__  # LPT's forward is gone: the class's own forward runs
    layers = plain.layers if case.model_cls is ViTModel else plain.vit.layers
    assert all(type(layer.attention) is ViTAttention for layer in layers)
    assert plain.state_dict().keys() == reference.state_dict().keys()
    x = pixels()
    torch.testing.assert_close(_run(plain, x)[case.output_name], _run(reference, x)[case.output_name], rtol=0, atol=0)


@pytest.mark.parametrize("case", EAGER, ids=_ids(EAGER))
def test_low_cpu_mem_usage_loads_the_same_model(case, tmp_path):
    model = make_model(case)
    reference, weights = _run(model), adapter_params(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_vit(case), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    assert_params_equal(adapter_params(loaded), weights)
    _assert_same_prediction(_run(loaded), reference, case.phase)

    other = make_model(case, adapter_seed=9)
    other.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=True)
    other.set_adapter("other")
    assert not any(p.is_meta for p in other.parameters())
    _assert_same_prediction(_run(other), reference, case.phase)


# ---------------------------------------------------------------------------------------------------- copies, state
@pytest.mark.parametrize("case", EAGER, ids=_ids(EAGER))
def test_deepcopy_and_pickle(case):
    model = make_model(case)
    reference = _run(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        _assert_same_prediction(_run(clone), reference, case.phase)
        with torch.no_grad():
            clone.base_model.lpt_head["default"].neg_()  # the copy runs its own weights ...
        assert not torch.equal(_run(clone).logits, reference.logits)
        _assert_same_prediction(_run(model), reference, case.phase)  # ... and the original is untouched


@pytest.mark.parametrize("case", ALL, ids=_ids(ALL))
def test_peft_model_state_dict_round_trip(case):
    model = make_model(case)
    reference, weights = _run(model), adapter_params(model)
    state = get_peft_model_state_dict(model)
    assert all(".lpt_" in key and not key.endswith(".default") for key in state)  # no base weights, no adapter name
    assert sum(t.numel() for t in state.values()) == expected_total_adapter_count()

    other = make_model(case, adapter_seed=7)
    assert not torch.equal(_run(other).logits, reference.logits)
    result = set_peft_model_state_dict(other, state)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if ".lpt_" in k]
    assert_params_equal(adapter_params(other), weights)
    _assert_same_prediction(_run(other), reference, case.phase)


# ---------------------------------------------------------------------------------------------------- layer contract
@pytest.mark.parametrize("case", PHASES, ids=_ids(PHASES))
def test_tuner_layers_expose_in_and_out_features(case):
    model = make_model(case)
    layers = [module for module in model.modules() if isinstance(module, LPTAttention)]
    assert len(layers) == 4
    assert all(layer.in_features == layer.out_features == 32 for layer in layers)
    status = model.get_layer_status()
    assert len(status) == 4 and all(row.available_adapters == ["default"] for row in status)


def test_mixed_adapter_batches_are_refused():
    model = make_model(TEST_CASES[0])
    with pytest.raises(ValueError, match="mixed-adapter batches"):
        model(pixel_values=pixels(), adapter_names=["default"] * 4)


def test_inject_adapter_in_model_is_refused_by_peft():
    case = TEST_CASES[0]
    base = tiny_vit(case)
    with pytest.raises(ValueError, match="uses shared state"):
        inject_adapter_in_model(lpt_config(case), base)
    assert not any(isinstance(module, LPTAttention) for module in base.modules())


# ---------------------------------------------------------------------------------------------------- compile
# Compiling costs 10-30 s per graph on 2 CPU cores: the default suite compiles one inference forward with aot_eager
# (dynamo's tracing and AOTAutograd, what untraceable code breaks, without inductor's C++ build); training through
# compiled graphs and inductor run in the slow suite.
COMPILE_CASE = Case(2, ViTForImageClassification, "sdpa")  # phase 2: two passes, top-k selection, gather


def _assert_close_prediction(got, expected, phase):
    torch.testing.assert_close(got.logits.detach(), expected.logits.detach(), rtol=1e-5, atol=1e-6)
    if phase == 2:
        assert torch.equal(got.group_indices, expected.group_indices)


def test_torch_compile_forward_matches_eager():
    torch._dynamo.reset()
    model = make_model(COMPILE_CASE)
    expected = _run(model)
    _assert_close_prediction(_run(torch.compile(model, backend="aot_eager")), expected, COMPILE_CASE.phase)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("case", PHASES, ids=_ids(PHASES))
def test_torch_compile_training_step_matches_eager(case, backend):
    """One train-mode compile (dropout off): its logits and its gradients match the eager model's."""
    torch._dynamo.reset()
    model = make_model(case).train()
    x, y = pixels(), labels()
    expected = model(pixel_values=x, labels=y)
    expected_grads = _grads(model, case, x, y)
    compiled = torch.compile(model, backend=backend)
    model.zero_grad(set_to_none=True)
    got = compiled(pixel_values=x, labels=y)
    training_loss(got, case.phase).backward()
    _assert_close_prediction(got, expected, case.phase)
    got_grads = parameter_grads(model)  # the compiled module shares the model's parameters
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
