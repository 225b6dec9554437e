"""An optimizer update that mixes parameters, split over pipeline stages in rounds.

A per-parameter optimizer (sgd, adam, adamw, …) updates each stage's parameters from that
stage's gradients alone, so each stage runs ``optimizer.update`` on the tree of what it owns
(``autopar.pipeline.runtime``). ``optax.clip_by_global_norm`` cannot be split so: run per
stage it clips each stage's gradients by that stage's own norm — a different step, silently.
So the update of the whole tree is traced once (``autopar.trace``) and each value gets a
home:

* stage k, when it is computed from stage k's parameters, gradients and optimizer state
  (and from common or global values);
* *global*, when it combines values of two or more stages (the global norm's sum over
  leaves): the stage values it reads, the *partials* (sums of squares), must be
  small (``SMALL`` elements); each is sent to the other stages that read it, and each stage
  computes the global values itself;
* *common*, when it reads no stage's values: constants, and state leaves every stage keeps a
  copy of (a step count).

A stage's scalar meeting a global value is global too (a partial sum joining the global sum:
fewer rounds); an array meeting one (a leaf scaled by the clip) stays on its stage.

A stage value reading a global value made from partials of round r − 1 belongs to round r;
round 0 needs nothing from other stages. Round r of stage k is one jitted program: the global
and common equations of rounds ≤ r (recomputed: they are cheap) and stage k's own of round r,
the parameter update ``p + u`` applied where ``u`` is made. After each round the stage's
partials move, packed into one vector per dtype (``PipelineStep._move``: a ``jax.device_put``
or, across processes, the multi-host transfer). ``clip_by_global_norm`` takes two rounds and
sends at most one scalar per parameter leaf (fewer where the sum's order adds a stage's
leaves first: one per stage on two stages). An update drawing random values (optax.add_noise:
one key split over the whole tree's leaves) runs so too, with nothing to send: per stage it
would split the key over the stage's leaves only. A per-parameter optimizer has no
global value: :func:`split_update` returns None and the stages update apart, as before.
``autopar.pipeline.update_rounds`` runs the rounds.

A ``lax.cond`` in the update (``optax.MultiSteps``, ``apply_if_finite``) is traced as both
branches and a ``select_n`` of their outputs, so each leaf's output reads its own leaf and
the predicate; the rounds compute both branches (an update's cost at most twice).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import jax
from jax.extend import core as jcore

from ..jaxpr_eval import run
from ..trace import INLINE_PARAMS, Program, _dce, trace

SMALL = 4096      # elements: the largest stage value sent to the other stages for a global value
GLOBAL, COMMON = -1, -2


@dataclass(frozen=True)
class Round:
    """Round ``round`` of stage ``stage``: ``eqns`` of the update program, reading ``ins``
    (this stage's values: its inputs, and what its earlier rounds kept) and ``recv`` (other
    stages' partials, unpacked from their packs); it keeps ``outs`` (for its later rounds and
    the state leaves it returns), sends ``sends`` (its partials of the round, one pack per
    dtype) and applies ``applies``: (param leaf i, the param's value id, its update)."""
    stage: int
    round: int
    eqns: tuple
    ins: tuple
    recv: tuple
    outs: tuple
    sends: tuple
    applies: tuple


@dataclass
class UpdateSplit:
    program: Program
    rounds: list          # [round][stage] -> Round | None
    home: dict            # value id -> stage | GLOBAL | COMMON
    level: dict           # value id -> the round it is made in
    partials: dict        # value id -> its stage (sent to every other stage after the round it is made in)
    owner: list           # param leaf -> stage
    state_home: list      # state leaf -> the stage returning it

    @property
    def num_rounds(self) -> int:
        return len(self.rounds)

    @property
    def sends_per_step(self) -> int:
        """Packs made per step (each sent to the other stages reading it)."""
        return sum(len(rd.sends) for row in self.rounds for rd in row if rd is not None)


def _size(value) -> int:
    return math.prod(value.shape)


def _check_small(value, stage, eqn) -> None:
    if _size(value) > SMALL:
        where = f" ({eqn.prim.name} at {eqn.source})" if eqn is not None and eqn.source else ""
        raise ValueError(
            f"the optimizer's update combines values of different pipeline stages, and one of them is not small: "
            f"a {value.dtype}{list(value.shape)} value of stage {stage}{where} would have to be sent to the other "
            f"stages. Pipeline plans run optimizers whose cross-parameter parts are scalars (clip_by_global_norm, "
            f"a global norm); use a per-parameter optimizer or one of those, or plan a single stage "
            f"(plan_training(..., num_stages=1))")


def _selects(fn):
    """``fn`` with every ``lax.cond`` computed as both branches and a ``select_n`` of their
    outputs (a wrapper such as ``optax.MultiSteps`` conds over the whole tree: as selects, each
    leaf's output reads only its own leaf and the common predicate)."""
    def hook(eqn, ins):
        name = eqn.primitive.name
        if name == "cond":
            index, ops = ins[0], ins[1:]
            branches = [run(b.jaxpr, b.consts, ops, hook) for b in eqn.params["branches"]]
            return [jax.lax.select_n(index, *cases) for cases in zip(*branches)]
        if name in INLINE_PARAMS and isinstance(eqn.params.get(INLINE_PARAMS[name]), jcore.ClosedJaxpr):
            body = eqn.params[INLINE_PARAMS[name]]
            return run(body.jaxpr, body.consts, ins[len(ins) - len(body.jaxpr.invars):], hook)
        return None

    def wrapped(*args):
        closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = run(closed.jaxpr, closed.consts, jax.tree_util.tree_leaves(args), hook)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), outs)
    return wrapped


def split_update(optimizer, params_abs, opt_abs, owner: list[int], state_stages: list[set],
                 state_home: list[int], num_stages: int) -> UpdateSplit | None:
    """The update of ``optimizer`` on the whole tree split into rounds per stage, or None when
    no value combines two stages' values (a per-parameter optimizer). ``owner[i]``: the stage
    owning param leaf i; ``state_stages[j]``: the stages whose optimizer state has leaf j (one:
    that stage's; several: each keeps a copy, a common value); ``state_home[j]``: the stage
    returning it."""
    program = trace(_selects(lambda p, s, g: optimizer.update(g, s, p)), params_abs, opt_abs, params_abs)
    P, S = len(owner), len(state_stages)
    inv, vals = program.invars, program.values
    home: dict = {c: COMMON for c in program.consts}
    for i in range(P):
        home[inv[i]] = home[inv[P + S + i]] = owner[i]
    for j, st in enumerate(state_stages):
        home[inv[P + j]] = next(iter(st)) if len(st) == 1 else COMMON
    level: dict = dict.fromkeys(home, 0)
    partials: dict = {}
    eqn_home, eqn_level = [], []
    for e in program.eqns:
        ins = [x for x in e.inputs if isinstance(x, int)]
        on_stage = [x for x in ins if home[x] >= 0]
        stages = {home[x] for x in on_stage}
        big = list(dict.fromkeys(home[x] for x in on_stage if _size(vals[x]) > SMALL))
        for x in on_stage:  # a large value of a second stage cannot be sent
            if big and home[x] != big[0]:
                _check_small(vals[x], home[x], e)
        if big:  # computed where its large input is
            h = big[0]
        elif len(stages) > 1 or (stages and any(home[x] == GLOBAL for x in ins)
                                 and all(vals[x].shape == () for x in on_stage)):
            h = GLOBAL  # small values of several stages, or one stage's scalar and a global one
        elif stages:
            h = stages.pop()
        else:
            h = GLOBAL if any(home[x] == GLOBAL for x in ins) else COMMON
        lv = max((level[x] for x in ins), default=0)
        for x in on_stage:
            if home[x] != h:  # a partial: sent after the round it is made in
                partials[x] = home[x]
                lv = max(lv, level[x] + 1)
        for o in e.outputs:
            home[o], level[o] = h, lv
        eqn_home.append(h)
        eqn_level.append(lv)
    # an output returned by a stage other than its home's (a stage value in a state leaf all
    # stages keep a copy of): sent as well
    returns = [(owner[i], o) for i, o in enumerate(program.outvars[:P])] + \
              [(state_home[j], o) for j, o in enumerate(program.outvars[P:])]
    for k, o in returns:
        if isinstance(o, int) and home[o] >= 0 and home[o] != k:
            _check_small(vals[o], home[o], None)
            partials[o] = home[o]
    # an update drawing random values (optax.add_noise / noisy_sgd: one key split over the whole
    # tree's leaves, ``split(key, num_leaves + 1)``) draws other keys per stage on the stage's
    # own leaves: it runs as the whole tree's update, split by home, even with nothing to send
    draws = any(e.prim.name.startswith("random_") for e in program.eqns)
    if not partials and GLOBAL not in eqn_home and not draws:
        return None
    if program.regions:
        raise ValueError("the optimizer's update combines parameters of different pipeline stages inside a loop "
                         "(lax.scan); pipeline plans split such updates only in straight-line code")
    ready = [_ready(o, k, home, level) for k, o in returns]
    R = max(ready + eqn_level) + 1
    split = UpdateSplit(program, [], home, level, partials, list(owner), list(state_home))
    split.rounds = [[_round(split, k, r, eqn_home, eqn_level) for k in range(num_stages)] for r in range(R)]
    return split


def _ready(o, k, home, level) -> int:
    """The round in which stage k has output ``o``: its own or a common/global value when it
    is made, another stage's after that stage has sent it."""
    if not isinstance(o, int):
        return 0
    return level[o] + 1 if home[o] >= 0 and home[o] != k else level[o]


def _round(split: UpdateSplit, k: int, r: int, eqn_home, eqn_level) -> Round | None:
    program, home, level, partials = split.program, split.home, split.level, split.partials
    P = len(split.owner)
    upd, new_state = program.outvars[:P], program.outvars[P:]
    mine = [program.eqns[n] for n, (h, lv) in enumerate(zip(eqn_home, eqn_level))
            if (h in (GLOBAL, COMMON) and lv <= r) or (h == k and lv == r)]
    # what later rounds of this stage read: its own values of later rounds, and every global
    # and common equation (each round recomputes those it needs)
    later = {x for n, (h, lv) in enumerate(zip(eqn_home, eqn_level)) if (h == k and lv > r) or h in (GLOBAL, COMMON)
             for x in program.eqns[n].inputs if isinstance(x, int)}
    applies = tuple((i, program.invars[i], u) for i, u in enumerate(upd)
                    if split.owner[i] == k and _ready(u, k, home, level) == r)
    keeps = [o for j, o in enumerate(new_state)
             if split.state_home[j] == k and isinstance(o, int) and _ready(o, k, home, level) == r]
    produced = {o for e in mine for o in e.outputs}
    sends = [x for x, s in partials.items() if s == k and level[x] == r]
    carry = sorted(x for x in later if x in produced and home[x] == k)
    wanted = list(dict.fromkeys([u for _, _, u in applies if isinstance(u, int)] + keeps + sends + carry))
    kept = _dce(mine, [v for v in wanted if v in produced], {})
    if not kept and not applies and not keeps and not sends:
        return None
    made = {o for e in kept for o in e.outputs}
    reads = [x for e in kept for x in e.inputs if isinstance(x, int) and x not in made and x not in program.consts]
    reads += [v for v in wanted if v not in made] + [p for _, p, _ in applies]
    reads = list(dict.fromkeys(reads))
    recv = tuple(x for x in reads if partials.get(x, k) != k)
    ins = tuple(x for x in reads if x not in recv)
    groups: dict = {}
    for v in sends:
        groups.setdefault(str(program.values[v].dtype), []).append(v)
    return Round(k, r, tuple(kept), ins, recv, tuple(dict.fromkeys(keeps + carry)),
                 tuple(tuple(g) for g in groups.values()), applies)
