"""A 1-D device mesh over the seed axis: seeds are split across devices, the dataset is replicated.

One device, eight GPUs and a TPU pod slice run the same code; only the mesh differs.
"""
from __future__ import annotations

import os

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
    """Host arrays (the same on every process) as arrays replicated over the mesh; built from
    each process's own copy, so no process ever reads another's memory."""
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    return jax.tree.map(put, tree)


def abstract_replicated(tree, mesh: Mesh):
    """Shapes and dtypes of host arrays as replicated over the mesh, placing nothing."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sharding), tree)


def to_host(x) -> np.ndarray:
    """A global array as one host array on every process: gathered across processes when it
    spans devices of other hosts (np.asarray alone refuses those)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


HEARTBEAT_TIMEOUT_S = 20  # a process that stops answering for this long fails the others


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Join a multi-process run (TPU pod slices, multi-node GPU, several CPU processes) before
    touching any device. With no arguments JAX detects the cluster (TPU VMs, SLURM); elsewhere
    all three are needed, the same coordinator on every process."""
    given = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in given) and any(v is None for v in given):
        raise UserError("--distributed needs all of --coordinator_address=HOST:PORT, --num_processes=N "
                        "and --process_id=I (or none of them, on a TPU VM or under SLURM)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise UserError(f"--process_id must lie in 0..{num_processes - 1}, got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=int(os.environ.get("EARLY_JAX_INIT_TIMEOUT", 300)),
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"--distributed found no cluster to join ({str(err).splitlines()[0][:200]}): "
                        "pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I to "
                        "every process, or run on a TPU VM / under SLURM") from None


def sync(name: str) -> None:
    """Wait until every process reaches this point (no-op on one process): others read what
    process 0 has just written."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """`flag` or-ed over all processes, so every process takes the same branch."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())


_PEER_FAILURE = ("Gloo", "heartbeat", "Connection reset", "coordination service", "UNAVAILABLE",
                 "Connection refused", "Broken pipe")


def peer_failure(err: BaseException) -> bool:
    """Whether an error of a multi-process run says another process went away (a collective or the
    coordination service lost its peer), rather than a bug here."""
    return jax.process_count() > 1 and any(marker in str(err) for marker in _PEER_FAILURE)
