"""Orbax checkpoints of the full training state; the only module that calls Orbax.

Orbax writes each step into a temporary folder and renames it when complete, so a run killed while
saving leaves the previous checkpoints intact and the half-written one is ignored and cleaned up.
"""
from __future__ import annotations

import contextlib
import os

import flax.serialization
import jax
import orbax.checkpoint as ocp

from early_jax.errors import UserError


class Checkpoints:
    """The checkpoints of one run in one folder: save at steps, list, restore into a target.

    Each operation opens and closes its own Orbax manager, so the view of the folder is never stale
    (another handle or process may have saved since) and no background machinery outlives a call.
    """

    def __init__(self, directory: str, keep_latest: int | None = None):
        self.directory = os.path.abspath(directory)
        self.keep_latest = keep_latest

    @contextlib.contextmanager
    def _manager(self, cleanup: bool = False):
        """`cleanup`: remove half-written steps of a killed save (only before saving: the cleanup
        runs in a background thread that `close` does not wait for, and two would race)."""
        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep_latest, create=True,
                                               enable_async_checkpointing=False,
                                               cleanup_tmp_directories=cleanup)
        manager = ocp.CheckpointManager(self.directory, options=options)
        try:
            yield manager
        finally:
            manager.close()

    def steps(self) -> list[int]:
        if not os.path.isdir(self.directory):
            return []
        with self._manager() as manager:
            return sorted(manager.all_steps())

    def save(self, step: int, state) -> None:
        with self._manager(cleanup=True) as manager:
            if step not in manager.all_steps():
                manager.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)))
                manager.wait_until_finished()

    def restore(self, step: int, target):
        """Restore `step` into the structure, shapes and shardings of `target` (arrays or abstract).

        A missing, unreadable or mismatched checkpoint raises UserError naming the folder and step.
        """
        path = os.path.join(self.directory, str(step))
        if step not in self.steps():
            raise UserError(f"no checkpoint for step {step} in {self.directory} "
                            f"(saved steps: {self.steps() or 'none'})")
        abstract = jax.tree.map(_abstract, flax.serialization.to_state_dict(target))
        try:
            with self._manager() as manager:
                restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as err:  # Orbax raises many types; the user needs the path and the cause
            raise UserError(f"checkpoint {path} (step {step}) cannot be restored into this run: "
                            f"{_cause(err)}. It was written by a different configuration or is corrupt: "
                            "use another --workdir, or delete that folder (and the run's result.json if "
                            "it is the final step) and rerun to recompute it from the checkpoint "
                            "before it") from err
        return flax.serialization.from_state_dict(target, restored)


def _abstract(x):
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _cause(err: BaseException) -> str:
    """The first line of the innermost exception: Orbax wraps the telling one (e.g. a truncated
    stream) in generic ones."""
    while err.__cause__ or err.__context__:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    return text[0][:400] if text else type(err).__name__
