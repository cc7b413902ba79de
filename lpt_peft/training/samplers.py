"""Batch samplers for LPT's dual sampling, sharded across data-parallel processes by themselves.

Each sampler yields lists of dataset indices for `DataLoader(dataset, batch_sampler=sampler)`. They shard on their
own (every rank builds the same global draw from `(seed, epoch, step)` and keeps its part), so the DataLoader must
**not** be passed through `accelerator.prepare`, which would shard the batches a second time; move the batches to the
device in the training loop instead. All randomness comes from local `torch.Generator`s, never the global RNG, so the
batches depend only on `(seed, epoch, rank, num_replicas)` and a resumed run can replay an epoch from any step with
:meth:`skip_batches`. The generators follow the one seeding scheme of `lpt_peft.data.seeding`.

Samplers are looked up by name in `SAMPLERS`; `@register_sampler("name")` on a new class (or factory function) makes it
available to `--sampler name` (see docs/extending.md). Every sampler has `split_sizes`: the sizes of the consecutive
parts of each batch (one part per branch), at which the training loop splits the model output.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from lpt_peft.checks import as_int, check_int
from lpt_peft.data.seeding import STREAM_CLASSES, STREAM_IMAGES, STREAM_INSTANCES, torch_generator

__all__ = [
    "SAMPLERS",
    "ClassBalancedBatchSampler",
    "DualBatchSampler",
    "InstanceBalancedBatchSampler",
    "create_sampler",
    "register_sampler",
]

# name -> factory(labels, batch_size, *, num_replicas, rank, seed, **options) -> batch sampler; see register_sampler.
SAMPLERS: dict[str, Callable[..., Sampler]] = {}
# What the training loop calls on a sampler besides iterating it.
SAMPLER_INTERFACE = ("__len__", "set_epoch", "skip_batches", "split_sizes")


def _sampler_key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def register_sampler(name: str) -> Callable:
    """
    Decorator: register a batch-sampler class or factory under `name` for [`create_sampler`] and `--sampler name`.

    The registered callable is called as `factory(labels, batch_size, num_replicas=..., rank=..., seed=...,
    **options)`, where `labels` is the 1-D int64 tensor of the training labels, `batch_size` the images per process
    and branch, and `options` the sampler options it accepts (today `samples_per_class`). It returns a
    `torch.utils.data.Sampler` of index lists that also has `__len__` (batches per epoch and process),
    `set_epoch(epoch)`, `skip_batches(n)` (resume mid-epoch: the next iteration starts at batch `n`) and
    `split_sizes` (a tuple: sizes of the consecutive branch parts of every batch, e.g. `(cb, ib)` for dual sampling;
    the first part goes to the class-balanced term of the objective, a second one to its instance-balanced term).

    Raises:
        ValueError: `name` is already registered (names are case-insensitive, `-` and `_` are the same).
    """
    key = _sampler_key(name)

    def decorator(factory: Callable) -> Callable:
        if key in SAMPLERS:
            raise ValueError(f"A sampler named {key!r} is already registered ({SAMPLERS[key]!r}); pick another name.")
        SAMPLERS[key] = factory
        return factory

    return decorator


def create_sampler(
    name: str,
    labels: Sequence[int] | torch.Tensor,
    batch_size: int,
    *,
    num_replicas: int | None = None,
    rank: int | None = None,
    seed: int = 0,
    **options: Any,
) -> Sampler:
    """
    Build the batch sampler registered as `name` (see [`register_sampler`]).

    Args:
        name (`str`): `"dual"` (LPT's dual sampling), `"class_balanced"`, `"instance_balanced"`, or a registered name.
        labels (`Sequence[int]` or `torch.Tensor`): Class index of every training image.
        batch_size (`int`): Images per process and per branch.
        num_replicas, rank (`int`, *optional*): Data-parallel shard; default from `torch.distributed`.
        seed (`int`, defaults to 0): Base seed, identical on all ranks.
        options: Sampler options, e.g. `samples_per_class`.

    Raises:
        ValueError: unknown `name` (the registered names are listed), or an option the sampler does not accept.
        TypeError: the built object lacks part of the sampler interface (`split_sizes`, `set_epoch`, ...).
    """
    if not isinstance(name, str) or _sampler_key(name) not in SAMPLERS:
        raise ValueError(f"Unknown sampler {name!r}; registered samplers are {sorted(SAMPLERS)}.")
    factory = SAMPLERS[_sampler_key(name)]
    accepted = inspect.signature(factory).parameters
    rejected = sorted(set(options) - set(accepted))
    if rejected:
        raise ValueError(
            f"Sampler {name!r} does not accept option(s) {rejected}; it accepts "
            f"{[p for p in accepted if p not in ('labels', 'batch_size')]}. Remove them for this sampler."
        )
    labels, _ = _as_labels(labels, None)
    sampler = factory(labels, batch_size, num_replicas=num_replicas, rank=rank, seed=seed, **options)
    missing = [attr for attr in SAMPLER_INTERFACE if not hasattr(sampler, attr)]
    if missing:
        raise TypeError(f"Sampler {name!r} built a {type(sampler).__name__} without {missing}; see register_sampler.")
    return sampler


def _check_positive_int(value: Any, name: str) -> int:
    return check_int(value, name, minimum=1)


def _check_int_range(value: Any, name: str, low: int, high: int, context: str = "") -> int:
    return check_int(value, name, minimum=low, maximum=high, hint=context.strip() and f"({context.strip()})")


def _resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    distributed = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if distributed else 1
    if rank is None:
        rank = dist.get_rank() if distributed else 0
    num_replicas = _check_positive_int(num_replicas, "num_replicas")
    rank = _check_int_range(rank, "rank", 0, num_replicas - 1, f" for num_replicas={num_replicas}")
    return num_replicas, rank


def _as_labels(labels: Sequence[int] | torch.Tensor, num_classes: int | None) -> tuple[torch.Tensor, int]:
    """Validates integer class labels and returns them as a 1-D int64 CPU tensor plus the number of classes."""
    try:
        tensor = labels.detach().to("cpu") if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"labels must be a 1-D list, array or tensor of integer class indices ({err}).") from err
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(
            f"labels must be integer class indices, got dtype {tensor.dtype}; convert them with e.g. "
            "`torch.as_tensor(labels, dtype=torch.long)` after checking they are whole numbers."
        )
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise ValueError(f"labels must be a non-empty 1-D sequence (one per image), got shape {tuple(tensor.shape)}.")
    tensor = tensor.long()
    if num_classes is None:
        num_classes = max(int(tensor.max()) + 1, 1)  # a negative max is reported as a bad label below
    num_classes = _check_positive_int(num_classes, "num_classes")
    bad = (tensor < 0) | (tensor >= num_classes)
    if bool(bad.any()):
        index = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"labels[{index}] = {int(tensor[index])} is not a class index in [0, {num_classes - 1}] "
            f"(num_classes={num_classes}); fix the label mapping or pass the right num_classes."
        )
    return tensor, num_classes


def _check_skip(num_batches: Any, length: int) -> int:
    context = f" (an epoch has {length} batches on each rank; pass the number already consumed in this epoch)"
    return _check_int_range(num_batches, "The number of batches to skip", 0, length, context)


class _ShardedBatchSampler(Sampler[list[int]]):
    """Epoch/rank/resume bookkeeping shared by the batch samplers; subclasses implement `iter_epoch` and `__len__`."""

    def __init__(self, num_replicas: int | None, rank: int | None, seed: int, start_batch: int) -> None:
        super().__init__()
        if as_int(seed) is None:
            raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
        self.num_replicas, self.rank = _resolve_replicas(num_replicas, rank)
        self.seed = as_int(seed)
        self.epoch = 0
        self._start_batch = 0
        if start_batch:
            self.skip_batches(start_batch)

    def __len__(self) -> int:
        raise NotImplementedError

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[list[int]]:
        """Yields the batches of `epoch` from `start_batch` on, without touching the sampler's state."""
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose batches the next iteration yields; call it at the start of every epoch."""
        self.epoch = check_int(epoch, "epoch", minimum=0)

    def skip_batches(self, num_batches: int) -> None:
        """
        Makes the next iteration start at batch `num_batches` of the current epoch, for resuming mid-epoch: the
        remaining batches are exactly those an uninterrupted run would have yielded. One-shot: the first iteration
        that yields (or ends) consumes it, later ones start at batch 0 again. `__len__` stays the full epoch length.
        """
        self._start_batch = _check_skip(num_batches, len(self))

    def _check_start(self, start_batch: int) -> int:
        return _check_int_range(
            start_batch, "start_batch", 0, len(self), f" (an epoch has {len(self)} batches on each rank)"
        )

    def __iter__(self) -> Iterator[list[int]]:
        # The skip is consumed at the first batch request, not at iter(): a multi-worker DataLoader creates (and
        # drops) one iterator before the one it uses.
        start, self._start_batch = self._start_batch, 0
        yield from self.iter_epoch(self.epoch, start)


class InstanceBalancedBatchSampler(_ShardedBatchSampler):
    """
    Instance-balanced (uniform over images) batches, sharded across data-parallel ranks.

    Each epoch uses one random permutation of `range(num_samples)` drawn from `torch_generator(seed,
    STREAM_INSTANCES, epoch)`.
    Step `s` takes the slice `[s * R * B, (s + 1) * R * B)` of the permutation (`R` ranks, batch size `B`) and rank `r`
    keeps its `r`-th block of `B` indices, so the global batch equals the single-process batch of size `R * B` and the
    ranks' shares are disjoint.

    `drop_last=False` (default): the permutation is padded by wrapping around to its start until its length is a
    multiple of `R * B`; every index is seen each epoch, every batch is full, and only the last step may repeat up to
    `R * B - 1` indices (drawn from the start of the permutation). `drop_last=True`: the permutation is truncated to a
    multiple of `R * B` instead (no repeats, up to `R * B - 1` random images skipped per epoch).

    Args:
        num_samples (`int`): Size of the data set.
        batch_size (`int`): Batch size per rank.
        drop_last (`bool`, defaults to `False`): Truncate instead of pad, see above.
        num_replicas (`int`, *optional*): Number of data-parallel ranks; default from `torch.distributed`, else 1.
        rank (`int`, *optional*): This process's rank; default from `torch.distributed`, else 0.
        seed (`int`, defaults to 0): Base seed, identical on all ranks.
        start_batch (`int`, defaults to 0): Batches of the first iteration to skip (resume), see :meth:`skip_batches`.

    Example:

    ```python
    >>> from lpt_peft.training.samplers import InstanceBalancedBatchSampler
    >>> sampler = InstanceBalancedBatchSampler(10, batch_size=4, num_replicas=1, rank=0, seed=0)
    >>> len(sampler), [len(batch) for batch in sampler]
    (3, [4, 4, 4])
    ```
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        start_batch: int = 0,
    ) -> None:
        self.num_samples = _check_positive_int(num_samples, "num_samples")
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.drop_last = bool(drop_last)
        num_replicas, _ = _resolve_replicas(num_replicas, rank)
        global_batch = batch_size * num_replicas
        if self.drop_last and num_samples < global_batch:
            raise ValueError(
                f"drop_last=True with {num_samples} samples and a global batch of {global_batch} "
                f"(batch_size={batch_size} x num_replicas={num_replicas}) leaves no batch; use drop_last=False or a "
                "smaller batch size."
            )
        super().__init__(num_replicas, rank, seed, start_batch)

    @property
    def split_sizes(self) -> tuple[int]:
        """One part per batch: `(batch_size,)`."""
        return (self.batch_size,)

    def __len__(self) -> int:
        global_batch = self.batch_size * self.num_replicas
        if self.drop_last:
            return self.num_samples // global_batch
        return math.ceil(self.num_samples / global_batch)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's global order (before padding/truncation), identical on every rank."""
        return torch.randperm(self.num_samples, generator=torch_generator(self.seed, STREAM_INSTANCES, epoch))

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[list[int]]:
        return self._iter(epoch, self._check_start(start_batch))

    def _iter(self, epoch: int, start_batch: int) -> Iterator[list[int]]:
        order = self.permutation(epoch)
        global_batch = self.batch_size * self.num_replicas
        total = len(self) * global_batch
        if total > order.numel():
            # Padding can exceed the data set when it is smaller than one global batch: wrap around repeatedly.
            order = order.repeat(math.ceil(total / order.numel()))
        order = order[:total].view(len(self), self.num_replicas, self.batch_size)[:, self.rank]
        for step in range(start_batch, len(self)):
            yield order[step].tolist()


@register_sampler("class_balanced")
class ClassBalancedBatchSampler(_ShardedBatchSampler):
    """
    Class-balanced batches: `batch_size // samples_per_class` distinct classes, `samples_per_class` images each.

    Classes are drawn uniformly among the classes that have images, without replacement within a step. The images of
    a class are drawn without replacement when it has at least `samples_per_class` images, otherwise with replacement.
    A batch lists its classes one after another (`samples_per_class` consecutive indices per class).

    Under data parallelism the draw for step `s` is a function of `(seed, epoch, s)` only: every rank draws the same
    `num_replicas * classes_per_batch` classes and keeps its own block of `classes_per_batch` of them, so ranks get
    disjoint classes (and images). Rank `r`'s images of a class depend on `(seed, epoch, s, slot)` only, so two ranks
    with `K` classes each see exactly the batch one rank with `2K` classes would.

    Args:
        labels (`Sequence[int]` or `torch.Tensor`): Class index of every image of the data set.
        batch_size (`int`): Batch size per rank, a multiple of `samples_per_class`.
        samples_per_class (`int`, defaults to 4): Images per class in a batch.
        num_batches (`int`, *optional*):
            Batches per epoch and rank; default `ceil(len(labels) / (batch_size * num_replicas))`, so an epoch covers
            about as many images as an instance-balanced epoch.
        num_classes (`int`, *optional*): Size of the label space; default `max(labels) + 1`. Classes without images
            are never drawn.
        num_replicas (`int`, *optional*): Number of data-parallel ranks; default from `torch.distributed`, else 1.
        rank (`int`, *optional*): This process's rank; default from `torch.distributed`, else 0.
        seed (`int`, defaults to 0): Base seed, identical on all ranks.
        start_batch (`int`, defaults to 0): Batches of the first iteration to skip (resume), see :meth:`skip_batches`.

    Example:

    ```python
    >>> from lpt_peft.training.samplers import ClassBalancedBatchSampler
    >>> labels = [0] * 50 + [1] * 10 + [2] * 3
    >>> sampler = ClassBalancedBatchSampler(labels, batch_size=4, samples_per_class=2, num_replicas=1, rank=0)
    >>> batch = next(iter(sampler))
    >>> len(batch), len({labels[i] for i in batch})
    (4, 2)
    ```
    """

    def __init__(
        self,
        labels: Sequence[int] | torch.Tensor,
        batch_size: int,
        samples_per_class: int = 4,
        num_batches: int | None = None,
        num_classes: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        start_batch: int = 0,
    ) -> None:
        self.labels, self.num_classes = _as_labels(labels, num_classes)
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.samples_per_class = _check_positive_int(samples_per_class, "samples_per_class")
        if batch_size % samples_per_class:
            raise ValueError(
                f"batch_size ({batch_size}) must be a multiple of samples_per_class ({samples_per_class}); e.g. use "
                f"batch_size={max(1, batch_size // samples_per_class) * samples_per_class}."
            )
        self.classes_per_batch = batch_size // samples_per_class
        num_replicas, _ = _resolve_replicas(num_replicas, rank)

        self.class_counts = torch.bincount(self.labels, minlength=self.num_classes)
        # Indices grouped by class; class c owns order[offsets[c] : offsets[c] + counts[c]].
        self._order = torch.argsort(self.labels, stable=True)
        self._offsets = torch.cumsum(self.class_counts, 0) - self.class_counts
        self.present_classes = torch.nonzero(self.class_counts).flatten()
        needed = self.classes_per_batch * num_replicas
        if needed > self.present_classes.numel():
            raise ValueError(
                f"Each step needs {needed} distinct classes (batch_size {batch_size} / samples_per_class "
                f"{samples_per_class} = {self.classes_per_batch} per rank x {num_replicas} rank(s)) but only "
                f"{self.present_classes.numel()} classes have images; lower batch_size or raise samples_per_class."
            )
        if num_batches is None:
            num_batches = math.ceil(self.labels.numel() / (batch_size * num_replicas))
        self.num_batches = _check_positive_int(num_batches, "num_batches")
        super().__init__(num_replicas, rank, seed, start_batch)

    @property
    def split_sizes(self) -> tuple[int]:
        """One part per batch: `(batch_size,)`."""
        return (self.batch_size,)

    def __len__(self) -> int:
        return self.num_batches

    def global_classes(self, epoch: int, step: int) -> torch.Tensor:
        """The `num_replicas * classes_per_batch` classes of a step, identical on every rank; rank r takes block r."""
        generator = torch_generator(self.seed, STREAM_CLASSES, epoch, step)
        num_needed = self.classes_per_batch * self.num_replicas
        choice = torch.randperm(self.present_classes.numel(), generator=generator)[:num_needed]
        return self.present_classes[choice]

    def _class_images(self, cls: int, epoch: int, step: int, slot: int) -> list[int]:
        count = int(self.class_counts[cls])
        generator = torch_generator(self.seed, STREAM_IMAGES, epoch, step, slot)
        if count >= self.samples_per_class:
            picks = torch.randperm(count, generator=generator)[: self.samples_per_class]
        else:
            picks = torch.randint(count, (self.samples_per_class,), generator=generator)
        start = int(self._offsets[cls])
        return self._order[start + picks].tolist()

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[list[int]]:
        return self._iter(epoch, self._check_start(start_batch))

    def _iter(self, epoch: int, start_batch: int) -> Iterator[list[int]]:
        first_slot = self.rank * self.classes_per_batch
        for step in range(start_batch, self.num_batches):
            classes = self.global_classes(epoch, step)[first_slot : first_slot + self.classes_per_batch].tolist()
            batch: list[int] = []
            for offset, cls in enumerate(classes):
                batch.extend(self._class_images(cls, epoch, step, first_slot + offset))
            yield batch


class DualBatchSampler(Sampler[list[int]]):
    """
    LPT dual sampling: every step yields one index list, the class-balanced batch followed by the instance-balanced
    batch, so both go through the model in one forward. Split the model outputs with `split_sizes`
    (`outputs[:cb_size]` is the class-balanced part).

    An epoch has `len(class_balanced)` steps. If the instance-balanced sampler runs out first it is cycled: its
    `k`-th pass in epoch `e` uses the permutation of sub-epoch `e * passes_per_epoch + k`, so no two passes (in any
    epoch) repeat a permutation. When it has at least as many batches, pass 0 of epoch `e` is exactly its epoch `e`.

    Args:
        class_balanced (`ClassBalancedBatchSampler`): Sampler of the class-balanced branch.
        instance_balanced (`InstanceBalancedBatchSampler`): Sampler of the instance-balanced branch, with the same
            `num_replicas` and `rank`.

    Example:

    ```python
    >>> from lpt_peft.training.samplers import (
    ...     ClassBalancedBatchSampler, DualBatchSampler, InstanceBalancedBatchSampler
    ... )
    >>> labels = [0] * 50 + [1] * 10 + [2] * 3
    >>> cb = ClassBalancedBatchSampler(labels, batch_size=4, samples_per_class=2, num_replicas=1, rank=0)
    >>> ib = InstanceBalancedBatchSampler(len(labels), batch_size=4, num_replicas=1, rank=0)
    >>> dual = DualBatchSampler(cb, ib)
    >>> dual.split_sizes, len(dual), len(next(iter(dual)))
    ((4, 4), 16, 8)
    ```
    """

    def __init__(
        self, class_balanced: ClassBalancedBatchSampler, instance_balanced: InstanceBalancedBatchSampler
    ) -> None:
        super().__init__()
        if not isinstance(class_balanced, ClassBalancedBatchSampler):
            raise TypeError(
                f"class_balanced must be a ClassBalancedBatchSampler, got {type(class_balanced).__name__}."
            )
        if not isinstance(instance_balanced, InstanceBalancedBatchSampler):
            raise TypeError(
                f"instance_balanced must be an InstanceBalancedBatchSampler, got {type(instance_balanced).__name__}."
            )
        cb_shard = (class_balanced.num_replicas, class_balanced.rank)
        ib_shard = (instance_balanced.num_replicas, instance_balanced.rank)
        if cb_shard != ib_shard:
            raise ValueError(
                f"The two samplers must shard alike; got (num_replicas, rank) = {cb_shard} for class_balanced and "
                f"{ib_shard} for instance_balanced."
            )
        self.class_balanced = class_balanced
        self.instance_balanced = instance_balanced
        self._start_batch = 0

    @property
    def epoch(self) -> int:
        """The current epoch, kept by the class-balanced sampler."""
        return self.class_balanced.epoch

    @property
    def split_sizes(self) -> tuple[int, int]:
        """`(cb_size, ib_size)`: sizes of the two parts of every yielded batch."""
        return self.class_balanced.batch_size, self.instance_balanced.batch_size

    @property
    def batch_size(self) -> int:
        return sum(self.split_sizes)

    @property
    def passes_per_epoch(self) -> int:
        """How many instance-balanced epochs (sub-epochs) one dual epoch may consume."""
        return math.ceil(len(self.class_balanced) / len(self.instance_balanced))

    def __len__(self) -> int:
        return len(self.class_balanced)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch of both branches (for the next iteration)."""
        self.class_balanced.set_epoch(epoch)
        # The instance-balanced batches come from the sub-epochs of this epoch; its own epoch is kept in sync only
        # for anyone reading it.
        self.instance_balanced.set_epoch(epoch)

    def skip_batches(self, num_batches: int) -> None:
        """Makes the next iteration resume at step `num_batches` of the current epoch, on both branches (one-shot)."""
        self._start_batch = _check_skip(num_batches, len(self))

    def _ib_batches(self, epoch: int, start_step: int) -> Iterator[list[int]]:
        ib_len = len(self.instance_balanced)
        sub_epoch, position = divmod(start_step, ib_len)
        while True:
            virtual_epoch = epoch * self.passes_per_epoch + sub_epoch
            yield from self.instance_balanced.iter_epoch(virtual_epoch, position)
            sub_epoch, position = sub_epoch + 1, 0

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[list[int]]:
        """Yields the dual batches of `epoch` from step `start_batch` on, without touching the sampler's state."""
        cb_batches = self.class_balanced.iter_epoch(epoch, start_batch)
        return (cb + ib for cb, ib in zip(cb_batches, self._ib_batches(epoch, start_batch)))

    def __iter__(self) -> Iterator[list[int]]:
        # Consumed at the first batch request, see _ShardedBatchSampler.__iter__.
        start, self._start_batch = self._start_batch, 0
        yield from self.iter_epoch(self.epoch, start)


@register_sampler("instance_balanced")
def instance_balanced_sampler(
    labels: torch.Tensor, batch_size: int, *, num_replicas: int | None, rank: int | None, seed: int
) -> InstanceBalancedBatchSampler:
    """Instance-balanced batches only (uniform over images), see [`InstanceBalancedBatchSampler`]."""
    return InstanceBalancedBatchSampler(len(labels), batch_size, num_replicas=num_replicas, rank=rank, seed=seed)


@register_sampler("dual")
def dual_sampler(
    labels: torch.Tensor,
    batch_size: int,
    *,
    samples_per_class: int = 4,
    num_replicas: int | None,
    rank: int | None,
    seed: int,
) -> DualBatchSampler:
    """LPT's dual sampling: a class-balanced batch followed by an instance-balanced one, both of `batch_size`."""
    shard = {"num_replicas": num_replicas, "rank": rank, "seed": seed}
    balanced = ClassBalancedBatchSampler(labels, batch_size, samples_per_class=samples_per_class, **shard)
    return DualBatchSampler(balanced, InstanceBalancedBatchSampler(len(labels), batch_size, **shard))
