"""Repeated blocks of unmarked models (autopar/pipeline/blocks.py): a GPT written without
stage markers gets the layers the markers would have given."""
from __future__ import annotations

import numpy as np

from autopar.graph import build_graph
from autopar.pipeline.blocks import repeated_blocks
from autopar.pipeline.layers import cluster_layers
from autopar.trace import trace
from examples import gpt


def gpt_graph(layers: int, markers: bool):
    cfg = gpt.GPTConfig(layers=layers, hidden=32, heads=4, seq=16, vocab=64, batch=4)
    params, batch = gpt.args_for(cfg, "loss_fn", abstract=True)
    return build_graph(trace(gpt.make_loss_fn(cfg, markers=markers), params, batch))


def test_unmarked_gpt_gets_one_layer_per_block_like_markers():
    marked, plain = cluster_layers(gpt_graph(12, True)), cluster_layers(gpt_graph(12, False))
    assert marked.from_markers and not plain.from_markers
    assert len(plain.layers) == len(marked.layers) == 12
    # the same work per layer (but the marker's elementwise count, 4·16·32), the middle layers equal
    np.testing.assert_allclose(np.array(marked.flops[:-1]) - np.array(plain.flops[:-1]), 4 * 16 * 32)
    assert len(set(plain.flops[1:-1])) == 1
    # cut on the residual stream: one (batch, seq, hidden) activation crosses each boundary
    assert set(plain.cut_bytes) == {4 * 16 * 32 * 4}


def test_few_blocks_keep_the_default_clustering():
    """Up to 8 repeated blocks the balanced 8-layer clustering stays (blocks are not found)."""
    plain = cluster_layers(gpt_graph(4, False))
    assert len(plain.layers) == 8


def test_no_repeats_and_forbidden_cuts():
    rng = np.random.default_rng(0)
    assert repeated_blocks(list(rng.integers(0, 10**6, 200)), np.zeros(200)) is None
    sigs = [1, 2] + [10, 11, 12, 13, 14] * 5 + [3]
    ends = repeated_blocks(sigs, np.ones(len(sigs)))
    assert ends is not None and np.diff(ends).tolist() == [5, 5, 5] and len(ends) == 4
    cut = np.ones(len(sigs))
    cut[[2 + 5 * k + 1 for k in range(5)]] = 0.0  # cheapest boundary: after each block's 2nd equation
    assert all((e - 2) % 5 == 1 for e in repeated_blocks(sigs, cut))
    assert repeated_blocks(sigs, np.full(len(sigs), np.inf)) is None
