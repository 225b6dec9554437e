"""One process of a multi-process pipeline test (tests/test_pipeline_multihost.py).

argv: PORT PROCESS_ID NUM_PROCESSES LOCAL_DEVICES OUT_DIR CASE [CASE …], each CASE
"NAME=PLAN_JSON" with NAME "mlp-…" (mlp.loss_fn, adam 1e-2) or "gpt-…" (gpt.loss_fn, sgd 0.1
momentum 0.9); the models are built as the test builds them. Every case runs 2 steps whose
params/optimizer state feed back; process 0 writes OUT_DIR/NAME.npz (every output leaf of
both steps, read with ``to_host``). With env DIE_AFTER_STEPS=N process 1 exits (os._exit)
right after N steps of the first case, to test that the others stop.
"""
import os
import sys

port, pid, nproc, local = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
out_dir, cases = sys.argv[5], sys.argv[6:]
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["JAX_NUM_CPU_DEVICES"] = str(local)
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", local)
from autopar.launch import initialize  # noqa: E402

initialize(f"127.0.0.1:{port}", nproc, pid, timeout_s=int(os.environ.get("AUTOPAR_TEST_TIMEOUT_S", "30")))
import numpy as np  # noqa: E402
import optax  # noqa: E402

from autopar import TrainingPlan  # noqa: E402
from autopar.pipeline.multistep import to_host  # noqa: E402
from examples import gpt, mlp  # noqa: E402

MODELS = {"mlp": lambda: (mlp.loss_fn, optax.adam(1e-2), mlp.params_and_batch(batch=32, hidden=64, layers=4,
                                                                                 bias=True)),
          "gpt": lambda: (gpt.loss_fn, optax.sgd(0.1, momentum=0.9),
                          gpt.params_and_batch(layers=2, hidden=32, seq=16, vocab=64, batch=8))}
die_after = int(os.environ.get("DIE_AFTER_STEPS", "-1"))
for case in cases:
    name, path = case.split("=", 1)
    loss_fn, opt, (params, batch) = MODELS[name.split("-")[0]]()
    tplan = TrainingPlan.from_json(open(path).read())
    step = tplan.apply(loss_fn, opt)
    state = opt.init(params)
    outs = []
    for t in range(2):
        if t == die_after and pid == 1:
            print(f"process {pid}: exiting on purpose", flush=True)
            os._exit(3)
        params, state, loss = step(params, state, batch)
        outs.append(to_host((params, state, loss)))
    if pid == 0:
        np.savez(os.path.join(out_dir, f"{name}.npz"),
                 *[x for out in outs for x in jax.tree_util.tree_leaves(out)])
    print(f"process {pid}: {name} done, loss {outs[-1][2]}", flush=True)
jax.distributed.shutdown()
