"""Cost model (no JAX): α+nβ formulas, mesh-axis → link mapping, resharding."""
import subprocess
import sys

import pytest

from autopar.cost import collective_time, load_cluster, mesh_model, resharding


def test_cost_and_solvers_do_not_import_jax():
    code = "import sys, cost, solvers; assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_axis_inside_node_uses_nvlink_axis_across_nodes_the_network():
    c = load_cluster("p3.16xlarge")
    m = mesh_model(c, 2, (2, 8))
    assert m.links[0].crosses_nodes and not m.links[1].crosses_nodes
    assert m.links[0].bandwidth_bytes_per_s == pytest.approx(25e9 / 8 / 8)  # one 25 Gb/s NIC shared by 8 GPUs
    assert m.links[1].bandwidth_bytes_per_s == c.intra_node_link.bandwidth_bytes_per_s
    flat = mesh_model(c, 2, (16,))
    assert flat.links[0].crosses_nodes
    with pytest.raises(ValueError, match="has 8 devices but cluster"):
        mesh_model(c, 2, (2, 4))


@pytest.mark.parametrize("p", [2, 4, 8])
def test_ring_formulas(p):
    c = load_cluster("dgx-a100-80g")
    m = mesh_model(c, 1, (p, 8 // p) if p < 8 else (8,))
    a, bw, n = c.intra_node_link.alpha_s, c.intra_node_link.bandwidth_bytes_per_s, 64e6  # bandwidth-bound
    ring, doubling = 2 * (p - 1) * a + 2 * (p - 1) / p * n / bw, (p - 1).bit_length() * (a + n / bw)
    assert collective_time(m, "all-reduce", (0,), n) == pytest.approx(min(ring, doubling))
    if p > 2:
        assert ring < doubling  # large messages: the ring wins
    assert collective_time(m, "all-gather", (0,), n) == pytest.approx(
        min((p - 1) * a, (p - 1).bit_length() * a) + (p - 1) / p * n / bw)
    assert collective_time(m, "all-to-all", (0,), n) == pytest.approx((p - 1) * a + (p - 1) / p * n / bw)
    assert collective_time(m, "p2p", (0,), n) == pytest.approx(a + n / bw)


def test_small_messages_use_recursive_doubling_and_time_grows_with_bytes():
    m = mesh_model(load_cluster("dgx-h100"), 1, (8,))
    small = collective_time(m, "all-reduce", (0,), 1024)
    assert small == pytest.approx(3 * (m.links[0].alpha_s + 1024 / m.links[0].bandwidth_bytes_per_s))
    times = [collective_time(m, k, (0,), n) for k in ("all-reduce",) for n in (1e3, 1e5, 1e7, 1e9)]
    assert times == sorted(times)


def test_resharding_costs():
    m = mesh_model(load_cluster("cpu-8"), 1, (2, 4))
    shape, f32 = (128, 1024), 4
    assert resharding(m, shape, f32, ((), ()), ((0,), (1,))) == (0.0, ())          # slicing is free
    t, colls = resharding(m, shape, f32, ((0,), ()), ((), ()))
    assert colls == (("all-gather", (0,), 128 * 1024 * 4),) and t > 0
    _, colls = resharding(m, shape, f32, ((0,), ()), ((), (0,)))
    assert [c[0] for c in colls] == ["all-to-all"]
    _, colls = resharding(m, shape, f32, ((1,), ()), ((0, 1), ()))                 # y then x·y: not a local slice
    assert [c[0] for c in colls] == ["collective-permute"]
    assert resharding(m, shape, f32, ((0,), ()), ((0, 1), ())) == (0.0, ())       # x then x·y: a local slice
