"""Which input leaf ``Plan.explain`` asks about: a path as the report prints it ("[0]['w']",
matched exactly, then as a unique substring) or a flat index, with close matches suggested
when none fits."""
from __future__ import annotations

import difflib
import re

from .explanation import ExplainError
from .pytree_json import leaf_paths as _leaf_paths

MAX_PATHS_IN_ERROR = 30


def short_source(src: str) -> str:
    """'/a/b/model.py:42:7 (attention)' → 'model.py:42 (attention)'."""
    m = re.match(r"^(.*?):(\d+)(?::\d+)?(.*)$", src or "")
    if not m:
        return src or ""
    where = re.sub(r"\(([^()]*\.)([^.()]+)\)", r"(\2)", m.group(3))  # (f.<locals>.g) → (g)
    return f"{m.group(1).replace(chr(92), '/').rsplit('/', 1)[-1]}:{m.group(2)}{where}"


def leaf_paths(plan) -> list[str]:
    return _leaf_paths(plan.input_tree, len(plan.input_specs_flat))


def _norm(path: str) -> str:
    return re.sub(r"\s+", "", path).replace('"', "'")


def resolve_leaf(plan, leaf) -> tuple[int, str]:
    """(flat index, path) of ``leaf``: a path as the report prints it ("[0]['w']") or an index."""
    paths = leaf_paths(plan)
    n = len(paths)
    if isinstance(leaf, str) and re.fullmatch(r"\s*-?\d+\s*", leaf):
        leaf = int(leaf)
    if isinstance(leaf, int) and not isinstance(leaf, bool):
        if not -n <= leaf < n:
            raise ExplainError(f"input leaf index {leaf} is out of range: the plan has {n} input leaves "
                               f"(0..{n - 1}); {_listing(paths)}")
        return leaf % n, paths[leaf % n]
    if not isinstance(leaf, str):
        raise ExplainError(f"leaf must be a path string such as {paths[0]!r} or a flat index, got {leaf!r}")
    want = _norm(leaf)
    exact = [i for i, p in enumerate(paths) if _norm(p) == want]
    if len(exact) == 1:
        return exact[0], paths[exact[0]]
    inside = [i for i, p in enumerate(paths) if want and want in _norm(p)]
    if len(inside) == 1:
        return inside[0], paths[inside[0]]
    if len(inside) > 1:
        raise ExplainError(f"input leaf {leaf!r} matches {len(inside)} leaves: "
                           + ", ".join(paths[i] for i in inside[:MAX_PATHS_IN_ERROR])
                           + (" …" if len(inside) > MAX_PATHS_IN_ERROR else "") + "; give the whole path")
    close = difflib.get_close_matches(leaf, paths, n=5, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ExplainError(f"no input leaf {leaf!r} in this plan.{hint} Give a path as the report prints it, or a "
                       f"flat index 0..{n - 1}; {_listing(paths)}")


def _listing(paths) -> str:
    head = ", ".join(paths[:MAX_PATHS_IN_ERROR])
    more = f" … and {len(paths) - MAX_PATHS_IN_ERROR} more (plan.report() lists them all)" \
        if len(paths) > MAX_PATHS_IN_ERROR else ""
    return f"valid paths: {head}{more}"
