"""A step time no plan of a training step can beat, under autopar's cost model.

Every plan — any stages, sub-meshes, operator layouts, micro-batch count among those asked
for — spreads the same operators over the cluster's devices, and the cost model charges each
operator its roofline on the shard a device holds (``cost.compute_time``: the slower of its
FLOPs at the device's peak and its memory traffic at the HBM bandwidth, a matmul's FLOPs at
its ``matmul_efficiency``). Splitting an operator over n devices leaves each at least 1/n of
its FLOPs and bytes, and a local matmul is never nearer peak than the whole one; collectives,
sends, pipeline bubbles, the planner's recomputation and stage imbalance only add (the
recomputation of your own ``jax.checkpoint`` calls is in the bound: every plan keeps it). So

    bound = (forward + backward of one micro-batch on one device) × micro-batches / devices

with the largest micro-batch asked for (fewest micro-batches: its matmuls are the nearest
peak, its weights read the fewest times), is below every predicted step of ``plan_training``
and ``baselines.dp_tp_pp`` on that cluster. (One step of this argument is checked rather than
proved: which elementwise operators the cost model counts as fused into their neighbours is
decided on the whole program here and on each stage's program in a plan; a stage boundary
can only cut such chains, never join them. Tests: both planners' plans of a small GPT;
``benchmarks/compare_training.py``: all 36 suite configs, 1.04–2.33× above their bounds.)
``planned step / bound`` is how far a plan is from perfect scaling of its compute (the
optimizer update, charged by neither, is left out); ``baseline step / bound`` is the
largest speedup over that baseline any planner could show.
"""
from __future__ import annotations

import jax

from autopar.cost import load_cluster
from autopar.pipeline.inputs import microbatch_shapes
from autopar.pipeline.loss_form import differentiated
from autopar.pipeline.training import microbatch_counts


def step_lower_bound(loss_fn, params, batch, *, cluster="cpu-8", nodes: int = 1, num_microbatches=1,
                     has_aux: bool = False) -> float:
    """Seconds per training step that no plan of ``loss_fn(params, batch)`` on ``nodes`` nodes of
    ``cluster`` beats, with ``num_microbatches`` (an int or a sequence of counts) and
    ``has_aux`` as :func:`autopar.plan_training` takes them (see the module docstring)."""
    from autopar.planner import plan  # (planner imports the pipeline package)
    spec = load_cluster(cluster)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be a positive int, got {nodes!r}")
    count = min(microbatch_counts(num_microbatches))
    one = spec.model_copy(update={"devices_per_node": 1, "nics_per_node": 1})
    grad = jax.value_and_grad(differentiated(loss_fn, has_aux))  # (a (total, weight) loss: the total's)
    single = plan(grad, params, microbatch_shapes(batch, count), cluster=one, nodes=1, mesh_shape=(1,),
                  memory_budget_bytes=1e30)  # (no memory limit)
    return single.predicted.compute_s * count / (nodes * spec.devices_per_node)
