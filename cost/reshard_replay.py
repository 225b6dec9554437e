"""XLA's reshard decision sequence replayed on mesh-axis factors (used by ``cost.resharding``).

The model replays the decision sequence of XLA's ``PartitionedHlo::ReshardNoCache`` on mesh
axes. XLA (jax 0.10.2) takes two more patterns when the reshard is between jit's
``in_shardings`` and ``out_shardings`` than at a ``with_sharding_constraint`` (how plans are
emitted, the default here); ``boundary=True`` prices the former. Both reproduce the compiled
HLO's collectives (kind and bytes) for every spec pair, all axis orders, measured with
``benchmarks/reshard_fidelity.py``: at a constraint for (64, 64), (8, 8, 4), (6, 8, 4) on
(2, 4); at the boundary for (64,), (24,), (64, 64), (12, 20), (8, 2), (8, 8, 4), (6, 8, 4),
(16, 64, 32) on meshes (8,), (2, 4), (4, 2).
A state (``cost.mesh_factors.State``) is the list of mesh-axis *factors* on each dim (major
to minor) plus the replicated factors, major first (an all-to-all may split an axis: the
part of size ``k`` of an axis is a factor of its own). Rules, in the order XLA tries them;
a rule may run the whole procedure again on a sub-step, "strict" meaning that sub-step may
not fall back to rule 8:

1. Same device count on every dim, other device order: one collective-permute of the shard
   (``((x, y),) → ((y, x),)``).
2. Same tile count and the per-dim counts a permutation of each other: all-to-alls. A pair
   (source dim, target dim) moves the source dim's *minor* factors (beyond the target dim's
   current count) behind the target dim's factors; disjoint pairs go in ONE all-to-all
   (``((x, y), ()) → ((), (x, y))`` is one all-to-all over both); a device order that still
   differs from the target's costs a collective-permute of the shard.
3. Source partly replicated, every target count a multiple of the source's: slice locally
   (free); the new factors come from the replicated ones, major first, dims in order; if
   that is not the target's order, a collective-permute of the target shard
   (``((), (x)) → ((), (y))`` on (2, 4): one permute).
4. Target partly replicated, every source count a multiple of the target's: if the source
   does not already hold the target's dims as prefixes, the shards are first permuted so it
   does (collective-permute of the source shard: ``((x, y),) → ((y),)`` permutes, then
   gathers x); then one all-gather per shrinking dim, last dim first.
5. Partly replicated source whose dims are the target's shifted by one: all-to-all, then on.
6. TryComplexReshardHandling, each kept only if its strict sub-steps reach the target:
   a. a dim split in two: ``X·Y`` on a dim ↔ ``X`` there and ``Y`` on another dim (one
      all-to-all of the minor part);
   b. (only at a jit boundary, see below) target partly replicated whose replicated
      factors lead a source dim that the target leaves unsplit: first reach the target with
      those factors kept on that dim, then gather them (``((), (x, y)) → ((y), ())``:
      all-to-all of y, then all-gather of x; at a sharding constraint: full rematerialization);
   c. target partly replicated: gather the first source dim whose count times the source's
      replication equals the target's replication, then go on: XLA gathers *before* it moves
      an axis, the all-to-all then runs on the gathered buffer (``((x), (y)) → ((y), ())``);
   d. source partly replicated, target fully tiled (at a jit boundary: any target): slice
      its replicated factors onto the first dim the target splits by a multiple of them,
      then go on (``((), (x)) → ((x, y), ())``: slice y onto dim 0, all-to-all x; at a jit
      boundary ``((), (x)) → ((y), ())`` is slice y, gather x: 4096 bytes, not 16384).
7. Dims with the same count in source and target are held (devices grouped by them) while
   the rest is resharded inside each group; then as from rule 1.
8. Otherwise XLA replicates the whole tensor (one all-gather per split dim, last dim first:
   ``((x), (y)) → ((), ())`` moves 8192 + 16384 bytes for a (64, 64) float32 on (2, 4)) and
   slices the target ("Involuntary full rematerialization").

Bytes follow ``cost.comm``'s records: all-gather its result, all-to-all and collective-permute
their buffer (kept as the divisor of the tensor's full bytes: the replay does not depend on
the dtype).
"""
from __future__ import annotations

import math

from .comm import ALL_GATHER, ALL_TO_ALL, COLLECTIVE_PERMUTE
from .mesh_factors import State, factors_size, norm_factors, split_factors


class Replay:
    """Replays XLA's reshard of one tensor; collects (kind, factors, divisor): the op moves
    the tensor's full bytes / divisor per device (so one replay serves every dtype)."""

    def __init__(self, shape, boundary=False):
        self.shape, self.boundary = shape, boundary

    def local(self, st: State) -> int:
        """The divisor of the full bytes that gives a shard of ``st``."""
        return st.tiles() * st.group

    # ---- entry: PartitionedHlo::ReshardNoCache -------------------------------------------
    def reshard(self, cur: State, dst: State, allow_full=True, shape=None):
        shape = shape or self.shape
        if cur == dst:
            return cur, []
        if cur.sizes() == dst.sizes() and factors_size(cur.rep) == factors_size(dst.rep):   # rule 1
            return dst, [(COLLECTIVE_PERMUTE.name, cur.dims, self.local(dst))]
        pairs = _all_to_all_dims(cur, dst)
        if pairs is not None and (r := self.all_to_all(cur, dst, pairs, shape)) is not None:  # rule 2
            return r
        if not dst.replicated() and cur.partial():
            for attempt in (self.from_partial_slice, self.partial_all_to_all):        # rules 3, 5
                if (r := attempt(cur, dst, shape)) is not None:
                    return r
        if not cur.replicated() and dst.partial():
            if (r := self.to_partial_gather(cur, dst, shape)) is not None:             # rule 4
                return r
        if cur.replicated():                                                          # slice
            return dst, []
        if not dst.replicated():
            if (r := self.complex(cur, dst, shape)) is not None:                      # rule 6
                return r
            if (r := self.group_equal_dims(cur, dst, shape)) is not None:             # rule 7
                return r
            if not allow_full:
                return cur, []
        _, ops = self.gather_dims(cur, range(len(cur.dims)))                          # rule 8
        return dst, ops

    def gather_dims(self, cur: State, dims):
        """All-gather the given dims, one collective per dim, last dim first."""
        ops = []
        for d in sorted(dims, reverse=True):
            if not cur.dims[d]:
                continue
            moved = cur.dims[d]
            cur = cur.with_dims(cur.dims[:d] + ((),) + cur.dims[d + 1:], moved + cur.rep)
            ops.append((ALL_GATHER.name, (moved,), self.local(cur)))
        return cur, ops

    # ---- rule 2: ReshardWithAllToAll / TryMultipleSourceTargetDims ------------------------
    def all_to_all(self, cur, dst, pairs, shape):
        ops = []
        eligible, rest, seen = [], [], set()
        for s, t in sorted(pairs, key=lambda p: p[1]):
            if s not in seen and t not in seen and shape[s] % cur.sizes()[s] == 0 \
                    and shape[t] % dst.sizes()[t] == 0:
                eligible.append((s, t))
                seen |= {s, t}
            else:
                rest.append((s, t))
        batches = [eligible] + [[p] for p in rest] if len(eligible) >= 2 else [[p] for p in pairs]
        for batch in batches:
            dims = list(cur.dims)
            moved = []
            for s, t in batch:
                parts = split_factors(dims[s], factors_size(dims[t]))
                if parts is None:
                    return None
                dims[s], m = parts
                dims[t] = dims[t] + m
                moved.extend(m)
            cur = cur.with_dims(dims, cur.rep)
            ops.append((ALL_TO_ALL.name, (tuple(moved),), self.local(cur)))
        if cur != dst:
            ops.append((COLLECTIVE_PERMUTE.name, dst.dims, self.local(dst)))
        return dst, ops

    # ---- rule 3: ReshardFromPartialReplicateWithDynamicSlice ------------------------------
    def from_partial_slice(self, cur, dst, shape):
        temp = _compatible(cur, dst)
        if temp is None:
            return None
        return dst, ([] if temp == dst else [(COLLECTIVE_PERMUTE.name, dst.dims, self.local(dst))])

    # ---- rule 4: ReshardToPartialReplicateWithAllGather ------------------------------------
    def to_partial_gather(self, cur, dst, shape):
        temp = _compatible(dst, cur)
        if temp is None:
            return None
        ops = []
        if temp != cur:
            ops.append((COLLECTIVE_PERMUTE.name, cur.dims, self.local(cur)))
        gathered = [d for d, (a, b) in enumerate(zip(temp.sizes(), dst.sizes())) if a != b]
        ops_g = []
        for d in sorted(gathered, reverse=True):
            moved = split_factors(temp.dims[d], dst.sizes()[d])[1]
            dims = list(temp.dims)
            dims[d] = split_factors(temp.dims[d], dst.sizes()[d])[0]
            temp = temp.with_dims(dims, moved + temp.rep)
            ops_g.append((ALL_GATHER.name, (moved,), self.local(temp)))
        return dst, ops + ops_g

    # ---- rule 5: ReshardPartialReplicateWithAllToAll ---------------------------------------
    def partial_all_to_all(self, cur, dst, shape):
        """From a partly replicated source whose dims are the target's shifted by one (XLA's
        ReshardPartialReplicateWithAllToAll; the tiled → partial direction is not taken by
        this XLA: measured)."""
        if not cur.partial() or dst.partial() or dst.replicated():
            return None
        n = len(dst.dims)
        psizes = cur.sizes() + (factors_size(cur.rep),)
        tsizes = dst.sizes()
        to_rep = max((i for i in range(n) if tsizes[i] > 1), default=None)
        if psizes[0] != 1 or to_rep is None or tsizes[to_rep] != psizes[-1] \
                or any(tsizes[i] != psizes[i + 1] for i in range(n)) \
                or norm_factors(sum(cur.dims, ()) + cur.rep) != norm_factors(sum(dst.dims, ())):
            return None
        tmp = dst.with_dims(dst.dims[:to_rep] + ((),) + dst.dims[to_rep + 1:], dst.dims[to_rep])
        pairs = _all_to_all_dims(cur, tmp)
        r = None if pairs is None else self.all_to_all(cur, tmp, pairs, shape)
        if r is None:
            return None
        st, more = self.reshard(r[0], dst, shape=shape)
        return st, r[1] + more

    # ---- rule 6: TryComplexReshardHandling -------------------------------------------------
    def complex(self, cur, dst, shape):
        if (r := self.merge_or_split(cur, dst, shape)) is not None:
            return r
        if self.boundary and (r := self.unreplicate_target(cur, dst, shape)) is not None:
            return r
        if dst.partial():                          # PatternMatchPartiallyReplicateDim
            rs = factors_size(cur.rep) if cur.partial() else 1
            for i, s in enumerate(cur.sizes()):
                if s != 1 and s * rs == factors_size(dst.rep):
                    mid, ops = self.gather_dims(cur, [i])
                    st, more = self.reshard(mid, dst, allow_full=False, shape=shape)
                    if st == dst:
                        return st, ops + more
                    break
        if cur.partial() and (self.boundary or not dst.partial()):
            rep = factors_size(cur.rep)
            for i, (s, t) in enumerate(zip(cur.sizes(), dst.sizes())):
                if t != s and s == 1 and t % rep == 0:
                    mid = cur.with_dims(cur.dims[:i] + (cur.rep,) + cur.dims[i + 1:], ())
                    st, more = self.reshard(mid, dst, allow_full=False, shape=shape)
                    if st == dst:
                        return st, more
                    break
        return None

    def unreplicate_target(self, cur, dst, shape):
        if not dst.partial():
            return None
        rep = factors_size(dst.rep)
        for i, (s, t) in enumerate(zip(cur.sizes(), dst.sizes())):
            head = split_factors(cur.dims[i], rep) if t == 1 and s != t else None
            if head is not None and head[0] == dst.rep:
                mid = dst.with_dims(dst.dims[:i] + (dst.rep,) + dst.dims[i + 1:], ())
                st, ops = self.reshard(cur, mid, allow_full=False, shape=shape)
                if st != mid:
                    return None
                st, more = self.reshard(mid, dst, allow_full=False, shape=shape)
                return (st, ops + more) if st == dst else None
        return None

    def merge_or_split(self, cur, dst, shape):
        if cur.replicated() or dst.replicated() or cur.partial() != dst.partial() \
                or factors_size(cur.rep) != factors_size(dst.rep):
            return None
        d1, d2 = [], []
        for i, (s, t) in enumerate(zip(cur.sizes(), dst.sizes())):
            if s == t:
                continue
            lo, hi = min(s, t), max(s, t)
            if lo == 1:
                d1.append(i)
            elif hi % lo == 0 and (-(-shape[i] // lo) * lo) % hi == 0:
                d2.append(i)
        cs, ds = cur.sizes(), dst.sizes()
        choice = None
        for i in d2:
            for j in d1:
                if cs[i] * cs[j] == ds[i] * ds[j]:
                    choice = (i, min(cs[i], ds[i]))
                    break
            if choice:
                break
        if choice is None:
            for i in d2:
                if cs[i] > ds[i]:
                    choice = (i, ds[i])
                    break
        if choice is None:
            return None
        i, k = choice
        a, b = split_factors(cur.dims[i], k), split_factors(dst.dims[i], k)
        if a is None or b is None:
            return None
        scur = cur.with_dims(cur.dims[:i] + a + cur.dims[i + 1:], cur.rep)
        sdst = dst.with_dims(dst.dims[:i] + b + dst.dims[i + 1:], dst.rep)
        local_i = shape[i] // cs[i]
        minor = local_i * factors_size(b[1])
        sshape = shape[:i] + (shape[i] // minor, minor) + shape[i + 1:]
        st, ops = self.reshard(scur, sdst, allow_full=False, shape=sshape)
        if st != sdst:
            return None
        merged = st.with_dims(st.dims[:i] + (st.dims[i] + st.dims[i + 1],) + st.dims[i + 2:], st.rep)
        if merged != dst:
            st, more = self.reshard(merged, dst, allow_full=False, shape=shape)
            if st != dst:
                return None
            ops = ops + more
        return dst, ops

    # ---- rule 7: group on dims with equal counts ----------------------------------------
    def group_equal_dims(self, cur, dst, shape):
        eq = [d for d, (s, t) in enumerate(zip(cur.sizes(), dst.sizes())) if s != 1 and s == t]
        if not eq:
            return None
        g = math.prod(cur.sizes()[d] for d in eq)
        gcur = State(tuple(() if d in eq else f for d, f in enumerate(cur.dims)), cur.rep, cur.group * g)
        gdst = State(tuple(() if d in eq else f for d, f in enumerate(dst.dims)), dst.rep, dst.group * g)
        gshape = tuple(n // cur.sizes()[d] if d in eq else n for d, n in enumerate(shape))
        st, ops = self.reshard(gcur, gdst, shape=gshape)
        back = State(tuple(cur.dims[d] if d in eq else f for d, f in enumerate(st.dims)), st.rep, cur.group)
        st, more = self.reshard(back, dst, shape=shape)
        return st, ops + more


def _all_to_all_dims(cur: State, dst: State):
    """XLA's GetReshardAllToAllSourceTargetDims: (source dim, target dim) pairs, or None."""
    if cur.replicated() or dst.replicated() or cur.partial() != dst.partial() or cur.tiles() != dst.tiles():
        return None
    cs, ds = cur.sizes(), dst.sizes()
    src_by: dict[int, list[int]] = {}
    dst_by: dict[int, list[int]] = {}
    for i, (s, t) in enumerate(zip(cs, ds)):
        if s != t:
            src_by.setdefault(s, []).append(i)
            dst_by.setdefault(t, []).append(i)
    if not src_by or sorted((k, len(v)) for k, v in src_by.items()) != sorted((k, len(v)) for k, v in dst_by.items()):
        return None
    cur_sizes = list(cs)
    out = []

    def remove(m, size, dim):
        m[size].remove(dim)
        if not m[size]:
            del m[size]

    while src_by:
        size = min(src_by)
        i = src_by[size][-1]
        t_i = ds[i]
        if t_i == size:
            remove(src_by, size, i)
            remove(dst_by, size, i)
            continue
        cands = src_by.get(t_i)
        if not cands:
            return None
        j = cands[0]
        if size == 1:
            for c in cands:
                j = c
                if ds[c] != 1:
                    break
        elif t_i % size == 0:
            for c in cands:
                j = c
                if ds[c] == size:
                    break
        else:
            return None
        out.append((j, i))
        remove(dst_by, t_i, i)
        src_by[size][-1] = j
        remove(src_by, t_i, j)
        cur_sizes[i], cur_sizes[j] = cur_sizes[j], cur_sizes[i]
    return out


def _subtiles(fine: State, coarse: State) -> bool:
    """Every device's tile of ``fine`` lies inside its tile of ``coarse``."""
    return all(f[:len(c)] == c for f, c in zip(fine.dims, coarse.dims))


def _compatible(partial: State, target: State):
    """XLA's PartialReplicateReshardCompatibleSharding: ``target``'s tile counts reached from the
    partly replicated ``partial`` by splitting its replicated factors (major first) onto the
    dims that grow, in dim order. None when a dim would shrink."""
    if not partial.partial():
        return None
    ps, ts = partial.sizes(), target.sizes()
    if any(t % p for p, t in zip(ps, ts)):
        return None
    if _subtiles(target, partial):
        return target
    dims, rep = [], partial.rep
    for d, (p, t) in enumerate(zip(ps, ts)):
        extra = ()
        if t > p:
            parts = split_factors(rep, t // p)
            if parts is None:
                return None
            extra, rep = parts
        dims.append(partial.dims[d] + extra)
    return partial.with_dims(dims, rep)

