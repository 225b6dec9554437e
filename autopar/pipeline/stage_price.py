"""What a planned stage costs (``costs`` module docstring): a stage's intra-op plan on its
sub-mesh → a :class:`~.costs.StageCost` (latency with its sends, static / persistent /
activation memory per device, ZeRO-1's optimizer state and all-gather), and the inputs of
that pricing: the seconds its sends take (``send_time``), the optimizer state ZeRO-1
reserves (``reserve``, ``ilp_limit``). A mixin of :class:`~.stage_cost.StageCoster` (it needs
its stage programs, ``stage_programs.StagePrograms``, and the cluster: ``spec``, ``nodes``,
``opt_ratio``, ``num_microbatches``)."""
from __future__ import annotations

import math

from autopar.cost import ClusterSpec, shard_factor

from .costs import StageCost
from .halves import residual_bytes_per_device
from .inputs import acc_ratio, nbytes
from .stages import stage_abstract_args
from .zero import gather_time, optimizer_bytes, reserved_bytes


def sub_cluster(spec: ClusterSpec, submesh) -> tuple[ClusterSpec, int]:
    """The cluster a sub-mesh (n, m) sees: n nodes of m devices each."""
    n, m = submesh
    if m == spec.devices_per_node:
        return spec, n
    return spec.model_copy(update={"devices_per_node": m}), n


class StagePricing:
    """The pricing of planned stages (module docstring)."""

    def send_time(self, i: int, j: int, n_dev: int) -> float:
        """Seconds to receive layers i..j−1's incoming activations and send their gradients back
        (``costs`` module docstring: 2·(α + bytes_in / (n_dev·bw)))."""
        st = self.stage(i, j)[0]
        vals = self.program.values
        in_bytes = sum(vals[v].nbytes for v in list(st.acts_in) + list(st.nd_acts_in))
        link = self.spec.inter_node_link if self.nodes > 1 else self.spec.intra_node_link
        bw = (self.spec.inter_node_bandwidth_per_device() if self.nodes > 1 else link.bandwidth_bytes_per_s) * n_dev
        return 2 * (link.alpha_s + in_bytes / bw) if in_bytes else 0.0

    def reserve(self, i: int, j: int, submesh, zero: bool) -> float:
        """ZeRO-1: the least optimizer state a stage of layers i..j−1 reserves per device (else 0)."""
        if not zero:
            return 0.0
        p = stage_abstract_args(self.program, self.stage(i, j)[0], self.P)[0]
        return reserved_bytes(sum(nbytes(x) for x in p), submesh[0] * submesh[1], self.opt_ratio)

    def ilp_limit(self, i: int, j: int, submesh, budget: float, zero: bool) -> float:
        """The memory limit of the stage ILP within ``budget`` (ZeRO-1: less the least optimizer
        state, ``reserve``: the limit ``cost_within`` plans under)."""
        if not zero:
            return budget
        return max(budget - self.reserve(i, j, submesh, zero), 1.0)

    def stage_cost(self, i: int, j: int, submesh, sp, remat: str, zero: bool, memory_free: bool = False,
                   held: int = 0, act: float | None = None) -> StageCost:
        """The StageCost of layers i..j−1 planned as ``sp`` on ``submesh`` (``costs`` module
        docstring); ``held``: copies of the residuals its ILP held besides (``cost_within``);
        ``act``: the residual bytes per device where another StageCost of the same program and
        layouts has them (``reuse.zero_of``) — the process that reuses a plan may not have
        traced its program, and the estimate without the trace differs."""
        st = self.stage(i, j)[0]
        p = stage_abstract_args(self.program, st, self.P)[0]
        vals = self.program.values
        sizes = dict(zip(sp.axis_names, sp.mesh_shape))
        n_dev = math.prod(sp.mesh_shape)
        p_bytes = [nbytes(x) for x in p]
        p_specs = sp.input_specs_flat[:len(p)]
        param_dev = sum(b / shard_factor(spec, sizes) for b, spec in zip(p_bytes, p_specs))
        acc_dev = sum(b * acc_ratio(x.dtype, self.grad_accum) / shard_factor(spec, sizes)
                      for x, b, spec in zip(p, p_bytes, p_specs))   # their gradient accumulators
        # the residuals in their planned layouts, as the runtime keeps them (pipeline.halves); a
        # replicated one is whole on every device (not traced here: the vjp residuals spread evenly)
        traced = self.traced.get(self.program_key(i, j, remat))
        kept = 0.0  # the held copies, as the ILP counted them (``build.held_usages``)
        if act is not None:
            kept = held * act
        elif traced is not None and traced[5] is not None:
            act = residual_bytes_per_device(traced[2], traced[5], sp)
            kept = held * act
        else:
            act = self.activation(i, j, remat) / n_dev
        send = self.send_time(i, j, n_dev)
        # the ILP's peak counts one micro-batch's residuals (and the held copies)
        static = max(sp.predicted.peak_memory_bytes - kept - act, 0.0)
        shaped = [(tuple(x.shape), b) for x, b in zip(p, p_bytes)]
        if zero:  # the optimizer state split over the replicated axes, all-gathered params once a step
            cl, n = sub_cluster(self.spec, submesh)
            optimizer = optimizer_bytes(shaped, p_specs, sizes, self.opt_ratio)
            gather = gather_time(cl, n, sp.axis_names, sp.mesh_shape, shaped, p_specs)
            static += optimizer
            persist = min(param_dev + acc_dev, static - optimizer) + optimizer
        else:
            optimizer, gather = param_dev * self.opt_ratio, 0.0
            # persistent part of static: parameters with their accumulators and optimizer state
            persist = min(param_dev * (1.0 + self.opt_ratio) + acc_dev, static)
        return StageCost(plan=sp, latency=sp.predicted.step_time_s + send, send=send, static=static, act=act,
                         param_dev=param_dev, persist=persist, remat=remat, zero=zero, optimizer=optimizer,
                         gather_s=gather, num_microbatches=self.num_microbatches, memory_free=memory_free,
                         held=kept)
