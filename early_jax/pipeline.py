"""Runs composed from pure pieces: dense training (shared by every experiment), then IMP levels."""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

import jax

from early_jax import config as cfg
from early_jax import masks, progress
from early_jax.config import Config, to_steps
from early_jax.errors import UserError
from early_jax.runner import RunDir, run
from early_jax.train import Trainer, TrainState


def seeds_of(config: Config) -> list[int]:
    return list(range(config.seed, config.seed + config.num_seeds))


def dense_identity(config: Config) -> dict:
    """What determines a dense run's numbers: not how it is executed, evaluated or checkpointed
    (a rewind step missing from the checkpoint grid is replayed from an earlier checkpoint)."""
    train = dataclasses.replace(config.train, seed_parallel="auto", eval_batch_size=0,
                                eval_every="", save_steps=())
    return {"model": dataclasses.asdict(config.model), "data": dataclasses.asdict(config.data),
            "train": dataclasses.asdict(train), "prune_ignore": list(cfg.ignored_layers(config))}


def dense_key(config: Config) -> str:
    return cfg.fingerprint(dense_identity(config))


def dense_dir(config: Config) -> str:
    dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(config.data.name.rstrip("/")))
    name = f"dense_{config.model.name}_{dataset}"
    return os.path.join(config.workdir, f"{name}_{dense_key(config)}_seeds{config.seed}-"
                                        f"{config.seed + config.num_seeds - 1}")


def save_steps(trainer: Trainer) -> list[int]:
    """The early checkpoint grid, within the run."""
    steps = [to_steps(s, trainer.steps_per_epoch) for s in trainer.config.train.save_steps]
    return sorted({s for s in steps if s <= trainer.total_steps})


def dense_run_dir(trainer: Trainer) -> RunDir:
    return RunDir(dense_dir(trainer.config))


def check_rewind_steps(trainer: Trainer, steps) -> None:
    """Refuse rewind steps the run cannot provide, before any training. Step 0 is always there
    (rebuilt from the seeds); a later step needs a checkpoint at or before it: in the grid of a run
    still to train, or among the checkpoints of the dense run already on disk."""
    if not steps:
        raise UserError("no rewind step given")
    for step in steps:
        if not 0 <= step < trainer.total_steps:
            raise UserError(f"rewind step {step} is outside the run: training has "
                            f"{trainer.total_steps} steps ({trainer.steps_per_epoch} per epoch)")
    later = [s for s in steps if s > 0]
    if not later:
        return
    grid, started = checkpoint_grid(trainer)
    if not grid or min(grid) > min(later):
        first = f"the first saved step {min(grid)}" if grid else "every saved step (only the end is saved)"
        where = (f"in the dense run already (partly) trained in {dense_dir(trainer.config)}; delete it to "
                 "retrain with that step in --save_steps" if started else "; add it to --save_steps")
        raise UserError(f"rewind step {min(later)} precedes {first} {where}")


def checkpoint_grid(trainer: Trainer) -> tuple[list[int], bool]:
    """(steps the dense run has or will save, whether it has trained any steps yet): what is on
    disk, plus the configured grid beyond the point an unfinished run would resume from."""
    dense = dense_run_dir(trainer) if os.path.exists(dense_dir(trainer.config)) else None
    latest = dense.latest_step() if dense else None
    if dense and dense.complete():
        return dense.kept.steps(), True
    planned = [s for s in save_steps(trainer) if latest is None or s > latest]
    return sorted(set(dense.kept.steps() if dense else []) | set(planned)), latest is not None


def train_dense(trainer: Trainer) -> tuple[TrainState, dict, RunDir]:
    """Train (or resume, or load) the dense network of every seed, keeping the early checkpoints."""
    config = trainer.config
    run_dir = dense_run_dir(trainer)
    description = {"kind": "dense", **dense_identity(config), "seeds": seeds_of(config),
                   "end": trainer.total_steps}
    states, result = run(trainer, run_dir, description=description,
                         initial=lambda: trainer.init(seeds_of(config)), end=trainer.total_steps,
                         save_steps=save_steps(trainer), label="dense")
    return states, result, run_dir


# ----- rewinding -----
def state_at(trainer: Trainer, dense: RunDir, step: int) -> TrainState:
    """The dense states of every seed at `step`: a kept checkpoint, W_0 rebuilt from the seeds, or
    replayed from the nearest earlier checkpoint (training is deterministic, so the replay equals
    what the run saw, when it runs as the dense run ran: see `check_replayable`)."""
    if not 0 <= step <= trainer.total_steps:
        raise UserError(f"rewind step {step} lies outside the run (0..{trainer.total_steps} steps)")
    saved = [s for s in dense.kept.steps() if s <= step]
    if not saved:
        if step == 0:
            return trainer.init(seeds_of(trainer.config))
        raise UserError(f"no dense checkpoint at or before step {step} in {dense.path}; "
                        "delete that dense run and retrain it with the step in --save_steps")
    states = dense.restore(saved[-1], trainer.abstract_state(len(seeds_of(trainer.config))))
    if saved[-1] == step:
        return states
    check_replayable(trainer, dense, step)
    return trainer.advance(states, step)[0]


def check_replayable(trainer: Trainer, dense: RunDir, step: int) -> None:
    """Refuse to replay steps of a dense run computed another way (backend, seed parallelism,
    device count): the replay would drift from the run's trajectory."""
    path = dense.file("execution.json")
    recorded = progress.read_json(path) if os.path.exists(path) else None
    if recorded not in (None, trainer.execution):
        raise UserError(f"step {step} must be replayed from an earlier checkpoint of {dense.path}, which "
                        f"was trained with {recorded}; here it would run with {trainer.execution} and "
                        "not reproduce the run. Run with those settings, or rewind to a saved step")


def rewind(trainer: Trainer, states_k: TrainState, mask) -> TrainState:
    """Params and BatchNorm statistics of step k, masked; a fresh optimizer; the schedule goes on
    from step k because it reads the state's step."""
    params = jax.jit(jax.vmap(masks.apply_mask))(states_k.params, mask)
    return trainer.fresh_optimizer(states_k.replace(params=params, mask=mask))


def prune_next(trainer: Trainer, states: TrainState):
    """Each seed prunes its own network: `fraction` of its remaining weights by magnitude."""
    prune = trainer.config.prune
    fn = lambda p, m: masks.magnitude_prune(p, m, prune.fraction, prune.scope)
    return jax.jit(jax.vmap(fn))(states.params, states.mask)


# ----- iterative magnitude pruning -----
def imp_name(config) -> str:
    """The folder of one prune setting's IMP runs (several settings can share a dense run)."""
    return f"imp_{config.prune.scope}_f{config.prune.fraction:g}"


def imp_dir(trainer: Trainer, dense: RunDir) -> str:
    return os.path.join(dense.path, imp_name(trainer.config))


def level_dir(trainer: Trainer, dense: RunDir, rewind_step: int, level: int) -> RunDir:
    return RunDir(os.path.join(imp_dir(trainer, dense), f"rewind{rewind_step}", f"level{level}"))


def mask_densities(mask) -> list[float]:
    """Fraction of prunable weights kept, per seed of a seed-stacked mask."""
    return [float(d) for d in jax.vmap(masks.density)(mask)]


def prune_identity(trainer: Trainer) -> dict:
    """What determines the masks of every IMP level (not how many levels or which rewind steps)."""
    return dataclasses.asdict(trainer.config.prune) | {"levels": None, "rewind_iters": None,
                                                      "ignore": list(trainer.ignore)}


def imp_chain(trainer: Trainer, root: str, rewind_point: Callable[[], TrainState],
              level0: TrainState, levels: int, identity: dict, label: str) -> list[tuple]:
    """Levels 1..N of IMP: level L prunes the final weights of level L-1 (level 0: `level0`),
    rewinds the survivors to `rewind_point()` and retrains to the end; finished levels are loaded.

    Returns [(level, mask, result)] for levels 1..N; `rewind_point` is only called if some level
    still has to train.
    """
    cache = []

    def point() -> TrainState:
        if not cache:
            cache.append(rewind_point())
        return cache[0]

    previous, out = level0, []
    prune = prune_identity(trainer)
    for level in range(1, levels + 1):
        description = {"kind": "imp_level", **identity, "level": level, "prune": prune,
                       "seeds": seeds_of(trainer.config)}
        initial = lambda previous=previous: rewind(trainer, point(), prune_next(trainer, previous))
        previous, result = run(trainer, RunDir(os.path.join(root, f"level{level}")),
                               description=description, initial=initial, end=trainer.total_steps,
                               label=f"{label} level {level}")
        out.append((level, previous.mask, result))
    return out


def imp(trainer: Trainer, rewind_steps, levels: int) -> list[dict]:
    """IMP with rewinding for every rewind step, reusing the dense run and every finished level.

    Level 0 is the dense run itself (training from step k reproduces it).
    Returns one row per (rewind step, level, seed).
    """
    dense_states, dense_result, dense = train_dense(trainer)
    rows = [{"seed": row["seed"], "rewind": k} | row for k in rewind_steps
            for row in result_rows(0, dense_states.mask, dense_result)]
    for k in rewind_steps:
        chain = imp_chain(trainer, os.path.join(imp_dir(trainer, dense), f"rewind{k}"),
                          lambda k=k: state_at(trainer, dense, k), dense_states, levels,
                          {"dense": os.path.basename(dense.path), "rewind": k}, f"imp k={k}")
        rows += [{"seed": row["seed"], "rewind": k} | row for level, mask, result in chain
                 for row in result_rows(level, mask, result)]
    return rows


def result_rows(level: int, mask, result: dict) -> list[dict]:
    """One row per seed: seed, level, density (from the mask), test accuracy."""
    return [{"seed": seed, "level": level, "density": d, "accuracy": acc}
            for seed, d, acc in zip(result["seeds"], mask_densities(mask), result["test_accuracy"])]
