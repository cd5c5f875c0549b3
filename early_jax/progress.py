"""Progress lines for long work: what runs, how far, how fast, how long still."""
from __future__ import annotations

import sys
import time


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
