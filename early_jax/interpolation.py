"""Linear interpolation between two trained networks (linear mode connectivity, Frankle et al.
2020): the maths and the compiled path program; instability.py runs the experiment.

The *barrier* of a path is the highest error on the straight line between two networks minus the
mean error of its two ends; a network is "stable" at k when two copies trained from k have a
barrier of about zero.

BatchNorm running statistics of an interpolated network do not describe its activations, so by
default they are recomputed for every point on the path, ends included (so all points are measured
the same way): a cumulative average of per-batch statistics over `bn_batches` training batches
(as PyTorch's `update_bn`), which weights every batch equally and does not depend on the initial
statistics. With `recompute_bn=False` the running statistics are interpolated like the weights.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from early_jax import sharding, streams
from early_jax.data.device import epoch_permutation, padded_batches, train_batch
from early_jax.errors import UserError
from early_jax.train import Trainer, TrainState, evaluation_sums, over_seeds

DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
SPLITS = ("test", "train")
SECOND_COPY_PURPOSES = ("order", "augment")  # what copy 2 draws anew; init and weights at k are shared


@dataclasses.dataclass(frozen=True)
class PathSettings:
    """How the path between the copies is measured (its results are cached per setting)."""

    alphas: tuple = DEFAULT_ALPHAS
    recompute_bn: bool = True      # False: interpolate the running statistics too
    bn_batches: int = 50           # training batches (with training augmentation), at most one epoch
    train_examples: int = 10_000   # fixed subset of the training split, no augmentation

    def check(self) -> "PathSettings":
        alphas = tuple(float(a) for a in self.alphas)
        if list(alphas) != sorted(set(alphas)) or alphas[:1] != (0.0,) or alphas[-1:] != (1.0,):
            raise UserError(f"alphas must be increasing, from 0 to 1 (the two copies), got {self.alphas}")
        if self.recompute_bn and self.bn_batches < 1:
            raise UserError(f"recomputing BatchNorm statistics needs bn_batches >= 1, got {self.bn_batches}")
        if self.train_examples < 1:
            raise UserError(f"train_examples must be >= 1, got {self.train_examples}")
        return dataclasses.replace(self, alphas=alphas)


def barrier(errors_along_path) -> float:
    """Error barrier of a path ordered by alpha: max error minus the mean of the two end errors.

    Never negative (the ends lie on the path); zero when no point is worse than the worse end.
    """
    errors = np.asarray(errors_along_path, np.float64)
    return round(float(errors.max() - (errors[0] + errors[-1]) / 2), 12)  # no float dust in tables


def interpolate(params_a, params_b, alpha):
    """(1 - alpha) * a + alpha * b, leaf by leaf; exactly a at alpha 0, exactly b at alpha 1, and
    exactly a everywhere when a == b (each half is computed from its nearer end)."""
    def lerp(a, b):
        delta = b - a
        return jnp.where(alpha <= 0.5, a + alpha * delta, b - (1 - alpha) * delta).astype(a.dtype)
    return jax.tree.map(lerp, params_a, params_b)


def recompute_batch_stats(model, params, batch_stats, images):
    """BatchNorm running statistics of `params`, recomputed from `images` [num_batches, B, H, W, C]
    (normalised) as the cumulative average of the per-batch statistics; params are never touched.

    Flax's update is linear, new = m * old + (1 - m) * batch, so one train-mode pass from zero
    statistics yields (1 - m) * batch; the sum over batches divided by n (1 - m) is the average. The
    momentum m is read off the model itself (a pass from statistics c gives m * c more), so any
    BatchNorm momentum works and the input statistics only fix the tree's structure.
    """
    zeros = jax.tree.map(jnp.zeros_like, batch_stats)

    def updated(stats, x):
        _, out = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                             mutable=["batch_stats"])
        return out.get("batch_stats", {})

    def accumulate(total, x):
        return jax.tree.map(jnp.add, total, updated(zeros, x)), None

    total, _ = jax.lax.scan(accumulate, zeros, images)
    probe = 1024.0  # a power of two: scaling is exact and rounding of (1 - m) * batch is negligible
    shifted = updated(jax.tree.map(lambda z: z + probe, zeros), images[0])
    momentum = jax.tree.map(lambda s, z: (s - z) / probe, shifted, updated(zeros, images[0]))
    return jax.tree.map(lambda t, m: t / (images.shape[0] * (1 - m)), total, momentum)


def second_copy_keys(keys: dict) -> dict:
    """One seed's keys for copy 2: new data order and augmentation, everything else shared."""
    salted = lambda k: streams.derive_data(k, "instability_copy2")
    return {p: salted(k) if p in SECOND_COPY_PURPOSES else k for p, k in keys.items()}


def with_second_copy_keys(states: TrainState) -> TrainState:
    return states.replace(keys=jax.vmap(second_copy_keys)(states.keys))


def train_subset(trainer: Trainer, num_examples: int) -> dict:
    """A fixed random subset of the training split (the task's labels), unaugmented, in eval batches."""
    data = trainer.dataset
    rng = streams.host_rng(0, "instability_train_subset")
    idx = np.sort(rng.permutation(len(data.x_train))[:min(num_examples, len(data.x_train))])
    batches = padded_batches(data.x_train[idx], data.y_train[idx], trainer.config.train.eval_batch_size)
    return sharding.put_replicated(batches | {"mean": data.mean, "std": data.std}, trainer.mesh)


def bn_images(trainer: Trainer, num_batches: int) -> jax.Array:
    """[num_batches, B, H, W, C] training batches, preprocessed as in training, from a fixed order
    (at most one epoch, so no example repeats)."""
    fns, n = trainer.fns, trainer.arrays.images.shape[0]
    num_batches = max(1, min(num_batches, fns.steps_per_epoch))
    key = streams.derive(jax.random.key(0), "instability_bn_batches")

    def batches(arrays):
        perm = epoch_permutation(key, 0, n)
        one = lambda i: train_batch(arrays, fns.prep, perm, i, fns.batch_size, jax.random.fold_in(key, i))[0]
        return jax.lax.map(one, jnp.arange(num_batches))

    return jax.jit(batches, out_shardings=sharding.replicated(trainer.mesh))(trainer.arrays)


# ----- the compiled path program -----
@functools.lru_cache(maxsize=8)
def _path_program(trainer: Trainer, settings: PathSettings, alpha_chunk: int):
    """jit((params_a, stats_a, params_b, stats_b, bn, test, train) -> correct [rows, A, splits])."""
    model, alphas = trainer.fns.model, jnp.asarray(settings.alphas, jnp.float32)

    def one_pair(params_a, stats_a, params_b, stats_b, bn, test, train):
        def at(alpha):
            params = interpolate(params_a, params_b, alpha)
            stats = (recompute_batch_stats(model, params, stats_a, bn) if settings.recompute_bn
                     else interpolate(stats_a, stats_b, alpha))
            variables = {"params": params, "batch_stats": stats}
            return jnp.stack([evaluation_sums(model, variables, data)[1] for data in (test, train)])
        # chunk 1: one alpha after another (CPU convolutions are slow under vmap)
        return jax.lax.map(at, alphas, batch_size=alpha_chunk if alpha_chunk > 1 else None)

    rows = over_seeds(one_pair, trainer.parallel, 4)
    seeds, rep = P(sharding.SEED_AXIS), P()
    return jax.jit(jax.shard_map(trainer.traced(rows), mesh=trainer.mesh,
                                 in_specs=(seeds,) * 4 + (rep,) * 3, out_specs=seeds, check_vma=False))


def path_errors(trainer: Trainer, states_a: TrainState, states_b: TrainState,
                settings: PathSettings = PathSettings(), alpha_chunk: int | None = None) -> np.ndarray:
    """Errors [rows, len(alphas), len(SPLITS)] along the line from row i of `states_a` to row i of
    `states_b`. `alpha_chunk` alphas run at once (vmapped); default where rows are vmapped
    (accelerators): as many as keep rows x alphas at most S x len(alphas), the memory of one
    seed group; one at a time where rows are mapped (CPU)."""
    settings = settings.check()
    groups = max(1, jax.tree.leaves(states_a.params)[0].shape[0] // trainer.config.num_seeds)
    chunk = alpha_chunk or (max(1, len(settings.alphas) // groups) if trainer.parallel == "vmap" else 1)
    program = _path_program(trainer, settings, chunk)
    bn, train = _path_data(trainer, settings)
    correct = sharding.to_host(program(states_a.params, states_a.batch_stats, states_b.params,
                                       states_b.batch_stats, bn, trainer.test, train)).astype(np.float64)
    counts = np.array([float(trainer.test["count"]), float(train["count"])])
    return (counts - correct) / counts


@functools.lru_cache(maxsize=8)
def _path_data(trainer: Trainer, settings: PathSettings) -> tuple:
    """(BatchNorm batches, train-error subset), built once per trainer and setting."""
    return (bn_images(trainer, settings.bn_batches if settings.recompute_bn else 1),
            train_subset(trainer, settings.train_examples))
