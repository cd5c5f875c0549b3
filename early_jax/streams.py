"""Every random key and host random generator a run derives, keyed by stable names.

A seed's four purpose keys are `fold_in(key(seed), purpose index)`; everything else derives from
one of them (or from a fixed root) by folding in names: `derive(perturb_key, "perturbation",
"noise", "3", level)`. Names are hashed with CRC-32 (stable across processes and Python versions),
so adding a consumer never shifts another, and nothing depends on a display label.
"""
from __future__ import annotations

import zlib

import jax
import numpy as np

# Independent streams of each seed: varying one (data order for instability) holds the others.
PURPOSES = ("init", "order", "augment", "perturb")


def seed_keys(seed) -> dict:
    """Per-purpose keys of one seed as raw key data (checkpointable)."""
    root = jax.random.key(seed)
    return {p: jax.random.key_data(jax.random.fold_in(root, i)) for i, p in enumerate(PURPOSES)}


def name_id(name) -> int:
    """A 31-bit number for a name (ints pass through): what `fold_in` folds."""
    if isinstance(name, (int, np.integer)):
        return int(name)
    return zlib.crc32(str(name).encode()) & 0x7FFFFFFF


def derive(key: jax.Array, *names) -> jax.Array:
    """`key` with each name folded in, in order (typed keys; traceable, so names may be traced
    ints such as a level inside vmap)."""
    for name in names:
        key = jax.random.fold_in(key, name if isinstance(name, jax.Array) else name_id(name))
    return key


def derive_data(key_data: jax.Array, *names) -> jax.Array:
    """`derive` on raw key data (as TrainState stores keys)."""
    return jax.random.key_data(derive(jax.random.wrap_key_data(key_data), *names))


def host_rng(seed: int, *names) -> np.random.Generator:
    """A NumPy generator for host-side draws (random labels, rotations, subsets, fixed batches)."""
    return np.random.default_rng([int(seed), *(name_id(n) for n in names)])
