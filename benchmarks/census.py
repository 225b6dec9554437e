"""Primitive census: trace a set of models, list every primitive seen with the rule that plans
it (or "fallback" and the reason) and how often it occurs; the target is zero fallback ops.

    .venv/bin/python benchmarks/census.py            # all models, (8,) and (2, 4) meshes
    .venv/bin/python benchmarks/census.py --models llama-scan,gpt

Control flow left as one node (``cond``/``while``) counts as a fallback, as in the report.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from autopar.cost import cluster_from_dict, load_cluster, mesh_model  # noqa: E402

from autopar.graph import build_graph  # noqa: E402
from autopar.strategies import STRATEGY_RULES, strategies_for  # noqa: E402
from autopar.trace import trace  # noqa: E402


def _llama(**kw):
    from examples import llama
    cfg = llama.LlamaConfig(**kw)
    return llama.make_train_step(cfg), llama.train_step_args(cfg)


def _gpt():
    from examples import gpt
    return gpt.train_step, gpt.train_step_args()


def _flax():
    from examples import flax_lm
    return flax_lm.adamw_step, flax_lm.adamw_step_args()


MODELS = {
    "llama-unrolled": lambda: _llama(scan=False),
    "llama-scan": lambda: _llama(scan=True),
    "llama-dpa": lambda: _llama(scan=True, attention="dpa"),
    "llama-dpa-remat": lambda: _llama(scan=True, attention="dpa", remat=True),
    "llama-dpa-cudnn": lambda: _llama(scan=False, attention="dpa", implementation="cudnn"),
    "gpt": _gpt,
    "flax_lm": _flax,
}


def census(names, mesh_shapes=((8,), (2, 4))):
    """{model: Counter((primitive, rule or "fallback: reason"))}."""
    base = load_cluster("cpu-8").model_dump()
    meshes = [mesh_model(cluster_from_dict({**base, "devices_per_node": shape[-1]}), math.prod(shape[:-1]), shape)
              for shape in mesh_shapes]
    out = {}
    for name in names:
        fn, args = MODELS[name]()
        graph = build_graph(trace(fn, *args))
        seen: Counter = Counter()
        for node in graph.nodes:
            if node.kind != "eqn":
                continue
            reasons = []
            for shape, mesh in zip(mesh_shapes, meshes):
                _, reason = strategies_for(node, mesh)
                if reason:
                    reasons.append(f"{shape}: {reason}")
            rule = STRATEGY_RULES.get(node.name)
            label = "fallback: " + "; ".join(reasons) if reasons else (
                f"{rule.__module__.rsplit('.', 1)[-1]}.{rule.__name__}" if rule else "?")
            seen[(node.name, label)] += 1
        out[name] = seen
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    a = ap.parse_args(argv)
    names = a.models.split(",")
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    result = census(names)
    total = Counter()
    fallbacks = 0
    for name, seen in result.items():
        n_fb = sum(c for (_, label), c in seen.items() if label.startswith("fallback"))
        fallbacks += n_fb
        print(f"\n== {name}: {sum(seen.values())} ops, {len(seen)} primitives, {n_fb} fallback ops")
        for (prim, label), c in sorted(seen.items()):
            print(f"  {prim:28s} {c:6d}  {label}")
            total[(prim, label)] += c
    print(f"\n== all models: {len({p for p, _ in total})} primitives, {sum(total.values())} ops, "
          f"{fallbacks} fallback ops")
    return 0 if fallbacks == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
