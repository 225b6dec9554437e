"""The result of ``solvers.presolve``: the reduced problem and the maps between its choices
(and strategy sets) and the original problem's — ``restore`` replays the reductions'
operations in reverse, ``forward`` / ``forward_sets`` map an original choice (a warm start)
or strategy sets onto the reduced problem."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .problem import Problem

@dataclass
class Presolved:
    problem: Problem  # the reduced problem
    nodes: np.ndarray  # original id of each reduced node
    strategies: list[np.ndarray]  # original strategy index of each reduced strategy
    ops: list[tuple] = field(repr=False)  # restore operations, applied in reverse
    num_original: int = 0
    stats: dict = field(default_factory=dict)
    # (original node, original strategy) dropped as dominated → the strategy that dominated it
    dominated_by: dict = field(default_factory=dict, repr=False)
    # no choice can exceed the usage limit (or there is none): the reductions were those of the
    # problem without its limit (``solvers.relaxation.memory_free`` need not presolve it again)
    memory_free: bool = False

    def forward(self, choice) -> tuple[int, ...] | None:
        """A reduced choice for an original ``choice`` (a warm start): each kept node keeps
        its strategy, a dominated one is replaced by its dominator (never worse). None when
        the choice uses a strategy presolve proved unusable (it cannot have finite cost)."""
        out = []
        for r, v in enumerate(self.nodes):
            pos = self._position(r, int(v), int(choice[v]))
            if pos is None:
                return None
            out.append(pos)
        return tuple(out)

    def forward_sets(self, sets) -> list[np.ndarray]:
        """``forward`` for sets: per reduced node, the reduced strategies of the original
        strategies in ``sets[v]`` (a dominated one: its dominator; an unusable one: none —
        a set may come out empty)."""
        out = []
        for r, v in enumerate(self.nodes):
            got = {self._position(r, int(v), int(s)) for s in sets[v]}
            out.append(np.array(sorted(p for p in got if p is not None), dtype=np.int64))
        return out

    def _position(self, r: int, v: int, s: int) -> int | None:
        """Reduced node r's index of original node v's strategy s, or of the strategy that
        dominated it (None: presolve proved it unusable)."""
        seen = 0
        pos = np.flatnonzero(self.strategies[r] == s)
        while not len(pos):
            s = self.dominated_by.get((v, s))
            seen += 1
            if s is None or seen > len(self.dominated_by):
                return None
            pos = np.flatnonzero(self.strategies[r] == s)
        return int(pos[0])

    def restore(self, choice) -> tuple[int, ...]:
        """Original choice (one strategy per original node) for a reduced ``choice``."""
        out = np.full(self.num_original, -1, dtype=np.int64)
        for r, v in enumerate(self.nodes):
            out[v] = self.strategies[r][int(choice[r])]
        for op in reversed(self.ops):
            if op[0] == "fix":
                out[op[1]] = op[2]
            elif op[0] == "map":
                _, v, u, table = op
                out[v] = table[out[u]]
            else:  # "map2": v = table[u, w] over the strategies u and w had then
                _, v, u, w, su, sw, table = op
                out[v] = table[int(np.flatnonzero(su == out[u])[0]), int(np.flatnonzero(sw == out[w])[0])]
        assert (out >= 0).all(), "restore left a node unset"
        return tuple(int(c) for c in out)

    def restore_sets(self, allowed) -> list[np.ndarray]:
        """``restore`` for sets: original strategies per original node that ``restore`` can give
        when each reduced node r takes any strategy of ``allowed[r]`` (reduced indices, none
        empty); a folded node gets every value of its table over its neighbours' sets."""
        out: list = [None] * self.num_original
        for r, v in enumerate(self.nodes):
            out[v] = np.unique(self.strategies[r][np.asarray(allowed[r], dtype=np.int64)])
        for op in reversed(self.ops):
            if op[0] == "fix":
                out[op[1]] = np.array([op[2]])
            elif op[0] == "map":
                _, v, u, table = op
                out[v] = np.unique(table[out[u]])
            else:
                _, v, u, w, su, sw, table = op
                rows, cols = np.searchsorted(su, out[u]), np.searchsorted(sw, out[w])
                out[v] = np.unique(table[np.ix_(rows, cols)])
        assert all(s is not None and len(s) for s in out), "restore_sets left a node unset"
        return out
