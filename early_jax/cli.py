"""What every experiment script shares: config flags, one-line errors, clean stops, the cluster.

Library modules never import this: it is the command-line layer (argparse) of the scripts.
"""
from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys
import traceback
from typing import Callable

import jax

from early_jax import config as cfg
from early_jax import files, preemption, sharding
from early_jax.errors import UserError


class Parser(argparse.ArgumentParser):
    """Mistakes on the command line are one `error:` line and exit code 2, like every other
    refusal; no flag is matched by a prefix (`--num_seed` is not `--num_seeds`)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message: str):
        hint = ""
        if message.startswith("unrecognized arguments"):
            given = message.split(":", 1)[1].split()[0].split("=")[0]
            known = [o for action in self._actions for o in action.option_strings]
            close = difflib.get_close_matches(given, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
        print(f"error: {message}{hint} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Script docstrings keep their line breaks (examples stay one per line); defaults are shown."""


def parser(description: str, replaced: dict[str, str] | None = None,
           default_preset: str = "fashion_cpu") -> argparse.ArgumentParser:
    """--preset, one flag per config field, and the cluster flags. `replaced` {config flag: what
    to use instead} names the config flags this script does not read: giving one is refused
    rather than silently ignored."""
    p = Parser(description=description, formatter_class=_HelpFormatter)
    add_config_flags(p, replaced or {}, default_preset)
    group = p.add_argument_group("multi-host runs (TPU pod slices, multi-node GPU)")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process run with jax.distributed.initialize (on a TPU VM "
                            "or under SLURM the cluster is detected; elsewhere give the three below)")
    group.add_argument("--coordinator_address", default=None, help="host:port of process 0")
    group.add_argument("--num_processes", type=int, default=None, help="processes in the run")
    group.add_argument("--process_id", type=int, default=None, help="this process's index")
    return p


def add_config_flags(parser: argparse.ArgumentParser, replaced: dict[str, str], default_preset: str) -> None:
    parser.add_argument("--preset", default=default_preset, choices=sorted(cfg.PRESETS),
                        help="starting configuration (every flag below overrides one of its fields)")
    for name, flag in cfg.flags().items():
        if name in replaced:
            parser.add_argument(f"--{name}", dest=f"unused_{name}", default=None, help=argparse.SUPPRESS)
            continue
        where = f"{flag.section}.{flag.field}" if flag.section else flag.field
        values = ", ".join(f"{preset} {cfg.flag_text(flag.get(config))}" for preset, config in cfg.PRESETS.items())
        parser.add_argument(f"--{name}", dest=f"cfg_{name}", default=argparse.SUPPRESS, metavar="V",
                            help=f"{where}; presets: {values}")
    parser.set_defaults(replaced_flags=replaced)


def overrides(args: argparse.Namespace) -> dict[str, str]:
    """The config flags given on the command line, as {flag: text}; a flag the script does not
    read is refused, naming the one it does."""
    for name, instead in args.replaced_flags.items():
        if getattr(args, f"unused_{name}", None) is not None:
            raise UserError(f"--{name} is not read by this script; use {instead}")
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def config_from_args(args: argparse.Namespace) -> cfg.Config:
    return cfg.validate(cfg.override(cfg.PRESETS[args.preset], overrides(args)))


def main(run: Callable[[argparse.Namespace], None], p: argparse.ArgumentParser) -> None:
    """Parse flags and run. A mistake the user can fix prints one `error:` line (exit 2); SIGTERM
    and Ctrl-C save the training state and say how to resume (exit 143 / 130)."""
    args = p.parse_args()
    preemption.install()
    try:
        if getattr(args, "distributed", False):
            from early_jax.sharding import initialize_distributed
            initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
            if jax.process_index() != 0:  # one voice per run: process 0 prints plans and progress
                sys.stdout = open(os.devnull, "w")
        run(args)
    except UserError as err:
        _exit(f"error: {err}", 2)
    except KeyboardInterrupt as err:
        where = f" at step {err.step}" if isinstance(err, preemption.Interrupted) else ""
        sigterm = preemption.signal_name() == "SIGTERM"
        _exit(f"\n{'terminated (SIGTERM)' if sigterm else 'interrupted'}{where}: finished pieces and "
              "the training state are saved; rerun the same command to resume",
              143 if sigterm else 130)
    except OSError as err:
        message = files.workdir_error(err)
        if message is None:
            raise
        _exit(f"error: {message}", 2)
    except Exception as err:
        message = files.workdir_error(err)  # Orbax wraps OS errors in its own
        if message is not None:
            _exit(f"error: {message}", 2)
        if sharding.peer_failure(err):
            _exit(f"error: another process of this multi-host run stopped ({str(err).splitlines()[0][:160]}); "
                  "what finished is saved: start every process again with the same command to resume", 1)
        if jax.process_count() > 1:  # a real bug: show it, then leave without waiting for the others
            traceback.print_exc()
            _exit("error: this process failed (traceback above); the other processes stop too", 1)
        raise


def _exit(message: str, code: int) -> None:
    """Print and leave at once: background threads (Orbax's) would otherwise print their own
    tracebacks while the interpreter shuts down."""
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os._exit(code)


def numbers(text: str, cast=float) -> list:
    """'1,2,4' -> [1.0, 2.0, 4.0] (or ints with cast=int): comma-separated flag values."""
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated {cast.__name__} values, got {text!r}") from None


# ----- the perturbation scripts -----
PERTURBATION_REPLACED = {"rewind_iters": "--rewind_iter (one rewind step k)"}


def perturbation_parser(description: str) -> argparse.ArgumentParser:
    """The flags every perturbation script shares (besides the config flags)."""
    p = parser(description, PERTURBATION_REPLACED)
    p.add_argument("--rewind_iter", default="500it", help="the rewind step k (500, 500it, 2ep)")
    p.add_argument("--perturb_levels", default=None,
                   help="IMP levels to perturb, comma-separated (default: 1..--levels)")
    return p


def perturbation_main(args, treatments: list, title: str) -> None:
    """The body of the perturbation scripts: config -> checks -> plan -> branches -> table and plot."""
    from early_jax import branches, data, pipeline, plans
    config = config_from_args(args)
    branches.check_treatments(treatments)  # before any data loading or training
    exp = pipeline.Experiment(config, data.from_config(config.data))
    k = exp.steps(args.rewind_iter)
    pipeline.check_rewind_steps(exp, [k])
    levels = numbers(args.perturb_levels, int) if args.perturb_levels else list(range(1, config.prune.levels + 1))
    branches.check_levels(exp, levels)
    plans.print_perturbation_plan(exp, k, levels, treatments, title)
    rows, path = branches.run_experiment(exp, k, levels, treatments, title)
    branches.print_summary(rows, path)
