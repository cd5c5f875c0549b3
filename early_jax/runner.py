"""One training run in its own work dir: resumable, checkpointed at chosen steps, evaluated, logged.

Layout of a run dir:
  run.json         what the run is (kind, config, seeds, start and end step)
  execution.json   how its first steps were computed (backend, seed parallelism, devices, CPU conv chunking)
  .lock            held while a process trains the run
  checkpoints/     full states at the requested steps and at the end (kept)
  resume/          the latest state at an evaluation boundary (only the newest is kept)
  metrics.jsonl    one line per evaluation: step, lr, train/test loss and accuracy per seed
  result.json      final test loss/accuracy per seed; its presence marks the run complete
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from early_jax import progress as prog
from early_jax.checkpoint import Checkpoints
from early_jax.config import to_steps
from early_jax.errors import UserError
from early_jax.train import Trainer, TrainState, current_step


class RunDir:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(path, exist_ok=True)
        self._kept = self._resume = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def kept(self) -> Checkpoints:
        if self._kept is None:
            self._kept = Checkpoints(self.file("checkpoints"))
        return self._kept

    @property
    def resume(self) -> Checkpoints:
        if self._resume is None:
            self._resume = Checkpoints(self.file("resume"), keep_latest=1)
        return self._resume

    def complete(self) -> bool:
        return os.path.exists(self.file("result.json"))

    def result(self) -> dict:
        return prog.read_json(self.file("result.json"))

    def check_identity(self, description: dict) -> None:
        """A run dir belongs to one configuration; reusing it for another would mix results."""
        path = self.file("run.json")
        description = json.loads(json.dumps(description))  # tuples -> lists, as stored
        if os.path.exists(path):
            stored = prog.read_json(path)
            if stored != description:
                raise UserError(f"{self.path} holds a different run ({_difference(stored, description)}); "
                                "use another --workdir or delete that folder")
        else:
            prog.write_json(path, description)

    def latest_step(self) -> int | None:
        steps = self.kept.steps() + self.resume.steps()
        return max(steps) if steps else None

    def restore(self, step: int, target: TrainState) -> TrainState:
        store = self.kept if step in self.kept.steps() else self.resume
        return store.restore(step, target)


def _difference(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: stored {a.get(k)!r} vs now {b.get(k)!r}" for k in keys[:3])


def evaluation_steps(trainer: Trainer, start: int, end: int) -> list[int]:
    every = max(1, to_steps(trainer.config.train.eval_every, trainer.steps_per_epoch))
    return [s for s in range(every * (start // every + 1), end, every)] + [end]


Join = Callable[[TrainState], TrainState]


def run(trainer: Trainer, run_dir: RunDir, *, description: dict, initial: Callable[[], TrainState],
        end: int, save_steps=(), label: str = "train", joins: dict[int, Join] | None = None
        ) -> tuple[TrainState, dict]:
    """Train `initial()` to `end`, or resume, or just load the finished run.

    The state at each of `save_steps` and at `end` is kept; metrics are logged at each evaluation.
    `joins` {step: states -> states} are applied when training reaches that step, before anything
    is saved there, so rows of a stacked run can start at later steps (a resume past a join step
    restores the joined state and does not apply it again).
    """
    run_dir.check_identity(description)
    num_seeds = len(description["seeds"])
    target = trainer.abstract_state(num_seeds)
    if run_dir.complete():
        return run_dir.restore(end, target), run_dir.result()
    with _exclusive(run_dir):
        return _train(trainer, run_dir, description, initial, end, save_steps, label, target, joins or {})


@contextlib.contextmanager
def _exclusive(run_dir: RunDir):
    """One process trains a run dir at a time (a double launch or a requeued job would otherwise
    delete each other's half-written checkpoints)."""
    with open(run_dir.file(".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another process is training {run_dir.path}; wait for it to finish or "
                            "stop it, then rerun") from None
        yield


def _train(trainer, run_dir, description, initial, end, save_steps, label, target, joins):
    if run_dir.complete():  # finished by another process while this one waited to start
        return run_dir.restore(end, target), run_dir.result()
    resume_step = run_dir.latest_step()
    if resume_step is None:
        # training donates its input; `initial()` may share buffers with states the caller reuses
        states = jax.tree.map(jnp.copy, initial())
        prog.write_json(run_dir.file("execution.json"), trainer.execution)
    else:
        states = run_dir.restore(resume_step, target)
        print(f"[{label}] resuming from step {resume_step} ({run_dir.path})", flush=True)
    start = current_step(states)
    _truncate_metrics(run_dir.file("metrics.jsonl"), start)
    save_steps = {s for s in save_steps if start <= s <= end} | {end}
    if start in save_steps:
        run_dir.kept.save(start, states)
    evals = set(evaluation_steps(trainer, start, end))
    bar = prog.Progress(label, start, end)
    window: list[dict] = []
    final = None
    t_start = time.time()

    def on_chunk(step, metrics):
        bar.update(step, f"loss {np.mean(metrics['loss']):.3f} acc {100 * np.mean(metrics['accuracy']):.1f}%")

    for boundary in sorted(save_steps | evals | {s for s in joins if s < end}):
        if boundary <= start:
            continue
        states, metrics = trainer.advance(states, boundary, on_chunk)
        window.append(metrics)
        if boundary in joins:
            states = joins[boundary](states)
        if boundary in evals:  # the line goes first: a resume from before it drops it and redoes it
            test = trainer.evaluate(states)
            line = _metrics_line(trainer, boundary, window, test, bar.rate(boundary))
            final = test if boundary == end else None
            window = []
            prog.append_jsonl(run_dir.file("metrics.jsonl"), line)
            bar.update(boundary, f"test acc {100 * np.mean(line['test_accuracy']):.2f}%", force=True)
        if boundary in save_steps:
            run_dir.kept.save(boundary, states)
        elif boundary in evals:
            run_dir.resume.save(boundary, states)
    final = final or trainer.evaluate(states)  # evaluated at `end` already, unless nothing ran
    result = {"step": end, "seeds": description["seeds"], "wall_s": time.time() - t_start,
              **{k: v.tolist() for k, v in final.items()}}
    prog.write_json(run_dir.file("result.json"), result)
    bar.done(f"done: test accuracy {_mean_std(final['test_accuracy'])}")
    return states, result


def _metrics_line(trainer, step, window, test, rate) -> dict:
    """`train_*`: means over the `train_steps` steps since the previous line (fewer after a resume)."""
    train = {k: np.concatenate([w[k] for w in window]).mean(0) for k in window[0]} if window else {}
    return {"step": step, "epoch": step / trainer.steps_per_epoch,
            "lr": float(trainer.fns.schedule(step - 1)), "steps_per_s": rate,
            "train_steps": sum(len(w["loss"]) for w in window),
            **{f"train_{k}": v.tolist() for k, v in train.items()},
            **{k: v.tolist() for k, v in test.items()}}


def _truncate_metrics(path: str, step: int) -> None:
    """After a resume, drop log lines from beyond the restored step (they will be recomputed)."""
    lines = [line for line in prog.read_jsonl(path) if line["step"] <= step]
    if os.path.exists(path):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        os.replace(tmp, path)


def _mean_std(values) -> str:
    values = 100 * np.asarray(values)
    return f"{values.mean():.2f}% +- {values.std():.2f}" if len(values) > 1 else f"{values.mean():.2f}%"
