"""Perturbation experiments as branches off the IMP study (the paper's Section 4).

For each chosen level L, take the mask that unperturbed IMP found at L (rewinding to k), the dense
weights at step k, perturb the kept weights, and train from k to the end. The masks and the dense
run are reused; nothing of IMP is redone. All (level, treatment, seed) rows start at step k, so they
train as one stacked array axis in one compiled program; the unperturbed control (IMP rewound to k)
and the rewind-to-0 reference are the IMP rows themselves.
"""
from __future__ import annotations

import dataclasses
import math
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from early_jax import config as cfg
from early_jax import masks, perturb, pipeline, progress, report
from early_jax.errors import UserError
from early_jax.runner import RunDir, run
from early_jax.train import Trainer, TrainState


@dataclasses.dataclass(frozen=True)
class Treatment:
    name: str                    # a key of perturb.PERTURBATIONS
    scale: float | None = None   # the noise multiplier n, for "noise"

    @property
    def label(self) -> str:
        return f"noise {self.scale:g}x" if self.name == "noise" else self.name

    def key(self, perturb_key: jax.Array, level: int) -> jax.Array:
        """Each (seed, treatment, level) gets its own stream; adding one never shifts another."""
        tag = zlib.crc32(self.label.encode()) & 0x7FFFFFFF
        return jax.random.fold_in(jax.random.fold_in(perturb_key, tag), level)


def check_treatments(treatments) -> None:
    if not treatments:
        raise UserError("no perturbation to run: name at least one")
    for t in treatments:
        if t.name not in perturb.PERTURBATIONS:
            raise UserError(f"unknown perturbation {t.name!r}: use one of {', '.join(perturb.PERTURBATIONS)}")
        if t.name == "noise" and (t.scale is None or not math.isfinite(t.scale) or t.scale < 0):
            raise UserError(f"noise needs a finite scale >= 0, got {t.scale}")


def level_masks(trainer: Trainer, k: int, levels: list[int]) -> dict[int, dict]:
    """The masks IMP (rewinding to k) trained with at each level, found or computed."""
    pipeline.imp(trainer, [k], max(levels))
    dense = pipeline.dense_run_dir(trainer)
    target = trainer.abstract_state(trainer.config.num_seeds)
    return {level: pipeline.level_dir(trainer, dense, k, level).restore(trainer.total_steps, target).mask
            for level in levels}


def perturbed_states(trainer: Trainer, state_k: TrainState, state_0: TrainState, mask, level: int,
                     treatment: Treatment) -> tuple[TrainState, jax.Array]:
    """Rewound (masked, fresh optimizer) states with the treatment applied; and per seed the
    effective std and the raw std of the change (see perturb.effective_std), as [S, 2]."""
    rewound = pipeline.rewind(trainer, state_k, mask)
    w_0 = jax.vmap(masks.apply_mask)(state_0.params, mask)

    def one(key_data, w_k, w0, m):
        key = treatment.key(jax.random.wrap_key_data(key_data), level)
        after = perturb.apply(treatment.name, key, w_k, w0, m, treatment.scale)
        eff = perturb.effective_std(w_k, after, m, perturb.init_std(w_k, m))
        return after, jnp.stack([eff["overall"], eff["raw"]])

    params, eff = jax.jit(jax.vmap(one))(rewound.keys["perturb"], rewound.params, w_0, mask)
    return rewound.replace(params=params), eff


def branch_dir(trainer: Trainer, k: int, label: str, levels: list[int], treatments: list[Treatment]) -> RunDir:
    """One folder per set of (level, treatment) rows: adding a noise scale or a level starts a new
    run beside the finished ones instead of clashing with them."""
    dense = pipeline.dense_run_dir(trainer)
    rows = cfg.fingerprint([[level, t.label] for level in levels for t in treatments])
    return RunDir(os.path.join(pipeline.imp_dir(trainer, dense), f"rewind{k}", f"perturb_{label}_{rows}"))


def run_branches(trainer: Trainer, k: int, levels: list[int], treatments: list[Treatment],
                 label: str) -> tuple[list[dict], str]:
    """Train every (level, treatment, seed) row from step k in one stacked run; one result row each
    (seed, rewind, level, treatment, density, accuracy, effective_std, perturbation_std), and the
    run's folder."""
    check_treatments(treatments)
    levels = sorted(set(levels))
    if not levels or min(levels) < 1:
        raise UserError("perturbation levels must be >= 1 (level 0 is the dense network)")
    seeds = pipeline.seeds_of(trainer.config)
    cells = [(level, t) for level in levels for t in treatments]
    run_dir = branch_dir(trainer, k, label, levels, treatments)
    effective_path = run_dir.file("effective_std.json")
    description = {"kind": "perturbation", "rewind": k,
                   "rows": [[level, t.label, seed] for level, t in cells for seed in seeds],
                   "seeds": [seed for _ in cells for seed in seeds]}

    def initial() -> TrainState:
        masks_by_level = level_masks(trainer, k, levels)
        dense = pipeline.dense_run_dir(trainer)
        state_k, state_0 = pipeline.state_at(trainer, dense, k), pipeline.state_at(trainer, dense, 0)
        parts, effective = [], []
        for level, t in cells:
            states, eff = perturbed_states(trainer, state_k, state_0, masks_by_level[level], level, t)
            parts.append(states)
            effective += np.asarray(eff).tolist()
        progress.write_json(effective_path, effective)
        return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)

    level_masks(trainer, k, levels)  # the IMP levels first, each as its own resumable run
    states, result = run(trainer, run_dir, description=description, initial=initial,
                         end=trainer.total_steps, label=f"perturb {label} k={k}")
    effective = progress.read_json(effective_path)
    densities = pipeline.mask_densities(states.mask)
    rows = [{"seed": seed, "rewind": k, "level": level, "treatment": treatment,
             "density": d, "accuracy": acc, "effective_std": eff, "perturbation_std": raw}
            for (level, treatment, seed), d, acc, (eff, raw)
            in zip(description["rows"], densities, result["test_accuracy"], effective)]
    return rows, run_dir.path


def reference_rows(trainer: Trainer, k: int, levels: list[int]) -> list[dict]:
    """IMP rewound to k (the unperturbed control) and to 0, as rows of the same table."""
    references = {k: f"control (rewind to {k})"} | ({0: "rewind to 0"} if k else {})
    return [row | {"treatment": name, **dict.fromkeys(("effective_std", "perturbation_std"),
                                                        0.0 if rewind == k else np.nan)}
            for rewind, name in references.items() for row in pipeline.imp(trainer, [rewind], max(levels))]


def run_experiment(trainer: Trainer, k: int, levels: list[int], treatments: list[Treatment],
                   label: str, title: str) -> tuple[list[dict], str]:
    """Branches plus references, written as results.csv and accuracy-vs-remaining plot (legend
    with each treatment's mean effective std). Returns the rows and the output folder."""
    check_treatments(treatments)
    pipeline.check_rewind_steps(trainer, [k])
    branch_rows, out = run_branches(trainer, k, levels, treatments, label)
    rows = reference_rows(trainer, k, levels) + branch_rows
    report.write_csv(rows, os.path.join(out, "results.csv"))
    effective = {}
    for row in rows:
        effective.setdefault(row["treatment"], []).append(row["effective_std"])
    legend = lambda t: t if t.startswith(("control", "rewind")) else \
        f"{t} (eff. std {np.nanmean(effective[t]):.2f})"
    report.plot_accuracy_vs_remaining(rows, "treatment", os.path.join(out, f"{label}.png"), title,
                                      label=legend)
    return rows, out


def print_summary(rows: list[dict], out: str) -> None:
    for treatment, points in report.summarize(rows, "treatment").items():
        print(f"{treatment}: " + ", ".join(f"{100 * d:.1f}% left -> {100 * a:.2f}%" for d, a, _, _ in points))
    print(f"results: {out}/results.csv and the plot beside it")


def add_flags(parser) -> None:
    """Flags every perturbation script shares (besides the config flags)."""
    parser.add_argument("--rewind_iter", default="500it", help="the rewind step k (500, 500it, 2ep)")
    parser.add_argument("--perturb_levels", default=None,
                        help="IMP levels to perturb, comma-separated (default: 1..--levels)")


def experiment_main(args, treatments: list[Treatment], label: str, title: str) -> None:
    """The body of the perturbation scripts: config -> checks -> branches -> table and plot."""
    from early_jax import cli, data
    from early_jax.config import to_steps
    config = cli.cfg.config_from_args(args)
    check_treatments(treatments)  # before any data loading or training
    trainer = Trainer(config, data.load(config.data.name, config.data.data_dir))
    k = to_steps(args.rewind_iter, trainer.steps_per_epoch)
    pipeline.check_rewind_steps(trainer, [k])
    levels = cli.numbers(args.perturb_levels, int) if args.perturb_levels else list(range(1, config.prune.levels + 1))
    print(f"{title}: rewind to {k}, levels {levels}, {config.num_seeds} seed(s), treatments "
          f"{[t.label for t in treatments]}")
    rows, out = run_experiment(trainer, k, levels, treatments, label, title)
    print_summary(rows, out)
