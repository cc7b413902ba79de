"""LPTAttention's key/value path: token keys/values projected into the buffer after the prompt rows, no concatenation.

References: `torch.cat` of the prompt rows and `F.linear` of the tokens (what the layer computed before), autograd's
numerical gradient, the frozen ViT's own operator counts, and the plain LayerNorm/Linear modules for the fallbacks.
"""

import pytest
import torch
import torch.nn.functional as F
from testing_utils import TEST_CASES, labels, make_model, pixels, training_loss
from torch import nn
from torch.profiler import ProfilerActivity, profile

import lpt_peft.tuner.layer as layer_module
from lpt_peft import LPTAttention
from lpt_peft.tuner.layer import _compute_dtype, _num_null_keys, _pad_attention_mask, _ProjectAfterPrompts
from lpt_peft.tuner.model import check_labels


def _reference(tokens, weight, bias, *prompt_rows):
    batch = tokens.shape[0]
    return torch.cat([rows.expand(batch, -1, -1) for rows in prompt_rows] + [F.linear(tokens, weight, bias)], dim=1)


@pytest.fixture(params=["project_then_copy", "batched_out"])
def projection_path(request, monkeypatch):
    """Both ways the Function writes the token rows: `F.linear` + copy (CPU) and the batched matmul into the strided
    rows (accelerators), each forced here on CPU."""
    devices = ("cpu",) if request.param == "project_then_copy" else ()
    monkeypatch.setattr(layer_module, "_PROJECT_THEN_COPY_DEVICES", devices)
    return request.param


@pytest.mark.parametrize("with_bias", [True, False])
def test_project_after_prompts_equals_cat_and_has_its_gradient(with_bias, projection_path):
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
def test_project_after_prompts_saves_no_more_than_linear_and_cat(frozen, projection_path):
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


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_padded_attention_mask_shuts_out_the_null_keys(dtype):
    mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    mask = mask if dtype == torch.bool else torch.where(mask, 0.0, torch.finfo(dtype).min)
    null_value, prompt_value = (False, True) if dtype == torch.bool else (torch.finfo(dtype).min, 0.0)
    expected = torch.cat(
        [torch.full((2, 1, 5, 2), null_value, dtype=dtype), torch.full((2, 1, 5, 3), prompt_value, dtype=dtype), mask],
        dim=-1,
    )
    assert torch.equal(_pad_attention_mask(mask, 3, num_null=2), expected)
    with pytest.raises(ValueError, match="Null keys need an attention mask"):
        _pad_attention_mask(None, 3, num_null=2)


def test_null_keys_round_cpu_sdpa_key_lengths_up_to_a_multiple_of_16():
    tokens = torch.empty(2, 50, 8)
    assert _num_null_keys("sdpa", tokens, 10) == 4  # phase 1: 10 + 50 = 60 keys -> 64
    assert _num_null_keys("sdpa", tokens, 20) == 10  # phase 2's main tail: 70 -> 80
    assert _num_null_keys("sdpa", tokens, 14) == 0  # already 64
    assert _num_null_keys("eager", tokens, 10) == 0  # the eager path gets the keys as they are
    assert _num_null_keys("sdpa", torch.empty(2, 50, 8, device="meta"), 10) == 0  # off CPU: no mask, no null keys


def test_no_null_keys_where_they_would_change_or_slow_something(monkeypatch):
    tokens = torch.empty(2, 50, 8)
    assert _num_null_keys("sdpa", tokens, 10, dropout=0.1) == 0  # another random stream, and slower
    assert _num_null_keys("sdpa", tokens.double(), 10) == 0  # float64: no faster
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the dtype the kernel computes in is what counts
        assert _num_null_keys("sdpa", tokens.double(), 10) == 4
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)  # exported graphs run anywhere
    assert _num_null_keys("sdpa", tokens, 10) == 0
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: False)
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    assert _num_null_keys("sdpa", tokens, 10) == 0


@pytest.mark.parametrize("case", [c for c in TEST_CASES if c.attn == "sdpa"], ids=lambda c: c.id)
def test_null_keys_keep_a_padding_mask(case, monkeypatch):
    """With a real padding mask the null columns are added to it, not put in its place: the logits equal those of the
    unpadded key sequence, and the mask matters (the padded image's logits differ from the unmasked run)."""
    mask = torch.ones(4, (16 // 4) ** 2 + 1, dtype=torch.long)
    mask[1, 5:] = 0

    def logits(multiple, attention_mask):
        monkeypatch.setattr(layer_module, "_CPU_SDPA_KEY_MULTIPLE", multiple)
        with torch.no_grad():
            return make_model(case).eval()(pixel_values=pixels(), attention_mask=attention_mask).logits

    expected = logits(0, mask)
    torch.testing.assert_close(logits(16, mask), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(logits(16, None)[1], expected[1], atol=1e-4)


@pytest.mark.parametrize("case", [c for c in TEST_CASES if c.attn == "sdpa"], ids=lambda c: c.id)
def test_null_keys_reach_sdpa_masked_and_change_nothing(case, monkeypatch):
    """On CPU SDPA every key sequence is a multiple of 16 long, the extra keys are masked out, and logits and every
    trainable gradient equal those of the unpadded key sequence (the reference: no null keys) to 1e-6."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, **kwargs):
        seen.append((key.shape[-2], attn_mask))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    def run(multiple):
        monkeypatch.setattr(layer_module, "_CPU_SDPA_KEY_MULTIPLE", multiple)
        model = make_model(case)
        output = model(pixel_values=pixels(), labels=labels())
        loss = training_loss(output, case.phase)
        trainable = [p for p in model.parameters() if p.requires_grad]
        return output.logits.detach(), torch.autograd.grad(loss, trainable)

    expected_logits, expected_grads = run(0)
    with monkeypatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", spy)
        logits, grads = run(16)
    assert seen and all(length % 16 == 0 for length, _ in seen)
    for length, mask in seen:
        assert mask is not None and mask.dtype == torch.bool and mask.shape[-1] == length
        rows = mask.reshape(-1, length)
        row = rows[0]
        num_null = int((~row).sum())
        # The null keys come first (fewer than 16 of them); prompts and tokens after them are all visible.
        assert num_null < 16 and not row[:num_null].any() and row[num_null:].all()
        assert torch.equal(rows, row.expand_as(rows))
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


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
