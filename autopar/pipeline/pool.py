"""Stage ILPs in parallel: the independent intra-op plans a costing step needs (every distinct
layer on every sub-mesh, a variant's layers on one sub-mesh, every range of the exact
search) planned by a pool of forked worker processes, each a copy of the parent's
:class:`~.stage_cost.StageCoster` (traced programs, caches) at the fork.

``prefetch(coster, requests)``: ``requests`` are ``StageCoster.cost`` argument tuples; those
whose result is not cached are grouped by the plan they need (the structural key: identical
layers are planned once), handed out in request order and their results merged back into the
parent's cache in that same order — so what the search sees afterwards (every cost, every
counter, the least budget that fits) does not depend on the number of workers, nor on which
worker finished first. A stage ILP is deterministic given its problem (unless its time
limit stops it, which depends on the machine's load with one worker as with two).
``run_tasks(coster, fn, tasks)``: chains of requests whose later ones depend on the earlier
plans (a stage planned, then planned again for its micro-batches in flight; a layer's
whole-budget plan, then its lean plan on the mesh it chose), one chain per stage program and
sub-mesh, each run to its end in one worker; merged in task order like ``prefetch``'s.

Each round forks fresh workers from the parent, so what a worker computed and the parent
does not hold is lost with it: besides its plans, a worker hands back what its coster's
``handoffs`` caches gained (``solvers.handoff``, each entry a function of its key alone): the
resharding matrices its problem builds made and the LP relaxations its solves and bounds
solved; the next rounds' workers inherit them (measured on GPT-175B on 1,024 H100s: 3.2 of
the 6.6 s CPU of matrix builds repeated an earlier round's; 13.8 of 56 s CPU of LPs repeated one
solved before, most of them in another process).

Workers are forked (a traced loss function cannot be pickled). JAX warns that ``os.fork`` does
not mix with its threads (a lock held by another thread at the fork stays held in the child);
workers only trace (``jax.make_jaxpr``, no XLA backend, no compilation) and solve ILPs, and
the warning is silenced here — the one risk is a worker that hangs, not a wrong result. The
pool is used only where
it pays: at least two plans to make and ``workers`` > 1 (``resolve_workers``).
"""
from __future__ import annotations

import dataclasses
import gc
import multiprocessing
import os
import warnings

from ..plan_types import Plan
from ..progress import Progress
from .reuse import serves

# ``workers="auto"``: this many processes at most (the machine's cores, fewer if it has fewer)
AUTO_WORKERS = 8
# … and only on sub-meshes this large or larger: small stage ILPs solve in milliseconds, less
# than forking and pickling a plan costs
AUTO_MIN_DEVICES = 32

_COSTER = None  # the forked worker's coster (set in the parent right before the fork)
_TASKS = None  # ``run_tasks``'s (function, tasks), likewise
_FROZEN = False  # ``_freeze`` froze the parent's objects; ``thaw`` undoes it


def resolve_workers(workers, total_devices: int) -> int:
    """The worker count for ``plan_training(workers=…)``: an int as given, "auto" the cores
    (at most ``AUTO_WORKERS``) on clusters of ``AUTO_MIN_DEVICES`` devices or more, else 1."""
    if workers == "auto":
        return min(os.cpu_count() or 1, AUTO_WORKERS) if total_devices >= AUTO_MIN_DEVICES else 1
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be 'auto' or an int ≥ 1, got {workers!r}")
    return workers


def _fresh_solver_threads() -> None:
    """Pool initializer: HiGHS's global task scheduler (made by the parent's first MIP) has no
    threads in a forked child — its MIPs then return nothing ("unknown") or hang waiting for
    them (seen: a GPT-175B worker 13 min in ``TaskGroup::~TaskGroup`` of ``evaluateRootNode``).
    Drop it so the child's first MIP starts its own."""
    try:
        import highspy
        highspy.Highs.resetGlobalScheduler(False)
    except (ImportError, AttributeError):
        pass


def _plan_one(args):
    """In a worker: plan one request; return the cache entries it made and its counters."""
    return _run_task(lambda coster: coster.cost(*args[0], **args[1]))


def _task_one(index):
    """In a worker: task ``index`` of ``run_tasks`` (its function and tasks inherited at the fork)."""
    fn, tasks = _TASKS
    return _run_task(lambda coster: fn(coster, tasks[index]))


def _run_task(work):
    """In a worker: ``work(coster)``; the cache entries it made, its counters and what its
    ``handoffs`` caches gained (module docstring)."""
    coster = _COSTER
    before, marks = set(coster.cache), _marks(coster)
    solves, infeasible = coster.solves, coster.infeasible
    work(coster)
    # a plan holds the traced function (not picklable): it travels as its JSON
    made = {k: (v if v.plan is None else dataclasses.replace(v, plan=v.plan.model_dump_json()))
            for k, v in coster.cache.items() if k not in before}
    reused = {k for k in made if k in getattr(coster, "reused", ())}
    return (made, reused, coster.solves - solves, coster.infeasible - infeasible, coster.min_need,
            _made_since(coster, marks))


def _bound_one(args):
    """In a worker: ``StageCoster.bound`` of one (i, j, sub-mesh), and what its ``handoffs``
    caches gained."""
    marks = _marks(_COSTER)
    return _COSTER.bound(*args), _made_since(_COSTER, marks)


def _marks(coster) -> list:
    return [c.mark() for c in coster.handoffs]


def _made_since(coster, marks) -> list:
    return [c.made_since(m) for c, m in zip(coster.handoffs, marks)]


def _absorb(coster, entries) -> None:
    for c, e in zip(coster.handoffs, entries):
        c.absorb(e)


def _plan_or_bound(item):
    """In a worker: a plan request (``_plan_one``) or a bound (``_bound_one``)."""
    kind, args = item
    return _plan_one(args) if kind == "plan" else _bound_one(args)


def _map(coster, fn, todo) -> list:
    """``fn`` over ``todo`` in ``coster.workers`` forked processes (results in order)."""
    global _COSTER
    progress, coster.progress = coster.progress, Progress()
    _COSTER = coster
    _freeze()
    try:
        ctx = multiprocessing.get_context("fork")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
            with ctx.Pool(min(coster.workers, len(todo)), initializer=_fresh_solver_threads) as pool:
                return pool.map(fn, todo, chunksize=1)
    finally:
        _COSTER = None
        coster.progress = progress


def _freeze() -> None:
    """Before a round's fork: every object the parent holds now leaves garbage collection
    (``gc.freeze``) until ``thaw``. The workers' collections no longer scan what they inherit
    (traced programs, caches: no copy-on-write of those pages either), nor do the parent's
    between rounds — they collected nothing there, and grew with every merged plan. Measured at
    GPT-175B@1,024: the workers' collections 3.9 → 1.6 s CPU; the parent's 1.4 s, of full
    collections that freed no object."""
    global _FROZEN
    gc.freeze()
    _FROZEN = True


def thaw() -> None:
    """Undo ``_freeze`` (``plan_training`` calls it when its search ends)."""
    global _FROZEN
    if _FROZEN:
        gc.unfreeze()
        _FROZEN = False


def _bound_todo(coster, requests) -> list:
    """((i, j, sub-mesh), bound key) of the distinct uncomputed bounds among ``requests``."""
    todo, seen = [], set()
    for i, j, sub in requests:
        key = (coster.program_key(i, j), tuple(sub), None, coster.budget, False, 1)
        if key not in seen and key not in coster.bounds and key not in coster.cache:
            seen.add(key)
            todo.append(((i, j, tuple(sub)), key))
    return todo


def prefetch(coster, requests, bounds=()) -> None:
    """Plan the uncached ``requests`` ((args, kwargs) of ``coster.cost``) in ``coster.workers``
    processes; merge in request order (module docstring). Sequential when it does not pay.
    A request an earlier one's plan may serve (the same stage program and sub-mesh: a smaller
    budget, ``StageCoster.served``; a lean request may also plan its whole budget) waits for
    the next round, which starts once this one is merged — then it is served or planned, as
    a single worker, asking for it after the earlier one, would have it. ``bounds``: (i, j,
    sub-mesh) whose ``coster.bound`` is computed in the same round, after the plans, stored in
    ``coster.bounds`` (one per distinct stage program and sub-mesh: a bound is a function of its
    problem alone, an LP solved to optimality, the same whichever process computes it; it needs
    no plan, so the pool has no barrier between them)."""
    if getattr(coster, "workers", 1) <= 1:
        return  # the caller's own ``cost`` calls plan them one by one
    todo, seen, ahead, later = [], set(), {}, []
    for args, kw in requests:
        key = coster.plan_key(*args, **kw)
        if key in seen or coster.is_cached(*args, **kw):
            continue
        if any(serves(k, key) for k in ahead.get((key[0], key[1]), ())):
            later.append((args, kw))
            continue
        seen.add(key)
        ahead.setdefault((key[0], key[1]), []).extend(
            [key, coster.plan_key(*args, **{**kw, "share": 1.0})])
        todo.append((args, kw))
    btodo = _bound_todo(coster, bounds)
    if len(todo) + len(btodo) < 2:
        return
    results = _map(coster, _plan_or_bound, [("plan", t) for t in todo] + [("bound", args) for args, _ in btodo])
    _merge(coster, results[:len(todo)])
    for (_, key), (value, entries) in zip(btodo, results[len(todo):]):
        coster.bounds[key] = value
        _absorb(coster, entries)
    if later:  # (every request they waited for is merged now)
        prefetch(coster, later)


def run_tasks(coster, fn, tasks, size=len) -> None:
    """``fn(coster, task)`` for every task in ``coster.workers`` forked processes, the plans
    each made merged into the parent's cache in task order (as ``prefetch``'s); handed out
    largest ``size`` first (any sortable value; ties in task order), so a long task does not
    start last (the order changes only when each ends, not what it plans). For work whose
    later requests depend on its earlier plans (``search.plan_stages``: a stage planned again
    for its micro-batches in flight when its plan overflows): each task goes on in its worker
    without waiting for a round to end. The tasks must not serve one another (``serves``: one
    task per stage program and sub-mesh); within a task, the requests come in the order one
    worker would make them. Sequential (nothing done here) with one worker or one task."""
    global _TASKS
    if getattr(coster, "workers", 1) <= 1 or len(tasks) < 2:
        return
    _TASKS = (fn, list(tasks))
    # (a stable sort: ties stay in task order)
    order = sorted(range(len(tasks)), key=lambda k: size(tasks[k]), reverse=True)
    try:
        done = dict(zip(order, _map(coster, _task_one, order)))
        _merge(coster, [done[k] for k in range(len(tasks))])
    finally:
        _TASKS = None


def _merge(coster, results) -> None:
    """Workers' cache entries, counters and handed-off caches into the parent's, in order."""
    plans: dict = {}  # JSON → Plan: a plan that served other requests in its worker is parsed once
    for made, reused, solves, infeasible, min_need, entries in results:
        _absorb(coster, entries)
        for k, v in made.items():
            if k not in coster.cache:
                if v.plan is not None:
                    if v.plan not in plans:
                        plans[v.plan] = Plan.model_validate_json(v.plan)
                    v = dataclasses.replace(v, plan=plans[v.plan])
                coster.remember(k, v)
        coster.solves += solves
        coster.infeasible += infeasible
        coster.min_need = min(coster.min_need, min_need)
        # the caller's first ``cost`` of a plan a worker made is not a cache hit (one worker
        # would have planned it there); of one an earlier plan served it is (so it would)
        coster.prefetched.update(k for k in made if k not in reused)


__all__ = ["AUTO_WORKERS", "AUTO_MIN_DEVICES", "resolve_workers", "prefetch", "run_tasks", "thaw"]
