"""PyTreeDef ⇄ JSON, so a saved plan can rebuild its PartitionSpec pytrees.

Standard containers (tuple, list, dict, None) and namedtuples (e.g. optax states, found
again by import path) round-trip exactly; other custom nodes come back as tuples.
"""
from __future__ import annotations

import importlib
from typing import Any

import jax


def treedef_to_json(treedef) -> Any:
    data = treedef.node_data()
    if data is None:
        return {"t": "leaf"}
    typ, aux = data
    kids = [treedef_to_json(c) for c in treedef.children()]
    if typ is type(None):
        return {"t": "none"}
    if typ is tuple:
        return {"t": "tuple", "c": kids}
    if typ is list:
        return {"t": "list", "c": kids}
    if typ is dict:
        return {"t": "dict", "keys": list(aux), "c": kids}
    if issubclass(typ, tuple) and hasattr(typ, "_fields"):
        return {"t": "namedtuple", "cls": f"{typ.__module__}:{typ.__qualname__}", "c": kids}
    return {"t": "custom", "cls": f"{typ.__module__}:{typ.__qualname__}", "c": kids}


def _import(path: str):
    mod, _, qual = path.partition(":")
    obj = importlib.import_module(mod)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _example(obj: Any) -> Any:
    t = obj["t"]
    if t == "leaf":
        return 0
    if t == "none":
        return None
    kids = [_example(c) for c in obj.get("c", [])]
    if t == "tuple":
        return tuple(kids)
    if t == "list":
        return kids
    if t == "dict":
        return dict(zip(obj["keys"], kids))
    if t == "namedtuple":
        try:
            return _import(obj["cls"])(*kids)
        except Exception:
            return tuple(kids)
    return tuple(kids)


def custom_nodes(obj: Any) -> list[str]:
    """The distinct classes of a JSON tree's custom nodes (those ``treedef_from_json`` turns
    into tuples), in first-seen order."""
    out: list[str] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if o.get("t") == "custom" and o["cls"] not in out:
            out.append(o["cls"])
        stack.extend(reversed(o.get("c", [])))
    return out


def treedef_from_json(obj: Any):
    return jax.tree_util.tree_structure(_example(obj), is_leaf=lambda x: x is None and False)


def leaf_paths(treedef, n: int | None = None) -> list[str]:
    """``keystr`` of every leaf ("[0]['w']"; "<arg>" for a bare leaf) of a PyTreeDef or of a
    JSON tree (``treedef_to_json``); "[i]" where the tree cannot be rebuilt."""
    try:
        if not isinstance(treedef, jax.tree_util.PyTreeDef):
            treedef = treedef_from_json(treedef)
        n = treedef.num_leaves
        leaves = jax.tree_util.tree_flatten_with_path(treedef.unflatten(list(range(n))))[0]
        return [jax.tree_util.keystr(p) or "<arg>" for p, _ in leaves]
    except Exception:
        return [f"[{i}]" for i in range(n or 0)]
