import math

import pytest
import torch

from lpt_peft.training.losses import (
    AGCLLoss,
    LogitAdjustedCrossEntropyLoss,
    LPTObjective,
    ScaledCrossEntropyLoss,
    build_loss,
    dual_sampling_beta,
)

COUNTS = [500, 120, 40, 9, 2]


def reference_agcl(
    cosines, labels, counts, noise, gamma_pos, gamma_neg, label_smoothing=0.1, noise_scale=0.5, margin=0.1, scale=20.0
):
    """A-GCL written out with plain Python loops over samples and classes (float64 math)."""
    log_counts = [math.log(n) for n in counts]
    gaps = [max(log_counts) - value for value in log_counts]
    w = [gap / max(gaps) if max(gaps) > 0 else 0.0 for gap in gaps]
    num_classes = len(counts)
    total = 0.0
    for b in range(len(labels)):
        y = int(labels[b])
        z = []
        for j in range(num_classes):
            c = float(cosines[b][j]) - noise_scale * abs(float(noise[b][j])) * w[j]
            if j == y:
                c -= margin
            z.append(scale * c)
        top = max(z)
        lse = top + math.log(sum(math.exp(v - top) for v in z))
        loss_b = 0.0
        for j in range(num_classes):
            log_p = z[j] - lse
            p = math.exp(log_p)
            t = (1 - label_smoothing) * (j == y) + label_smoothing / num_classes
            weight = (1 - p) ** gamma_pos if j == y else p**gamma_neg
            loss_b -= t * weight * log_p
        total += loss_b
    return total / len(labels)


def make_batch(batch_size=6, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    cosines = (torch.rand(batch_size, num_classes, generator=g, dtype=torch.float64) * 2 - 1) * 0.6
    labels = torch.randint(num_classes, (batch_size,), generator=g)
    noise = (torch.randn(batch_size, num_classes, generator=g, dtype=torch.float64) / 3).clamp(-1, 1)
    return cosines, labels, noise


@pytest.mark.parametrize("gammas", [(0.0, 4.0), (0.5, 8.0)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_agcl_matches_closed_form(gammas, label_smoothing):
    cosines, labels, noise = make_batch()
    loss_fn = AGCLLoss(COUNTS, gamma_pos=gammas[0], gamma_neg=gammas[1], label_smoothing=label_smoothing)
    got = loss_fn(cosines, labels, noise=noise)
    want = reference_agcl(cosines.tolist(), labels.tolist(), COUNTS, noise.tolist(), *gammas, label_smoothing)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_agcl_presets_and_build_loss_branches():
    cosines, labels, noise = make_batch(seed=1)
    cb = AGCLLoss.class_balanced(COUNTS)
    ib = AGCLLoss.instance_balanced(COUNTS)
    assert (cb.gamma_pos, cb.gamma_neg) == (0.0, 4.0)
    assert (ib.gamma_pos, ib.gamma_neg) == (0.5, 8.0)
    for branch, gammas in [("class_balanced", (0.0, 4.0)), ("instance_balanced", (0.5, 8.0))]:
        loss_fn = build_loss("agcl", COUNTS, branch=branch)
        want = reference_agcl(cosines.tolist(), labels.tolist(), COUNTS, noise.tolist(), *gammas)
        assert loss_fn(cosines, labels, noise=noise).item() == pytest.approx(want, rel=1e-10)
    # Explicit exponents override the branch preset.
    assert build_loss("agcl", COUNTS, branch="instance_balanced", gamma_neg=2.0).gamma_neg == 2.0
    assert isinstance(build_loss("CE", COUNTS), ScaledCrossEntropyLoss)
    assert isinstance(build_loss("logit-adjusted", COUNTS), LogitAdjustedCrossEntropyLoss)


def test_agcl_noise_weights_and_equal_counts():
    loss_fn = AGCLLoss([1000, 100, 10])
    # log-linear in the count: head 0, tail 1, the middle class halfway.
    torch.testing.assert_close(loss_fn.noise_weights, torch.tensor([0.0, 0.5, 1.0]))
    equal = AGCLLoss([7, 7, 7])
    assert torch.equal(equal.noise_weights, torch.zeros(3))
    cosines, labels, noise = make_batch(num_classes=3, seed=2)
    got = equal(cosines, labels, noise=noise)
    want = reference_agcl(cosines.tolist(), labels.tolist(), [7, 7, 7], [[0.0] * 3] * 6, 0.0, 4.0)
    assert torch.isfinite(got) and got.item() == pytest.approx(want, rel=1e-10)


def _detached_agcl(cosines, labels, counts, noise, gamma_pos, gamma_neg, label_smoothing=0.1):
    """Same loss but with the asymmetric weights detached (the variant A-GCL must NOT be)."""
    counts = torch.tensor(counts, dtype=torch.float64)
    gaps = counts.log().max() - counts.log()
    w = gaps / gaps.max()
    onehot = torch.nn.functional.one_hot(labels, counts.numel()).double()
    z = 20.0 * (cosines - 0.5 * noise.abs() * w - 0.1 * onehot)
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp().detach()
    weights = onehot * (1 - p) ** gamma_pos + (1 - onehot) * p**gamma_neg
    targets = (1 - label_smoothing) * onehot + label_smoothing / counts.numel()
    return -(targets * weights * log_p).sum(-1).mean()


@pytest.mark.parametrize("gammas", [(0.0, 4.0), (0.5, 8.0)])
def test_agcl_weights_are_not_detached(gammas):
    cosines, labels, noise = make_batch(seed=3)
    cosines = cosines * 0.2  # soft predictions, so the weights matter
    x = cosines.clone().requires_grad_(True)
    AGCLLoss(COUNTS, *gammas)(x, labels, noise=noise).backward()
    x_detached = cosines.clone().requires_grad_(True)
    _detached_agcl(x_detached, labels, COUNTS, noise, *gammas).backward()
    assert (x.grad - x_detached.grad).abs().max() > 1e-3

    # The gradient is the one of the closed form: central differences of the loop reference.
    eps = 1e-6
    numeric = torch.zeros_like(cosines)
    for b in range(cosines.shape[0]):
        for j in range(cosines.shape[1]):
            plus, minus = cosines.clone(), cosines.clone()
            plus[b, j] += eps
            minus[b, j] -= eps
            f_plus = reference_agcl(plus.tolist(), labels.tolist(), COUNTS, noise.tolist(), *gammas)
            f_minus = reference_agcl(minus.tolist(), labels.tolist(), COUNTS, noise.tolist(), *gammas)
            numeric[b, j] = (f_plus - f_minus) / (2 * eps)
    torch.testing.assert_close(x.grad, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gammas", [(0.0, 4.0), (0.5, 8.0)])
def test_agcl_gradcheck(gammas):
    cosines, labels, noise = make_batch(batch_size=3, num_classes=4, seed=4)
    loss_fn = AGCLLoss([50, 20, 5, 1], *gammas)
    x = (cosines * 0.3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: loss_fn(c, labels, noise=noise), (x,))


def test_logit_adjusted_gradcheck():
    cosines, labels, _ = make_batch(batch_size=3, num_classes=4, seed=5)
    loss_fn = LogitAdjustedCrossEntropyLoss([50, 20, 5, 1], tau=1.0, scale=5.0)
    x = cosines.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: loss_fn(c, labels), (x,))


def test_agcl_random_noise_is_seeded_fresh_and_clamped():
    cosines, labels, _ = make_batch(seed=6)

    def loss_with_seed(seed):
        return AGCLLoss(COUNTS, generator=torch.Generator().manual_seed(seed))(cosines, labels)

    assert loss_with_seed(0).item() == loss_with_seed(0).item()
    assert loss_with_seed(0).item() != loss_with_seed(1).item()

    # A fresh delta per call: the second call of the same loss differs from the first.
    loss_fn = AGCLLoss(COUNTS, generator=torch.Generator().manual_seed(0))
    assert loss_fn(cosines, labels).item() != loss_fn(cosines, labels).item()

    # The noise changes the loss exactly like the fixed-noise reference of the same draw.
    seeded = AGCLLoss(COUNTS, generator=torch.Generator().manual_seed(3))
    delta = AGCLLoss(COUNTS, generator=torch.Generator().manual_seed(3)).sample_noise(cosines)
    want = reference_agcl(cosines.tolist(), labels.tolist(), COUNTS, delta.tolist(), 0.0, 4.0)
    assert seeded(cosines, labels).item() == pytest.approx(want, rel=1e-10)

    # A huge std saturates the clamp: every |delta| is 1, so the loss equals the one with all-ones noise.
    wide = AGCLLoss(COUNTS, noise_std=1e6, generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(cosines)
    assert wide(cosines, labels).item() == pytest.approx(wide(cosines, labels, noise=ones).item(), rel=1e-12)


def test_agcl_noise_distribution():
    loss_fn = AGCLLoss(COUNTS, generator=torch.Generator().manual_seed(0))
    delta = loss_fn.sample_noise(torch.zeros(400, 500))
    assert delta.dtype == torch.float32 and delta.shape == (400, 500)
    assert delta.abs().max() <= 1.0
    assert abs(delta.mean().item()) < 0.005
    assert delta.std().item() == pytest.approx(1 / 3, rel=0.02)
    # 3 sigma: about 0.27% of the Gaussian mass lies beyond the clamp.
    assert (delta.abs() == 1.0).float().mean().item() == pytest.approx(0.0027, abs=0.001)
    assert loss_fn.sample_noise(torch.zeros(2, 5, dtype=torch.float64)).dtype == torch.float64


def test_agcl_half_precision_is_computed_in_float32():
    cosines, labels, noise = make_batch(seed=7)
    loss_fn = AGCLLoss(COUNTS)
    got = loss_fn(cosines.bfloat16(), labels, noise=noise.bfloat16())
    want = loss_fn(cosines.bfloat16().double(), labels, noise=noise.bfloat16().double())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_agcl_saturated_prediction_has_finite_gradient():
    # p_y rounds to 1 in float32: (1 - p_y) ** 0.5 must not give 0 * inf = nan in the backward pass.
    x = torch.tensor([[1.0, -1.0, -1.0]], requires_grad=True)
    loss = AGCLLoss([10, 10, 10], gamma_pos=0.5, gamma_neg=8.0)(x, torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_buffers_follow_the_module():
    loss_fn = AGCLLoss(COUNTS)
    assert set(dict(loss_fn.named_buffers())) == {"class_counts"}
    assert loss_fn.class_counts.tolist() == COUNTS
    assert "class_counts" in loss_fn.state_dict()
    assert loss_fn.to(torch.float64).class_counts.dtype == torch.float64
    assert set(dict(LogitAdjustedCrossEntropyLoss(COUNTS).named_buffers())) == {"class_counts"}


def test_scaled_cross_entropy_hand_computed():
    logits, labels = torch.tensor([[0.5, -0.5]]), torch.tensor([0])
    # z = (1, -1): loss = log(1 + e^-2)
    assert ScaledCrossEntropyLoss(scale=2.0)(logits, labels).item() == pytest.approx(math.log1p(math.exp(-2)))
    # default scale 20, in float64 to resolve the tiny value: log(1 + e^-20)
    default = ScaledCrossEntropyLoss()(logits.double(), labels).item()
    assert default == pytest.approx(math.log1p(math.exp(-20)), rel=1e-9)
    # scale 1 (linear head): z = (0.5, -0.5)
    assert ScaledCrossEntropyLoss(scale=1.0)(logits, labels).item() == pytest.approx(math.log1p(math.exp(-1)))
    # label smoothing 0.2 over 2 classes: targets (0.9, 0.1)
    log_p0, log_p1 = -math.log1p(math.exp(-1)), -1 - math.log1p(math.exp(-1))
    smoothed = ScaledCrossEntropyLoss(scale=1.0, label_smoothing=0.2)(logits, labels).item()
    assert smoothed == pytest.approx(-(0.9 * log_p0 + 0.1 * log_p1))
    # noise is accepted and ignored
    with_noise = ScaledCrossEntropyLoss(scale=2.0)(logits, labels, noise=torch.ones(1, 2)).item()
    assert with_noise == pytest.approx(math.log1p(math.exp(-2)))


def test_logit_adjusted_hand_computed():
    logits, labels = torch.tensor([[0.1, 0.3], [0.4, -0.2]]), torch.tensor([1, 0])
    loss_fn = LogitAdjustedCrossEntropyLoss([3, 1], tau=1.0, scale=2.0)
    # prior (0.75, 0.25): z = 2 * logits + log prior
    z1 = (0.2 + math.log(0.75), 0.6 + math.log(0.25))
    z2 = (0.8 + math.log(0.75), -0.4 + math.log(0.25))
    want1 = -(z1[1] - math.log(math.exp(z1[0]) + math.exp(z1[1])))
    want2 = -(z2[0] - math.log(math.exp(z2[0]) + math.exp(z2[1])))
    assert loss_fn(logits, labels).item() == pytest.approx((want1 + want2) / 2, rel=1e-6)
    # tau = 0 is plain scaled cross-entropy
    plain = LogitAdjustedCrossEntropyLoss([3, 1], tau=0.0, scale=2.0)(logits, labels)
    assert plain.item() == pytest.approx(ScaledCrossEntropyLoss(scale=2.0)(logits, labels).item(), rel=1e-6)
    # tau = 2 doubles the adjustment
    z = (0.2 + 2 * math.log(0.75), 0.6 + 2 * math.log(0.25))
    want = -(z[1] - math.log(math.exp(z[0]) + math.exp(z[1])))
    got = LogitAdjustedCrossEntropyLoss([3, 1], tau=2.0, scale=2.0)(logits[:1], labels[:1])
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_dual_sampling_beta():
    assert dual_sampling_beta(0, 90) == 0.5
    assert dual_sampling_beta(45, 90) == 0.25
    assert dual_sampling_beta(89, 90) == pytest.approx(0.5 / 90)
    assert dual_sampling_beta(0, 1) == 0.5
    assert dual_sampling_beta(2, 4, eta=1.0) == 0.5
    for epoch, num_epochs in [(90, 90), (-1, 90), (0, 0)]:
        with pytest.raises(ValueError, match="epoch"):
            dual_sampling_beta(epoch, num_epochs)


def test_lpt_objective_matches_formula():
    cb_x, cb_y, cb_noise = make_batch(seed=8)
    ib_x, ib_y, ib_noise = make_batch(seed=9)
    objective = LPTObjective(COUNTS, num_epochs=10)
    s_cb = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    s_ib = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    epoch = 3
    out = objective(cb_x, cb_y, ib_x, ib_y, epoch, s_cb, s_ib, cb_noise=cb_noise, ib_noise=ib_noise)

    loss_cb = reference_agcl(cb_x.tolist(), cb_y.tolist(), COUNTS, cb_noise.tolist(), 0.0, 4.0)
    loss_ib = reference_agcl(ib_x.tolist(), ib_y.tolist(), COUNTS, ib_noise.tolist(), 0.5, 8.0)
    beta = 0.5 * (10 - 3) / 10
    assert out["loss"].item() == pytest.approx(loss_cb - 0.5 * 1.3 + beta * (loss_ib - 0.5 * 0.7), rel=1e-10)
    assert out["loss_cb"].item() == pytest.approx(loss_cb, rel=1e-10)
    assert out["loss_ib"].item() == pytest.approx(loss_ib, rel=1e-10)
    assert out["match_cb"].item() == 1.3 and out["match_ib"].item() == 0.7
    assert out["beta"].item() == pytest.approx(beta)
    for key in ("loss_cb", "loss_ib", "match_cb", "match_ib", "beta"):
        assert not out[key].requires_grad
    out["loss"].backward()
    assert s_cb.grad.item() == pytest.approx(-0.5)
    assert s_ib.grad.item() == pytest.approx(-0.5 * beta)

    # Phase 1: no match scores, no matching terms.
    phase1 = objective(cb_x, cb_y, ib_x, ib_y, 0, cb_noise=cb_noise, ib_noise=ib_noise)
    assert phase1["loss"].item() == pytest.approx(loss_cb + 0.5 * loss_ib, rel=1e-10)
    assert "match_cb" not in phase1 and "match_ib" not in phase1

    # Single branch: only the class-balanced terms.
    single = objective(cb_x, cb_y, None, None, 5, s_cb, cb_noise=cb_noise)
    assert single["loss"].item() == pytest.approx(loss_cb - 0.5 * 1.3, rel=1e-10)
    assert "loss_ib" not in single

    with pytest.raises(ValueError, match="together"):
        objective(cb_x, cb_y, ib_x, None, 0)
    with pytest.raises(ValueError, match="scalar"):
        objective(cb_x, cb_y, None, None, 0, torch.ones(3))


def test_lpt_objective_with_baseline_loss():
    objective = LPTObjective(COUNTS, num_epochs=4, loss_name="logit_adjusted", matching_weight=1.0, eta=1.0)
    cb_x, cb_y, _ = make_batch(seed=10)
    ib_x, ib_y, _ = make_batch(seed=11)
    la = LogitAdjustedCrossEntropyLoss(COUNTS)
    out = objective(cb_x, cb_y, ib_x, ib_y, 1, torch.tensor(0.4), torch.tensor(0.2))
    want = la(cb_x, cb_y) - 0.4 + 0.75 * (la(ib_x, ib_y) - 0.2)
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)


def test_errors():
    loss_fn = AGCLLoss(COUNTS)
    cosines = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"label 7 .*5 classes"):
        loss_fn(cosines, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match=r"label -1 .*5 classes"):
        ScaledCrossEntropyLoss()(cosines, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"label 5 "):
        LogitAdjustedCrossEntropyLoss(COUNTS)(cosines, torch.tensor([5, 0]))
    with pytest.raises(ValueError, match=r"class_counts\[2\] = 0: class 2 has no training images"):
        AGCLLoss([4, 3, 0, 1])
    with pytest.raises(ValueError, match=r"class 1"):
        build_loss("logit_adjusted", [4, -3, 2])
    with pytest.raises(ValueError, match="shape"):
        loss_fn(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="shape"):
        loss_fn(torch.zeros(5), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        loss_fn(cosines, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="noise"):
        loss_fn(cosines, torch.tensor([0, 1]), noise=torch.zeros(2, 4))
    with pytest.raises(TypeError, match="integer"):
        loss_fn(cosines, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"valid choices are \['agcl', 'ce', 'logit_adjusted'\]"):
        build_loss("focal", COUNTS)
    with pytest.raises(ValueError, match=r"\['class_balanced', 'instance_balanced'\]"):
        build_loss("agcl", COUNTS, branch="balanced")
    with pytest.raises(TypeError, match="tau"):
        build_loss("agcl", COUNTS, tau=1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        AGCLLoss(COUNTS, label_smoothing=1.5)


def test_register_loss_refuses_a_taken_name():
    from lpt_peft.training.losses import LOSSES, AGCLLoss, register_loss

    with pytest.raises(ValueError, match="'agcl' is already registered"):
        register_loss("AGCL")(torch.nn.Identity)
    assert LOSSES["agcl"] is AGCLLoss and list(LOSSES)[:3] == ["agcl", "ce", "logit_adjusted"]
