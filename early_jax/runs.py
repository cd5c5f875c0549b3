"""Run identity: one frozen descriptor per kind of run names it, finds it and reuses it.

A descriptor holds only what determines a run's numbers. `identity()` writes each dataclass as the
fields whose value differs from the field's default (recursively; fields marked
`config.not_identity` are left out), so adding a field with a default keeps every existing name.
Folders are named by the hash of that identity, nested under the run they start from:

  <workdir>/dense_<model>_<data>_<hash>_seeds<a>-<b>/          Dense
    imp_<scope>_f<fraction>/rewind<k>/level<L>/              ImpLevel
    imp_<scope>_f<fraction>/rewind<k>/perturb_<hash>/        Perturbation (rows: level x treatment)
    instability/k<k1>-<k2>.../                               InstabilityCopies (dense)
    imp_<scope>_f<fraction>/instability_level<L>/k.../       InstabilityCopies (IMP level L)
    telemetry_<N>_every<m>[_<subnetwork>]/                   Telemetry
    pretrain/<task>_<P>ep[_sparse_<subnetwork>]/pretrain/    Pretraining
      .../<offset>/level0/, .../<offset>/imp_.../level<L>/   AfterPretraining
    study_<scope>_f<fraction>_<hash>/                        Study

`path`, `exists`, `complete` and `result` only look: nothing is created until a run writes. A
finished run's result.json holds what later pieces need (accuracies, mask densities and kept
counts, divergence), so reusing one reads JSON and restores no checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, ClassVar

from early_jax import files
from early_jax.config import Config, ModelConfig, PruneConfig, TrainConfig, ignored_layers
from early_jax.errors import UserError

FORMAT = 2  # run.json layout; run dirs without it were written before run descriptors


def identity(obj) -> Any:
    """JSON-ready identity of a value: dataclasses as their non-default identity fields."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            if not f.metadata.get("identity", True):
                continue
            value = identity(getattr(obj, f.name))
            if f.default is not dataclasses.MISSING:
                default = identity(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = identity(f.default_factory())
            else:
                default = dataclasses.MISSING
            if value != default:
                out[f.name] = value
        return out
    if isinstance(obj, (tuple, list)):
        return [identity(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): identity(v) for k, v in obj.items()}
    return obj


def digest(obj) -> str:
    """A short stable hash of a value's identity."""
    text = json.dumps(identity(obj), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


class Run:
    """What every descriptor offers (they are frozen dataclasses). Each also has `seeds`: the
    seed of every state row, in order."""

    kind: ClassVar[str]

    def folder(self) -> str:
        """The run's folder relative to the work dir."""
        raise NotImplementedError

    def path(self, workdir: str) -> str:
        return os.path.join(workdir, self.folder())

    def describe(self) -> dict:
        """What run.json records: the format, the kind and the whole identity."""
        return {"format": FORMAT, "kind": self.kind, **identity(self)}

    def exists(self, workdir: str) -> bool:
        return os.path.isfile(os.path.join(self.path(workdir), "run.json"))

    def complete(self, workdir: str) -> bool:
        return os.path.isfile(os.path.join(self.path(workdir), "result.json"))

    def result(self, workdir: str) -> dict:
        return files.read_json(os.path.join(self.path(workdir), "result.json"))


@dataclasses.dataclass(frozen=True)
class Dense(Run):
    """Dense training of every seed from its own init: shared by every other kind of run."""

    kind: ClassVar[str] = "dense"
    model: ModelConfig
    train: TrainConfig
    augment: bool
    data: str                 # content fingerprint of the dataset arrays (data.fingerprint)
    ignore: tuple             # the resolved ignore list: it shapes the state's mask
    seeds: tuple[int, ...]
    label: str = dataclasses.field(default="", metadata={"identity": False})  # for the folder name

    def folder(self) -> str:
        return f"dense_{self.label}_{digest(self)}_seeds{self.seeds[0]}-{self.seeds[-1]}"


def dense(config: Config, data_fingerprint: str, data_label: str) -> Dense:
    return Dense(model=config.model, train=config.train, augment=config.data.augment,
                 data=data_fingerprint, ignore=ignored_layers(config), seeds=config.seeds,
                 label=f"{config.model.name}_{data_label}")


def imp_folder(dense_run: Dense, prune: PruneConfig) -> str:
    """One prune setting's folder: named by scope and fraction (plus a hash of any other field
    a later version adds)."""
    rest = {k: v for k, v in identity(prune).items() if k not in ("scope", "fraction")}
    name = f"imp_{prune.scope}_f{prune.fraction:g}" + (f"_{digest(rest)}" if rest else "")
    return os.path.join(dense_run.folder(), name)


class OnDense(Run):
    """A run of one state row per seed of the dense run it starts from."""

    @property
    def seeds(self):
        return self.dense.seeds


@dataclasses.dataclass(frozen=True)
class ImpLevel(OnDense):
    """IMP level L >= 1: prune level L-1's final weights, rewind the survivors to step k, retrain."""

    kind: ClassVar[str] = "imp_level"
    dense: Dense
    prune: PruneConfig
    rewind: int
    level: int

    def folder(self) -> str:
        return os.path.join(imp_folder(self.dense, self.prune), f"rewind{self.rewind}", f"level{self.level}")

    def tag(self) -> str:
        """A short name of this subnetwork for the folders of runs that use its mask."""
        return f"{os.path.basename(imp_folder(self.dense, self.prune))}_level{self.level}_k{self.rewind}"


def imp_run(dense_run: Dense, prune: PruneConfig, rewind: int, level: int) -> Run:
    """The run of IMP level `level` rewinding to `rewind`; level 0 is the dense run itself."""
    return ImpLevel(dense_run, prune, rewind, level) if level else dense_run


@dataclasses.dataclass(frozen=True)
class Perturbation(Run):
    """Rows (level, treatment) x seeds trained from step k in one stacked run."""

    kind: ClassVar[str] = "perturbation"
    dense: Dense
    prune: PruneConfig
    rewind: int
    rows: tuple           # ((level, perturb.Treatment), ...)

    def folder(self) -> str:
        return os.path.join(imp_folder(self.dense, self.prune), f"rewind{self.rewind}",
                            f"perturb_{digest(self.rows)}")

    @property
    def seeds(self):
        return tuple(s for _ in self.rows for s in self.dense.seeds)


@dataclasses.dataclass(frozen=True)
class InstabilityCopies(Run):
    """Copy 2 of every k (rows k x seeds) of the dense network (level 0) or IMP level L."""

    kind: ClassVar[str] = "instability_copies"
    dense: Dense
    prune: PruneConfig | None
    level: int
    rewinds: tuple[int, ...]

    def folder(self) -> str:
        root = (os.path.join(self.dense.folder(), "instability") if self.level == 0
                else os.path.join(imp_folder(self.dense, self.prune), f"instability_level{self.level}"))
        ks = self.rewinds
        name = "k" + "-".join(map(str, ks))
        if len(name) > 64:  # many k values: keep the folder name within file-system limits
            name = f"k{ks[0]}-to-{ks[-1]}_{len(ks)}values_{digest(list(ks))}"
        return os.path.join(root, name)

    @property
    def seeds(self):
        return tuple(s for _ in self.rewinds for s in self.dense.seeds)


@dataclasses.dataclass(frozen=True)
class Telemetry(OnDense):
    """Statistics of the first `end` steps of the dense run, optionally over a subnetwork."""

    kind: ClassVar[str] = "telemetry"
    dense: Dense
    end: int
    every: int
    subnet: ImpLevel | None = None

    def folder(self) -> str:
        sub = f"_{self.subnet.tag()}" if self.subnet else ""
        return os.path.join(self.dense.folder(), f"telemetry_{self.end}_every{self.every}{sub}")


@dataclasses.dataclass(frozen=True)
class Pretraining(OnDense):
    """P epochs of a changed task from each seed's init (only the subnetwork of `sparse`, if set)."""

    kind: ClassVar[str] = "pretraining"
    dense: Dense
    task: Any             # pretrain.Task
    epochs: int
    sparse: ImpLevel | None = None

    def root(self) -> str:
        sparse = f"_sparse_{self.sparse.tag()}" if self.sparse else ""
        return os.path.join(self.dense.folder(), "pretrain", f"{self.task.name}_{self.epochs}ep{sparse}")

    def folder(self) -> str:
        return os.path.join(self.root(), "pretrain")


@dataclasses.dataclass(frozen=True)
class AfterPretraining(Run):
    """The real task after pre-training: level 0 trains the pre-trained network (with its mask)
    to the end; level L >= 1 is IMP rewinding to the pre-trained weights."""

    kind: ClassVar[str] = "after_pretraining"
    pretraining: Pretraining
    offset: str           # "replace": start at step P * steps_per_epoch; "none": at step 0
    prune: PruneConfig | None = None
    level: int = 0

    def folder(self) -> str:
        base = os.path.join(self.pretraining.root(), self.offset)
        if self.level == 0:
            return os.path.join(base, "level0")
        imp = os.path.basename(imp_folder(self.pretraining.dense, self.prune))
        return os.path.join(base, imp, f"level{self.level}")

    @property
    def seeds(self):
        return self.pretraining.seeds


@dataclasses.dataclass(frozen=True)
class Study(OnDense):
    """The whole-paper study's tables, figures and report for one prune setting and plan."""

    kind: ClassVar[str] = "study"
    dense: Dense
    prune: PruneConfig
    plan: Any             # study.Plan

    def folder(self) -> str:
        name = f"study_{os.path.basename(imp_folder(self.dense, self.prune))[4:]}_{digest(self.plan)}"
        return os.path.join(self.dense.folder(), name)


def check_no_older_layout(workdir: str, dense_run: Dense) -> None:
    """Refuse a work dir that holds a run of this model, data and seeds written before run
    descriptors (its name cannot be matched, and retraining silently would cost hours)."""
    if not os.path.isdir(workdir):
        return
    prefix, suffix = f"dense_{dense_run.label}_", f"_seeds{dense_run.seeds[0]}-{dense_run.seeds[-1]}"
    for name in sorted(os.listdir(workdir)):
        record = os.path.join(workdir, name, "run.json")
        if name.startswith(prefix) and name.endswith(suffix) and os.path.isfile(record):
            check_format(os.path.join(workdir, name), files.read_json(record))


def check_format(folder: str, recorded: dict) -> None:
    """Refuse a run.json written before run descriptors (it has no "format")."""
    if "format" not in recorded:
        raise UserError(f"{folder} was written by an earlier early_jax whose runs cannot be reused; "
                        "move that folder out of the work dir (or pass another --workdir) and rerun")
