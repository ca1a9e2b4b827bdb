"""Progress of the long loops (layers, shards, bytes): one place decides how it is shown.

On a terminal it is a tqdm bar. When stderr is not a terminal (a Ray job's log, a Kubeflow pod's,
a file, a pipe) a bar's ``\\r`` redraws make an unreadable log, so progress becomes log lines on the
``replaceme.progress`` logger (INFO, so ``--log-level WARNING`` hides them): percent, count, rate
and ETA, every ``REPLACEME_PROGRESS_INTERVAL`` seconds (default 30) and at every 10 % done.
``REPLACEME_PROGRESS=bar|log`` overrides the choice.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from types import TracebackType
from typing import Protocol

from tqdm.auto import tqdm

log = logging.getLogger("replaceme.progress")
MODE_ENV = "REPLACEME_PROGRESS"  # bar | log; unset: bar on a terminal, log otherwise
INTERVAL_ENV = "REPLACEME_PROGRESS_INTERVAL"  # seconds between log lines (also one at every 10 %)
DEFAULT_INTERVAL_S = 30.0
STEP = 0.1  # a line at every 10 % done


class Progress(Protocol):
    def update(self, n: float = 1) -> object: ...
    def close(self) -> None: ...
    def __enter__(self) -> Progress: ...
    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> object: ...


def progress(*, total: float, desc: str, unit: str, disable: bool = False, initial: float = 0,
             unit_scale: bool = False) -> Progress:
    """A progress display for ``total`` units: a bar on a terminal, log lines elsewhere."""
    if not disable and _mode() == "log":
        return LogProgress(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale,
                           interval=_interval())
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale, disable=disable,
                leave=False)


def _mode() -> str:
    chosen = os.environ.get(MODE_ENV, "").strip().lower()
    if chosen in ("bar", "log"):
        return chosen
    stream = sys.stderr
    return "bar" if stream is not None and hasattr(stream, "isatty") and stream.isatty() else "log"


def _interval() -> float:
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


class LogProgress:
    """Progress as periodic log lines: ``calibrate: 40% (24/60 layer), 3.1 layer/s, elapsed 00:08, ETA 00:12``."""

    def __init__(self, *, total: float, desc: str, unit: str, initial: float = 0, unit_scale: bool = False,
                 interval: float = DEFAULT_INTERVAL_S) -> None:
        self.total, self.desc, self.unit, self.unit_scale, self.interval = total, desc, unit, unit_scale, interval
        self.n = self.initial = self.logged = initial
        self.started = self.last = time.monotonic()
        self.next_fraction = self._next(initial)

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval or (self.total and self.n / self.total >= self.next_fraction):
            self._log(now)

    def close(self) -> None:
        if self.n != self.logged:
            self._log(time.monotonic())

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is None:
            self.close()

    def _next(self, n: float) -> float:
        return (math.floor(n / self.total / STEP + 1e-9) + 1) * STEP if self.total else math.inf

    def _log(self, now: float) -> None:
        elapsed = now - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        percent = f"{100 * self.n / self.total:3.0f}%" if self.total else "?"
        eta = tqdm.format_interval((self.total - self.n) / rate) if rate > 0 and self.total else "?"
        log.info("%s: %s (%s/%s %s), %s/s, elapsed %s, ETA %s", self.desc, percent, self._amount(self.n),
                 self._amount(self.total), self.unit, self._amount(rate, rate=True), tqdm.format_interval(elapsed), eta)
        self.last, self.logged, self.next_fraction = now, self.n, self._next(self.n)

    def _amount(self, value: float, *, rate: bool = False) -> str:
        if self.unit_scale:
            return tqdm.format_sizeof(value, suffix=self.unit if rate else "", divisor=1000)
        return f"{value:.3g} {self.unit}" if rate else f"{value:g}"
