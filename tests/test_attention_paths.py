"""LPTAttention's key/value path: token keys/values projected into the buffer after the prompt rows, no concatenation.

References: `torch.cat` of the prompt rows and `F.linear` of the tokens (what the layer computed before), autograd's
numerical gradient, the frozen ViT's own operator counts, and the plain LayerNorm/Linear modules for the fallbacks.
"""

import pytest
import torch
import torch.nn.functional as F
from testing_utils import TEST_CASES, make_model, pixels
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lpt_peft import LPTAttention
from lpt_peft.tuner.layer import _compute_dtype, _pad_attention_mask, _ProjectAfterPrompts
from lpt_peft.tuner.model import check_labels


def _reference(tokens, weight, bias, *prompt_rows):
    batch = tokens.shape[0]
    return torch.cat([rows.expand(batch, -1, -1) for rows in prompt_rows] + [F.linear(tokens, weight, bias)], dim=1)


@pytest.mark.parametrize("with_bias", [True, False])
def test_project_after_prompts_equals_cat_and_has_its_gradient(with_bias):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 5, 4, dtype=torch.double, generator=gen, requires_grad=True)
    weight = torch.randn(6, 4, dtype=torch.double, generator=gen, requires_grad=True)
    bias = torch.randn(6, dtype=torch.double, generator=gen, requires_grad=True) if with_bias else None
    shared = torch.randn(1, 2, 6, dtype=torch.double, generator=gen, requires_grad=True)  # broadcast over the batch
    group = torch.randn(3, 3, 6, dtype=torch.double, generator=gen, requires_grad=True)  # one per image
    args = (tokens, weight, bias, shared, group)
    torch.testing.assert_close(_ProjectAfterPrompts.apply(*args), _reference(*args), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(_ProjectAfterPrompts.apply, args)
    # The gradient of a weighted sum equals the concatenation's, input by input.
    probe = torch.randn(3, 10, 6, dtype=torch.double, generator=gen)
    inputs = [a for a in args if a is not None]
    ours = torch.autograd.grad((_ProjectAfterPrompts.apply(*args) * probe).sum(), inputs)
    expected = torch.autograd.grad((_reference(*args) * probe).sum(), inputs)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def _saved_bytes(fn, *args) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of `fn(*args)` (saved-tensor hooks)."""
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn(*args)
    return out, sum(saved.values())


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen_projection", "trainable_projection"])
def test_project_after_prompts_saves_no_more_than_linear_and_cat(frozen):
    """Peak training memory: with a frozen projection (every LPT phase) the tokens must not be kept for the backward
    (F.linear does not keep them either); with a trainable one, the same tensors as F.linear. Gradients stay exact."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(4, 9, 8, dtype=torch.double, generator=gen)  # a frozen layer's normed input: no grad
    weight = torch.randn(8, 8, dtype=torch.double, generator=gen, requires_grad=not frozen)
    bias = torch.randn(8, dtype=torch.double, generator=gen, requires_grad=not frozen)
    shared = torch.randn(1, 2, 8, dtype=torch.double, generator=gen, requires_grad=True)
    args = (tokens, weight, bias, shared)
    ours, our_bytes = _saved_bytes(_ProjectAfterPrompts.apply, *args)
    reference, reference_bytes = _saved_bytes(_reference, *args)
    assert our_bytes <= reference_bytes, f"saved {our_bytes} bytes for backward, linear + cat {reference_bytes}"
    if frozen:
        assert our_bytes == 0
    inputs = [a for a in args if a.requires_grad]
    probe = torch.randn(4, 11, 8, dtype=torch.double, generator=gen)
    for got, want in zip(
        torch.autograd.grad((ours * probe).sum(), inputs),
        torch.autograd.grad((reference * probe).sum(), inputs),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(_ProjectAfterPrompts.apply, args)


def _cat_count(model, x) -> int:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(pixel_values=x)
    return sum(event.count for event in prof.key_averages() if event.key == "aten::cat")


@pytest.mark.parametrize("case", [c for c in TEST_CASES if c.model_cls.__name__ == "ViTModel"], ids=lambda c: c.id)
def test_no_concatenation_beyond_the_frozen_backbone(case):
    """The CPU profiler sees as many `aten::cat` calls in an LPT forward as in the frozen ViT (its embeddings' CLS)."""
    model, x = make_model(case), pixels()
    lpt = _cat_count(model, x)
    with model.disable_adapter():
        frozen = _cat_count(model, x)
    assert lpt == frozen, f"LPT forward has {lpt} aten::cat calls, the frozen ViT {frozen}"


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_padded_attention_mask_lets_every_query_see_the_prompts(dtype):
    mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    mask = mask if dtype == torch.bool else torch.where(mask, 0.0, torch.finfo(dtype).min)
    pad_value = True if dtype == torch.bool else 0.0
    expected = torch.cat([torch.full((2, 1, 5, 3), pad_value, dtype=dtype), mask], dim=-1)
    assert torch.equal(_pad_attention_mask(mask, 3), expected)
    assert _pad_attention_mask(None, 3) is None


class _WrappedLinear(nn.Linear):
    """A Linear subclass (as a quantised or hooked projection would be): takes the generic path."""


def test_wrapped_projection_takes_the_concatenating_path_with_equal_logits():
    case = next(c for c in TEST_CASES if c.phase == 2 and c.attn == "sdpa")
    model, x = make_model(case), pixels()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
        for layer in [m for m in model.modules() if isinstance(m, LPTAttention)]:
            attention = layer.base_layer
            for name in (layer.attention_spec.key_attr, layer.attention_spec.value_attr):
                plain = getattr(attention, name)
                wrapped = _WrappedLinear(plain.in_features, plain.out_features)
                wrapped.load_state_dict(plain.state_dict())
                setattr(attention, name, wrapped)
        got = model(pixel_values=x).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_autocast_gives_the_dtype_and_values_of_f_linear():
    tokens, linear = torch.randn(2, 5, 8), nn.Linear(8, 8)
    prompts = torch.randn(1, 3, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _reference(tokens, linear.weight, linear.bias, prompts)
        dtype = _compute_dtype(tokens)
        got = _ProjectAfterPrompts.apply(
            tokens.to(dtype), linear.weight.to(dtype), linear.bias.to(dtype), prompts.to(dtype)
        )
    assert got.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-2)


def test_check_labels_names_the_bad_label_on_cpu():
    check_labels(torch.tensor([0, 2]), 3)
    check_labels(torch.tensor([], dtype=torch.long), 3)
    with pytest.raises(ValueError, match="Label -1 is out of range for num_labels=3 \\(valid: 0..2\\)"):
        check_labels(torch.tensor([-1, 0]), 3)
    with pytest.raises(ValueError, match="Label 3 is out of range for num_labels=3"):
        check_labels(torch.tensor([3, 0]), 3)


def test_check_labels_does_not_read_device_labels(monkeypatch):
    """Off the CPU the check is queued with `torch._assert_async` (no `.item()`/`int()` sync); its message is clear."""
    calls = []
    monkeypatch.setattr(torch, "_assert_async", lambda cond, msg: calls.append((cond, msg)))
    labels = torch.tensor([0, 5], device="meta")
    check_labels(labels, 3)
    assert len(calls) == 1 and "num_labels=3 (valid: 0..2)" in calls[0][1]
    assert calls[0][0].device.type == "meta"  # stayed on the device: nothing was copied to the host


@pytest.mark.parametrize("phase", [1, 2])
def test_torch_compile_equals_eager_and_compiles_once(phase):
    """`torch.compile(model)` (default mode; 10-15 s per phase on 2 cores): logits equal eager to 1e-5, one graph,
    no recompilation when phase 2's per-image group choice changes from batch to batch (the choice is data, not a
    guard)."""
    from torch._dynamo.utils import counters

    case = next(c for c in TEST_CASES if c.phase == phase and c.attn == "sdpa" and c.model_cls.__name__ == "ViTModel")
    model, x = make_model(case), pixels()
    keys = model.base_model.lpt_keys["default"]
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    choices = []
    for shift in range(3):
        with torch.no_grad():
            if shift:  # a different group choice for the same images
                keys.copy_(keys.roll(1, dims=0))
            expected = model(pixel_values=x)
            got = compiled(pixel_values=x)
        torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)
        if phase == 2:
            assert torch.equal(got.group_indices, expected.group_indices)
            choices.append(expected.group_indices.tolist())
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["graph_break"])
    if phase == 2:
        assert len({str(c) for c in choices}) == 3, choices  # the test really changed the choice each time
