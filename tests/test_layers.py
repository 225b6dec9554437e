"""Layer clustering and the stage_boundary marker."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import autopar
from autopar.graph import build_graph
from autopar.pipeline.layers import cluster_layers, cut_profile
from autopar.trace import trace

B, H = 64, 128


def mlp_loss(params, x, marks=()):
    h = x
    for i, w in enumerate(params):
        h = jnp.tanh(h @ w)
        if i in marks:
            h = autopar.stage_boundary(h)
    return jnp.mean(h ** 2)


def args(layers=4):
    return [jax.ShapeDtypeStruct((H, H), jnp.float32)] * layers, jax.ShapeDtypeStruct((B, H), jnp.float32)


def test_marker_is_identity_for_values_gradients_and_vmap():
    params = [jnp.eye(H) * 0.5] * 2
    x = jnp.ones((B, H))
    f = lambda p, x: mlp_loss(p, x, marks=(0,))  # noqa: E731
    np.testing.assert_allclose(f(params, x), mlp_loss(params, x), rtol=1e-6)
    for a, b in zip(jax.grad(f)(params, x), jax.grad(mlp_loss)(params, x)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert jax.jit(jax.vmap(f, in_axes=(None, 0)))(params, x[None]).shape == (1,)


def test_dp_cuts_between_layers_at_one_activation_each():
    graph = build_graph(trace(mlp_loss, *args(4)))
    lay = cluster_layers(graph, 4)
    assert len(lay.layers) == 4 and not lay.from_markers
    dots = [n.index for n in graph.nodes if n.name == "dot_general"]
    assert [sum(a <= d < b for d in dots) for a, b in lay.layers] == [1, 1, 1, 1]  # one matmul per layer
    assert all(c == B * H * 4 for c in lay.cut_bytes)                              # one activation crosses
    assert max(lay.flops) <= 1.25 * sum(lay.flops) / 4


def test_markers_fix_the_cuts():
    graph = build_graph(trace(lambda p, x: mlp_loss(p, x, marks=(0,)), *args(4)))
    lay = cluster_layers(graph)
    assert lay.from_markers and len(lay.layers) == 2
    dots = [n.index for n in graph.nodes if n.name == "dot_general"]
    assert [sum(a <= d < b for d in dots) for a, b in lay.layers] == [1, 3]
    with pytest.raises(ValueError, match="markers make 2 layers"):
        cluster_layers(graph, 3)


def test_cut_profile_excludes_inputs_and_is_nonnegative():
    graph = build_graph(trace(mlp_loss, *args(2)))
    cut = cut_profile(graph)
    assert (cut >= 0).all() and cut.max() <= 2 * B * H * 4
