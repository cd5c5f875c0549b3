"""Pre-training under a changed task, then IMP from the pre-trained state (the paper's Section 5).

Tasks (combinable with '+'): fixed random labels, blurred inputs, rotation prediction (a 4-way head
during pre-training, replaced by a freshly initialised head afterwards), and a random subset of the
training data. The pre-trained state W_P is the rewinding point of IMP on the real task. By default
pre-training *replaces* the first P epochs of the main run (the schedule and data order continue
from step P * steps_per_epoch, as the paper's code does); `offset="none"` trains the full run after.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from early_jax import masks, models, pipeline, runs, streams
from early_jax.config import ignored_layers, to_steps
from early_jax.data.device import (Preprocess, blur, fixed_quarter_turns, fixed_random_labels,
                                   rotate_host)
from early_jax.data.record import Dataset
from early_jax.errors import UserError
from early_jax.pipeline import Experiment
from early_jax.runner import run
from early_jax.train import Trainer, TrainState

TASK_PARTS = ("random_labels", "blur", "rotation", "subset")
OFFSETS = ("replace", "none")


@dataclasses.dataclass(frozen=True)
class Task:
    random_labels: float = 0.0   # fraction of training labels replaced by fixed random classes
    blur: int = 1                # blur factor (the paper: 4, i.e. 32 -> 8 -> 32 pixels)
    rotation: str = ""           # "" | "fixed" (one quarter turn per example) | "redraw" (each visit)
    rotate_first: bool = False   # rotate before crop and flip, as the paper's code (see device.train_batch)
    subset: float = 1.0          # fraction of the training set kept

    @property
    def name(self) -> str:
        parts = [f"random_labels{self.random_labels:g}" * bool(self.random_labels),
                 f"blur{self.blur}" * (self.blur > 1), (f"rotation_{self.rotation}" + "_first" * self.rotate_first) * bool(self.rotation),
                 f"subset{self.subset:g}" * (self.subset < 1)]
        return "+".join(p for p in parts if p) or "supervised"


def parse_task(text: str, *, label_fraction: float = 1.0, blur_factor: int = 4,
               rotation: str = "fixed", rotate_first: bool = False, subset_fraction: float = 0.1) -> Task:
    """'blur', 'rotation', 'random_labels', 'subset' or combinations like 'blur+rotation'."""
    parts = [p.strip() for p in text.split("+") if p.strip()]
    unknown = [p for p in parts if p not in TASK_PARTS]
    if unknown or not parts:
        raise UserError(f"unknown pre-training task {text!r}: combine {', '.join(TASK_PARTS)} with '+'")
    if {"random_labels", "rotation"} <= set(parts):
        raise UserError("random_labels+rotation: rotation prediction has its own labels (the turns); "
                        "pick one of the two")
    if rotation not in ("fixed", "redraw"):
        raise UserError(f"--rotation must be fixed or redraw, got {rotation!r}")
    if not 0 < subset_fraction <= 1 or not 0 < label_fraction <= 1 or blur_factor < 2:
        raise UserError("need 0 < --subset_fraction <= 1, 0 < --label_fraction <= 1, --blur_factor >= 2")
    return Task(random_labels=label_fraction if "random_labels" in parts else 0.0,
                blur=blur_factor if "blur" in parts else 1,
                rotation=rotation if "rotation" in parts else "", rotate_first=rotate_first,
                subset=subset_fraction if "subset" in parts else 1.0)


def check_task(task: Task, dataset: Dataset, batch_size: int) -> None:
    """Refuse a task the dataset cannot support, before any training starts."""
    height, width = dataset.image_shape[:2]
    if task.blur > min(height, width):
        raise UserError(f"--blur_factor={task.blur} is larger than the {height}x{width} images")
    if task.rotation and height != width:
        raise UserError(f"rotation prediction needs square images, these are {height}x{width}")
    kept = round(task.subset * len(dataset.x_train))
    if kept < batch_size:
        raise UserError(f"--subset_fraction={task.subset:g} keeps {kept} examples, fewer than one "
                        f"batch of {batch_size}; raise the fraction")


def blur_host(images: np.ndarray, factor: int) -> np.ndarray:
    """Blurred uint8 copies (for evaluating a blur task on the test set)."""
    out = blur(jnp.asarray(images, jnp.float32) / 255.0, factor)
    return np.clip(np.round(np.asarray(out) * 255.0), 0, 255).astype(np.uint8)


def task_dataset(task: Task, dataset: Dataset, seed: int) -> Dataset:
    """The dataset the pre-training sees; its test split is transformed the same way so that the
    pre-training's own test accuracy means something (rotation: predict the test rotations).
    Normalisation keeps the real dataset's statistics. Every draw has its own stream of `seed`."""
    x, y = dataset.x_train, dataset.y_train
    if task.subset < 1:
        rng = streams.host_rng(seed, "pretrain_subset")
        chosen = np.sort(rng.choice(len(x), max(1, round(task.subset * len(x))), replace=False))
        x, y = x[chosen], y[chosen]
    if task.random_labels:
        y = fixed_random_labels(y, dataset.num_classes, task.random_labels,
                                streams.host_rng(seed, "pretrain_random_labels"))
    x_test, y_test, num_classes = dataset.x_test, dataset.y_test, dataset.num_classes
    if task.rotation:
        if task.rotation == "fixed":  # the train step turns each image by its label
            y = fixed_quarter_turns(len(x), streams.host_rng(seed, "pretrain_rotations_train"))
        y_test = fixed_quarter_turns(len(x_test), streams.host_rng(seed, "pretrain_rotations_test"))
        x_test, num_classes = rotate_host(x_test, y_test), 4
    if task.blur > 1:
        x_test = blur_host(x_test, task.blur)
    return dataclasses.replace(dataset, name=f"{dataset.name}:{task.name}", x_train=x, y_train=y,
                               x_test=x_test, y_test=y_test, num_classes=num_classes, sources=())


def pretrain_trainer(exp: Experiment, task: Task, epochs: int) -> Trainer:
    """A trainer for P epochs of the task; durations are converted with the *main* dataset's steps
    per epoch, so a subset task still pre-trains for P * steps_per_epoch iterations on the same
    learning-rate schedule as the main run."""
    spe = exp.steps_per_epoch
    as_iterations = lambda d: f"{to_steps(d, spe)}it"
    tc = exp.config.train
    train = dataclasses.replace(tc, duration=f"{epochs * spe}it", save_steps=(),
                                milestones=tuple(map(as_iterations, tc.milestones)),
                                warmup=as_iterations(tc.warmup), eval_every=as_iterations(tc.eval_every))
    config = dataclasses.replace(exp.config, train=train)
    prep = Preprocess(augment=config.data.augment, blur_factor=task.blur,
                      rotation={"fixed": "label", "redraw": "redraw"}.get(task.rotation, ""),
                      rotate_first=task.rotate_first)
    return Trainer(config, task_dataset(task, exp.dataset, config.seed), prep=prep, mesh=exp.trainer.mesh)


def widen_mask(mask, params, ignore) -> dict:
    """A mask for `params` (prunable layers as `ignore` says): kernels whose shape differs (the
    4-way rotation head) are kept whole."""
    full = masks.prunable_mask(params, ignore)
    flat_mask = dict(jax.tree_util.tree_flatten_with_path(mask)[0])
    leaves = [flat_mask[p] if p in flat_mask and flat_mask[p].shape == whole.shape else whole
              for p, whole in jax.tree_util.tree_flatten_with_path(full)[0]]
    return jax.tree.unflatten(jax.tree.structure(full), leaves)


def fresh_head(main: Trainer, seed) -> dict:
    """A newly drawn output layer for one seed, from its own stream of the init key."""
    init_key = jax.random.wrap_key_data(streams.seed_keys(seed)["init"])
    variables = models.init_variables(main.model, streams.derive(init_key, "fresh_head"), main.dataset.image_shape)
    return variables["params"]["head"]


def main_start(exp: Experiment, pre: TrainState, start_step: int, mask=None, *, new_head: bool = False
               ) -> TrainState:
    """The main run's state after pre-training: pre-trained weights and BatchNorm statistics (with
    `new_head`, a freshly drawn output layer for the real task: after rotation prediction), a fresh
    optimizer, the main run's keys (data order continues as the dense run's would from
    `start_step`), and `mask` (default: dense)."""
    main = exp.trainer

    def one(pre_state: TrainState, seed, keep) -> TrainState:
        base = main.init_one(seed)
        keep = base.mask if keep is None else keep
        params = {**pre_state.params, "head": fresh_head(main, seed)} if new_head else pre_state.params
        params = masks.apply_mask(params, keep)
        return base.replace(step=jnp.int32(start_step), params=params, batch_stats=pre_state.batch_stats,
                            opt_state=main.tx.init(params), mask=keep)

    return jax.jit(jax.vmap(one))(pre, jnp.asarray(exp.seeds), mask)


def start_step(exp: Experiment, epochs: int, offset: str) -> int:
    if offset not in OFFSETS:
        raise UserError(f"--offset must be one of {OFFSETS}, got {offset!r}")
    step = epochs * exp.steps_per_epoch if offset == "replace" else 0
    if step >= exp.total_steps:
        raise UserError(f"{epochs} pre-training epochs replace the whole {exp.total_steps}-step run; "
                        "use fewer epochs or --offset=none")
    return step


def pretrain(exp: Experiment, descriptor: runs.Pretraining, sparse_mask=None):
    """Pre-train every seed (resumable); returns the run's outcome. With `sparse_mask`, only that
    subnetwork is pre-trained (pruned weights stay zero)."""
    trainer = pretrain_trainer(exp, descriptor.task, descriptor.epochs)

    def initial():
        states = trainer.init(exp.seeds)
        if sparse_mask is None:
            return states
        ignore = ignored_layers(exp.config)
        wide = jax.vmap(lambda m, p: widen_mask(m, p, ignore))(sparse_mask(), states.params)
        return states.replace(params=jax.jit(jax.vmap(masks.apply_mask))(states.params, wide), mask=wide)

    return run(trainer, descriptor, initial=initial, workdir=exp.config.workdir,
               label=f"pretrain {descriptor.task.name} {descriptor.epochs}ep")


def pretrain_imp(exp: Experiment, task: Task, epochs: int, levels: int, offset: str = "replace"
                 ) -> list[dict]:
    """Pre-train, then IMP rewinding to the pre-trained state: one row per (level, seed).

    With 0 epochs the start is W_0, so the rows are those of IMP rewound to step 0 (reused)."""
    step0 = start_step(exp, epochs, offset)
    tag = {"task": task.name, "pretrain_epochs": epochs}
    if epochs == 0:
        return [tag | row for row in pipeline.imp(exp, [0], levels)]
    descriptor = runs.Pretraining(exp.dense, task, epochs)
    after = [runs.AfterPretraining(descriptor, offset, exp.prune if level else None, level)
             for level in range(levels + 1)]
    pre = functools.cache(lambda: pretrain(exp, descriptor))  # only if a level still has to train
    start = lambda: main_start(exp, pre().states(), step0, new_head=bool(task.rotation))
    level0 = run(exp.trainer, after[0], initial=start, label=f"{task.name} {epochs}ep level 0")
    chain = pipeline.imp_chain(exp, after[1:], start, level0, f"{task.name} {epochs}ep")
    return [tag | row for level, outcome in enumerate([level0, *chain])
            for row in pipeline.result_rows(outcome.result, level=level)]


def sparse_pretrain(exp: Experiment, task: Task, epochs: int, level: int, rewind: int,
                    offset: str = "replace") -> list[dict]:
    """Pre-train only the subnetwork of IMP `level` (rewinding to `rewind`), then train it on the
    real task from the pre-trained weights with the same mask: one row per seed."""
    step0 = start_step(exp, epochs, offset)
    descriptor = runs.Pretraining(exp.dense, task, epochs, sparse=exp.level(rewind, level))
    mask = functools.cache(lambda: pipeline.mask_of(exp, rewind, level))
    pre = functools.cache(lambda: pretrain(exp, descriptor, sparse_mask=mask))
    after = runs.AfterPretraining(descriptor, offset)
    outcome = run(exp.trainer, after, label=f"sparse {task.name} {epochs}ep",
                  initial=lambda: main_start(exp, pre().states(), step0, mask(), new_head=bool(task.rotation)))
    tag = {"task": task.name + "_sparse", "pretrain_epochs": epochs}
    return [tag | row for row in pipeline.result_rows(outcome.result, level=level)]


def rows_on_disk(exp: Experiment, task: Task, offset: str, sparse: runs.ImpLevel | None = None) -> list[dict]:
    """Every finished run after pre-training on `task` (any number of epochs, any level) on disk,
    for this dense run, prune setting and offset: what the tables and plots of a task show."""
    folder = os.path.join(exp.path(exp.dense), "pretrain")
    pattern = re.escape(task.name) + r"_(\d+)ep" + (re.escape(f"_sparse_{sparse.tag()}") if sparse else "")
    found = [re.fullmatch(pattern, name) for name in (os.listdir(folder) if os.path.isdir(folder) else [])]
    rows = []
    for epochs in sorted(int(m.group(1)) for m in found if m):
        pre = runs.Pretraining(exp.dense, task, epochs, sparse)
        tag = {"task": task.name + ("_sparse" if sparse else ""), "pretrain_epochs": epochs}
        for level in ([0] if sparse else range(exp.config.prune.levels + 1)):
            after = runs.AfterPretraining(pre, offset, exp.prune if level else None, level)
            if after.complete(exp.config.workdir):
                result = after.result(exp.config.workdir)
                rows += [tag | row for row in pipeline.result_rows(result, level=sparse.level if sparse else level)]
    return rows
