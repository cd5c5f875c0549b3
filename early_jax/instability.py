"""Instability to SGD noise (linear mode connectivity, Frankle et al. 2020).

From the state at step k (the dense network, or an IMP subnetwork rewound to k with a level's mask)
two copies train to the end with different data order and augmentation; the error is measured along
the straight line between them, and the *barrier* is the highest error on that line minus the mean
error of its two ends. A network is "stable" at k when the barrier is about zero.

How the pieces run:
- Copy 1 keeps the seed's own keys. Training is deterministic, so from the dense state at k it
  retraces the dense run, and from an IMP rewind it retraces that IMP level: its final state is the
  one already stored there and is loaded, not retrained. Copy 2 (order and augmentation keys
  `fold_in(key, COPY_SALT)`; init and perturb keys and the weights at k shared) is trained for all
  k values and S seeds at once: one resumable run over rows (k, seed), where the rows of each k
  join the run when it reaches k (`second_copies`).
- The path (interpolate, recompute BatchNorm statistics, measure test and train error) is one
  compiled program over rows (k, seed) x alphas, cached next to the copies per evaluation setting.
- BatchNorm running statistics of an interpolated network do not describe its activations, so by
  default they are recomputed for every point on the path, ends included (so all points are measured
  the same way): a cumulative average of per-batch statistics over `bn_batches` training batches
  (as PyTorch's `update_bn`), which weights every batch equally and does not depend on the initial
  statistics. With `recompute_bn=False` the running statistics are interpolated like the weights.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from early_jax import config as cfg
from early_jax import pipeline, progress, sharding
from early_jax.data.device import epoch_permutation, normalize, train_batch
from early_jax.errors import UserError
from early_jax.runner import RunDir, run
from early_jax.train import Trainer, TrainState, over_seeds

DEFAULT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))
SPLITS = ("test", "train")
COPY_SALT = 0x2C0F  # copy 2's order/augment keys are fold_in(key, COPY_SALT)
SECOND_COPY_PURPOSES = ("order", "augment")
_DATA_SEED = 0  # the fixed train-error subset and BatchNorm batches (the same for every seed)


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


# ----- pure pieces -----
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


def correct_count(model, variables, data) -> jax.Array:
    """Weighted number of correct top-1 predictions over padded batches
    {x uint8 [nb, B, ...], y, w, count, mean, std} (an exact integer in float32 below 2^24)."""
    def body(correct, batch):
        x, y, w = batch
        logits = model.apply(variables, normalize(x, data["mean"], data["std"]), train=False)
        return correct + jnp.sum(w * (jnp.argmax(logits, -1) == y)), None

    correct, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (data["x"], data["y"], data["w"]))
    return correct


def second_copy_keys(keys: dict) -> dict:
    """One seed's keys for copy 2: new data order and augmentation, everything else shared."""
    salted = lambda k: jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(k), COPY_SALT))
    return {p: salted(k) if p in SECOND_COPY_PURPOSES else k for p, k in keys.items()}


def with_second_copy_keys(states: TrainState) -> TrainState:
    return states.replace(keys=jax.vmap(second_copy_keys)(states.keys))


def _padded_batches(x, y, batch_size: int) -> dict:
    n = x.shape[0]
    batch_size = max(1, min(batch_size, n))
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    w = jnp.concatenate([jnp.ones(n, jnp.float32), jnp.zeros(pad, jnp.float32)])
    x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
    y = jnp.concatenate([y, jnp.zeros(pad, y.dtype)])
    shape = lambda a: a.reshape(num_batches, batch_size, *a.shape[1:])
    return {"x": shape(x), "y": shape(y), "w": shape(w), "count": jnp.float32(n)}


def train_subset(trainer: Trainer, num_examples: int) -> dict:
    """A fixed random subset of the training split (the task's labels), unaugmented, in eval batches."""
    arrays, n = trainer.arrays, trainer.arrays.images.shape[0]
    idx = np.sort(np.random.default_rng(_DATA_SEED).permutation(n)[:min(num_examples, n)])
    batch_size = trainer.config.train.eval_batch_size or len(idx)
    build = lambda images, labels: _padded_batches(images[idx], labels[idx], batch_size)
    out = jax.jit(build, out_shardings=sharding.replicated(trainer.mesh))(arrays.images, arrays.labels)
    return out | sharding.put_replicated({"mean": arrays.mean, "std": arrays.std}, trainer.mesh)


def bn_images(trainer: Trainer, num_batches: int) -> jax.Array:
    """[num_batches, B, H, W, C] training batches, preprocessed as in training, from a fixed order
    (at most one epoch, so no example repeats)."""
    fns, n = trainer.fns, trainer.arrays.images.shape[0]
    num_batches = max(1, min(num_batches, fns.steps_per_epoch))
    key = jax.random.key(_DATA_SEED)

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
            return jnp.stack([correct_count(model, variables, data) for data in (test, train)])
        # chunk 1: one alpha after another (CPU convolutions are slow under vmap)
        return jax.lax.map(at, alphas, batch_size=alpha_chunk if alpha_chunk > 1 else None)

    rows = over_seeds(one_pair, trainer.parallel, 4)
    seeds, rep = P(sharding.SEED_AXIS), P()
    return jax.jit(jax.shard_map(rows, mesh=trainer.mesh, in_specs=(seeds,) * 4 + (rep,) * 3,
                                 out_specs=seeds, check_vma=False))


def path_errors(trainer: Trainer, states_a: TrainState, states_b: TrainState,
                settings: PathSettings = PathSettings(), alpha_chunk: int | None = None) -> np.ndarray:
    """Errors [rows, len(alphas), len(SPLITS)] along the line from row i of `states_a` to row i of
    `states_b`. `alpha_chunk` alphas run at once (vmapped); default where rows are vmapped
    (accelerators): as many as keep rows x alphas at most S x len(alphas), the memory of one
    seed group; one at a time where rows are mapped (CPU)."""
    settings = settings.check()
    groups = max(1, jax.tree.leaves(states_a.params)[0].shape[0] // len(pipeline.seeds_of(trainer.config)))
    chunk = alpha_chunk or (max(1, len(settings.alphas) // groups) if trainer.parallel == "vmap" else 1)
    program = _path_program(trainer, settings, chunk)
    bn, train = _path_data(trainer, settings)
    correct = np.asarray(program(states_a.params, states_a.batch_stats, states_b.params,
                                 states_b.batch_stats, bn, trainer.test, train), np.float64)
    counts = np.array([float(trainer.test["count"]), float(train["count"])])
    return (counts - correct) / counts


@functools.lru_cache(maxsize=8)
def _path_data(trainer: Trainer, settings: PathSettings) -> tuple:
    """(BatchNorm batches, train-error subset), built once per trainer and setting."""
    return (bn_images(trainer, settings.bn_batches if settings.recompute_bn else 1),
            train_subset(trainer, settings.train_examples))


# ----- the experiment -----
def copies_dir(trainer: Trainer, dense: RunDir, rewind_steps, level: int) -> RunDir:
    """Copy 2 of every k in one stacked run: <dense>/instability/k0-100-500 for the dense network,
    <IMP dir>/instability_level{L}/k0-100-500 for IMP level L."""
    root = (os.path.join(dense.path, "instability") if level == 0
            else os.path.join(pipeline.imp_dir(trainer, dense), f"instability_level{level}"))
    name = "k" + "-".join(map(str, rewind_steps))
    if len(name) > 64:  # many k values: keep the folder name within file-system limits
        name = f"k{rewind_steps[0]}-to-{rewind_steps[-1]}_{len(rewind_steps)}values_{cfg.fingerprint(list(rewind_steps))}"
    return RunDir(os.path.join(root, name))


def level_mask(trainer: Trainer, dense: RunDir, rewind_step: int, level: int):
    """The mask IMP level `level` (rewinding to k) trained with, from that level's final state."""
    level_run = pipeline.level_dir(trainer, dense, rewind_step, level)
    num_seeds = len(pipeline.seeds_of(trainer.config))
    return level_run.restore(trainer.total_steps, trainer.abstract_state(num_seeds)).mask


def starting_states(trainer: Trainer, dense: RunDir, rewind_step: int, level: int) -> TrainState:
    """Dense: the full state at k (momentum included, so copy 1 retraces the dense run). Level L:
    the IMP rewind of that state with the level's mask (fresh optimizer, as IMP retrains)."""
    states = pipeline.state_at(trainer, dense, rewind_step)
    if level == 0:
        return states
    return pipeline.rewind(trainer, states, level_mask(trainer, dense, rewind_step, level))


def stacked(parts: list[TrainState]) -> TrainState:
    """Row groups one after another: rows (group, seed)."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def group_rows(group: int, num_seeds: int) -> slice:
    """The rows of the group-th k in a stacked state or path."""
    return slice(group * num_seeds, (group + 1) * num_seeds)


def first_copies(trainer: Trainer, dense: RunDir, rewind_steps, level: int) -> TrainState:
    """Copy 1's final states, rows (k, seed): those of the runs they retrace (the dense run, or
    IMP level `level` rewound to each k)."""
    target = trainer.abstract_state(len(pipeline.seeds_of(trainer.config)))
    runs = [dense if level == 0 else pipeline.level_dir(trainer, dense, k, level) for k in rewind_steps]
    return stacked([run_dir.restore(trainer.total_steps, target) for run_dir in runs])


def second_copies(trainer: Trainer, dense: RunDir, rewind_steps, level: int) -> TrainState:
    """Copy 2's final states, rows (k, seed), trained as one stacked run (trained, resumed or loaded).

    Every row starts at the first k; the rows of a later k hold a placeholder until training reaches
    that k, where their starting state joins the run. Each row then trains as a run of its own from
    k would (to float rounding; bit for bit where rows are mapped, as on CPU), at the price of the
    placeholder steps (k_i - k_0 of the T steps of a row). The progress line and metrics.jsonl
    average over all rows, placeholders included.
    """
    if list(rewind_steps) != sorted(set(rewind_steps)) or rewind_steps[-1] >= trainer.total_steps:
        raise ValueError(f"rewind steps must increase and lie before the end: {rewind_steps}")
    num_seeds = len(pipeline.seeds_of(trainer.config))
    start = lambda k: with_second_copy_keys(starting_states(trainer, dense, k, level))

    def join(group: int):
        rows = group_rows(group, num_seeds)
        return lambda states: jax.tree.map(lambda full, part: full.at[rows].set(part), states,
                                           start(rewind_steps[group]))

    first = rewind_steps[0]
    states, _ = run(trainer, copies_dir(trainer, dense, rewind_steps, level),
                    description=copies_description(trainer, dense, rewind_steps, level),
                    initial=lambda: stacked([start(first)] * len(rewind_steps)),
                    end=trainer.total_steps, label=f"instability k={','.join(map(str, rewind_steps))} level {level}",
                    joins={k: join(group) for group, k in enumerate(rewind_steps) if group})
    return states


def copies_description(trainer: Trainer, dense: RunDir, rewind_steps, level: int) -> dict:
    prune = pipeline.prune_identity(trainer)
    seeds = pipeline.seeds_of(trainer.config)
    return {"kind": "instability_second_copies", "dense": os.path.basename(dense.path),
            "rewinds": list(rewind_steps), "level": level, "prune": prune if level else None,
            "copy_salt": COPY_SALT, "seeds": seeds * len(rewind_steps),
            "rows": [[k, seed] for k in rewind_steps for seed in seeds]}


def measured_path(trainer: Trainer, dense: RunDir, rewind_steps, level: int,
                  settings: PathSettings, alpha_chunk: int | None = None) -> dict:
    """{errors [rows][A][splits], densities [rows]} with rows (k, seed), cached in the copies' folder."""
    run_dir = copies_dir(trainer, dense, rewind_steps, level)
    cache = run_dir.file(f"path_{cfg.fingerprint(dataclasses.asdict(settings))}.json")
    run_dir.check_identity(copies_description(trainer, dense, rewind_steps, level))
    if run_dir.complete() and os.path.exists(cache):
        return progress.read_json(cache)
    second = second_copies(trainer, dense, rewind_steps, level)
    first = first_copies(trainer, dense, rewind_steps, level)
    num_rows, started = len(rewind_steps) * len(pipeline.seeds_of(trainer.config)), time.time()
    print(f"[instability level {level}] measuring {num_rows} paths x {len(settings.alphas)} points "
          f"(test set + {settings.train_examples} train examples"
          + (f", BatchNorm from {settings.bn_batches} batches each)" if settings.recompute_bn else ")"), flush=True)
    errors = path_errors(trainer, first, second, settings, alpha_chunk)
    print(f"[instability level {level}] paths measured ({progress.format_seconds(time.time() - started)})", flush=True)
    out = {"settings": dataclasses.asdict(settings), "errors": errors.tolist(),
           "densities": pipeline.mask_densities(first.mask)}
    progress.write_json(cache, out)
    return out


def instability(trainer: Trainer, rewind_steps, *, level: int = 0, alphas=DEFAULT_ALPHAS,
                recompute_bn: bool = True, bn_batches: int = 50, train_examples: int = 10_000,
                alpha_chunk: int | None = None) -> list[dict]:
    """Error along the path between two copies trained from step k, for every k, seed and split.

    level 0: the dense network; level L > 0: IMP level L's subnetwork rewound to k (IMP is run or
    reused first). Returns rows (seed, rewind, level, density, split, alpha, error); `barriers(rows)`
    gives the barrier per (seed, rewind, level, split). A finished set of copies and its paths is
    reused (one stacked run per set of k values).
    """
    settings = PathSettings(tuple(alphas), recompute_bn, bn_batches, train_examples).check()
    steps = sorted(set(int(k) for k in rewind_steps))
    pipeline.check_rewind_steps(trainer, steps)
    if level < 0:
        raise UserError(f"level must be >= 0, got {level}")
    if level:
        pipeline.imp(trainer, steps, level)  # trains or reuses the dense run and levels 1..L
    else:
        pipeline.train_dense(trainer)
    dense = pipeline.dense_run_dir(trainer)
    path = measured_path(trainer, dense, steps, level, settings, alpha_chunk)
    seeds = pipeline.seeds_of(trainer.config)
    rows = []
    for group, k in enumerate(steps):
        part = group_rows(group, len(seeds))
        rows += path_rows(seeds, k, level, {name: path[name][part] for name in ("errors", "densities")},
                          settings.alphas)
    return rows


def path_rows(seeds, rewind_step: int, level: int, path: dict, alphas) -> list[dict]:
    return [{"seed": seed, "rewind": rewind_step, "level": level, "density": round(density, 6), "split": split,
             "alpha": alpha, "error": errors[a][s]}
            for seed, density, errors in zip(seeds, path["densities"], path["errors"])
            for s, split in enumerate(SPLITS) for a, alpha in enumerate(alphas)]


def barriers(path: list[dict]) -> list[dict]:
    """One row per (seed, rewind, level, split): barrier, the two end errors and the worst alpha."""
    groups: dict[tuple, list[dict]] = {}
    for row in path:
        groups.setdefault((row["seed"], row["rewind"], row["level"], row["split"]), []).append(row)
    out = []
    for (seed, k, level, split), points in groups.items():
        points = sorted(points, key=lambda r: r["alpha"])
        errors = [p["error"] for p in points]
        out.append({"seed": seed, "rewind": k, "level": level, "density": points[0]["density"],
                    "split": split, "barrier": barrier(errors), "error_copy1": errors[0],
                    "error_copy2": errors[-1], "worst_alpha": points[int(np.argmax(errors))]["alpha"]})
    return out


def summarize(barrier_rows: list[dict]) -> dict:
    """{(level, split): [(k, mean barrier, std, n)] sorted by k}, over seeds."""
    cells: dict[tuple, list[float]] = {}
    for row in barrier_rows:
        cells.setdefault((row["level"], row["split"], row["rewind"]), []).append(row["barrier"])
    out: dict[tuple, list] = {}
    for (level, split, k), values in sorted(cells.items()):
        out.setdefault((level, split), []).append((k, float(np.mean(values)), float(np.std(values)),
                                                   len(values)))
    return out


def barrier_rows_density(barrier_rows: list[dict], level: int) -> float:
    return float(np.mean([r["density"] for r in barrier_rows if r["level"] == level]))


def plot(barrier_rows: list[dict], along: list[dict], path: str, title: str) -> str:
    """Left: barrier vs k (symlog x, so k=0 shows), mean +- std over seeds, per level and split.
    Right: mean test error along the path for each (level, k)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    steps = sorted({r["rewind"] for r in barrier_rows})
    levels = sorted({r["level"] for r in barrier_rows})
    color = lambda i: plt.get_cmap("tab10")(i % 10)
    for (level, split), points in summarize(barrier_rows).items():  # colour: level; line: split
        k, mean, std = (np.array([p[i] for p in points]) for i in range(3))
        name = "dense" if level == 0 else f"level {level} ({100 * barrier_rows_density(barrier_rows, level):.1f}% left)"
        c = color(levels.index(level))
        left.plot(k, 100 * mean, marker="o", ms=4, color=c, ls="-" if split == "test" else "--",
                  label=f"{name}, {split}")
        left.fill_between(k, 100 * (mean - std), 100 * (mean + std), color=c, alpha=0.15)
    positive = [k for k in steps if k > 0]
    left.set_xscale("symlog", linthresh=min(positive) if positive else 1)
    left.set_xticks(steps, [str(k) for k in steps])
    left.axhline(0, color="0.5", lw=0.8)
    left.set_xlabel("rewind iteration k (symlog)")
    left.set_ylabel("error barrier (percentage points)")
    left.set_title(title)
    left.legend(fontsize=8)
    left.grid(True, alpha=0.3)
    curves: dict[tuple, dict] = {}
    for row in along:
        if row["split"] == "test":
            curves.setdefault((row["level"], row["rewind"]), {}).setdefault(row["alpha"], []).append(row["error"])
    for (level, k), by_alpha in sorted(curves.items()):  # colour: k; line: level
        alphas = sorted(by_alpha)
        name = "dense" if level == 0 else f"level {level}"
        right.plot(alphas, [100 * np.mean(by_alpha[a]) for a in alphas], marker=".",
                   color=color(steps.index(k)), ls=["-", "--", ":", "-."][levels.index(level) % 4],
                   label=f"{name}, k={k}")
    right.set_xlabel("interpolation alpha (copy 1 -> copy 2)")
    right.set_ylabel("test error (%)")
    right.set_title("error along the path (mean over seeds)")
    right.legend(fontsize=7)
    right.grid(True, alpha=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
