"""Early-phase telemetry (the paper's Fig. 3): statistics of the weights during the first N steps.

The statistics are computed inside the compiled training program at every step, while the early
steps are *replayed* from the dense run's step-0 checkpoint after the run has finished: training is
deterministic, so the replay sees exactly the original weights, and distances to the final weights
W_T need no stored trajectory.

Every statistic is computed over the prunable conv/dense kernels concatenated ("all"), and, given an
IMP mask, over only the weights that mask keeps ("sub"). Per-layer versions come from the same sums.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from early_jax import files, masks, pipeline, report, runs, streams, tables
from early_jax.errors import UserError
from early_jax.pipeline import Experiment
from early_jax.train import Trainer, TrainState

STATS = ("mean_abs", "sign_flip", "dist_init", "dist_final", "cos_init", "cos_final")
NUM_SAMPLES = 10


def kernels(params, mask) -> list[jax.Array]:
    """The prunable kernels in the shared sorted path order."""
    return [w for w, _ in masks.masked_kernels(params, mask).values()]


def layer_names(params, mask) -> list[str]:
    return list(masks.masked_kernels(params, mask))


def layer_sums(w: jax.Array, w0: jax.Array, wt: jax.Array, keep: jax.Array) -> jax.Array:
    """[10] sums over the kept entries of one layer, from which every statistic follows."""
    k = keep.astype(jnp.float32)
    return jnp.stack([k.sum(), (k * jnp.abs(w)).sum(),
                      (k * (jnp.sign(w) != jnp.sign(w0))).sum(),
                      (k * (w - w0) ** 2).sum(), (k * (w - wt) ** 2).sum(),
                      (k * w * w0).sum(), (k * w * wt).sum(),
                      (k * w * w).sum(), (k * w0 * w0).sum(), (k * wt * wt).sum()])


def stats_from_sums(s: jax.Array) -> dict:
    """Mean |w|, % of signs flipped since init, L2 distance and cosine to W_0 and W_T."""
    count, abs_sum, flips, d0, dt, dot0, dott, ww, w0w0, wtwt = (s[..., i] for i in range(10))
    safe = lambda x: jnp.maximum(x, 1e-30)
    return {"mean_abs": abs_sum / safe(count), "sign_flip": 100 * flips / safe(count),
            "dist_init": jnp.sqrt(d0), "dist_final": jnp.sqrt(dt),
            "cos_init": dot0 / safe(jnp.sqrt(ww * w0w0)), "cos_final": dott / safe(jnp.sqrt(ww * wtwt))}


def make_refs(init_params, final_params, state_mask, subnet_mask, sample_key) -> dict:
    """Per-seed references: kernels of W_0 and W_T, the subnetwork mask, sampled weight indices."""
    w0, wt = kernels(init_params, state_mask), kernels(final_params, state_mask)
    sub = [m for _, m in masks.masked_kernels(init_params, subnet_mask).values()] if subnet_mask \
        else [jnp.ones(w.shape, bool) for w in w0]
    total = sum(w.size for w in w0)
    return {"init": w0, "final": wt, "sub": sub,
            "sample": jax.random.choice(sample_key, total, (NUM_SAMPLES,), replace=False)}


def observe(state: TrainState, refs: dict) -> dict:
    """Statistics of one seed's weights (runs inside the compiled step; see Trainer.advance)."""
    ws = kernels(state.params, state.mask)
    out = {}
    for prefix, keeps in (("all", [jnp.ones(w.shape, bool) for w in ws]), ("sub", refs["sub"])):
        per_layer = jnp.stack([layer_sums(w, w0, wt, k) for w, w0, wt, k
                               in zip(ws, refs["init"], refs["final"], keeps)])
        for name, value in stats_from_sums(per_layer.sum(0)).items():
            out[f"{prefix}_{name}"] = value
        for name, value in stats_from_sums(per_layer).items():
            out[f"layer_{prefix}_{name}"] = value  # [num_layers]
    out["samples"] = jnp.concatenate([w.ravel() for w in ws])[refs["sample"]]
    return out


def log_spaced_steps(end: int) -> list[int]:
    """0, 1, 2, 4, ... (powers of two) up to `end`, plus `end`: where test accuracy is measured."""
    steps = [0] + [2 ** i for i in range(int(math.log2(max(end, 1))) + 1) if 2 ** i < end]
    return steps + [end]


def replay(trainer: Trainer, start_states: TrainState, refs: dict, end: int,
           saved: dict[int, Callable[[], Any]] | None = None) -> tuple[TrainState, dict]:
    """Train from step 0 to `end` observing every step; test metrics at log-spaced steps.

    `saved` ({step: () -> params}, the run's own checkpoints) are compared with the replay as it
    passes them: distances to the run's final weights mean something only if the replay is the run.
    Returns the states at `end` and a dict of arrays: per-step stats [end+1, S, ...] (row 0 is the
    state before any step) and `test_*` [len(eval_steps), S] with `eval_steps`.
    """
    saved = {s: load for s, load in (saved or {}).items() if 0 < s <= end}
    eval_steps = log_spaced_steps(end)
    first = jax.jit(jax.vmap(observe))(start_states, refs)
    steps_log, evals = [], []
    states = start_states
    for boundary in sorted(set(eval_steps) | set(saved)):
        if boundary > 0:
            states, metrics = trainer.advance(states, boundary, observe=observe, refs=refs)
            steps_log.append(metrics)
        if boundary in saved:
            check_same_weights(states.params, saved[boundary](), boundary)
        if boundary in eval_steps:
            evals.append(trainer.evaluate(states))
    per_step = {k: np.concatenate([np.asarray(first[k])[None]] + [m[k] for m in steps_log])
                for k in first}
    for name in ("loss", "accuracy", "grad_norm"):  # the step's own metrics; none before step 0
        values = np.concatenate([m[name] for m in steps_log])
        per_step[name] = np.concatenate([np.full((1, values.shape[1]), np.nan), values])
    per_step["eval_steps"] = np.array(eval_steps)
    for key in evals[0]:
        per_step[key] = np.stack([e[key] for e in evals])
    return states, per_step


def check_same_weights(replayed, saved, step: int, rtol: float = 1e-5) -> None:
    """Refuse a replay that drifted from the run's checkpoint (relative to the weights' size)."""
    gap = float(optax.tree.norm(jax.tree.map(lambda a, b: a - b, replayed, saved)))
    size = float(optax.tree.norm(saved))
    if gap > rtol * size:
        raise UserError(f"replaying the dense run does not reproduce its checkpoint at step {step} "
                        f"(|replay - saved| = {gap:.3g} vs |w| = {size:.3g}): it was trained another "
                        "way (backend, seed parallelism, device count, or an earlier version of "
                        "early_jax or jax); retrain it here (another --workdir) to measure "
                        "distances to its final weights")


def telemetry_rows(per_step: dict, seeds: list[int], every: int = 1) -> list[dict]:
    """One row per (seed, step) with the global statistics, samples and (where measured) test metrics."""
    scalar = [k for k in per_step if k.startswith(("all_", "sub_")) or k in ("loss", "accuracy", "grad_norm")]
    evals = {int(s): i for i, s in enumerate(per_step["eval_steps"])}
    rows = []
    for step in range(per_step["samples"].shape[0]):
        if step % every and step not in evals:
            continue
        for i, seed in enumerate(seeds):
            row = {"seed": seed, "step": step, **{k: float(per_step[k][step, i]) for k in scalar}}
            row |= {f"sample_{j}": float(v) for j, v in enumerate(per_step["samples"][step, i])}
            if step in evals:
                row |= {"test_loss": float(per_step["test_loss"][evals[step], i]),
                        "test_accuracy": float(per_step["test_accuracy"][evals[step], i])}
            rows.append(row)
    return rows


def layer_rows(per_step: dict, seeds: list[int], layers: list[str]) -> list[dict]:
    """Per-layer statistics at the log-spaced evaluation steps (one row per seed, step, layer)."""
    rows = []
    for step in per_step["eval_steps"]:
        for i, seed in enumerate(seeds):
            for j, layer in enumerate(layers):
                rows.append({"seed": seed, "step": int(step), "layer": layer,
                             **{f"{p}_{s}": float(per_step[f"layer_{p}_{s}"][step, i, j])
                                for p in ("all", "sub") for s in STATS}})
    return rows


def sample_keys(states: TrainState) -> jax.Array:
    """Which weights to trace: drawn from each seed's perturbation stream (no other stream moves)."""
    return jax.vmap(lambda k: streams.derive(jax.random.wrap_key_data(k), "telemetry_samples"))(states.keys["perturb"])


def descriptor_of(exp: Experiment, end: int, *, level: int = 0, rewind: int = 0, every: int = 1) -> runs.Telemetry:
    return runs.Telemetry(exp.dense, end, every, exp.level(rewind, level) if level else None)


def run_telemetry(exp: Experiment, end: int, *, level: int = 0, rewind: int = 0, every: int = 1) -> str:
    """Telemetry of the first `end` steps of the dense run (trained or reused first), optionally
    with the subnetwork kept at IMP `level` (rewinding to `rewind`). Writes telemetry.csv,
    telemetry_layers.csv and telemetry.png into a folder of the dense run; returns that folder.
    A finished folder is found and reused without touching a checkpoint."""
    descriptor = descriptor_of(exp, end, level=level, rewind=rewind, every=every)
    out = exp.path(descriptor)
    if descriptor.complete(exp.config.workdir):
        return out
    dense = pipeline.train_dense(exp)
    subnet = pipeline.mask_of(exp, rewind, level) if level else None
    start = pipeline.state_at(exp, 0)
    final = dense.states()
    refs = jax.jit(jax.vmap(make_refs))(start.params, final.params, start.mask, subnet, sample_keys(start))
    layers = layer_names(jax.tree.map(lambda x: x[0], start.params), jax.tree.map(lambda x: x[0], start.mask))
    dense_dir = exp.run_dir(exp.dense)
    pipeline.check_replayable(exp, dense_dir, end)
    params_at = lambda step: dense_dir.restore(step, final).params
    _, per_step = replay(exp.trainer, start, refs, end,
                         saved={s: functools.partial(params_at, s) for s in dense_dir.checkpoints().steps()})
    rows = telemetry_rows(per_step, list(exp.seeds), every)
    exp.run_dir(descriptor).claim(descriptor.describe())
    tables.write_csv(rows, os.path.join(out, "telemetry.csv"))
    tables.write_csv(layer_rows(per_step, list(exp.seeds), layers), os.path.join(out, "telemetry_layers.csv"))
    report.plot_telemetry(rows, os.path.join(out, "telemetry.png"),
                          f"early phase, {exp.config.model.name}", subnet=bool(level))
    files.write_json(os.path.join(out, "result.json"), {"steps": end, "seeds": list(exp.seeds),
                                                       "tables": ["telemetry.csv", "telemetry_layers.csv"]})
    return out
