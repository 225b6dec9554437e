"""8 simulated CPU devices, set before any JAX backend starts; shared test clusters."""
import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# LLVM codegen at -O0: XLA:CPU compiles the tests' programs about twice as fast; the HLO
# passes (partitioning, collective combining, buffer assignment) that the tests check against
# the plan are the same at every backend level. A level the caller set is kept.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from autopar.cost import cluster_from_dict, load_cluster  # noqa: E402


def make_cluster(devices_per_node: int = 4, *, alpha_s: float = 1e-7, intra_bw: float = 150e9,
                 inter_bw: float = 15e9, nics: int | None = None, flops: float = 1e12,
                 memory_bytes: int = 4 * 2**30):
    """A cluster with fast links (tiny α) and slow devices, so small models are worth sharding."""
    base = load_cluster("cpu-8").model_dump()
    return cluster_from_dict({
        **base, "name": f"test-{devices_per_node}", "devices_per_node": devices_per_node,
        "device": {**base["device"], "peak_flops": {"float32": flops}, "memory_bytes": memory_bytes},
        "intra_node_link": {"alpha_s": alpha_s, "bandwidth_bytes_per_s": intra_bw},
        "inter_node_link": {"alpha_s": alpha_s, "bandwidth_bytes_per_s": inter_bw},
        "nics_per_node": nics or devices_per_node})


@pytest.fixture(scope="session")
def devices8():
    devs = jax.devices()
    if len(devs) < 8:
        pytest.skip(f"needs 8 devices, JAX sees {len(devs)}")
    return devs


def assert_step_equals_single_device(loss_fn, params, batch, opt, tplan, rtol=1e-5, atol=1e-6):
    """``tplan.apply()`` on (params, optimizer state, batch) equals the unsharded jitted step."""
    import numpy as np
    import optax
    state = opt.init(params)

    def ref(p, o, b):
        loss, g = jax.value_and_grad(loss_fn)(p, b)
        u, o = opt.update(g, o, p)
        return optax.apply_updates(p, u), o, loss
    want = jax.jit(ref)(params, state, batch)
    got = tplan.apply()(params, state, batch)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)
