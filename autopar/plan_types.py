"""The Plan: a frozen pydantic model that round-trips through JSON.

Specs are stored as lists of mesh-axis *names* per tensor dim (``[["x"], []]``), never as
solver indices. ``timing`` holds the only non-deterministic fields (wall-clock times).
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from autopar.cost import ClusterSpec

SpecNames = list[list[str]]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Document(_Frozen):
    """A saved plan: JSON round trip; equality over fields only (private attributes such as
    the planned function are not compared)."""

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and self.model_dump() == other.model_dump()

    __hash__ = None

    def to_json(self, *, indent: int | None = 1) -> str:
        return self.model_dump_json(indent=indent)

    @classmethod
    def from_json(cls, text: str):
        return cls.model_validate_json(text)


class CollectiveCost(_Frozen):
    kind: str             # a cost.comm Collective's name ("all-reduce", …; cost.COLLECTIVES)
    axes: list[str]
    bytes: float          # per device, as in the α+nβ formulas (see cost.comm)
    time_s: float
    where: str            # e.g. "dot_general #12 (model.py:30)" or "reshard v5: input[0] -> dot_general #12"


class KindTotal(_Frozen):
    count: int
    bytes: float
    time_s: float


class Predicted(_Frozen):
    step_time_s: float
    compute_s: float
    comm_s: float
    comm_bytes_per_device: float
    peak_memory_bytes: float
    collectives: list[CollectiveCost]
    by_kind: dict[str, KindTotal]
    # per step of a loop: outputs fed back whose layout differs from their input's are
    # resharded by Plan.apply before the next call (not part of the compiled step)
    loop_reshard_s: float = 0.0


class EqnPlan(_Frozen):
    index: int
    primitive: str
    strategy: str
    out_specs: list[SpecNames | None]
    reshard_inputs: dict[int, SpecNames]   # operand index -> spec it is resharded to first
    shapes: list[list[int]]
    compute_s: float
    comm_s: float
    source: str = ""
    fallback: str | None = None


class SolverStats(_Frozen):
    solver: str
    status: str
    objective_s: float
    lower_bound_s: float | None
    gap: float | None
    nodes: int
    edges: int
    strategies: int


class MeshCandidate(_Frozen):
    mesh_shape: list[int]
    objective_s: float | None
    status: str


class FallbackTotal(_Frozen):
    """Equations of one primitive replicated for one reason (no sharding rule applies: the
    rule raised ``strategies.Fallback`` or offers only the replicated strategy)."""
    primitive: str
    count: int
    reason: str


class Timing(_Frozen):
    trace_s: float = 0.0
    strategies_s: float = 0.0
    solve_s: float = 0.0
    total_s: float = 0.0
    per_mesh_solve_s: dict[str, float] = {}


def _like(tree, specs: list, what: str, function: str):
    """``specs`` unflattened into the structure of ``tree`` (same number of leaves)."""
    import jax

    treedef = jax.tree_util.tree_structure(tree)
    if treedef.num_leaves != len(specs):
        raise ValueError(f"the plan of {function} has {len(specs)} {what} leaves but the pytree given has "
                         f"{treedef.num_leaves} ({treedef}); pass the same {what}s the plan was made for")
    return treedef.unflatten(specs)


class Plan(_Document):
    version: int = 1
    function: str
    fingerprint: str
    cluster: ClusterSpec
    nodes: int
    mesh_shape: list[int]
    axis_names: list[str]
    memory_budget_bytes: float
    input_specs_flat: list[SpecNames]
    output_specs_flat: list[SpecNames | None]
    input_tree: Any
    output_tree: Any
    input_shapes: list[list[int]]
    input_dtypes: list[str] = []   # (empty in plans saved before it was recorded)
    eqns: list[EqnPlan]
    predicted: Predicted
    solver: SolverStats
    mesh_candidates: list[MeshCandidate]
    fallbacks: list[FallbackTotal]
    donated_inputs: list[int] = []
    # (flat input leaf, flat output leaf) pairs a loop feeds back: donated pairs and those
    # autopar.carry.carried_pairs matches by path
    carried: list[list[int]] = []
    # values (traced program's value ids) converted once into this spec right after they are
    # produced, where several readers want it (autopar.build_shared); left out when empty
    materialized: dict[int, SpecNames] = Field(default_factory=dict, exclude_if=lambda v: not v)
    timing: Timing = Timing()
    # who chose the shardings: "autopar", or a hand-written baseline of autopar.baselines
    # ("data_parallel", "fsdp", "megatron", "dp_tp"); left out of the JSON when "autopar"
    strategy_name: str = Field(default="autopar", exclude_if=lambda v: v == "autopar")
    _fn: Any = PrivateAttr(default=None)   # the planned function, when planned in this process
    _args: Any = PrivateAttr(default=None)  # its example arguments as ShapeDtypeStructs (for explain)
    # the arguments' / outputs' own PyTreeDefs (equinox Modules, nnx.State, dataclasses …), when
    # planned in this process; a JSON load keeps containers and namedtuples only (specs_like)
    _in_treedef: Any = PrivateAttr(default=None)
    _out_treedef: Any = PrivateAttr(default=None)

    # --- views -----------------------------------------------------------------------
    @property
    def input_specs(self):
        """PartitionSpec pytree with the example arguments' structure (a tuple, one entry per
        positional argument): ``jax.tree.map(f, args, plan.input_specs)`` works. After a JSON
        load custom pytree nodes come back as tuples: use :meth:`specs_like`."""
        from .pytree_json import treedef_from_json
        tree = self._in_treedef if self._in_treedef is not None else treedef_from_json(self.input_tree)
        return tree.unflatten(self._input_pspecs())

    @property
    def output_specs(self):
        """PartitionSpec pytree with the function's output structure (see :meth:`output_specs_like`)."""
        from .pytree_json import treedef_from_json
        tree = self._out_treedef if self._out_treedef is not None else treedef_from_json(self.output_tree)
        return tree.unflatten(self._output_pspecs())

    def specs_like(self, *args):
        """The input specs with the structure of ``args`` (the function's positional arguments,
        arrays or ShapeDtypeStructs): re-attaches the user's pytree types after ``from_json``."""
        return _like(args, self._input_pspecs(), "input", self.function)

    def output_specs_like(self, outputs):
        """The output specs with the structure of ``outputs`` (e.g. ``jax.eval_shape(fn, *args)``)."""
        return _like(outputs, self._output_pspecs(), "output", self.function)

    def _input_pspecs(self) -> list:
        from .emit import to_pspec
        return [to_pspec(s) for s in self.input_specs_flat]

    def _output_pspecs(self) -> list:
        from jax.sharding import PartitionSpec

        from .emit import to_pspec
        return [PartitionSpec() if s is None else to_pspec(s) for s in self.output_specs_flat]

    def report(self) -> str:
        from .report import format_report
        return format_report(self)

    def apply(self, fn, *, devices=None):
        """A jitted callable taking the same arguments as ``fn``, sharded as planned."""
        from .runtime import apply_plan
        return apply_plan(self, fn, devices=devices)

    def validate(self, *args, fn=None, devices=None):
        """Compile the plan; predicted vs compiled collective bytes and peak memory."""
        from .validate import validate_plan
        fn = fn if fn is not None else self._fn
        if fn is None:
            raise ValueError("this plan does not hold its function (it was loaded from JSON): "
                             "call plan.validate(*args, fn=the_function)")
        return validate_plan(self, fn, *args, devices=devices)

    def explain(self, leaf, *, fn=None, args=None, axis=None, top: int = 5, solver: str = "auto", time_limit_s=None):
        """Why input ``leaf`` (a path as the report prints it, e.g. ``"[0]['qkv']"``, or a flat
        index) has its sharding; for a replicated / partly split leaf, the cheapest plan that
        splits it further and the operations that make it expensive (``autopar.explain``).
        ``fn`` / ``args`` are needed after a JSON load; ``axis="y"``: split it over that mesh axis."""
        from .explain import explain
        return explain(self, leaf, fn=fn, args=args, axis=axis, top=top, solver=solver, time_limit_s=time_limit_s)
