"""A 1-D device mesh over the seed axis: seeds are split across devices, the dataset is replicated.

One device, eight GPUs and a TPU pod slice run the same code; only the mesh differs.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from early_jax.errors import UserError

SEED_AXIS = "seeds"


def seed_mesh(devices=None) -> Mesh:
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (SEED_AXIS,))


def check_seed_count(num_seeds: int, mesh: Mesh) -> None:
    devices = mesh.devices.size
    if num_seeds % devices:
        raise UserError(f"--num_seeds={num_seeds} is not a multiple of the {devices} devices; use a "
                        f"multiple of {devices} (e.g. {devices * max(1, round(num_seeds / devices))}) "
                        "so every device holds the same number of seeds")


def seed_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over devices (states, masks, per-seed keys)."""
    return NamedSharding(mesh, P(SEED_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put_replicated(tree, mesh: Mesh):
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def initialize_distributed(enabled: bool) -> None:
    """Multi-host runs (TPU pod slices, multi-node GPU) call this before touching any device."""
    if enabled:
        jax.distributed.initialize()
