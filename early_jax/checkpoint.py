"""Orbax checkpoints of the full training state, verified by checksums; the only Orbax caller.

One `Checkpoints` (one Orbax CheckpointManager) per run dir holds the states at the kept steps (the
early grid and the end, a preservation policy) and the latest resume point. Orbax writes each step
into a temporary folder and renames it when complete, so a kill while saving leaves the previous
checkpoints intact. Before each save a checksum of every array is written atomically beside the
checkpoints (`<run>/checksums/<step>.json`); a restore verifies it, and refuses non-finite
parameters, so a damaged checkpoint is an error, never a silent restart from garbage.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys

import flax.serialization
import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from early_jax import files, sharding
from early_jax.errors import UserError

_unverified_noted: set = set()


class Checkpoints:
    """The checkpoints of one run in `<run>/checkpoints`: save, list, restore into a target."""

    def __init__(self, run_path: str, keep=(), writable: bool = False):
        self.directory = os.path.abspath(os.path.join(run_path, "checkpoints"))
        self.checksums = os.path.abspath(os.path.join(run_path, "checksums"))
        self.keep = sorted(set(keep))
        self.writable = writable
        self._manager = None

    def _open(self):
        if self._manager is None:
            policy = policies.AnyPreservationPolicy([policies.CustomSteps(self.keep), policies.LatestN(1)])
            options = ocp.CheckpointManagerOptions(
                preservation_policy=policy if self.writable else None, create=self.writable,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=self.writable)  # half-written steps of a killed save
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def steps(self) -> list[int]:
        if not os.path.isdir(self.directory):
            return []
        manager = self._open()
        manager.reload()
        return sorted(manager.all_steps())

    def save(self, step: int, state) -> None:
        if not self.writable:
            raise RuntimeError("these checkpoints were opened for reading")
        if step in self.steps():
            return
        tree = flax.serialization.to_state_dict(state)
        files.write_json(self._checksum_path(step), checksums(tree))
        self._open().save(step, args=ocp.args.StandardSave(tree))
        self._open().wait_until_finished()

    def prune_to_kept(self) -> None:
        """Remove every step but the kept ones (a finished run needs no resume point; a kill while
        Orbax deleted an old one can leave part of it behind) and the checksums of removed steps."""
        for step in self.steps():
            if step not in self.keep:
                self._open().delete(step)
        if files.is_primary():
            for name in os.listdir(self.directory):
                stray = os.path.join(self.directory, name)
                if name.isdigit() and int(name) not in self.keep and os.path.isdir(stray):
                    shutil.rmtree(stray, ignore_errors=True)
            for name in os.listdir(self.checksums) if os.path.isdir(self.checksums) else []:
                if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) not in self.keep:
                    os.remove(os.path.join(self.checksums, name))
        self._open().reload()

    def restore(self, step: int, target):
        """Restore `step` into the structure, shapes and shardings of `target` (arrays or abstract),
        verified against its checksums; any problem is one UserError naming the path and step."""
        path = os.path.join(self.directory, str(step))
        saved = self.steps()
        if step not in saved:
            raise UserError(f"no checkpoint for step {step} in {self.directory} "
                            f"(saved steps: {saved or 'none'})")
        abstract = jax.tree.map(_abstract, flax.serialization.to_state_dict(target))
        way_out = ("delete that step folder (and the run's result.json if it is the final step) and "
                   "rerun to recompute it from the checkpoint before it, or use another --workdir")
        try:
            restored = self._open().restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as err:  # Orbax raises many types; the user needs the path and the cause
            raise UserError(f"checkpoint {path} (step {step}) cannot be restored into this run: "
                            f"{_cause(err)}. It was written by a different configuration or is "
                            f"damaged: {way_out}") from err
        self._verify(step, path, restored, way_out)
        return flax.serialization.from_state_dict(target, restored)

    def _checksum_path(self, step: int) -> str:
        return os.path.join(self.checksums, f"{step}.json")

    def _verify(self, step: int, path: str, restored, way_out: str) -> None:
        record = self._checksum_path(step)
        if not os.path.exists(record):
            if self.directory not in _unverified_noted:
                _unverified_noted.add(self.directory)
                print(f"note: the checkpoints in {self.directory} carry no checksums (written by an "
                      "earlier early_jax); they load unverified", file=sys.stderr)
        else:
            expected, actual = files.read_json(record), checksums(restored)
            bad = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
            if bad:
                raise UserError(f"checkpoint {path} (step {step}) is damaged: {len(bad)} array(s) "
                                f"differ from their checksums ({', '.join(bad[:3])}); {way_out}")
        params = restored.get("params", {}) if isinstance(restored, dict) else {}
        if not all(np.isfinite(sharding.to_host(x)).all() for x in jax.tree.leaves(params)):
            raise UserError(f"checkpoint {path} (step {step}) holds non-finite parameters; {way_out}")


def checksums(tree) -> dict[str, str]:
    """{leaf path: sha256 of shape, dtype and bytes} of a state dict (gathered on multi-host)."""
    flat = flax.traverse_util.flatten_dict(tree, sep="/") if isinstance(tree, dict) else {"": tree}
    out = {}
    for path, leaf in flat.items():
        array = np.ascontiguousarray(sharding.to_host(leaf))
        digest = hashlib.sha256(f"{array.shape}{array.dtype.str}".encode())
        digest.update(array.tobytes())
        out[str(path)] = digest.hexdigest()[:24]
    return out


def _abstract(x):
    sharding_ = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_)


def _cause(err: BaseException) -> str:
    """The first line of the innermost exception: Orbax wraps the telling one (e.g. a truncated
    stream) in generic ones."""
    while err.__cause__ or err.__context__:
        err = err.__cause__ or err.__context__
    text = str(err).strip().splitlines()
    return text[0][:400] if text else type(err).__name__
