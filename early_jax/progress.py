"""Progress lines for long work and small atomic file helpers for work dirs."""
from __future__ import annotations

import json
import os
import sys
import time

from early_jax.errors import UserError


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """A live line per piece of work: what runs, step, loss/accuracy, steps/s and eta.

    On a terminal the line is rewritten in place; in a log file a line is written at most every
    `every_s` seconds, plus one at each evaluation.
    """

    def __init__(self, label: str, start: int, end: int, stream=None, every_s: float = 10.0):
        self.label, self.start, self.end = label, start, end
        self.stream = stream or sys.stdout
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = every_s
        self.t0 = time.time()
        self.last_print = 0.0
        self.first_step_time = None  # compile time is excluded from the speed once steps are done

    def rate(self, step: int) -> float:
        elapsed = time.time() - self.t0
        return (step - self.start) / elapsed if elapsed > 0 and step > self.start else 0.0

    def update(self, step: int, text: str = "", force: bool = False) -> None:
        now = time.time()
        if not (self.tty or force or now - self.last_print >= self.every_s):
            return
        self.last_print = now
        rate = self.rate(step)
        eta = format_seconds((self.end - step) / rate) if rate else "?"
        pct = 100.0 * step / max(self.end, 1)
        line = (f"[{self.label}] step {step}/{self.end} ({pct:.0f}%) {text} "
                f"{rate:.1f} steps/s eta {eta}")
        if self.tty and not force:
            self.stream.write("\r" + line[:160].ljust(160))
        else:
            self.stream.write(("\r" if self.tty else "") + line + "\n")
        self.stream.flush()

    def done(self, text: str) -> None:
        elapsed = format_seconds(time.time() - self.t0)
        self.stream.write(("\r" if self.tty else "") + f"[{self.label}] {text} ({elapsed})".ljust(80) + "\n")
        self.stream.flush()


def write_json(path: str, obj) -> None:
    """Write through a temporary file and rename, so a kill never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=_to_builtin)
    os.replace(tmp, path)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); delete it (a run rebuilds its own "
                        "files) or restore it") from None


def append_jsonl(path: str, obj) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, default=_to_builtin) + "\n")


def read_jsonl(path: str) -> list:
    """The logged lines; a last line cut short by a kill mid-write is dropped, not fatal."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return out


def _to_builtin(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"cannot write {type(x).__name__} as JSON")
