"""The whole paper in one command, at a chosen scale: dense run, telemetry, IMP at rewind 0 and k,
perturbations at k, instability vs k and one pre-training task, then a report with every figure.

Every piece is a resumable run in the work dir, so an interrupted study picks up where it stopped and
a finished one only regenerates its report.
"""
from __future__ import annotations

import dataclasses
import os

from early_jax import branches, config as cfg, files, instability, pipeline, plans, pretrain, runs, tables, telemetry
from early_jax.errors import UserError
from early_jax.interpolation import DEFAULT_ALPHAS, PathSettings
from early_jax.perturb import Treatment
from early_jax.pipeline import Experiment


@dataclasses.dataclass(frozen=True)
class Plan:
    """What the study runs (durations in the config's units; levels are IMP levels)."""

    rewind: str = "500it"
    levels: int = 8
    perturb_levels: tuple = (8,)
    treatments: tuple = ("shuffle_layer", "shuffle_layer_keep_signs", "reinit_keep_signs")
    noise_scales: tuple = (0.5, 1.0, 2.0, 3.0)
    instability_rewinds: tuple = ("0it", "100it", "500it", "2000it")
    telemetry_steps: str = "4000it"
    pretrain_task: str = "blur"
    pretrain_epochs: tuple = (1, 2, 4)
    pretrain_offset: str = "replace"  # "none" where P epochs would eat most of a short run
    # 0: the dense network, at every instability k; L: IMP level L's subnetworks, at the rewind
    # steps IMP trains anyway (0 and k: each needs its own IMP levels)
    instability_levels: tuple = (0,)
    instability_alphas: tuple = DEFAULT_ALPHAS
    instability_train_examples: int = 10_000
    instability_bn_batches: int = 50


# The config changes and plan of each preset's study. `fashion_resnet8` (the default, what
# `make demo` runs) is where the paper's findings show on a CPU (docs/study_search.md): 3 seeds,
# 2 levels, perturbations at the sparsest level (16% left), instability of the dense network at
# four k and of that level's subnetworks at 0 and k, one epoch of blur pre-training before the full
# run (replacing one of its three epochs would measure a shortened run rather than the
# pre-training). `fashion_cpu` is the quick study of the small convnet (2 epochs, 2 seeds), in
# which nothing depends on the early phase.
CPU_PATHS = dict(instability_alphas=(0.0, 0.25, 0.5, 0.75, 1.0), instability_train_examples=2000,
                 instability_bn_batches=20)
STUDIES = {
    "fashion_resnet8": (
        {},
        Plan(rewind="100it", levels=2, perturb_levels=(2,), noise_scales=(1.0, 3.0),
             instability_rewinds=("0it", "10it", "50it", "200it"), instability_levels=(0, 2),
             telemetry_steps="400it", pretrain_task="blur", pretrain_epochs=(1,), pretrain_offset="none",
             **CPU_PATHS)),
    "fashion_cpu": (
        {"duration": "2ep", "milestones": "1ep", "save_steps": "0it,10it,25it,50it,100it,200it",
         "num_seeds": "2", "eval_every": "2ep", "fraction": "0.6"},
        Plan(rewind="50it", levels=3, perturb_levels=(2, 3), noise_scales=(1.0, 3.0),
             instability_rewinds=("0it", "10it", "50it", "200it"), telemetry_steps="400it",
             pretrain_task="blur", pretrain_epochs=(1,), pretrain_offset="none", **CPU_PATHS)),
    "cifar10_resnet20": (
        {"num_seeds": "2"},
        Plan()),
}


def study_config(preset: str, overrides: dict) -> tuple[cfg.Config, Plan]:
    """The preset, then the study's scale for it, then the user's flags (which win; --levels and
    --rewind_iters set the plan's IMP depth and its one rewind step k)."""
    changes, plan = STUDIES.get(preset, ({}, Plan()))
    config = cfg.validate(cfg.override(cfg.override(cfg.PRESETS[preset], changes), overrides))
    if "levels" in overrides:
        levels = config.prune.levels
        if levels < 1:
            raise UserError("the study needs --levels >= 1")
        kept = tuple(lv for lv in plan.perturb_levels if lv <= levels) or (levels,)
        plan = dataclasses.replace(plan, levels=levels, perturb_levels=kept)
    if "rewind_iters" in overrides:
        if len(config.prune.rewind_iters) != 1:
            raise UserError(f"the study uses one rewind step k; got --rewind_iters={overrides['rewind_iters']}")
        plan = dataclasses.replace(plan, rewind=config.prune.rewind_iters[0])
    return config, plan


def descriptor(exp: Experiment, plan: Plan) -> runs.Study:
    """The study's tables and report: one folder per prune setting and plan, so two studies that
    share a dense run never mix their tables."""
    return runs.Study(exp.dense, exp.prune, plan)


def steps_of(plan: Plan, exp: Experiment) -> dict:
    return {"rewind": exp.steps(plan.rewind),
            "instability": sorted({exp.steps(k) for k in plan.instability_rewinds}),
            "telemetry": min(exp.steps(plan.telemetry_steps), exp.total_steps)}


def check(plan: Plan, exp: Experiment) -> None:
    """Everything the study will refuse, refused before any training."""
    steps = steps_of(plan, exp)
    pipeline.check_rewind_steps(exp, [0, steps["rewind"], *steps["instability"]])
    branches.check_treatments(treatments(plan))
    pretrain.check_task(pretrain.parse_task(plan.pretrain_task), exp.dataset, exp.config.train.batch_size)
    for epochs in plan.pretrain_epochs:
        pretrain.start_step(exp, epochs, plan.pretrain_offset)
    for name, levels, lowest in (("perturbation", plan.perturb_levels, 1), ("instability", plan.instability_levels, 0)):
        if not set(levels) <= set(range(lowest, plan.levels + 1)):
            raise UserError(f"{name} levels {levels} must lie in {lowest}..{plan.levels}")
    path_settings(plan).check()


def instability_steps(plan: Plan, exp: Experiment, level: int) -> list[int]:
    steps = steps_of(plan, exp)
    return steps["instability"] if level == 0 else sorted({0, steps["rewind"]})


def path_settings(plan: Plan) -> PathSettings:
    return PathSettings(tuple(plan.instability_alphas), True, plan.instability_bn_batches,
                        plan.instability_train_examples)


def treatments(plan: Plan) -> list[Treatment]:
    return [Treatment(name) for name in plan.treatments] + [Treatment("noise", n) for n in plan.noise_scales]


def pieces(plan: Plan, exp: Experiment, speed: plans.Speed) -> list[plans.Piece]:
    """Every run the study trains (finished ones are priced at nothing by plans.print_plan)."""
    steps, end, seeds = steps_of(plan, exp), exp.total_steps, len(exp.seeds)
    k = steps["rewind"]
    branch = branches.descriptor(exp, k, sorted(plan.perturb_levels), treatments(plan))
    out = plans.dense_and_imp(exp, {0, k}, plan.levels) + [
        plans.Piece(f"telemetry replay ({steps['telemetry']} steps)", telemetry.descriptor_of(
            exp, steps["telemetry"], level=max(plan.perturb_levels), rewind=k), seeds, 0, steps["telemetry"],
            evals=len(telemetry.log_spaced_steps(steps["telemetry"])), new_program=True),
        plans.Piece(f"perturbations ({len(branch.rows)} rows x seeds)", branch, len(branch.seeds), k, end,
                    new_program=True)]
    for level in plan.instability_levels:
        copies = instability.copies(exp, instability_steps(plan, exp, level), level)
        out.append(plans.Piece(f"instability copies, level {level} ({len(copies.rewinds)} k x seeds)",
                               copies, len(copies.seeds), copies.rewinds[0], end, new_program=True,
                               extra_s=plans.path_seconds(exp, speed, len(copies.seeds), path_settings(plan))))
    task = pretrain.parse_task(plan.pretrain_task)
    for e in plan.pretrain_epochs:
        pre = runs.Pretraining(exp.dense, task, e)
        start = pretrain.start_step(exp, e, plan.pretrain_offset)
        out.append(plans.Piece(f"pre-training {task.name} {e}ep", pre, seeds, 0, e * exp.steps_per_epoch,
                               new_program=True))
        out += [plans.Piece(f"  then level {level}", runs.AfterPretraining(
            pre, plan.pretrain_offset, exp.prune if level else None, level), seeds, start, end)
            for level in range(plan.levels + 1)]
    return out


def run_study(exp: Experiment, plan: Plan) -> dict[str, str]:
    """Run (or reuse) every piece, write the CSVs into the study's folder; returns {table: path}."""
    check(plan, exp)
    steps = steps_of(plan, exp)
    k = steps["rewind"]
    out = exp.path(descriptor(exp, plan))
    config = exp.config
    files.write_json(os.path.join(out, "study.json"), {
        "title": f"early-phase study: {config.model.name} on {exp.dataset.name}",
        "plan": dataclasses.asdict(plan), "prune": runs.identity(exp.prune),
        "seeds": list(exp.seeds), "dense": exp.dense.folder()})
    tables_ = {}

    def save(name, rows):
        tables_[name] = tables.write_csv(rows, os.path.join(out, f"{name}.csv"))

    dense = pipeline.train_dense(exp)
    save("dense", pipeline.result_rows(dense.result, level=0))
    save("imp", pipeline.imp(exp, sorted({0, k}), plan.levels))
    tel = telemetry.run_telemetry(exp, steps["telemetry"], level=max(plan.perturb_levels), rewind=k)
    tables_["telemetry"] = tables.write_csv(tables.read_csv(os.path.join(tel, "telemetry.csv")),
                                            os.path.join(out, "telemetry.csv"))
    save("perturbations", branches.reference_rows(exp, k, list(plan.perturb_levels))
         + branches.run_branches(exp, k, list(plan.perturb_levels), treatments(plan)))
    along = [row for level in plan.instability_levels
             for row in instability.instability(exp, instability_steps(plan, exp, level), level=level,
                                                settings=path_settings(plan))]
    save("instability_path", along)
    save("instability", instability.barriers(along))
    task = pretrain.parse_task(plan.pretrain_task)
    pre_rows = [row for e in (0, *plan.pretrain_epochs)
                for row in pretrain.pretrain_imp(exp, task, e, plan.levels, plan.pretrain_offset)]
    save("pretrain", pre_rows)
    return tables_
