"""Clean stops: SIGTERM (a preemptible VM about to be taken) and Ctrl-C during training.

While a run trains, the first SIGTERM or SIGINT only sets a flag; the run checks it after each
compiled chunk, saves a resume checkpoint at the step it reached and raises `Interrupted`, so the
next launch resumes there. Outside training (or on a second signal) Ctrl-C interrupts at once. On
a multi-host run every process takes the stop together (the flag is agreed collectively).
"""
from __future__ import annotations

import contextlib
import signal

from early_jax import sharding


class Interrupted(KeyboardInterrupt):
    """Training stopped on request; the state at `step` is saved as a resume point."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step}")
        self.step = step


_state = {"training": 0, "requested": None}


def _handler(signum, frame):
    first = _state["requested"] is None
    _state["requested"] = _state["requested"] or signal.Signals(signum).name
    if not (_state["training"] and first):  # not training, or asked twice: stop here and now
        raise KeyboardInterrupt


def install() -> None:
    """Take over SIGTERM and SIGINT (scripts call this once, at start)."""
    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


def requested() -> bool:
    """Whether a stop was asked for (on any process of a multi-host run)."""
    return sharding.any_process(_state["requested"] is not None)


def signal_name() -> str | None:
    return _state["requested"]


@contextlib.contextmanager
def training():
    _state["training"] += 1
    try:
        yield
    finally:
        _state["training"] -= 1
