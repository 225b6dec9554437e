"""One process of a multi-process pipeline test (tests/test_pipeline_multihost.py).

argv: PORT PROCESS_ID NUM_PROCESSES LOCAL_DEVICES OUT_DIR CASE [CASE …], each CASE
"NAME=PLAN_JSON" with NAME "mlp-…" (mlp.loss_fn, adam 1e-2) or "tied-…" (``tied_loss``, a
WeightedLoss with aux outputs; clip_by_global_norm 0.5 then sgd 0.1 momentum 0.9) or "scan-…" (``scan_loss``, a
scanned stack with dropout run in the split form, adam 1e-2); the test builds its plans
and references from ``MODELS``. Every case runs 2 steps whose params/optimizer state feed
back, then ``step.evaluate`` of the new params; process 0 writes OUT_DIR/NAME.npz (every
output leaf of both steps and the evaluated loss, read with ``to_host``); every process checks
that the params live only on their owner stage's devices. CASE "mismatch=A,B": process 0
loads plan A, the others plan B, and every process must raise PlanMismatchError. With env
DIE_AFTER_STEPS=N process 1 exits (os._exit) right after N steps of the first case (process
DIE_PROCESS if set), to test that the others stop.
"""
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from autopar import WeightedLoss
from examples import mlp


def tied_loss(params, batch):
    """An MLP whose input embedding is also its output projection (tied, as in GPT); its
    squared error averaged over the rows the mask keeps (a weighted loss: the weight, summed
    over the micro-batches, crosses processes), with aux outputs (has_aux): each row's error
    and a count of rows above 1."""
    h = jnp.tanh(batch["x"] @ params["emb"])
    for w in params["layers"]:
        h = jnp.tanh(h @ w)
    err = jnp.mean((h @ params["emb"].T - batch["y"]) ** 2, axis=-1)
    return (WeightedLoss(jnp.sum(err * batch["mask"]), jnp.sum(batch["mask"])),
            {"row_error": err, "rows_above_1": jnp.sum(err > 1.0)})


def tied_params_and_batch():
    k = jax.random.split(jax.random.key(0), 5)
    params = {"emb": jax.random.normal(k[0], (16, 32)) * 0.3,
              "layers": [jax.random.normal(k[i], (32, 32)) * 0.2 for i in (1, 2)]}
    mask = (np.arange(32) % 5 < np.arange(32) % 3 + 1).astype(np.float32)  # a different count per micro-batch
    return params, {"x": jax.random.normal(k[3], (32, 16)), "y": jax.random.normal(k[4], (32, 16)), "mask": mask}


def scan_loss(params, batch):
    """A lax.scan over 4 stacked layers (MaxText's scan_layers) with dropout from the batch's
    key (a key per layer; each micro-batch draws its rows of the whole batch's masks): split per
    iteration, run in the split form (``apply(stacked=False)``)."""
    def body(h, w_key):
        w, key = w_key
        h = jnp.tanh(h @ w["w"] + w["b"])
        return jnp.where(jax.random.bernoulli(key, 0.9, h.shape), h / 0.9, 0.0), None
    keys = jax.random.split(batch["dropout"], params["layers"]["b"].shape[0])
    h, _ = jax.lax.scan(body, batch["x"] @ params["emb"], (params["layers"], keys))
    return jnp.mean((h @ params["head"] - batch["y"]) ** 2)


def scan_params_and_batch():
    k = jax.random.split(jax.random.key(1), 5)
    params = {"emb": jax.random.normal(k[0], (16, 32)) * 0.3, "head": jax.random.normal(k[1], (32, 16)) * 0.3,
              "layers": {"w": jax.random.normal(k[2], (4, 32, 32)) * 0.2, "b": jnp.full((4, 32), 0.1)}}
    return params, {"x": jax.random.normal(k[3], (32, 16)), "y": jax.random.normal(k[4], (32, 16)),
                    "dropout": jax.random.key(7)}


MODELS = {"mlp": lambda: (mlp.loss_fn, optax.adam(1e-2), mlp.params_and_batch(batch=32, hidden=64, layers=4,
                                                                                 bias=True)),
          # gradients clipped by their norm over all stages (about 1.09 here): a scalar per leaf crosses
          # processes (autopar.pipeline.update_split)
          "tied": lambda: (tied_loss, optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.1, momentum=0.9)),
                           tied_params_and_batch()),
          "scan": lambda: (scan_loss, optax.adam(1e-2), scan_params_and_batch()),
          # Adam with eps 1e-4: at the default 1e-8 a gradient entry near 0 turns the rounding of
          # summing micro-batches (different with every stage split: 2.2e-6 on the 2-stage split,
          # 3.0e-6 on four 1-layer chunks after two steps) into updates at the tolerance's edge
          "mlpeps": lambda: (mlp.loss_fn, optax.adam(1e-2, eps=1e-4), mlp.params_and_batch(batch=32, hidden=64,
                                                                                            layers=4, bias=True))}
HAS_AUX = {"tied"}   # the models whose loss returns (loss, aux)


def check_placement(tplan, params, pid):
    """Every param leaf lives on its owner stage's devices only (no shards elsewhere)."""
    devs = jax.devices()
    for i, x in enumerate(jax.tree_util.tree_leaves(params)):
        owner = next(s for s in tplan.stages if i in s.owned_params)
        where = {devs[d] for d in owner.devices}
        assert set(x.sharding.device_set) == where, (i, x.sharding, owner.devices)
        assert {s.device for s in x.addressable_shards} == {d for d in where if d.process_index == pid}, i


def main(port, pid, nproc, local, out_dir, cases):
    jax.config.update("jax_num_cpu_devices", local)
    from autopar.launch import initialize
    initialize(f"127.0.0.1:{port}", nproc, pid, timeout_s=int(os.environ.get("AUTOPAR_TEST_TIMEOUT_S", "30")))
    from autopar import TrainingPlan
    from autopar.pipeline.multistep import to_host
    die_after = int(os.environ.get("DIE_AFTER_STEPS", "-1"))
    for case in cases:
        name, path = case.split("=", 1)
        if name == "mismatch":  # process 0 loads one plan, the others another: PlanMismatchError everywhere
            from autopar.runtime import PlanMismatchError
            loss_fn, opt, _ = MODELS["mlp"]()
            paths = path.split(",")
            try:
                TrainingPlan.from_json(open(paths[min(pid, 1)]).read()).apply(loss_fn, opt)
            except PlanMismatchError as err:
                print(f"process {pid}: PlanMismatchError: {err}", flush=True)
            else:
                raise SystemExit("different plans were not detected")
            continue
        loss_fn, opt, (params, batch) = MODELS[name.split("-")[0]]()
        tplan = TrainingPlan.from_json(open(path).read())
        split = tplan.scan_split is not None  # the split form: each slice on its stage
        step = tplan.apply(loss_fn, opt, stacked=not split, params_like=params if split else None)
        if split:
            params = step.split(params)
        state = opt.init(params)
        outs, took = [], []
        for t in range(2):
            if t == die_after and pid == int(os.environ.get("DIE_PROCESS", "1")):
                print(f"process {pid}: exiting on purpose", flush=True)
                os._exit(3)
            t0 = time.perf_counter()
            params, state, loss = step(params, state, batch)
            jax.block_until_ready((params, state, loss))
            took.append(round(time.perf_counter() - t0, 3))
            check_placement(tplan, params, pid)
            out = to_host((params, state, loss))
            outs.append((step.stack(out[0]), step.stack(out[1]), out[2]) if split else out)
        outs.append(to_host(step.evaluate(params, batch)))  # forward only, the updated params fed back
        if pid == 0:
            np.savez(os.path.join(out_dir, f"{name}.npz"),
                     *[x for out in outs for x in jax.tree_util.tree_leaves(out)])
        print(f"process {pid}: {name} done, placement checked, loss {outs[-2][2]}, step seconds {took}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6:])
