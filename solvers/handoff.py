"""A cache whose new entries another process can take over: ``mark`` where it stands,
``made_since(mark)`` the entries made after, ``absorb`` them in another copy
(``autopar.pipeline.pool``: forked workers hand back what they computed, and the next round's
workers inherit it). Every entry must be a function of its key alone — the same whichever
process made it —, so absorbing one changes no result, only what is computed again.
Cleared at ``max_entries``."""
from __future__ import annotations


class HandoffCache:
    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: dict = {}
        self._clears = 0

    def get(self, key):
        return self._entries.get(key)

    def put(self, key, value) -> None:
        if len(self._entries) >= self.max_entries:
            self._clear()
        self._entries[key] = self._held(value)

    def mark(self) -> tuple[int, int]:
        """Where the cache stands now, for ``made_since``."""
        return self._clears, len(self._entries)

    def made_since(self, mark: tuple[int, int]) -> dict:
        """The entries made after ``mark`` (every one held, after a clear)."""
        clears, n = mark
        items = list(self._entries.items())
        return dict(items if clears != self._clears else items[n:])

    def absorb(self, entries: dict) -> None:
        """Hold the entries another copy made (``made_since``) that this one has not."""
        for key, value in entries.items():
            if key not in self._entries:
                self.put(key, value)

    def _held(self, value):
        """``value`` as kept (a subclass may freeze it)."""
        return value

    def _clear(self) -> None:
        self._entries.clear()
        self._clears += 1
