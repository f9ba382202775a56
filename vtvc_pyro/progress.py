"""Progress of long loops: a tqdm bar on a terminal, a few whole lines in a log.

On a terminal (``file.isatty()``, stderr by default) :func:`track` is a ``tqdm.auto`` bar. Anywhere
else (a log file, a pipe, CI) a tqdm bar still redraws itself with carriage returns, which a file
keeps as thousands of updates, and tqdm has no option to end its updates with a newline instead;
so there :class:`LineProgress` writes whole lines itself, with tqdm's own meter text::

    svi:  25% 150/600 [00:05<00:15, 28.85it/s, elbo=-35.2, val=-0.412]

Off a terminal, a phase that ends within ``delay`` seconds prints nothing; a longer one prints a
line once ``delay`` has passed, one at each quarter of ``total`` (25, 50, 75 %), one whenever
``interval`` seconds pass without a line (a heartbeat for slow phases), and one at the end (also
when the loop stops early). That is at most 5 lines per phase plus one a minute, whatever the
number of items. On a terminal ``delay`` is tqdm's own: no bar for a phase shorter than that.

Usage::

    bar = track(range(steps), "svi", enabled=progress)
    for step in bar:
        ...
        bar.set_postfix(elbo=f"{elbo:.1f}")

Importing this module changes no global state.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm

DELAY = 3.0
"""Seconds a phase must last before it shows anything (shorter ones leave no trace in a log)."""

INTERVAL = 60.0
"""Off a terminal: the longest time without a line while a phase runs."""

QUARTERS = 4
"""Off a terminal: a line each time the count crosses another 1/QUARTERS of the total."""

_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
_FORMAT_UNKNOWN_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def _isatty(file: IO) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class LineProgress:
    """The off-terminal progress of :func:`track`: whole lines, at the moments its module docstring lists.

    Iterating over it yields the items of ``iterable`` (or call :meth:`update` by hand); the
    ``tqdm`` methods a loop needs (:meth:`set_postfix`, :meth:`update`, :meth:`close`) behave alike.
    """

    def __init__(self, iterable: Iterable | None = None, desc: str = "", total: float | None = None,
                 initial: int = 0, delay: float = DELAY, interval: float = INTERVAL, file: IO | None = None,
                 enabled: bool = True):
        self.iterable, self.desc, self.total = iterable, desc, total
        self.n, self.delay, self.interval = initial, delay, interval
        self.file = file
        self.enabled = enabled
        self.postfix = ""
        self.lines = 0  # lines written so far
        self._start = time.monotonic()
        self._last_line = self._start
        self._quarter = self._quarter_of(initial)
        self._closed = False
        if enabled and delay <= 0:
            self._print()

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LineProgress was made without an iterable: call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total) if self.total is not None else len(self.iterable)

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _quarter_of(self, n: float) -> int:
        return math.floor(QUARTERS * n / self.total) if self.total else 0

    def _print(self) -> None:
        now = time.monotonic()
        known = bool(self.total) and self.n <= self.total
        line = tqdm.format_meter(self.n, self.total if known else None, now - self._start, prefix=self.desc,
                                 postfix=self.postfix or None,
                                 bar_format=_FORMAT if known else _FORMAT_UNKNOWN_TOTAL)
        (self.file or sys.stderr).write(line + "\n")
        (self.file or sys.stderr).flush()
        self.lines += 1
        self._last_line = now
        self._quarter = self._quarter_of(self.n)

    def update(self, n: float = 1) -> None:
        """Count ``n`` more items; write a line if one is due."""
        self.n += n
        if not self.enabled or self._closed:
            return
        now = time.monotonic()
        if not self.lines:
            due = now - self._start >= self.delay
        else:
            quarter = self._quarter_of(self.n)
            due = (self._quarter < quarter < QUARTERS) or now - self._last_line >= self.interval
        if due:
            self._print()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """Text after the meter, ``key=value`` as tqdm writes it (shown in the next line; none is written now)."""
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={tqdm.format_num(v) if isinstance(v, (int, float)) else str(v).strip()}"
                                 for k, v in items.items())

    def close(self) -> None:
        """Write the last line (for a phase that lasted ``delay`` or showed a line); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.enabled and (self.lines or time.monotonic() - self._start >= self.delay):
            self._print()


def track(iterable: Iterable | None = None, desc: str = "", total: float | None = None, enabled: bool = True,
          leave: bool = True, initial: int = 0, delay: float = DELAY, interval: float = INTERVAL,
          file: IO | None = None):
    """Show the progress of a loop over ``iterable``: a tqdm bar on a terminal, plain lines elsewhere.

    Args:
        desc: the phase's name, at the start of the bar or line.
        total: the number of items (default ``len(iterable)`` where it has one).
        enabled: ``False`` shows nothing (the command line's ``--quiet``; ranks > 0 of ``torchrun``).
        leave: keep the finished bar on a terminal (tqdm's ``leave``); lines in a log always stay.
        initial: items already done (a resumed loop).
        delay: a phase shorter than this many seconds shows nothing.
        interval: off a terminal, at most this many seconds without a line.
        file: where to write (default ``sys.stderr``, looked up at the call).

    Returns:
        an iterable with ``set_postfix(**kw)``, ``update(n)`` and ``close()``: a ``tqdm`` bar or a
        :class:`LineProgress`.
    """
    file = file or sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if enabled and _isatty(file):
        return auto_tqdm(iterable, desc=desc, total=total, initial=initial, leave=leave, delay=delay, file=file,
                         dynamic_ncols=True)
    return LineProgress(iterable, desc, total, initial, delay, interval, file, enabled)
