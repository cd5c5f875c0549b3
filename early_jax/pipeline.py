"""Runs composed from pure pieces: dense training (shared by every experiment), then IMP levels."""
from __future__ import annotations

import dataclasses
import os
import re

from early_jax import config as cfg
from early_jax.config import Config, to_steps
from early_jax.data.record import Dataset
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
            "train": dataclasses.asdict(train), "prune_ignore": list(config.prune.ignore)}


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


def train_dense(trainer: Trainer) -> tuple[TrainState, dict, RunDir]:
    """Train (or resume, or load) the dense network of every seed, keeping the early checkpoints."""
    config = trainer.config
    run_dir = RunDir(dense_dir(config))
    description = {"kind": "dense", **dense_identity(config), "seeds": seeds_of(config),
                   "end": trainer.total_steps}
    states, result = run(trainer, run_dir, description=description,
                         initial=lambda: trainer.init(seeds_of(config)), end=trainer.total_steps,
                         save_steps=save_steps(trainer), label="dense")
    return states, result, run_dir
