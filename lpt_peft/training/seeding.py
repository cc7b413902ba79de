"""The one seeding scheme of training: every random stream is a CPU `torch.Generator` seeded from a
`numpy.random.SeedSequence` over a tuple of integer keys.

A stream is named by its keys, e.g. `(seed, STREAM_AUGMENT, phase, epoch, index)` for the crop of one image, so
nearby keys give statistically independent streams (SeedSequence hashes its entropy) and a value depends only on its
keys: not on worker count, on iteration order, or on when a DataLoader iterator was created. This is what makes a
resumed run bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "STREAM_AUGMENT",
    "STREAM_CLASSES",
    "STREAM_IMAGES",
    "STREAM_INSTANCES",
    "STREAM_LOADER",
    "seed_from_keys",
    "seeded_generator",
]

# Stream identifiers: the second key of every stream, so two uses of the same run seed never share a stream.
STREAM_CLASSES = 0  # class-balanced sampler: the classes of a step
STREAM_IMAGES = 1  # class-balanced sampler: the images of one class slot of a step
STREAM_INSTANCES = 2  # instance-balanced sampler: the permutation of an epoch
STREAM_AUGMENT = 3  # training augmentation of one image
STREAM_LOADER = 4  # a DataLoader's own generator (base seed of its workers)

_MASK64 = (1 << 64) - 1


def seed_from_keys(*keys: int) -> int:
    """A 64-bit seed derived from integer keys with `numpy.random.SeedSequence` (negative keys taken mod 2**64)."""
    entropy = [int(k) & _MASK64 for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded from `keys` (see the module docstring); it never touches the global RNG."""
    return torch.Generator(device="cpu").manual_seed(seed_from_keys(*keys))
