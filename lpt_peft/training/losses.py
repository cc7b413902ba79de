"""Training objectives for Long-tailed Prompt Tuning (LPT).

The main loss is A-GCL (asymmetric Gaussian-cloud logit loss, Dong et al., ICLR 2023). It takes the *unscaled*
cosines of the LPT cosine classifier; the scale lives in the loss. Two baselines with the same call signature
(:class:`ScaledCrossEntropyLoss`, :class:`LogitAdjustedCrossEntropyLoss`) make the loss switchable from a config via
:func:`build_loss`. :class:`LPTObjective` combines the class-balanced and instance-balanced branches of dual sampling
with the phase-2 key-matching term.

Losses are looked up by name in `LOSSES`; `@register_loss("name")` on a new `nn.Module` class makes it available to
`--loss name` (see docs/extending.md).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LOSSES",
    "AGCLLoss",
    "LPTObjective",
    "LogitAdjustedCrossEntropyLoss",
    "ScaledCrossEntropyLoss",
    "build_loss",
    "dual_sampling_beta",
    "register_loss",
]

# name -> loss class; filled by @register_loss. Every loss is called as `loss(logits, labels, noise=None)`.
LOSSES: dict[str, type[nn.Module]] = {}
BRANCHES = ("class_balanced", "instance_balanced")

# (gamma_pos, gamma_neg) of A-GCL per dual-sampling branch: the paper's values for the class-balanced branch, the
# authors' released code for the instance-balanced branch.
_AGCL_GAMMAS = {"class_balanced": (0.0, 4.0), "instance_balanced": (0.5, 8.0)}


def _loss_key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_loss(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """
    Class decorator: register a per-branch training loss under `name` for [`build_loss`], [`LPTObjective`] and
    `--loss name`.

    The class is called as `loss(logits, labels, noise=None)` with `logits` of shape `(batch_size, num_classes)` (the
    unscaled cosines of the LPT head), `labels` of shape `(batch_size,)`, and returns the scalar batch-mean loss; it
    may ignore `noise`. Its constructor receives the training `class_counts` when it has a `class_counts` parameter,
    and the keyword defaults in the optional class attribute `branch_defaults` (`{"class_balanced": {...},
    "instance_balanced": {...}}`) for the dual-sampling branch it serves.

    Raises:
        ValueError: `name` is already registered (names are case-insensitive, `-` and `_` are the same).

    Example:

    ```python
    >>> @register_loss("my_ce")
    ... class MyCrossEntropy(nn.Module):
    ...     def forward(self, logits, labels, noise=None):
    ...         return F.cross_entropy(20.0 * logits, labels)
    ```
    """
    key = _loss_key(name)

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if key in LOSSES:
            raise ValueError(f"A loss named {key!r} is already registered ({LOSSES[key].__name__}); use another name.")
        LOSSES[key] = cls
        return cls

    return decorator


def _as_class_counts(class_counts: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Validates per-class training counts and returns them as a float64 CPU tensor."""
    if isinstance(class_counts, torch.Tensor):
        counts = class_counts.detach().to("cpu")
    else:
        try:
            counts = torch.as_tensor(class_counts)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(
                f"class_counts must be a 1-D sequence of per-class training image counts, got {type(class_counts)!r}"
            ) from err
    if counts.dtype == torch.bool or counts.is_complex():
        raise TypeError(f"class_counts must be real numbers (images per class), got dtype {counts.dtype}.")
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"class_counts must be a non-empty 1-D sequence (one count per class), got shape {tuple(counts.shape)}."
        )
    counts = counts.to(torch.float64)
    if not torch.isfinite(counts).all():
        bad = torch.nonzero(~torch.isfinite(counts)).flatten().tolist()
        raise ValueError(f"class_counts must be finite; class index(es) {bad[:10]} are not.")
    nonpositive = torch.nonzero(counts <= 0).flatten().tolist()
    if nonpositive:
        first = nonpositive[0]
        more = f" (and {len(nonpositive) - 1} more: {nonpositive[1:10]})" if len(nonpositive) > 1 else ""
        value = counts[first].item()
        problem = "has no training images" if value == 0 else "has a negative image count"
        raise ValueError(
            f"class_counts[{first}] = {value:g}: class {first} {problem}{more}. "
            "Every class needs at least one training image for a long-tailed loss (log n_j is undefined); "
            "drop the class from the label space or fix the training split."
        )
    return counts


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """Checks shapes/dtypes/range of a (logits, labels) pair and returns the labels as int64."""
    if not isinstance(logits, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(
            f"logits and labels must be torch.Tensor, got {type(logits).__name__} and {type(labels).__name__}."
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating point tensor, got dtype {logits.dtype}.")
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (batch_size, num_classes), got shape {tuple(logits.shape)}.")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(
            f"logits have {logits.shape[1]} classes (shape {tuple(logits.shape)}) but the loss was built with "
            f"class_counts for {num_classes} classes; build the loss with the training set's class counts."
        )
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}.")
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must have shape (batch_size,) = ({logits.shape[0]},) to match logits of shape "
            f"{tuple(logits.shape)}, got shape {tuple(labels.shape)}."
        )
    num_classes = logits.shape[1]
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        value = labels[bad][0].item()
        raise ValueError(
            f"label {value} is out of range for {num_classes} classes (valid labels are 0..{num_classes - 1}); "
            "check the label mapping of the data set against the classifier's num_classes."
        )
    return labels.long()


def _check_noise(noise: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor or None, got {type(noise).__name__}.")
    if noise.shape != logits.shape:
        raise ValueError(
            f"noise must have the same shape as the logits {tuple(logits.shape)}, got {tuple(noise.shape)}."
        )
    return noise


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # Half-precision log-softmax at scale 20 loses the tail probabilities that the asymmetric weights act on.
    return torch.promote_types(logits.dtype, torch.float32)


@register_loss("agcl")
class AGCLLoss(nn.Module):
    r"""
    A-GCL: asymmetric Gaussian-cloud logit loss of LPT (Dong et al., ICLR 2023).

    For unscaled cosines `c` of shape `(B, C)`, labels `y` and training class counts `n`:

    1. `w_j = (log n_max - log n_j) / max_i (log n_max - log n_i)` (0 for all classes if all counts are equal),
    2. `delta ~ Normal(0, noise_std)` clamped to `[-1, 1]`, per sample and class, freshly drawn every call,
    3. `c' = c - noise_scale * |delta| * w`, then `c'_y -= margin`, `z = scale * c'`, `p = softmax(z)`,
    4. weights `(1 - p_y) ** gamma_pos` on the target and `p_j ** gamma_neg` on the others (not detached),
       soft targets `t = (1 - label_smoothing) * onehot(y) + label_smoothing / C`,
    5. `loss_b = -sum_j t_j * weight_j * log p_j`, averaged over the batch.

    Tail classes (large `w_j`) get their logits pushed down by a random amount during training, so the head must
    give them a larger margin ("Gaussian cloud"); the asymmetric weights down-weight easy negatives.

    Args:
        class_counts (`Sequence[float]` or `torch.Tensor`):
            Number of training images per class, all > 0.
        gamma_pos (`float`, defaults to 0.0): Focusing exponent of the target term.
        gamma_neg (`float`, defaults to 4.0): Focusing exponent of the non-target terms.
        noise_scale (`float`, defaults to 0.5): Amplitude of the Gaussian-cloud perturbation.
        noise_std (`float`, defaults to 1/3): Standard deviation of `delta` before clamping.
        margin (`float`, defaults to 0.1): Cosine margin subtracted from the target logit.
        scale (`float`, defaults to 20.0): Logit scale (inverse temperature) applied after the perturbation.
        label_smoothing (`float`, defaults to 0.1): Label smoothing in `[0, 1]`.
        generator (`torch.Generator`, *optional*):
            Source of the random `delta`; the noise is drawn on the generator's device and moved to the logits'
            device. Defaults to the global RNG on the logits' device.

    Example:

    ```python
    >>> import torch
    >>> from lpt_peft.training.losses import AGCLLoss
    >>> loss_fn = AGCLLoss.class_balanced([500, 50, 5], generator=torch.Generator().manual_seed(0))
    >>> cosines = torch.tensor([[0.9, 0.1, -0.2], [0.0, 0.3, 0.8]], requires_grad=True)
    >>> loss = loss_fn(cosines, torch.tensor([0, 2]))
    >>> loss.backward()
    ```

    Inputs in float16/bfloat16 are computed in float32; the returned loss is float32 then.
    """

    # Exponents per dual-sampling branch, used by build_loss (explicit gamma_pos/gamma_neg override them).
    branch_defaults = {
        branch: {"gamma_pos": gammas[0], "gamma_neg": gammas[1]} for branch, gammas in _AGCL_GAMMAS.items()
    }

    def __init__(
        self,
        class_counts: Sequence[float] | torch.Tensor,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        noise_scale: float = 0.5,
        noise_std: float = 1.0 / 3.0,
        margin: float = 0.1,
        scale: float = 20.0,
        label_smoothing: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        counts = _as_class_counts(class_counts)
        for name, value in (("gamma_pos", gamma_pos), ("gamma_neg", gamma_neg), ("noise_scale", noise_scale)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
        if not math.isfinite(noise_std) or noise_std < 0:
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}.")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite number > 0, got {scale}.")
        if not math.isfinite(margin):
            raise ValueError(f"margin must be finite, got {margin}.")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}.")

        self.gamma_pos = float(gamma_pos)
        self.gamma_neg = float(gamma_neg)
        self.noise_scale = float(noise_scale)
        self.noise_std = float(noise_std)
        self.margin = float(margin)
        self.scale = float(scale)
        self.label_smoothing = float(label_smoothing)
        self.generator = generator

        # float32 holds integer counts exactly; the weights are derived per call in the logits' precision.
        self.register_buffer("class_counts", counts.to(torch.float32))

    @classmethod
    def class_balanced(cls, class_counts: Sequence[float] | torch.Tensor, **kwargs: Any) -> AGCLLoss:
        """A-GCL with the paper's exponents (`gamma_pos=0`, `gamma_neg=4`), used on the class-balanced branch."""
        gamma_pos, gamma_neg = _AGCL_GAMMAS["class_balanced"]
        return cls(class_counts, **{"gamma_pos": gamma_pos, "gamma_neg": gamma_neg, **kwargs})

    @classmethod
    def instance_balanced(cls, class_counts: Sequence[float] | torch.Tensor, **kwargs: Any) -> AGCLLoss:
        """A-GCL with the authors' code exponents (`gamma_pos=0.5`, `gamma_neg=8`) for the instance-balanced branch."""
        gamma_pos, gamma_neg = _AGCL_GAMMAS["instance_balanced"]
        return cls(class_counts, **{"gamma_pos": gamma_pos, "gamma_neg": gamma_neg, **kwargs})

    @property
    def num_classes(self) -> int:
        return self.class_counts.numel()

    @property
    def noise_weights(self) -> torch.Tensor:
        """Per-class perturbation weights `w_j` in [0, 1] (0 for the largest class, 1 for the smallest)."""
        return self._noise_weights(torch.float32)

    def _noise_weights(self, dtype: torch.dtype) -> torch.Tensor:
        log_counts = self.class_counts.to(dtype).log()
        log_gap = log_counts.max() - log_counts
        # All-equal counts: no class is a tail class, so no perturbation (and no 0/0).
        return log_gap / log_gap.max().clamp_min(torch.finfo(dtype).tiny)

    def sample_noise(self, logits: torch.Tensor) -> torch.Tensor:
        """Draws `delta ~ Normal(0, noise_std)` clamped to `[-1, 1]` with the shape/device/dtype of `logits`."""
        if self.generator is None:
            delta = torch.randn(logits.shape, device=logits.device, dtype=torch.float32)
        else:
            delta = torch.randn(logits.shape, generator=self.generator, device=self.generator.device)
        return (delta * self.noise_std).clamp_(-1.0, 1.0).to(device=logits.device, dtype=logits.dtype)

    def forward(
        self, cosine_logits: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            cosine_logits (`torch.Tensor` of shape `(batch_size, num_classes)`): Unscaled cosines in [-1, 1].
            labels (`torch.Tensor` of shape `(batch_size,)`): Integer class indices.
            noise (`torch.Tensor` of shape `(batch_size, num_classes)`, *optional*):
                Used as `delta` as is (no clamping), instead of a random draw; for tests and ablations.

        Returns:
            `torch.Tensor`: the scalar batch-mean loss.
        """
        labels = _check_inputs(cosine_logits, labels, self.num_classes)
        dtype = _compute_dtype(cosine_logits)
        cosines = cosine_logits.to(dtype)
        delta = self.sample_noise(cosines) if noise is None else _check_noise(noise, cosines).to(cosines)

        perturbed = cosines - self.noise_scale * delta.abs() * self._noise_weights(dtype)
        target_mask = F.one_hot(labels, self.num_classes).to(torch.bool)
        perturbed = perturbed - self.margin * target_mask.to(dtype)
        log_probs = F.log_softmax(self.scale * perturbed, dim=-1)

        log_p_target = log_probs.gather(1, labels[:, None])
        # 1 - p_y via expm1 keeps precision near p_y = 1; the floor keeps the gradient of x ** 0.5 finite at x = 0
        # (where the loss term is 0 anyway).
        one_minus_p_target = (-torch.expm1(log_p_target)).clamp_min(torch.finfo(dtype).tiny)
        target_weight = one_minus_p_target.pow(self.gamma_pos)
        # p_j ** gamma as exp(gamma * log p_j): no 0 ** gamma and no underflowing probabilities in the graph.
        non_target_weight = torch.exp(self.gamma_neg * log_probs)
        weights = torch.where(target_mask, target_weight, non_target_weight)

        targets = torch.full_like(log_probs, self.label_smoothing / self.num_classes)
        targets = targets + (1.0 - self.label_smoothing) * target_mask.to(dtype)
        return -(targets * weights * log_probs).sum(dim=-1).mean()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, "
            f"noise_scale={self.noise_scale}, noise_std={self.noise_std:.4g}, margin={self.margin}, "
            f"scale={self.scale}, label_smoothing={self.label_smoothing}"
        )


@register_loss("ce")
class ScaledCrossEntropyLoss(nn.Module):
    """
    Cross-entropy on `scale * logits`: the plain baseline for a cosine head (use `scale=1.0` for a linear head).

    Args:
        scale (`float`, defaults to 20.0): Logit scale (inverse temperature).
        label_smoothing (`float`, defaults to 0.0): Label smoothing in `[0, 1]`.

    Example:

    ```python
    >>> import torch
    >>> from lpt_peft.training.losses import ScaledCrossEntropyLoss
    >>> loss = ScaledCrossEntropyLoss(scale=20.0)(torch.tensor([[0.5, -0.5]]), torch.tensor([0]))
    ```
    """

    def __init__(self, scale: float = 20.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite number > 0, got {scale}.")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}.")
        self.scale = float(scale)
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """`noise` is accepted and ignored so the loss can replace :class:`AGCLLoss`."""
        labels = _check_inputs(logits, labels, None)
        scaled = self.scale * logits.to(_compute_dtype(logits))
        return F.cross_entropy(scaled, labels, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, label_smoothing={self.label_smoothing}"


@register_loss("logit_adjusted")
class LogitAdjustedCrossEntropyLoss(nn.Module):
    """
    Logit-adjusted cross-entropy (Menon et al., ICLR 2021): cross-entropy on `scale * logits + tau * log(prior)` with
    `prior_j = n_j / sum(n)`. Only the training loss is adjusted; predict with the raw logits.

    Args:
        class_counts (`Sequence[float]` or `torch.Tensor`): Number of training images per class, all > 0.
        tau (`float`, defaults to 1.0): Strength of the adjustment (0 gives plain scaled cross-entropy).
        scale (`float`, defaults to 20.0): Logit scale (use 1.0 for a linear head).

    Example:

    ```python
    >>> import torch
    >>> from lpt_peft.training.losses import LogitAdjustedCrossEntropyLoss
    >>> loss_fn = LogitAdjustedCrossEntropyLoss([100, 10], tau=1.0, scale=20.0)
    >>> loss = loss_fn(torch.tensor([[0.2, 0.4]]), torch.tensor([1]))
    ```
    """

    def __init__(self, class_counts: Sequence[float] | torch.Tensor, tau: float = 1.0, scale: float = 20.0) -> None:
        super().__init__()
        counts = _as_class_counts(class_counts)
        if not math.isfinite(tau):
            raise ValueError(f"tau must be finite, got {tau}.")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a finite number > 0, got {scale}.")
        self.tau = float(tau)
        self.scale = float(scale)
        self.register_buffer("class_counts", counts.to(torch.float32))

    @property
    def num_classes(self) -> int:
        return self.class_counts.numel()

    @property
    def log_prior(self) -> torch.Tensor:
        """`log(n_j / sum(n))`."""
        return self._log_prior(torch.float32)

    def _log_prior(self, dtype: torch.dtype) -> torch.Tensor:
        counts = self.class_counts.to(dtype)
        return counts.log() - counts.sum().log()

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """`noise` is accepted and ignored so the loss can replace :class:`AGCLLoss`."""
        labels = _check_inputs(logits, labels, self.num_classes)
        dtype = _compute_dtype(logits)
        adjusted = self.scale * logits.to(dtype) + self.tau * self._log_prior(dtype)
        return F.cross_entropy(adjusted, labels)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, tau={self.tau}, scale={self.scale}"


def _normalize_choice(value: str, what: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, one of {list(choices)}; got {type(value).__name__}.")
    key = value.strip().lower().replace("-", "_")
    if key not in choices:
        raise ValueError(f"Unknown {what} {value!r}; valid choices are {list(choices)}.")
    return key


def _check_kwargs(factory: Any, kwargs: dict[str, Any], loss_name: str, reserved: Sequence[str] = ()) -> None:
    accepted = [p for p in inspect.signature(factory).parameters if p not in ("self", "class_counts", *reserved)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(f"Unexpected argument(s) {unknown} for loss {loss_name!r}; it accepts {accepted}.")


def build_loss(
    name: str,
    class_counts: Sequence[float] | torch.Tensor,
    branch: str = "class_balanced",
    **kwargs: Any,
) -> nn.Module:
    """
    Builds a training loss by name; all of them are called as `loss(logits, labels, noise=None)`.

    Args:
        name (`str`): `"agcl"`, `"ce"` (scaled cross-entropy), `"logit_adjusted"`, or any name registered with
            [`register_loss`].
        class_counts (`Sequence[float]` or `torch.Tensor`):
            Training images per class (validated for every loss, so a class without images is always reported).
        branch (`str`, defaults to `"class_balanced"`):
            `"class_balanced"` or `"instance_balanced"`: picks the loss's `branch_defaults` for that branch, for A-GCL
            the `(gamma_pos, gamma_neg)` preset (0, 4) or (0.5, 8). Explicit `kwargs` override the preset. Ignored by
            losses without `branch_defaults`.
        kwargs: Further constructor arguments of the chosen loss (e.g. `scale`, `label_smoothing`, `generator`).

    Example:

    ```python
    >>> from lpt_peft.training.losses import build_loss
    >>> loss_fn = build_loss("agcl", [500, 50, 5], branch="instance_balanced")
    >>> loss_fn.gamma_pos, loss_fn.gamma_neg
    (0.5, 8.0)
    ```
    """
    name = _normalize_choice(name, "loss name", tuple(LOSSES))
    branch = _normalize_choice(branch, "branch", BRANCHES)
    counts = _as_class_counts(class_counts)
    loss_cls = LOSSES[name]
    _check_kwargs(loss_cls.__init__, kwargs, name)
    options = {**getattr(loss_cls, "branch_defaults", {}).get(branch, {}), **kwargs}
    if "class_counts" in inspect.signature(loss_cls.__init__).parameters:
        return loss_cls(counts, **options)
    return loss_cls(**options)


def dual_sampling_beta(epoch: int, num_epochs: int, eta: float = 0.5) -> float:
    """
    Weight of the instance-balanced branch in dual sampling: `eta * (E - e) / E`, with `e` the 0-based epoch.

    Example:

    ```python
    >>> from lpt_peft.training.losses import dual_sampling_beta
    >>> dual_sampling_beta(0, 90), dual_sampling_beta(45, 90)
    (0.5, 0.25)
    ```
    """
    if isinstance(num_epochs, bool) or not isinstance(num_epochs, int) or num_epochs <= 0:
        raise ValueError(f"num_epochs must be a positive integer, got {num_epochs!r}.")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < num_epochs:
        raise ValueError(
            f"epoch must be a 0-based integer in [0, {num_epochs - 1}] for num_epochs={num_epochs}, got {epoch!r}."
        )
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta}.")
    return float(eta) * (num_epochs - epoch) / num_epochs


def _as_match_score(score: torch.Tensor | float, which: str) -> torch.Tensor:
    if not isinstance(score, torch.Tensor):
        raise TypeError(f"{which} must be a scalar torch.Tensor or None, got {type(score).__name__}.")
    if score.numel() != 1:
        raise ValueError(
            f"{which} must be a scalar (the batch mean of the summed key cosines), got shape {tuple(score.shape)}."
        )
    return score.reshape(())


class LPTObjective(nn.Module):
    """
    The LPT dual-sampling objective.

    `L = loss_cb - matching_weight * s_cb + beta(e) * (loss_ib - matching_weight * s_ib)` with
    `beta(e) = eta * (E - e) / E` (see :func:`dual_sampling_beta`) and `s` the phase-2 key matching scores (higher is
    better). Phase 1 passes no match scores, which drops the matching terms; passing no instance-balanced batch
    drops the whole `beta` term (single-branch training).

    Args:
        class_counts (`Sequence[float]` or `torch.Tensor`): Training images per class.
        num_epochs (`int`): Total number of epochs `E` of the run (for the `beta` schedule).
        loss_name (`str`, defaults to `"agcl"`): Loss of both branches, see :func:`build_loss`.
        matching_weight (`float`, defaults to 0.5): Weight of the key matching score.
        eta (`float`, defaults to 0.5): Initial weight of the instance-balanced branch.
        instance_balanced_branch (`str`, defaults to `"instance_balanced"`): Preset of the instance-balanced loss:
            `"instance_balanced"` (A-GCL gammas 0.5 / 8, the authors' code) or `"class_balanced"` (0 / 4, the paper).
        loss_kwargs: Extra arguments for :func:`build_loss`, given to both branch losses. The branch presets pick
            A-GCL's `gamma_pos`/`gamma_neg` per branch.

    Example:

    ```python
    >>> import torch
    >>> from lpt_peft.training.losses import LPTObjective
    >>> objective = LPTObjective([500, 50, 5], num_epochs=10)
    >>> cb_logits, ib_logits = torch.rand(4, 3) * 2 - 1, torch.rand(4, 3) * 2 - 1
    >>> out = objective(cb_logits, torch.tensor([0, 1, 2, 2]), ib_logits, torch.tensor([0, 0, 0, 1]), epoch=0)
    >>> sorted(out)
    ['beta', 'loss', 'loss_cb', 'loss_ib']
    ```
    """

    def __init__(
        self,
        class_counts: Sequence[float] | torch.Tensor,
        num_epochs: int,
        loss_name: str = "agcl",
        matching_weight: float = 0.5,
        eta: float = 0.5,
        instance_balanced_branch: str = "instance_balanced",
        **loss_kwargs: Any,
    ) -> None:
        super().__init__()
        dual_sampling_beta(0, num_epochs, eta)  # validates num_epochs and eta up front
        if not math.isfinite(matching_weight):
            raise ValueError(f"matching_weight must be finite, got {matching_weight}.")
        self.loss_name = _normalize_choice(loss_name, "loss name", tuple(LOSSES))
        self.cb_loss = build_loss(self.loss_name, class_counts, branch="class_balanced", **loss_kwargs)
        # "instance_balanced" uses the authors' code's A-GCL exponents there; "class_balanced" the paper's (0, 4).
        self.ib_loss = build_loss(self.loss_name, class_counts, branch=instance_balanced_branch, **loss_kwargs)
        self.num_epochs = num_epochs
        self.matching_weight = float(matching_weight)
        self.eta = float(eta)

    def beta(self, epoch: int) -> float:
        return dual_sampling_beta(epoch, self.num_epochs, self.eta)

    def forward(
        self,
        cb_logits: torch.Tensor,
        cb_labels: torch.Tensor,
        ib_logits: torch.Tensor | None,
        ib_labels: torch.Tensor | None,
        epoch: int,
        cb_match_score: torch.Tensor | None = None,
        ib_match_score: torch.Tensor | None = None,
        *,
        cb_noise: torch.Tensor | None = None,
        ib_noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """
        Returns:
            `dict[str, torch.Tensor]`: `"loss"` (the total, with gradient) and detached scalars for logging:
            `"loss_cb"`, `"beta"`, plus `"loss_ib"` when an instance-balanced batch is given and `"match_cb"` /
            `"match_ib"` when the corresponding match score is given (absent components are omitted).
        """
        if (ib_logits is None) != (ib_labels is None):
            raise ValueError(
                "ib_logits and ib_labels must be given together (dual sampling) or both be None (class-balanced "
                "batch only)."
            )
        if ib_logits is None and ib_match_score is not None:
            raise ValueError("ib_match_score was given without an instance-balanced batch (ib_logits is None).")
        beta = self.beta(epoch)

        loss_cb = self.cb_loss(cb_logits, cb_labels, noise=cb_noise)
        total = loss_cb
        out: dict[str, torch.Tensor] = {"loss_cb": loss_cb.detach()}
        if cb_match_score is not None:
            match_cb = _as_match_score(cb_match_score, "cb_match_score")
            total = total - self.matching_weight * match_cb
            out["match_cb"] = match_cb.detach()
        if ib_logits is not None:
            loss_ib = self.ib_loss(ib_logits, ib_labels, noise=ib_noise)
            branch = loss_ib
            out["loss_ib"] = loss_ib.detach()
            if ib_match_score is not None:
                match_ib = _as_match_score(ib_match_score, "ib_match_score")
                branch = branch - self.matching_weight * match_ib
                out["match_ib"] = match_ib.detach()
            total = total + beta * branch
        out["beta"] = torch.tensor(beta, dtype=loss_cb.dtype, device=loss_cb.device)
        out["loss"] = total
        return out

    def extra_repr(self) -> str:
        return f"num_epochs={self.num_epochs}, matching_weight={self.matching_weight}, eta={self.eta}"
