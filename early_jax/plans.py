"""What a command is about to train and how long that should take, printed before any work.

A plan is a list of pieces, each a run (descriptor) with its number of state rows and steps. Pieces
already finished in the work dir cost nothing; the rest are priced with the measured speed of this
machine: seconds per training step of the seeds, and per evaluation of the test set. Stacked runs
(perturbation rows, instability copies) cost in proportion to their rows, plus a compile for their
own program shape; the instability path is priced from the forward passes it makes.
"""
from __future__ import annotations

import dataclasses
import time

from early_jax import runs
from early_jax.pipeline import Experiment
from early_jax.progress import format_seconds
from early_jax.runner import evaluation_steps

COMPILE_S = 4.0  # seconds to trace and compile a new program (a new trainer or a new run shape)


@dataclasses.dataclass(frozen=True)
class Piece:
    name: str
    descriptor: runs.Run | None   # None: not a run of its own; always priced
    rows: int
    start: int                    # first step trained
    end: int
    evals: int | None = None      # test-set evaluations (default: every eval_every, and the end)
    extra_s: float = 0.0          # work besides training (measuring instability paths)
    new_program: bool = False     # its own program shape or trainer: compiled first


@dataclasses.dataclass(frozen=True)
class Speed:
    step_s: float                 # one training step of all seeds
    eval_s: float                 # one test-set evaluation of all seeds


def measure(exp: Experiment) -> Speed:
    """Time 50 training steps and one evaluation of the seeds on a throwaway state, after compiling."""
    trainer = exp.trainer
    states = trainer.init(exp.seeds)
    states, _ = trainer.advance(states, 1)  # compile
    trainer.evaluate(states)
    end = min(exp.total_steps, 51)
    start = time.time()
    states, _ = trainer.advance(states, end)
    step_s = (time.time() - start) / max(end - 1, 1)
    start = time.time()
    trainer.evaluate(states)
    return Speed(step_s, time.time() - start)


def seconds(piece: Piece, exp: Experiment, speed: Speed) -> float:
    """The time a piece takes (0 when its run is finished)."""
    if piece.descriptor is not None and piece.descriptor.complete(exp.config.workdir):
        return 0.0
    scale = piece.rows / len(exp.seeds)
    evals = piece.evals if piece.evals is not None else \
        len(evaluation_steps(max(1, exp.steps(exp.config.train.eval_every)), piece.start, piece.end))
    compile_s = COMPILE_S if piece.new_program else 0.0
    return scale * ((piece.end - piece.start) * speed.step_s + evals * speed.eval_s) + piece.extra_s + compile_s


def path_seconds(exp: Experiment, speed: Speed, rows: int, settings) -> float:
    """Measuring `rows` interpolation paths: per point, BatchNorm statistics from `bn_batches`
    forward passes (a third of a training step each) and evaluations of the test set and the
    train subset."""
    per_seed_step, per_seed_eval = speed.step_s / len(exp.seeds), speed.eval_s / len(exp.seeds)
    subset = min(settings.train_examples, len(exp.dataset.x_train)) / len(exp.dataset.x_test)
    bn = settings.bn_batches if settings.recompute_bn else 0
    return rows * len(settings.alphas) * (bn * per_seed_step / 3 + per_seed_eval * (1 + subset))


def print_plan(title: str, pieces: list[Piece], exp: Experiment, speed: Speed) -> float:
    """One line per piece (its rows, steps and time; 'done' when found finished) and the total."""
    print(f"{title}: {exp.config.model.name} on {exp.dataset.name}, {len(exp.seeds)} seed(s), "
          f"{exp.total_steps} steps per training ({1 / speed.step_s:.1f} steps/s measured)")
    total = 0.0
    for piece in pieces:
        cost = seconds(piece, exp, speed)
        total += cost
        state = f"~{format_seconds(cost)}" if cost else "done (reused)"
        print(f"  {piece.name:34s} {piece.rows:3d} rows x {piece.end - piece.start:6d} steps  {state}")
    print(f"  estimated total ~{format_seconds(total)}", flush=True)
    return total


def dense_and_imp(exp: Experiment, rewinds, levels: int) -> list[Piece]:
    """The dense run and IMP levels 1..levels for each rewind step."""
    seeds, end = len(exp.seeds), exp.total_steps
    return [Piece("dense", exp.dense, seeds, 0, end, new_program=True)] + [
        Piece(f"IMP k={k} level {level}", exp.level(k, level), seeds, k, end)
        for k in sorted(set(rewinds)) for level in range(1, levels + 1)]


def print_perturbation_plan(exp: Experiment, k: int, levels: list[int], treatments, title: str) -> float:
    from early_jax import branches
    branch = branches.descriptor(exp, k, sorted(set(levels)), treatments)
    pieces = dense_and_imp(exp, {0, k}, max(levels)) + [
        Piece(f"{len(branch.rows)} perturbed rows x seeds", branch, len(branch.seeds), k, exp.total_steps,
              new_program=True)]
    return print_plan(title, pieces, exp, measure(exp))
