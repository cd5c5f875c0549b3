"""The whole paper in one command, at a chosen scale: dense run, telemetry, IMP at rewind 0 and k,
perturbations at k, instability vs k and one pre-training task, then a report with every figure.

Every piece is a resumable run in the work dir, so an interrupted study picks up where it stopped and
a finished one only regenerates its report.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time

from early_jax import branches, config as cfg, instability, pipeline, pretrain, progress, report, telemetry
from early_jax.config import to_steps
from early_jax.errors import UserError
from early_jax.progress import format_seconds
from early_jax.train import Trainer


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
    instability_alphas: tuple = instability.DEFAULT_ALPHAS
    instability_train_examples: int = 10_000
    instability_bn_batches: int = 50


# The config changes and plan of each preset's study. The CPU one is sized to finish within 20
# minutes on 2 cores: 2 epochs per training, 2 seeds, and 3 IMP levels that remove 60% of the
# remaining weights each (40%, 16%, 6.4% left), so that the sparse end is reached in 3 levels. Its
# one pre-training epoch comes before the full 2-epoch run (replacing half of it, after the
# learning-rate drop, would measure the shortened training rather than the pre-training).
STUDIES = {
    "fashion_cpu": (
        {"duration": "2ep", "milestones": "1ep", "save_steps": "0it,10it,25it,50it,100it,200it",
         "num_seeds": "2", "eval_every": "2ep", "fraction": "0.6"},
        Plan(rewind="50it", levels=3, perturb_levels=(2, 3), noise_scales=(1.0, 3.0),
             instability_rewinds=("0it", "10it", "50it", "200it"), telemetry_steps="400it",
             pretrain_task="blur", pretrain_epochs=(1,), pretrain_offset="none",
             instability_alphas=(0.0, 0.25, 0.5, 0.75, 1.0),
             instability_train_examples=2000, instability_bn_batches=20)),
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


def study_dir(trainer: Trainer, plan: Plan) -> str:
    """The study's tables and report: one folder per prune setting and plan, so two studies that
    share a dense run never mix their tables. Creates nothing."""
    name = f"study_{pipeline.imp_name(trainer.config)}_{cfg.fingerprint(plan)}"
    return os.path.join(pipeline.dense_dir(trainer.config), name)


def steps_of(plan: Plan, trainer: Trainer) -> dict:
    spe = trainer.steps_per_epoch
    return {"rewind": to_steps(plan.rewind, spe),
            "instability": sorted({to_steps(k, spe) for k in plan.instability_rewinds}),
            "telemetry": min(to_steps(plan.telemetry_steps, spe), trainer.total_steps)}


def check(plan: Plan, trainer: Trainer) -> None:
    """Everything the study will refuse, refused before any training."""
    steps = steps_of(plan, trainer)
    pipeline.check_rewind_steps(trainer, [0, steps["rewind"], *steps["instability"]])
    branches.check_treatments(treatments(plan))
    pretrain.check_task(pretrain.parse_task(plan.pretrain_task), trainer.dataset, trainer.config.train.batch_size)
    for epochs in plan.pretrain_epochs:
        pretrain.start_step(trainer, epochs, plan.pretrain_offset)
    if not set(plan.perturb_levels) <= set(range(1, plan.levels + 1)):
        raise UserError(f"perturbation levels {plan.perturb_levels} must lie in 1..{plan.levels}")


def treatments(plan: Plan) -> list:
    return ([branches.Treatment(name) for name in plan.treatments]
            + [branches.Treatment("noise", n) for n in plan.noise_scales])


def training_runs(plan: Plan, trainer: Trainer) -> dict[str, float]:
    """How many full trainings (of all seeds) each piece costs, counting a run from k as (T-k)/T."""
    steps, total = steps_of(plan, trainer), trainer.total_steps
    k = steps["rewind"]
    frac = lambda start: (total - start) / total
    pretrain_runs = sum(e * trainer.steps_per_epoch / total
                        + (plan.levels + 1) * frac(pretrain.start_step(trainer, e, plan.pretrain_offset))
                        for e in plan.pretrain_epochs)
    return {"dense": 1.0, "IMP": plan.levels * (frac(0) + frac(k)),
            "perturbations": len(plan.perturb_levels) * len(treatments(plan)) * frac(k),
            # copy 2 of every k in one run from the first k; copy 1 is the dense run
            "instability": len(steps["instability"]) * frac(min(steps["instability"])),
            "telemetry": steps["telemetry"] / total, "pre-training": pretrain_runs}


def print_plan(plan: Plan, trainer: Trainer, seconds_per_step: float) -> float:
    """Print what will run and an estimated time of every piece (pieces already in the work dir
    are reused and take far less)."""
    runs = training_runs(plan, trainer)
    seeds = trainer.config.num_seeds
    per_run = trainer.total_steps * seconds_per_step
    print(f"early-phase study: {trainer.config.model.name} on {trainer.dataset.name}, {seeds} seed(s), "
          f"{trainer.total_steps} steps per training; rewind k={steps_of(plan, trainer)['rewind']}, "
          f"{plan.levels} IMP levels")
    for piece, count in runs.items():
        print(f"  {piece:14s} {count:5.1f} trainings  ~{format_seconds(count * per_run)}")
    estimate = sum(runs.values()) * per_run
    print(f"  estimated total ~{format_seconds(estimate)} at {1 / seconds_per_step:.1f} steps/s "
          "(all seeds; pieces already in the work dir are reused)")
    return estimate


def measure_speed(trainer: Trainer) -> float:
    """Seconds per training step of all seeds, timed on a throwaway state after compiling."""
    states = trainer.init(pipeline.seeds_of(trainer.config))
    states, _ = trainer.advance(states, 1)  # compile
    start = time.time()
    end = min(trainer.total_steps, 51)
    trainer.advance(states, end)
    return (time.time() - start) / (end - 1)


def run_study(trainer: Trainer, plan: Plan, out: str) -> dict[str, str]:
    """Run (or reuse) every piece, write the CSVs into `out`; returns {table name: path}."""
    check(plan, trainer)
    steps = steps_of(plan, trainer)
    k = steps["rewind"]
    os.makedirs(out, exist_ok=True)
    config = trainer.config
    progress.write_json(os.path.join(out, "study.json"), {
        "title": f"early-phase study: {config.model.name} on {trainer.dataset.name}",
        "plan": dataclasses.asdict(plan), "prune": pipeline.prune_identity(trainer),
        "seeds": pipeline.seeds_of(config), "dense": os.path.basename(pipeline.dense_dir(config))})
    tables = {}

    def save(name, rows):
        tables[name] = report.write_csv(rows, os.path.join(out, f"{name}.csv"))

    _, dense_result, _ = pipeline.train_dense(trainer)
    save("dense", [{"seed": s, "accuracy": a} for s, a in zip(dense_result["seeds"], dense_result["test_accuracy"])])
    save("imp", pipeline.imp(trainer, sorted({0, k}), plan.levels))
    tel = telemetry.run_telemetry(trainer, steps["telemetry"], level=max(plan.perturb_levels), rewind=k)
    tables["telemetry"] = shutil.copy(os.path.join(tel, "telemetry.csv"), os.path.join(out, "telemetry.csv"))
    rows, _ = branches.run_experiment(trainer, k, list(plan.perturb_levels), treatments(plan), "study",
                                      "perturbations at k")
    save("perturbations", rows)
    along = instability.instability(trainer, steps["instability"], alphas=plan.instability_alphas,
                                    train_examples=plan.instability_train_examples,
                                    bn_batches=plan.instability_bn_batches)
    save("instability_path", along)
    save("instability", instability.barriers(along))
    task = pretrain.parse_task(plan.pretrain_task)
    pre_rows = [row for e in (0, *plan.pretrain_epochs)
                for row in pretrain.pretrain_imp(trainer, task, e, plan.levels, plan.pretrain_offset)]
    save("pretrain", pre_rows)
    return tables
