"""The one seeding scheme of the data pipeline: numpy's `SeedSequence` over a tuple of integers.

`SeedSequence` hashes its entropy so that nearby keys (seed, epoch, index) give statistically independent streams,
unlike `seed + index` offsets, and the result is the same on every platform and Python version, unlike `hash()`.
"""

from __future__ import annotations

import numpy as np
import torch

_UINT64 = 1 << 64

# Stream identifiers, one key of every stream, so two uses of the same run seed never share a stream.
STREAM_CLASSES = 0  # class-balanced sampler: the classes of a step
STREAM_IMAGES = 1  # class-balanced sampler: the images of one class slot of a step
STREAM_INSTANCES = 2  # instance-balanced sampler: the permutation of an epoch
STREAM_AUGMENT = 3  # training augmentation of one image
STREAM_LOADER = 4  # a DataLoader's own generator (base seed of its workers)


def seed_from_keys(*keys: int) -> int:
    """
    A 63-bit seed derived from `keys` by `numpy.random.SeedSequence` (negative keys are taken modulo 2**64).

    Example:

    ```py
    >>> seed_from_keys(42, 3, 17) == seed_from_keys(42, 3, 17) != seed_from_keys(42, 3, 18)
    True
    ```
    """
    if not keys or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) for k in keys):
        raise ValueError(f"Seed keys must be one or more integers, got {keys!r}.")
    sequence = np.random.SeedSequence([int(k) % _UINT64 for k in keys])
    # 63 bits: `torch.Generator.manual_seed` and `numpy.random.default_rng` both take it, whatever the platform.
    return int(sequence.generate_state(1, dtype=np.uint64)[0]) >> 1


def torch_generator(*keys: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded with [`seed_from_keys`]`(*keys)`, e.g. keys `(seed, epoch, index)`."""
    return torch.Generator().manual_seed(seed_from_keys(*keys))
