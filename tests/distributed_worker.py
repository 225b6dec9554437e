"""One process of the 2-process test: 4 local CPU devices, global mesh of 8."""
import os
import sys

os.environ["JAX_NUM_CPU_DEVICES"] = "4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax  # noqa: E402

port, pid, plan_path, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.config.update("jax_num_cpu_devices", 4)
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=60)
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import autopar  # noqa: E402
from examples import mlp  # noqa: E402

assert jax.device_count() == 8 and jax.local_device_count() == 4, (jax.device_count(), jax.local_device_count())
plan = autopar.Plan.from_json(open(plan_path).read())
sharded = plan.apply(mlp.mlp_step)
args = sharded.shard_inputs(*mlp.mlp_step_args(batch=128, hidden=1024))
out = sharded(*args)
leaves = [np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in jax.tree_util.tree_leaves(out)]
if pid == 0:
    np.savez(out_path, *leaves)
jax.distributed.shutdown()
