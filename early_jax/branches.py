"""Perturbation experiments as branches off the IMP study (the paper's Section 4).

For each chosen level L, take the mask that unperturbed IMP found at L (rewinding to k), the dense
weights at step k, perturb the kept weights, and train from k to the end. The masks and the dense
run are reused; nothing of IMP is redone. All (level, treatment, seed) rows start at step k, so they
train as one stacked array axis in one compiled program; the unperturbed control (IMP rewound to k)
and the rewind-to-0 reference are the IMP rows themselves.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from early_jax import files, masks, perturb, pipeline, report, runs, sharding, streams, tables
from early_jax.errors import UserError
from early_jax.perturb import Treatment
from early_jax.pipeline import Experiment
from early_jax.runner import run
from early_jax.train import TrainState


def check_treatments(treatments) -> None:
    if not treatments:
        raise UserError("no perturbation to run: name at least one")
    for t in treatments:
        if t.name not in perturb.PERTURBATIONS:
            raise UserError(f"unknown perturbation {t.name!r}: use one of {', '.join(perturb.PERTURBATIONS)}")
        if t.name == "noise" and (t.scale is None or not math.isfinite(t.scale) or t.scale < 0):
            raise UserError(f"noise needs a finite scale >= 0, got {t.scale}")


def check_levels(exp: Experiment, levels) -> list[int]:
    levels = sorted(set(levels))
    if not levels or min(levels) < 1:
        raise UserError("perturbation levels must be >= 1 (level 0 is the dense network)")
    return levels


def perturbed_states(exp: Experiment, state_k: TrainState, state_0: TrainState, mask, level: int,
                     treatment: Treatment) -> tuple[TrainState, jax.Array]:
    """Rewound (masked, fresh optimizer) states with the treatment applied; and per seed the
    effective std and the raw std of the change (see perturb.effective_std), as [S, 2]."""
    pipeline.check_finite(exp, state_k, "perturb")
    rewound = pipeline.rewind(exp, state_k, mask)
    w_0 = jax.vmap(masks.apply_mask)(state_0.params, mask)
    params, eff = perturbation_program(treatment, level)(rewound.keys["perturb"], rewound.params, w_0, mask)
    return rewound.replace(params=params), eff


@functools.lru_cache(maxsize=64)
def perturbation_program(treatment: Treatment, level: int):
    """jit((perturb key data, W_k, masked W_0, mask) per row -> (perturbed W_k, [effective std,
    raw std])), vmapped over the rows."""
    def one(key_data, w_k, w0, m):
        key = streams.derive(jax.random.wrap_key_data(key_data), *treatment.stream_names, level)
        after = perturb.apply(treatment.name, key, w_k, w0, m, treatment.scale)
        eff = perturb.effective_std(w_k, after, m, perturb.init_std(w_k, m))
        return after, jnp.stack([eff["overall"], eff["raw"]])

    return jax.jit(jax.vmap(one))


def descriptor(exp: Experiment, k: int, levels, treatments) -> runs.Perturbation:
    """One run per set of (level, treatment) rows: adding a noise scale or a level starts a new
    run beside the finished ones instead of clashing with them."""
    return runs.Perturbation(exp.dense, exp.prune, k, tuple((lv, t) for lv in levels for t in treatments))


def run_branches(exp: Experiment, k: int, levels: list[int], treatments: list[Treatment]) -> list[dict]:
    """Train every (level, treatment, seed) row from step k in one stacked run (or find it); one
    result row each (seed, rewind, level, treatment, density, accuracy, effective_std,
    perturbation_std, diverged)."""
    check_treatments(treatments)
    levels = check_levels(exp, levels)
    branch = descriptor(exp, k, levels, treatments)
    run_dir = exp.run_dir(branch)

    def initial() -> TrainState:
        masks_by_level = {level: pipeline.mask_of(exp, k, level) for level in levels}
        state_k, state_0 = pipeline.state_at(exp, k), pipeline.state_at(exp, 0)
        parts, effective = [], []
        for level, t in branch.rows:
            states, eff = perturbed_states(exp, state_k, state_0, masks_by_level[level], level, t)
            parts.append(states)
            effective += sharding.to_host(eff).tolist()
        files.write_json(run_dir.file("effective_std.json"), effective)
        return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)

    if not branch.complete(exp.config.workdir):
        pipeline.imp(exp, [k], max(levels))  # the IMP levels first, each as its own resumable run
    outcome = run(exp.trainer, branch, initial=initial,
                  label=f"perturb {'+'.join(dict.fromkeys(t.label for t in treatments))} k={k}")
    return branch_rows(branch, outcome.result, files.read_json(run_dir.file("effective_std.json")))


def branch_rows(branch: runs.Perturbation, result: dict, effective: list) -> list[dict]:
    cells = [(level, t.label) for level, t in branch.rows for _ in branch.dense.seeds]
    rows = pipeline.result_rows(result, rewind=branch.rewind)
    return [row | {"level": level, "treatment": label, "effective_std": eff, "perturbation_std": raw}
            for row, (level, label), (eff, raw) in zip(rows, cells, effective)]


def branch_rows_on_disk(exp: Experiment, k: int) -> list[dict]:
    """Every finished perturbation run at rewind step k of this prune setting on disk."""
    folder = os.path.join(exp.imp_path(), f"rewind{k}")
    rows = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if name.startswith("perturb_") and os.path.exists(os.path.join(path, "result.json")):
            recorded = files.read_json(os.path.join(path, "run.json"))["rows"]
            branch = runs.Perturbation(exp.dense, exp.prune, k,
                                       tuple((lv, Treatment(**t)) for lv, t in recorded))
            if exp.path(branch) == path:  # a run of this dense run and prune setting
                rows += branch_rows(branch, files.read_json(os.path.join(path, "result.json")),
                                    files.read_json(os.path.join(path, "effective_std.json")))
    return rows


def reference_rows(exp: Experiment, k: int, levels: list[int]) -> list[dict]:
    """IMP rewound to k (the unperturbed control) and to 0, as rows of the same table."""
    references = {k: f"control (rewind to {k})"} | ({0: "rewind to 0"} if k else {})
    return [row | {"treatment": name, "effective_std": 0.0 if rewind == k else np.nan,
                   "perturbation_std": 0.0 if rewind == k else np.nan}
            for rewind, name in references.items() for row in pipeline.imp(exp, [rewind], max(levels))]


def run_experiment(exp: Experiment, k: int, levels: list[int], treatments: list[Treatment],
                   title: str) -> tuple[list[dict], str]:
    """Branches plus references; then perturbations.csv and the accuracy-vs-remaining plot of
    every perturbation finished at k (this call's and earlier ones'), with each treatment's mean
    effective std in the legend. Returns this call's rows and the table's path."""
    check_treatments(treatments)
    pipeline.check_rewind_steps(exp, [k])
    rows = reference_rows(exp, k, levels) + run_branches(exp, k, levels, treatments)
    shown = reference_rows(exp, k, levels) + branch_rows_on_disk(exp, k)
    out = os.path.join(exp.imp_path(), f"rewind{k}")
    path = tables.write_csv(shown, os.path.join(out, "perturbations.csv"))
    report.plot_perturbations(shown, os.path.join(out, "perturbations.png"), title)
    return rows, path


def print_summary(rows: list[dict], path: str) -> None:
    for treatment, points in report.curves(rows, "treatment").items():
        print(f"{treatment}: " + ", ".join(f"{100 * d:.1f}% left -> {s.text()}%" for d, s in points))
    print(f"results: {path} and perturbations.png beside it (every perturbation run at this k)")
