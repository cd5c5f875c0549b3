"""Instability to SGD noise vs the rewind step k: two copies trained from the state at k, and the
error barrier on the line between them (the maths is in interpolation.py).

From the state at step k (the dense network, or an IMP subnetwork rewound to k with a level's mask)
two copies train to the end with different data order and augmentation:
- Copy 1 keeps the seed's own keys. Training is deterministic, so from the dense state at k it
  retraces the dense run, and from an IMP rewind it retraces that IMP level: its final state is the
  one already stored there and is loaded, not retrained.
- Copy 2 (order and augmentation keys drawn anew, see interpolation.second_copy_keys; init and
  perturb keys and the weights at k shared) is trained for all k values and S seeds at once: one
  resumable run over rows (k, seed), where the rows of each k join the run when it reaches k.
- The path (interpolate, recompute BatchNorm statistics, measure test and train error) is one
  compiled program over rows (k, seed) x alphas, cached next to the copies per path setting.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp

from early_jax import files, pipeline, progress, runs, tables
from early_jax.errors import UserError
from early_jax.interpolation import SPLITS, PathSettings, barrier, path_errors, with_second_copy_keys
from early_jax.pipeline import Experiment
from early_jax.runner import run
from early_jax.train import TrainState


def copies(exp: Experiment, rewind_steps, level: int) -> runs.InstabilityCopies:
    return runs.InstabilityCopies(exp.dense, exp.prune if level else None, level, tuple(rewind_steps))


def starting_states(exp: Experiment, rewind_step: int, level: int) -> TrainState:
    """Dense: the full state at k (momentum included, so copy 1 retraces the dense run). Level L:
    the IMP rewind of that state with the level's mask (fresh optimizer, as IMP retrains)."""
    states = pipeline.state_at(exp, rewind_step)
    if level == 0:
        return states
    return pipeline.rewind(exp, states, pipeline.mask_of(exp, rewind_step, level))


def stacked(parts: list[TrainState]) -> TrainState:
    """Row groups one after another: rows (group, seed)."""
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def group_rows(group: int, num_seeds: int) -> slice:
    """The rows of the group-th k in a stacked state or path."""
    return slice(group * num_seeds, (group + 1) * num_seeds)


def first_copies(exp: Experiment, rewind_steps, level: int) -> TrainState:
    """Copy 1's final states, rows (k, seed): those of the runs they retrace (the dense run, or
    IMP level `level` rewound to each k)."""
    return stacked([pipeline.final_states(exp, exp.level(k, level)) for k in rewind_steps])


def second_copies(exp: Experiment, rewind_steps, level: int) -> TrainState:
    """Copy 2's final states, rows (k, seed), trained as one stacked run (trained, resumed or loaded).

    Every row starts at the first k; the rows of a later k hold a placeholder until training reaches
    that k, where their starting state joins the run. Each row then trains as a run of its own from
    k would (to float rounding; bit for bit where rows are mapped, as on CPU), at the price of the
    placeholder steps (k_i - k_0 of the T steps of a row). The progress line and metrics.jsonl
    average over all rows, placeholders included.
    """
    if list(rewind_steps) != sorted(set(rewind_steps)) or rewind_steps[-1] >= exp.total_steps:
        raise ValueError(f"rewind steps must increase and lie before the end: {rewind_steps}")
    start = lambda k: with_second_copy_keys(starting_states(exp, k, level))

    def join(group: int):
        rows = group_rows(group, len(exp.seeds))
        return lambda states: jax.tree.map(lambda full, part: full.at[rows].set(part), states,
                                           start(rewind_steps[group]))

    return run(exp.trainer, copies(exp, rewind_steps, level),
               initial=lambda: stacked([start(rewind_steps[0])] * len(rewind_steps)),
               label=f"instability k={','.join(map(str, rewind_steps))} level {level}",
               joins={k: join(group) for group, k in enumerate(rewind_steps) if group}).states()


def measured_path(exp: Experiment, rewind_steps, level: int, settings: PathSettings,
                  alpha_chunk: int | None = None) -> dict:
    """{errors [rows][A][splits], densities [rows]} with rows (k, seed), cached in the copies' folder."""
    descriptor = copies(exp, rewind_steps, level)
    run_dir = exp.run_dir(descriptor)
    cache = run_dir.file(f"path_{runs.digest(settings)}.json")
    run_dir.claim(descriptor.describe())
    if run_dir.complete() and os.path.exists(cache):
        return files.read_json(cache)
    second = second_copies(exp, rewind_steps, level)
    first = first_copies(exp, rewind_steps, level)
    num_rows, started = len(descriptor.seeds), time.time()
    print(f"[instability level {level}] measuring {num_rows} paths x {len(settings.alphas)} points "
          f"(test set + {settings.train_examples} train examples"
          + (f", BatchNorm from {settings.bn_batches} batches each)" if settings.recompute_bn else ")"), flush=True)
    errors = path_errors(exp.trainer, first, second, settings, alpha_chunk)
    print(f"[instability level {level}] paths measured ({progress.format_seconds(time.time() - started)})", flush=True)
    out = {"settings": runs.identity(settings), "errors": errors.tolist(),
           "densities": run_dir.result()["density"]}
    files.write_json(cache, out)
    return out


def instability(exp: Experiment, rewind_steps, *, level: int = 0, settings: PathSettings = PathSettings(),
                alpha_chunk: int | None = None) -> list[dict]:
    """Error along the path between two copies trained from step k, for every k, seed and split.

    level 0: the dense network; level L > 0: IMP level L's subnetwork rewound to k (IMP is run or
    reused first). Returns rows (seed, rewind, level, density, split, alpha, error); `barriers(rows)`
    gives the barrier per (seed, rewind, level, split). A finished set of copies and its paths is
    reused (one stacked run per set of k values).
    """
    settings = settings.check()
    steps = sorted(set(int(k) for k in rewind_steps))
    pipeline.check_rewind_steps(exp, steps)
    if level < 0:
        raise UserError(f"level must be >= 0, got {level}")
    pipeline.imp(exp, steps, level)  # the dense run and levels 1..L (found when finished)
    path = measured_path(exp, steps, level, settings, alpha_chunk)
    rows = []
    for group, k in enumerate(steps):
        part = group_rows(group, len(exp.seeds))
        for seed, density, errors in zip(exp.seeds, path["densities"][part], path["errors"][part]):
            rows += [{"seed": seed, "rewind": k, "level": level, "density": round(density, 6),
                      "split": split, "alpha": alpha, "error": errors[a][s]}
                     for s, split in enumerate(SPLITS) for a, alpha in enumerate(settings.alphas)]
    return rows


def barriers(path: list[dict]) -> list[dict]:
    """One row per (seed, rewind, level, split): barrier, the two end errors and the worst alpha."""
    out = []
    for (seed, k, level, split), points in tables.group_rows(path, ("seed", "rewind", "level", "split")).items():
        points = sorted(points, key=lambda r: r["alpha"])
        errors = [p["error"] for p in points]
        worst = max(range(len(errors)), key=errors.__getitem__)
        out.append({"seed": seed, "rewind": k, "level": level, "density": points[0]["density"],
                    "split": split, "barrier": barrier(errors), "error_copy1": errors[0],
                    "error_copy2": errors[-1], "worst_alpha": points[worst]["alpha"]})
    return out


def rows_on_disk(exp: Experiment, level: int, settings: PathSettings) -> list[dict]:
    """Every path measured with these settings for this network (dense, or IMP level L of this
    prune setting), over all sets of k ever run; a (seed, k) measured in two sets is shown once."""
    root = os.path.dirname(exp.path(copies(exp, [0], level)))
    cache = f"path_{runs.digest(settings.check())}.json"
    seen, rows = set(), []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        record = os.path.join(root, name, "run.json")
        if not (os.path.exists(record) and os.path.exists(os.path.join(root, name, cache))):
            continue
        steps = files.read_json(record)["rewinds"]
        if exp.path(copies(exp, steps, level)) != os.path.join(root, name):
            continue  # another dense run's or prune setting's
        for row in instability(exp, steps, level=level, settings=settings):
            key = (row["seed"], row["rewind"], row["split"], row["alpha"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows
