"""Configuration: frozen dataclasses, presets, duration parsing and command-line overrides."""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

from early_jax.errors import UserError

_DURATION = re.compile(r"^\s*(\d+)\s*(it|ep)?\s*$")


def to_steps(duration, steps_per_epoch: int) -> int:
    """'500it' -> 500, '2ep' -> 2 * steps_per_epoch, a bare number ('500' or 500) -> iterations."""
    if isinstance(duration, bool):
        raise UserError(f"bad duration {duration!r}: write '<n>it' or '<n>ep'")
    if isinstance(duration, int):
        if duration < 0:
            raise UserError(f"bad duration {duration}: must be >= 0")
        return duration
    match = _DURATION.match(str(duration))
    if not match:
        raise UserError(f"bad duration {duration!r}: write '<n>it' (iterations) or '<n>ep' (epochs), "
                        "e.g. '500it' or '2ep'")
    value, unit = int(match.group(1)), match.group(2)
    return value * steps_per_epoch if unit == "ep" else value


def not_identity(default, **kwargs):
    """A field that does not change what a run computes (how it is executed, evaluated or
    checkpointed, how far a plan goes, or what a name points at): run identities leave it out."""
    return dataclasses.field(default=default, metadata={"identity": False}, **kwargs)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet20"
    bn_scale_init: str = "uniform"   # "uniform" = U[0,1] as the paper's code; "ones" = modern default
    compute_dtype: str = "float32"   # "bfloat16": bf16 compute, float32 params and optimizer state
    # float32 convolutions and matmuls on GPU/TPU: "highest" is true float32 (the paper's PyTorch
    # numbers); "default" lets TPUs use bfloat16 passes and GPUs TF32 (faster, ~1e-3 relative).
    # No effect on CPU.
    matmul_precision: str = "highest"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = not_identity("cifar10")         # identified by the arrays' content, not the name
    data_dir: str | None = not_identity(None)
    augment: bool = True             # pad-4 random crop + horizontal flip on training batches
    pool: int = 1                    # average-pool images by this factor when loading (2: 28x28 -> 14x14)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128
    duration: str = "160ep"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4       # coupled L2 on every parameter, as torch.optim.SGD
    milestones: tuple[str, ...] = ("80ep", "120ep")
    gamma: float = 0.1
    warmup: str = "0it"
    eval_every: str = not_identity("1ep")
    eval_batch_size: int = not_identity(1000)
    save_steps: tuple[str, ...] = not_identity(("0it", "25it", "50it", "100it", "250it", "500it", "1000it",
                                             "2000it"))
    seed_parallel: str = not_identity("auto")   # "vmap" | "map" (seeds one after another) | "auto"
    on_divergence: str = not_identity("stop")   # a seed's loss or weights turn non-finite: "stop" the
                                             # run, or "drop" that seed and finish the others


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    fraction: float = 0.2            # of the remaining weights, per level
    scope: str = "global"            # "global" (one threshold) | "layerwise"
    levels: int = not_identity(16)      # how far to go, not what a level computes
    # Parameter path patterns never pruned, e.g. ("head",); "auto": the model's default (see
    # `ignored_layers`). Part of the dense run's identity (it shapes the state's mask).
    ignore: tuple[str, ...] = not_identity(("auto",))
    rewind_iters: tuple[str, ...] = not_identity(("500it",))


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    num_seeds: int = 1
    seed: int = 0                    # seeds are seed, seed+1, ..., seed+num_seeds-1
    workdir: str = "runs"

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(range(self.seed, self.seed + self.num_seeds))


PRESETS: dict[str, Config] = {
    # The paper's recipe (section 1.2 of the spec): ResNet-20, CIFAR-10 from TFDS, 160 epochs.
    "cifar10_resnet20": Config(),
    # Offline CPU preset: a small convnet on Debian's Fashion-MNIST.
    "fashion_cpu": Config(
        model=ModelConfig(name="convnet_small"),
        data=DataConfig(name="fashion_mnist_idx", augment=False),
        train=TrainConfig(duration="10ep", lr=0.1, milestones=("5ep", "8ep"), eval_every="1ep",
                          save_steps=("0it", "25it", "50it", "100it", "250it", "500it", "1000it")),
        prune=PruneConfig(levels=4)),
    # The offline preset in which the paper's findings show (docs/study_search.md): a small ResNet
    # on Fashion-MNIST pooled to 14x14, at a high learning rate with no warmup, long enough to
    # train well; 60% pruned per level (40% and 16% left), rewinding to k = 100 (7% of training).
    "fashion_resnet8": Config(
        model=ModelConfig(name="resnet8_w8"),
        data=DataConfig(name="fashion_mnist_idx", augment=False, pool=2),
        train=TrainConfig(duration="3ep", lr=0.4, milestones=("2ep",), eval_every="3ep",
                          save_steps=("0it", "10it", "25it", "50it", "100it", "200it")),
        prune=PruneConfig(fraction=0.6, levels=2, rewind_iters=("100it",)),
        num_seeds=3),
}

# Flag name -> (section, field). Section fields keep their own names except the two `name`s.
_ALIASES = {"model": ("model", "name"), "dataset": ("data", "name")}
SECTIONS = ("model", "data", "train", "prune")
CHOICES = {"seed_parallel": ("auto", "vmap", "map"), "scope": ("global", "layerwise"),
           "on_divergence": ("stop", "drop"), "matmul_precision": ("default", "high", "highest"),
           "bn_scale_init": ("uniform", "ones"), "compute_dtype": ("float32", "bfloat16")}


@dataclasses.dataclass(frozen=True)
class Flag:
    name: str
    section: str | None        # None: a top-level Config field
    field: str
    type: Any                  # the field's annotation

    def get(self, config: Config):
        return getattr(getattr(config, self.section), self.field) if self.section else getattr(config, self.field)


def flags() -> dict[str, Flag]:
    """Every overridable config field by its flag name."""
    out = {}
    for section in SECTIONS:
        cls = type(getattr(Config(), section))
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            name = next((a for a, (s, n) in _ALIASES.items() if (s, n) == (section, f.name)), f.name)
            out[name] = Flag(name, section, f.name, hints[f.name])
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if f.name not in SECTIONS:
            out[f.name] = Flag(f.name, None, f.name, hints[f.name])
    return out


def parse_flag(flag: Flag, text: str):
    """A flag's text as the type its field is annotated with: bool, int, float, str, a tuple of
    strings (comma-separated), or an optional one of those ('none' is None)."""
    kind, optional = flag.type, False
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        kind, optional = args[0], len(args) < len(typing.get_args(kind))
    if optional and text.strip().lower() == "none":
        return None
    if kind is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UserError(f"--{flag.name} takes true or false, got {text!r}")
    if typing.get_origin(kind) is tuple or kind is tuple:
        return tuple(s.strip() for s in text.split(",") if s.strip())
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise UserError(f"--{flag.name} takes {'an integer' if kind is int else 'a number'}, "
                            f"got {text!r}") from None
    value = str(text)
    if flag.name in CHOICES and value not in CHOICES[flag.name]:
        raise UserError(f"--{flag.name} must be one of {', '.join(CHOICES[flag.name])}, got {value!r}")
    return value


def override(config: Config, values: dict[str, str]) -> Config:
    """Apply {flag: text} overrides; unknown flags raise a UserError naming the valid ones."""
    known = flags()
    sections = {s: {} for s in SECTIONS}
    top = {}
    for name, text in values.items():
        if name not in known:
            raise UserError(f"unknown flag --{name}; valid config flags: {', '.join(sorted(known))}")
        flag = known[name]
        (sections[flag.section] if flag.section else top)[flag.field] = parse_flag(flag, text)
    replaced = {s: dataclasses.replace(getattr(config, s), **kv) for s, kv in sections.items() if kv}
    return dataclasses.replace(config, **replaced, **top)


def flag_text(value) -> str:
    """A config value as it would be written on the command line."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def validate(config: Config) -> Config:
    """Catch settings that cannot be right before any work starts (the dataset-dependent checks
    are in `check_schedule` and train.check_setup)."""
    from early_jax import models  # imported here: models does not need the config module
    models.create(config.model.name, bn_scale_init=config.model.bn_scale_init,
                  dtype=config.model.compute_dtype)  # raises UserError on an unknown model
    t, p = config.train, config.prune
    for name, value in {"num_seeds": config.num_seeds, "batch_size": t.batch_size,
                        "eval_batch_size": t.eval_batch_size}.items():
        if value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if config.seed < 0:
        raise UserError(f"--seed must be >= 0, got {config.seed}")
    _check_number("lr", t.lr, lambda x: x > 0, "> 0")
    _check_number("momentum", t.momentum, lambda x: 0 <= x < 1, "in [0, 1)")
    _check_number("weight_decay", t.weight_decay, lambda x: x >= 0, ">= 0")
    _check_number("gamma", t.gamma, lambda x: 0 < x <= 1, "in (0, 1]")
    _check_number("fraction", p.fraction, lambda x: 0 < x < 1, "in (0, 1)")
    if p.levels < 0:
        raise UserError(f"--levels must be >= 0, got {p.levels}")
    if config.data.pool < 1:
        raise UserError(f"--pool must be >= 1, got {config.data.pool}")
    for name, value in (("seed_parallel", t.seed_parallel), ("scope", p.scope),
                        ("on_divergence", t.on_divergence), ("matmul_precision", config.model.matmul_precision)):
        if value not in CHOICES[name]:
            raise UserError(f"--{name} must be one of {', '.join(CHOICES[name])}, got {value!r}")
    for duration in (t.duration, t.warmup, t.eval_every, *t.milestones, *t.save_steps, *p.rewind_iters):
        to_steps(duration, 1)  # raises on a malformed duration
    if to_steps(t.duration, 1) == 0:
        raise UserError(f"--duration={t.duration} trains nothing: the untrained network would be "
                        "the result; give a positive duration")
    if to_steps(t.eval_every, 1) == 0:
        raise UserError(f"--eval_every={t.eval_every} must be positive")
    return config


def check_schedule(config: Config, steps_per_epoch: int) -> None:
    """Durations against each other, once the steps per epoch are known."""
    t = config.train
    total = to_steps(t.duration, steps_per_epoch)
    warmup = to_steps(t.warmup, steps_per_epoch)
    if warmup > total:
        raise UserError(f"--warmup={t.warmup} ({warmup} steps) is longer than the run "
                        f"(--duration={t.duration}, {total} steps); shorten it")
    late = [m for m in t.milestones if to_steps(m, steps_per_epoch) > total]
    if late:
        raise UserError(f"--milestones {', '.join(late)} lie after the end of the run "
                        f"(--duration={t.duration}, {total} steps), so the learning rate would never "
                        "drop there; move or drop them")


def _check_number(name: str, value: float, ok, wanted: str) -> None:
    if not (math.isfinite(value) and ok(value)):
        raise UserError(f"--{name} must be finite and {wanted}, got {value}")


def ignored_layers(config: Config) -> tuple:
    """`prune.ignore` with "auto" replaced by the model's default: VGG keeps its output layer
    unpruned (as the paper's code does), every other model prunes every kernel."""
    auto = ("head",) if config.model.name.startswith("vgg") else ()
    return tuple(dict.fromkeys(p for pattern in config.prune.ignore
                               for p in (auto if pattern == "auto" else (pattern,))))
