"""The per-primitive table (``autopar.strategies.registry``): one ``register`` call declares a
primitive's strategies, FLOPs and fusion fact, and the graph and memory model read them there."""
import jax.numpy as jnp

from autopar.graph import build_graph
from autopar.strategies import FLOPS_RULES, FUSION_RULES, STRATEGY_RULES
from autopar.trace import trace


def test_every_rule_declares_flops_and_fuses_only_into_ruled_primitives():
    assert set(FLOPS_RULES) == set(STRATEGY_RULES)
    assert FUSION_RULES and all(n in STRATEGY_RULES and f.into <= set(STRATEGY_RULES) for n, f in FUSION_RULES.items())


def test_graph_flops_come_from_the_registry(monkeypatch):
    monkeypatch.setitem(FLOPS_RULES, "tanh", lambda params, operands, outputs: 7.0)
    nodes = {n.name: n for n in build_graph(trace(lambda x: jnp.tanh(x).sum(), jnp.ones((4, 8)))).nodes}
    assert nodes["tanh"].flops == 7.0 and nodes["reduce_sum"].flops == 32.0   # a reduction: its operand's elements
