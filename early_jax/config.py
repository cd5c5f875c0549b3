"""Configuration: frozen dataclasses, presets, duration parsing and command-line overrides."""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet20"
    bn_scale_init: str = "uniform"   # "uniform" = U[0,1] as the paper's code; "ones" = modern default
    compute_dtype: str = "float32"   # "bfloat16": bf16 compute, float32 params and optimizer state


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "cifar10"
    data_dir: str | None = None
    augment: bool = True             # pad-4 random crop + horizontal flip on training batches


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 128
    duration: str = "160ep"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4       # coupled L2 on every parameter, as torch.optim.SGD
    milestones: tuple = ("80ep", "120ep")
    gamma: float = 0.1
    warmup: str = "0it"
    eval_every: str = "1ep"
    eval_batch_size: int = 1000
    save_steps: tuple = ("0it", "25it", "50it", "100it", "250it", "500it", "1000it", "2000it")
    seed_parallel: str = "auto"      # "vmap" | "map" (seeds one after another in one program) | "auto"


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    fraction: float = 0.2            # of the remaining weights, per level
    levels: int = 16
    scope: str = "global"            # "global" (one threshold) | "layerwise"
    ignore: tuple = ("auto",)        # parameter path patterns never pruned, e.g. ("head",); "auto":
                                     # the model's default (see `ignored_layers`)
    rewind_iters: tuple = ("500it",)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    num_seeds: int = 1
    seed: int = 0                    # seeds are seed, seed+1, ..., seed+num_seeds-1
    workdir: str = "runs"


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
}

# Flag name -> (section, field). Section fields keep their own names except the two `name`s.
_ALIASES = {"model": ("model", "name"), "dataset": ("data", "name")}
SECTIONS = ("model", "data", "train", "prune")


def flag_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Every overridable field by its flag name; top-level fields have section None."""
    out = {}
    for section in SECTIONS:
        cls = type(getattr(Config(), section))
        for f in dataclasses.fields(cls):
            flag = next((a for a, (s, n) in _ALIASES.items() if (s, n) == (section, f.name)), f.name)
            out[flag] = (section, f)
    for f in dataclasses.fields(Config):
        if f.name not in SECTIONS:
            out[f.name] = (None, f)
    return out


def _parse_value(text: str, default: Any, flag: str):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise UserError(f"--{flag} takes true or false, got {text!r}")
    if isinstance(default, tuple):
        return tuple(s.strip() for s in text.split(",") if s.strip())
    if isinstance(default, (int, float)):
        try:
            return type(default)(text)
        except ValueError:
            raise UserError(f"--{flag} takes a {type(default).__name__}, got {text!r}") from None
    return None if text.lower() == "none" and default is None else text


def override(config: Config, values: dict[str, str]) -> Config:
    """Apply {flag: text} overrides; unknown flags raise a UserError naming the valid ones."""
    fields = flag_fields()
    sections = {s: {} for s in SECTIONS}
    top = {}
    for flag, text in values.items():
        if flag not in fields:
            raise UserError(f"unknown flag --{flag}; valid config flags: {', '.join(sorted(fields))}")
        section, f = fields[flag]
        current = getattr(getattr(config, section), f.name) if section else getattr(config, f.name)
        value = _parse_value(text, current, flag)
        (sections[section] if section else top)[f.name] = value
    replaced = {s: dataclasses.replace(getattr(config, s), **kv) for s, kv in sections.items() if kv}
    return dataclasses.replace(config, **replaced, **top)


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--preset plus one flag per config field, all optional; values are parsed by `override`."""
    parser.add_argument("--preset", default="fashion_cpu", choices=sorted(PRESETS),
                        help="starting configuration (default: %(default)s, the offline CPU preset)")
    cpu, paper = PRESETS["fashion_cpu"], PRESETS["cifar10_resnet20"]
    for flag, (section, f) in flag_fields().items():
        where = f"{section}.{f.name}" if section else f.name
        value = lambda c: _flag_text(getattr(getattr(c, section), f.name) if section else getattr(c, f.name))
        parser.add_argument(f"--{flag}", dest=f"cfg_{flag}", default=argparse.SUPPRESS, metavar="V",
                            help=f"{where}; preset fashion_cpu: {value(cpu)}, cifar10_resnet20: {value(paper)}")


def _flag_text(value) -> str:
    """A config value as it would be written on the command line."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}
    return validate(override(PRESETS[args.preset], overrides))


def validate(config: Config) -> Config:
    """Catch inconsistent settings before any work starts."""
    from early_jax import models  # imported here: models does not need the config module
    models.create(config.model.name, bn_scale_init=config.model.bn_scale_init,
                  dtype=config.model.compute_dtype)  # raises UserError on an unknown model
    if config.num_seeds < 1:
        raise UserError(f"--num_seeds must be >= 1, got {config.num_seeds}")
    if config.train.seed_parallel not in ("auto", "vmap", "map"):
        raise UserError(f"--seed_parallel must be auto, vmap or map, got {config.train.seed_parallel!r}")
    if config.prune.scope not in ("global", "layerwise"):
        raise UserError(f"--scope must be global or layerwise, got {config.prune.scope!r}")
    if not 0 < config.prune.fraction < 1:
        raise UserError(f"--fraction must lie in (0, 1), got {config.prune.fraction}")
    if config.train.batch_size < 1 or config.train.eval_batch_size < 1:
        raise UserError(f"--batch_size and --eval_batch_size must be >= 1, got {config.train.batch_size} "
                        f"and {config.train.eval_batch_size}")
    if not config.train.lr > 0 or config.prune.levels < 0:
        raise UserError(f"need --lr > 0 and --levels >= 0, got {config.train.lr} and {config.prune.levels}")
    for duration in (config.train.duration, config.train.warmup, config.train.eval_every,
                     *config.train.milestones, *config.train.save_steps, *config.prune.rewind_iters):
        to_steps(duration, 1)  # raises on a malformed duration
    return config


def ignored_layers(config: Config) -> tuple:
    """`prune.ignore` with "auto" replaced by the model's default: VGG keeps its output layer
    unpruned (as the paper's code does), every other model prunes every kernel."""
    auto = ("head",) if config.model.name.startswith("vgg") else ()
    return tuple(dict.fromkeys(p for pattern in config.prune.ignore
                               for p in (auto if pattern == "auto" else (pattern,))))


def fingerprint(*parts) -> str:
    """A short stable hash of config pieces: work dirs are named by what determines their contents."""
    text = json.dumps([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]
