"""One training run in its own work dir: resumable, checkpointed at chosen steps, evaluated, logged.

Layout of a run dir:
  run.json         what the run is (its descriptor's kind and identity; runs.Run.describe)
  execution.json   how its first steps were computed (backend, seed parallelism, devices, precision)
  .lock            held while a process trains the run
  checkpoints/     full states at the kept steps (early grid, end) and the latest resume point
  checksums/       a checksum of every array of each checkpoint, verified at restore
  metrics.jsonl    one line per evaluation: step, lr, train/test loss and accuracy per seed
  divergence.json  seeds whose loss or weights turned non-finite, and the first such step
  result.json      final test loss/accuracy, mask density and kept count, divergence per row;
                   its presence marks the run complete
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from early_jax import files, preemption, sharding, tables
from early_jax import progress as prog
from early_jax.checkpoint import Checkpoints
from early_jax.config import to_steps
from early_jax.errors import UserError
from early_jax.runs import Run, check_format
from early_jax.train import Trainer, TrainState, current_step


class RunDir:
    """The files of one run; constructing one (or asking about it) creates nothing."""

    def __init__(self, path: str):
        self.path = path
        self._checkpoints: Checkpoints | None = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def complete(self) -> bool:
        return os.path.exists(self.file("result.json"))

    def result(self) -> dict:
        return files.read_json(self.file("result.json"))

    def checkpoints(self, keep=(), writable: bool = False) -> Checkpoints:
        """The run's one checkpoint manager (reopened only to become writable)."""
        if self._checkpoints is None or (writable and not self._checkpoints.writable):
            if self._checkpoints is not None:
                self._checkpoints.close()
            self._checkpoints = Checkpoints(self.path, keep, writable)
        return self._checkpoints

    def claim(self, description: dict) -> None:
        """A run dir belongs to one run; reusing it for another would mix results. Writes
        run.json (creating the folder) the first time."""
        path = self.file("run.json")
        description = json.loads(json.dumps(description))  # tuples -> lists, as stored
        if os.path.exists(path):
            stored = files.read_json(path)
            check_format(self.path, stored)
            if stored != description:
                raise UserError(f"{self.path} holds a different run ({_difference(stored, description)}); "
                                "use another --workdir or delete that folder")
        else:
            files.write_json(path, description)
        sharding.sync("claim " + self.path)

    def latest_step(self) -> int | None:
        steps = self.checkpoints().steps()
        return max(steps) if steps else None

    def restore(self, step: int, target: TrainState) -> TrainState:
        return self.checkpoints().restore(step, target)


def _difference(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: stored {a.get(k)!r} vs now {b.get(k)!r}" for k in keys[:3])


@dataclasses.dataclass
class Outcome:
    """A finished run: result.json's contents, and its final states, loaded only when asked for."""

    result: dict
    load: Callable[[], TrainState]
    _states: TrainState | None = None

    def states(self) -> TrainState:
        if self._states is None:
            self._states = self.load()
        return self._states


def evaluation_steps(eval_every: int, start: int, end: int) -> list[int]:
    return [s for s in range(eval_every * (start // eval_every + 1), end, eval_every)] + [end]


Join = Callable[[TrainState], TrainState]


def run(trainer: Trainer, descriptor: Run, *, initial: Callable[[], TrainState], save_steps=(),
        label: str = "train", joins: dict[int, Join] | None = None, workdir: str | None = None
        ) -> Outcome:
    """Train `initial()` to the end, or resume, or find the finished run (reading only its JSON).

    The state at each of `save_steps` and at the end is kept; metrics are logged at each evaluation.
    `joins` {step: states -> states} are applied when training reaches that step, before anything
    is saved there, so rows of a stacked run can start at later steps (a resume past a join step
    restores the joined state and does not apply it again).
    """
    run_dir = RunDir(descriptor.path(workdir or trainer.config.workdir))
    run_dir.claim(descriptor.describe())
    end, num_rows = trainer.total_steps, len(descriptor.seeds)
    load = lambda: run_dir.restore(end, trainer.abstract_state(num_rows))
    if not run_dir.complete():
        with _exclusive(run_dir):
            if not run_dir.complete():  # unless another process finished it while this one waited
                states, result = _train(trainer, run_dir, descriptor, initial, save_steps, label,
                                        joins or {})
                return Outcome(result, load, states)
    return Outcome(run_dir.result(), load)


@contextlib.contextmanager
def _exclusive(run_dir: RunDir):
    """One process (or one multi-host job, through process 0) trains a run dir at a time: a double
    launch or a requeued job would otherwise delete each other's half-written checkpoints."""
    if not files.is_primary():
        yield
        return
    os.makedirs(run_dir.path, exist_ok=True)
    with open(run_dir.file(".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another process is training {run_dir.path}; wait for it to finish or "
                            "stop it, then rerun") from None
        yield


def _train(trainer: Trainer, run_dir: RunDir, descriptor: Run, initial, save_steps, label, joins):
    end = trainer.total_steps
    save_steps = {s for s in save_steps if s <= end} | {end}
    store = run_dir.checkpoints(keep=save_steps, writable=True)
    resume_step = run_dir.latest_step()
    seeds = list(descriptor.seeds)
    if resume_step is None:
        # training donates its input; `initial()` may share buffers with states the caller reuses
        states = jax.tree.map(jnp.copy, initial())
        files.write_json(run_dir.file("execution.json"), trainer.execution)
    else:
        states = run_dir.restore(resume_step, trainer.abstract_state(len(seeds)))
        print(f"[{label}] resuming from step {resume_step} ({run_dir.path})", flush=True)
    start = current_step(states)
    metrics_path = run_dir.file("metrics.jsonl")
    files.rewrite_jsonl(metrics_path, [line for line in files.read_jsonl(metrics_path) if line["step"] <= start])
    watch = DivergenceWatch(run_dir, seeds, trainer.config.train.on_divergence)
    if start in save_steps:
        store.save(start, states)
    evals = set(evaluation_steps(max(1, to_steps(trainer.config.train.eval_every, trainer.steps_per_epoch)),
                                 start, end))
    bar = prog.Progress(label, start, end)
    window: list[dict] = []
    final = None
    t_start = time.time()

    def on_chunk(step, metrics):
        watch.check(step, metrics, store)
        bar.update(step, f"loss {np.nanmean(metrics['loss']):.3f} acc {100 * np.nanmean(metrics['accuracy']):.1f}%")

    with preemption.training():
        for boundary in sorted(save_steps | evals | {s for s in joins if s < end}):
            if boundary <= start:
                continue
            states, metrics = trainer.advance(states, boundary, on_chunk, stop=preemption.requested)
            window.append(metrics)
            reached = current_step(states)
            if reached < boundary:  # SIGTERM / Ctrl-C: keep this step as the resume point, then stop
                store.save(reached, states)
                raise preemption.Interrupted(reached)
            if boundary in joins:
                states = joins[boundary](states)
            if boundary in evals:  # the line goes first: a resume from before it drops it and redoes it
                test = watch.mask(trainer.evaluate(states))
                line = _metrics_line(trainer, boundary, window, test, bar.rate(boundary))
                final = test if boundary == end else None
                window = []
                files.append_jsonl(metrics_path, line)
                bar.update(boundary, f"test acc {100 * np.nanmean(line['test_accuracy']):.2f}%", force=True)
            if boundary in save_steps | evals:
                store.save(boundary, states)
    final = final or watch.mask(trainer.evaluate(states))  # evaluated at `end` already, unless nothing ran
    store.prune_to_kept()
    result = {"step": end, "seeds": seeds, "wall_s": time.time() - t_start,
              **{k: v.tolist() for k, v in final.items()}, **mask_counts(states.mask),
              "diverged": watch.flags(), "diverged_at": watch.steps()}
    files.write_json(run_dir.file("result.json"), result)
    sharding.sync("result " + run_dir.path)
    bar.done(f"done: test accuracy {tables.stat(final['test_accuracy']).text()}%" + watch.summary())
    return states, result


def mask_counts(mask) -> dict:
    """Per row of a stacked mask: the fraction of prunable weights kept, and kept/total counts."""
    leaves = [sharding.to_host(x) for x in jax.tree.leaves(mask)]
    kept = sum(x.reshape(len(x), -1).sum(1) for x in leaves)
    total = sum(x[0].size for x in leaves)
    return {"density": (kept / max(total, 1)).tolist(), "kept": kept.astype(int).tolist(), "prunable": total}


class DivergenceWatch:
    """Per-seed finite flags from the compiled step: `stop` ends the run at the end of the chunk
    with one error (the last good checkpoint stays); `drop` records the seed (divergence.json)
    and masks its numbers as NaN so that no table averages them in."""

    def __init__(self, run_dir: RunDir, seeds: list[int], mode: str):
        self.run_dir, self.seeds, self.mode = run_dir, seeds, mode
        path = run_dir.file("divergence.json")
        self.first_bad: dict[int, int] = ({int(k): v for k, v in files.read_json(path).items()}
                                          if os.path.exists(path) else {})

    def check(self, step: int, metrics: dict, store: Checkpoints) -> None:
        finite = np.asarray(metrics["finite"], bool)  # [steps, rows]
        new = {}
        for row in np.flatnonzero(~finite.all(0)):
            if int(row) not in self.first_bad:
                new[int(row)] = step - len(finite) + 1 + int(np.argmin(finite[:, row]))
        if not new:
            return
        if self.mode == "stop":
            saved = store.steps()
            where = f"step {max(saved)} in {store.directory}" if saved else "none (the run had saved nothing yet)"
            rows = ", ".join(f"seed {self.seeds[r]} at step {s}" for r, s in sorted(new.items()))
            raise UserError(f"training diverged (non-finite loss or weights): {rows}. The last good "
                            f"checkpoint is {where}, kept. Lower --lr (or raise --warmup), or pass "
                            "--on_divergence=drop to finish the other seeds and mark these")
        self.first_bad |= new
        files.write_json(self.run_dir.file("divergence.json"), self.first_bad)
        print(f"warning: {', '.join(f'seed {self.seeds[r]} diverged at step {s}' for r, s in sorted(new.items()))}; "
              "finishing the other seeds (--on_divergence=drop)", flush=True)

    def mask(self, test: dict) -> dict:
        """Evaluation numbers with diverged rows as NaN (a NaN network still 'predicts' a class)."""
        bad = np.array([r in self.first_bad for r in range(len(self.seeds))])
        return {k: np.where(bad, np.nan, v) for k, v in test.items()}

    def flags(self) -> list[bool]:
        return [r in self.first_bad for r in range(len(self.seeds))]

    def steps(self) -> list[int | None]:
        return [self.first_bad.get(r) for r in range(len(self.seeds))]

    def summary(self) -> str:
        return f" ({len(self.first_bad)} diverged seed(s) left out)" if self.first_bad else ""


def _metrics_line(trainer, step, window, test, rate) -> dict:
    """`train_*`: means over the `train_steps` steps since the previous line (fewer after a resume)."""
    names = [k for k in (window[0] if window else {}) if k != "finite"]
    train = {k: np.concatenate([w[k] for w in window]).mean(0) for k in names}
    return {"step": step, "epoch": step / trainer.steps_per_epoch,
            "lr": float(trainer.fns.schedule(step - 1)), "steps_per_s": rate,
            "train_steps": sum(len(w["loss"]) for w in window),
            **{f"train_{k}": v.tolist() for k, v in train.items()},
            **{k: v.tolist() for k, v in test.items()}}
