"""Runs composed from pure pieces: the experiment's shared context, dense training (shared by every
experiment), rewinding, and IMP level chains, each found and reused through its descriptor."""
from __future__ import annotations

import functools
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from early_jax import config as cfg
from early_jax import files, masks, runs, sharding
from early_jax.config import Config, to_steps
from early_jax.data.device import steps_per_epoch
from early_jax.data.record import Dataset, fingerprint
from early_jax.errors import UserError
from early_jax.runner import Outcome, RunDir, run
from early_jax.train import Trainer, TrainState


class Experiment:
    """What the pieces of one experiment share: the config and dataset, the step counts, the
    dense run's descriptor, and the trainer (built on first use: finding finished runs needs none).
    """

    def __init__(self, config: Config, dataset: Dataset, mesh=None):
        self.config, self.dataset, self._mesh = config, dataset, mesh
        self.steps_per_epoch = steps_per_epoch(len(dataset.x_train), config.train.batch_size)
        self.total_steps = to_steps(config.train.duration, self.steps_per_epoch)
        cfg.check_schedule(config, self.steps_per_epoch)
        label = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset.name)
        self.dense = runs.dense(config, fingerprint(dataset), label)
        runs.check_no_older_layout(config.workdir, self.dense)

    @functools.cached_property
    def trainer(self) -> Trainer:
        return Trainer(self.config, self.dataset, mesh=self._mesh)

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.config.seeds

    @property
    def prune(self) -> cfg.PruneConfig:
        return self.config.prune

    def steps(self, duration) -> int:
        return to_steps(duration, self.steps_per_epoch)

    def path(self, descriptor: runs.Run) -> str:
        return descriptor.path(self.config.workdir)

    def run_dir(self, descriptor: runs.Run) -> RunDir:
        return RunDir(self.path(descriptor))

    def imp_path(self) -> str:
        """The folder of this prune setting's IMP runs (several settings share a dense run)."""
        return os.path.join(self.config.workdir, runs.imp_folder(self.dense, self.prune))

    def level(self, rewind: int, level: int) -> runs.Run:
        return runs.imp_run(self.dense, self.prune, rewind, level)


def save_steps(exp: Experiment) -> list[int]:
    """The early checkpoint grid, within the run."""
    return sorted({s for s in map(exp.steps, exp.config.train.save_steps) if s <= exp.total_steps})


def train_dense(exp: Experiment) -> Outcome:
    """Train (or resume, or find) the dense network of every seed, keeping the early checkpoints."""
    return run(exp.trainer, exp.dense, initial=lambda: exp.trainer.init(exp.seeds),
               save_steps=save_steps(exp), label="dense")


# ----- rewinding -----
def check_rewind_steps(exp: Experiment, steps) -> None:
    """Refuse rewind steps the run cannot provide, before any training. Step 0 is always there
    (rebuilt from the seeds); a later step needs a checkpoint at or before it: in the grid of a run
    still to train, or among the checkpoints of the dense run already on disk."""
    if not steps:
        raise UserError("no rewind step given")
    for step in steps:
        if not 0 <= step < exp.total_steps:
            raise UserError(f"rewind step {step} is outside the run: training has "
                            f"{exp.total_steps} steps ({exp.steps_per_epoch} per epoch)")
    later = [s for s in steps if s > 0]
    if not later:
        return
    grid, started = checkpoint_grid(exp)
    if not grid or min(grid) > min(later):
        first = f"the first saved step {min(grid)}" if grid else "every saved step (only the end is saved)"
        where = (f"in the dense run already (partly) trained in {exp.path(exp.dense)}; delete it to "
                 "retrain with that step in --save_steps" if started else "; add it to --save_steps")
        raise UserError(f"rewind step {min(later)} precedes {first} {where}")


def checkpoint_grid(exp: Experiment) -> tuple[list[int], bool]:
    """(steps the dense run has or will save, whether it has trained any steps yet): what is on
    disk, plus the configured grid beyond the point an unfinished run would resume from."""
    dense = exp.run_dir(exp.dense)
    on_disk = dense.checkpoints().steps()
    if dense.complete():
        return on_disk, True
    latest = max(on_disk) if on_disk else None
    planned = [s for s in save_steps(exp) if latest is None or s > latest]
    return sorted(set(on_disk) | set(planned)), latest is not None


def state_at(exp: Experiment, step: int) -> TrainState:
    """The dense states of every seed at `step`: a kept checkpoint, W_0 rebuilt from the seeds, or
    replayed from the nearest earlier checkpoint (training is deterministic, so the replay equals
    what the run saw, when it runs as the dense run ran: see `check_replayable`)."""
    if not 0 <= step <= exp.total_steps:
        raise UserError(f"rewind step {step} lies outside the run (0..{exp.total_steps} steps)")
    dense = exp.run_dir(exp.dense)
    saved = [s for s in dense.checkpoints().steps() if s <= step]
    if not saved:
        if step == 0:
            return exp.trainer.init(exp.seeds)
        raise UserError(f"no dense checkpoint at or before step {step} in {dense.path}; "
                        "delete that dense run and retrain it with the step in --save_steps")
    states = dense.restore(saved[-1], exp.trainer.abstract_state(len(exp.seeds)))
    if saved[-1] == step:
        return states
    check_replayable(exp, dense, step)
    return exp.trainer.advance(states, step)[0]


def check_replayable(exp: Experiment, dense: RunDir, step: int) -> None:
    """Refuse to replay steps of a dense run computed another way (backend, seed parallelism,
    device count): the replay would drift from the run's trajectory."""
    path = dense.file("execution.json")
    recorded = files.read_json(path) if os.path.exists(path) else None
    here = exp.trainer.execution
    if recorded not in (None, here):
        raise UserError(f"step {step} must be replayed from an earlier checkpoint of {dense.path}, which "
                        f"was trained with {recorded}; here it would run with {here} and "
                        "not reproduce the run. Run with those settings, or rewind to a saved step")


def check_finite(exp: Experiment, states: TrainState, what: str) -> None:
    """Pruning, rewinding and perturbing refuse non-finite weights (a NaN network prunes to
    nonsense that still reports its density); with --on_divergence=drop a diverged seed passes
    through, stays NaN and is marked diverged again by the run it starts."""
    finite = sharding.to_host(_finite_rows(states.params))
    if not finite.all() and exp.config.train.on_divergence == "stop":
        bad = [int(i) for i in np.flatnonzero(~finite)]
        raise UserError(f"cannot {what}: the weights of row(s) {bad} are not finite (a diverged or "
                        "damaged run); retrain it, or pass --on_divergence=drop to carry on without them")


@jax.jit
@jax.vmap
def _finite_rows(params) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(params)]))


def rewind(exp: Experiment, states_k: TrainState, mask) -> TrainState:
    """Params and BatchNorm statistics of step k, masked; a fresh optimizer; the schedule goes on
    from step k because it reads the state's step."""
    check_finite(exp, states_k, "rewind")
    params = jax.jit(jax.vmap(masks.apply_mask))(states_k.params, mask)
    return exp.trainer.fresh_optimizer(states_k.replace(params=params, mask=mask))


def prune_next(exp: Experiment, states: TrainState):
    """Each seed prunes its own network: `fraction` of its remaining weights by magnitude."""
    check_finite(exp, states, "prune")
    prune = exp.prune
    fn = lambda p, m: masks.magnitude_prune(p, m, prune.fraction, prune.scope)
    return jax.jit(jax.vmap(fn))(states.params, states.mask)


# ----- iterative magnitude pruning -----
def imp_chain(exp: Experiment, levels: list[runs.Run], rewind_point: Callable[[], TrainState],
              level0: Outcome, label: str) -> list[Outcome]:
    """IMP levels in order: each prunes the final weights of the one before (the first: `level0`),
    rewinds the survivors to `rewind_point()` and retrains to the end. Finished levels are found
    from their JSON; a state is restored or rebuilt only where a level still has to train."""
    point = functools.cache(rewind_point)
    previous, out = level0, []
    for descriptor in levels:
        initial = lambda previous=previous: rewind(exp, point(), prune_next(exp, previous.states()))
        previous = run(exp.trainer, descriptor, initial=initial, label=f"{label} level {descriptor.level}")
        out.append(previous)
    return out


def imp(exp: Experiment, rewind_steps, levels: int) -> list[dict]:
    """IMP with rewinding for every rewind step, reusing the dense run and every finished level.

    Level 0 is the dense run itself (training from step k reproduces it).
    Returns one row per (rewind step, level, seed).
    """
    dense = train_dense(exp)
    rows = []
    for k in rewind_steps:
        chain = imp_chain(exp, [exp.level(k, level) for level in range(1, levels + 1)],
                          lambda k=k: state_at(exp, k), dense, f"imp k={k}")
        rows += [row for level, outcome in enumerate([dense, *chain])
                 for row in result_rows(outcome.result, rewind=k, level=level)]
    return rows


def result_rows(result: dict, **tags) -> list[dict]:
    """One row per state row of a result: the tags, seed, density, accuracy, divergence."""
    count = len(result["seeds"])
    diverged = result.get("diverged", [False] * count)
    return [tags | {"seed": seed, "density": d, "accuracy": acc, "diverged": bool(bad)}
            for seed, d, acc, bad in zip(result["seeds"], result["density"], result["test_accuracy"],
                                         diverged)]


def imp_rows_on_disk(exp: Experiment) -> list[dict]:
    """Every finished IMP level of this prune setting on disk (any rewind step, any depth), with
    the dense run as level 0 of each rewind step: what tables and plots show."""
    root = exp.imp_path()
    if not exp.dense.complete(exp.config.workdir) or not os.path.isdir(root):
        return []
    dense = exp.dense.result(exp.config.workdir)
    rows = []
    for k in sorted(_numbered(root, "rewind")):
        rows += result_rows(dense, rewind=k, level=0)
        for level in sorted(_numbered(os.path.join(root, f"rewind{k}"), "level")):
            descriptor = exp.level(k, level)
            if descriptor.complete(exp.config.workdir):
                rows += result_rows(descriptor.result(exp.config.workdir), rewind=k, level=level)
    return rows


def _numbered(folder: str, prefix: str) -> list[int]:
    """The n of each `<prefix><n>` entry of a folder."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return [int(n[len(prefix):]) for n in names if n.startswith(prefix) and n[len(prefix):].isdigit()]


def final_states(exp: Experiment, descriptor: runs.Run) -> TrainState:
    """The final states of a finished run (one restore)."""
    return exp.run_dir(descriptor).restore(exp.total_steps, exp.trainer.abstract_state(len(descriptor.seeds)))


def mask_of(exp: Experiment, rewind: int, level: int):
    """The mask IMP level `level` (rewinding to `rewind`) trained with: the one place a level's
    mask is read (the level is trained first if needed)."""
    imp(exp, [rewind], level)
    return final_states(exp, exp.level(rewind, level)).mask
