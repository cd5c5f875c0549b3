"""What every experiment script shares: config flags, clean errors, clean Ctrl-C."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from early_jax import config as cfg
from early_jax.errors import UserError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    cfg.add_config_flags(p)
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host GPU / TPU pod slices)")
    return p


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Script docstrings keep their line breaks (examples stay one per line); defaults are shown."""


def main(run: Callable[[argparse.Namespace], None], p: argparse.ArgumentParser) -> None:
    """Parse flags and run; user mistakes print one line (exit 2), Ctrl-C says how to resume."""
    args = p.parse_args()
    try:
        if args.distributed:
            from early_jax.sharding import initialize_distributed
            initialize_distributed(True)
        run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: finished pieces are saved; rerun the same command to resume",
              file=sys.stderr)
        sys.exit(130)


def numbers(text: str, cast=float) -> list:
    """'1,2,4' -> [1.0, 2.0, 4.0] (or ints with cast=int): comma-separated flag values."""
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"expected comma-separated {cast.__name__} values, got {text!r}") from None
