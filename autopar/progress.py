"""Progress of long planning work: phases, items done of total, the incumbent and its gap.

The planner reports to a :class:`Progress`; the API default (``verbose=False``) is
:class:`LogProgress` on the ``"autopar"`` logger at INFO, which prints nothing unless the
user configures logging (``logging.basicConfig(level=logging.INFO)``); ``verbose=True`` adds
a stderr handler for the call. The CLI shows a live display (:class:`RichProgress`).
"""
from __future__ import annotations

import logging
import sys
import time

from .report import _time

LOGGER = logging.getLogger("autopar")


class Progress:
    """Receives planning events and ignores them (subclasses show them)."""

    def phase(self, name: str, total: int | None = None) -> None:
        """A new phase of ``total`` items (None: unknown)."""

    def advance(self, n: int = 1, *, detail: str = "", incumbent_s: float | None = None,
                gap: float | None = None) -> None:
        """``n`` items of the phase done; the best plan so far and its proven gap, if known."""

    def close(self) -> None:
        """The work is over."""


class LogProgress(Progress):
    """One log record per phase and per item, on the ``autopar`` logger."""

    def __init__(self, logger: logging.Logger = LOGGER, level: int = logging.INFO):
        self.logger, self.level = logger, level
        self.t0 = time.perf_counter()
        self.name, self.total, self.done = "", None, 0

    def phase(self, name: str, total: int | None = None) -> None:
        self.name, self.total, self.done = name, total, 0
        self.logger.log(self.level, "[%6.1f s] %s%s", time.perf_counter() - self.t0, name,
                        f" (0/{total})" if total else "")

    def advance(self, n: int = 1, *, detail: str = "", incumbent_s=None, gap=None) -> None:
        self.done += n
        self.logger.log(self.level, "[%6.1f s] %s %s%s", time.perf_counter() - self.t0, self.name,
                        f"{self.done}/{self.total}" if self.total else f"{self.done}", _info(detail, incumbent_s, gap))


def _info(detail: str, incumbent_s, gap) -> str:
    parts = [detail] if detail else []
    if incumbent_s is not None:
        parts.append(f"best {_time(incumbent_s)}")
    if gap is not None:
        parts.append(f"gap {gap:.1%}")
    return (": " + ", ".join(parts)) if parts else ""


class _Verbose(LogProgress):
    """``verbose=True``: LogProgress with a stderr handler on the ``autopar`` logger for the call."""

    def __init__(self):
        super().__init__()
        self.handler = logging.StreamHandler(sys.stderr)
        self.handler.setFormatter(logging.Formatter("autopar: %(message)s"))
        self.saved = LOGGER.level
        LOGGER.addHandler(self.handler)
        if LOGGER.getEffectiveLevel() > logging.INFO:
            LOGGER.setLevel(logging.INFO)

    def close(self) -> None:
        LOGGER.removeHandler(self.handler)
        LOGGER.setLevel(self.saved)


class RichProgress(Progress):
    """A live display on stderr (the CLI): phase, items done of total, best plan, gap, elapsed."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

        self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                       console=console or Console(stderr=True), transient=False)
        self.bar.start()
        self.task = None

    def phase(self, name: str, total: int | None = None) -> None:
        if self.task is not None:
            self._finish()
        self.task = self.bar.add_task(name, total=total, info="")

    def advance(self, n: int = 1, *, detail: str = "", incumbent_s=None, gap=None) -> None:
        if self.task is None:
            self.phase("planning")
        self.bar.update(self.task, advance=n, info=_info(detail, incumbent_s, gap).lstrip(": "))

    def _finish(self) -> None:
        """Mark the current phase done (a phase without items counts as one)."""
        done = self.bar.tasks[self.task].completed or 1
        self.bar.update(self.task, total=done, completed=done)

    def close(self) -> None:
        if self.task is not None:
            self._finish()
        self.bar.stop()


def progress_for(verbose) -> Progress:
    """``verbose``: False (log records only), True (those on stderr), or a Progress."""
    if isinstance(verbose, Progress):
        return verbose
    return _Verbose() if verbose else LogProgress()
