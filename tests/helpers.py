"""Tiny configurations shared by the tests: small enough that each program compiles in seconds."""
import dataclasses
from typing import ClassVar

from early_jax import config as cfg
from early_jax import data, runs

TINY_DATA = data.synthetic(num_train=96, num_test=40, shape=(8, 8, 1), num_classes=4, seed=0)


def tiny_config(**overrides) -> cfg.Config:
    """convnet_tiny on 8x8x1 synthetic data, batch 16 (6 steps an epoch), 4 epochs."""
    base = cfg.Config(
        model=cfg.ModelConfig(name="convnet_tiny"),
        data=cfg.DataConfig(name="synthetic:8x8x1", augment=True),
        train=cfg.TrainConfig(batch_size=16, duration="4ep", lr=0.05, milestones=("2ep",),
                              eval_every="2ep", eval_batch_size=16,
                              save_steps=("0it", "3it", "6it")),
        prune=cfg.PruneConfig(levels=2, rewind_iters=("0it", "3it")),
        num_seeds=2)
    return cfg.override(base, {k: str(v) for k, v in overrides.items()}) if overrides else base


def with_workdir(config: cfg.Config, path) -> cfg.Config:
    return dataclasses.replace(config, workdir=str(path))


@dataclasses.dataclass(frozen=True)
class TinyRun(runs.Run):
    """A run descriptor for tests of the runner: a folder name and the seed of each row."""

    kind: ClassVar[str] = "test"
    name: str
    seeds: tuple = (0, 1)

    def folder(self) -> str:
        return self.name
