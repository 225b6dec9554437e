"""Running an optimizer update split into rounds (``autopar.pipeline.update_split``) in a
``PipelineStep``: per round, each stage's jitted program (where this process has the stage),
then the round's packs of partials to the stages reading them, in one order in every process
(a move across processes is the multi-host transfer, which all its processes issue)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ..emit import interpret
from ..trace import Lit, Program
from .update_split import Round, UpdateSplit, _size

_wsc = jax.lax.with_sharding_constraint


class SplitUpdate:
    """Runs an :class:`UpdateSplit` for a ``PipelineStep``: per round, each stage's program
    (where this process has the stage), then that round's packs of partials to every other
    stage (the same order in every process)."""

    def __init__(self, step, split: UpdateSplit):
        self.step, self.split = step, split
        prog = split.program
        self.inv = {v: n for n, v in enumerate(prog.invars)}   # an input's position: params, state, grads
        self.pack_of: dict = {}   # partial -> (pack key (stage, round, group), offset)
        for row in split.rounds:
            for rd in row:
                for g, ids in enumerate(rd.sends if rd is not None else ()):
                    off = 0
                    for v in ids:
                        self.pack_of[v] = ((rd.stage, rd.round, g), off)
                        off += _size(prog.values[v])
        # the last round of each stage reading each value: where a parameter or state leaf is donated
        self.last: dict = {}
        self.donated: dict = {}   # (stage, round) -> the value ids its program donates
        for row in split.rounds:
            for rd in row:
                for v in (rd.ins if rd is not None else ()):
                    self.last[(rd.stage, v)] = rd.round
        self.fns = {(rd.stage, rd.round): self._compile(rd) for row in split.rounds for rd in row if rd is not None}
        # the stages reading each pack (it is sent to those only)
        self.readers: dict = {}
        for row in split.rounds:
            for rd in row:
                for v in (rd.recv if rd is not None else ()):
                    self.readers.setdefault(self.pack_of[v][0], set()).add(rd.stage)
        for j, o in enumerate(prog.outvars[len(split.owner):]):  # a state leaf returned by another stage
            if isinstance(o, int) and o in self.pack_of:
                self.readers.setdefault(self.pack_of[o][0], set()).add(split.state_home[j])

    def _layout(self, k: int, v: int):
        """Layout on stage k of an input of the update: a parameter or its gradient as its
        optimizer state is laid out (ZeRO-1's slices, else the parameter's own sharding), a state
        leaf as the runtime keeps it; None for other values."""
        step = self.step
        P, S = len(self.split.owner), len(self.split.state_home)
        n = self.inv.get(v)
        if n is None:
            return None
        if n < P or n >= P + S:  # a parameter, or its gradient
            return step.execs[k].opt_sh.get(n if n < P else n - P - S)
        return step.state_sharding(k, n - P)

    def _compile(self, rd: Round):
        step, prog = self.step, self.split.program
        P = len(self.split.owner)
        repl = step.execs[rd.stage].repl
        made = list(dict.fromkeys(o for e in rd.eqns for o in e.outputs))
        sub = Program(values=prog.values, invars=list(rd.ins) + list(rd.recv), outvars=made,
                      consts={c: prog.consts[c] for e in rd.eqns for c in e.inputs
                              if isinstance(c, int) and c in prog.consts},
                      eqns=list(rd.eqns), in_tree=None, out_tree=None, regions={}, customs={})
        run = interpret(sub, {}, {}, None) if rd.eqns else None
        in_sh = [self._layout(rd.stage, v) for v in rd.ins]
        out_sh = {o: self._layout(rd.stage, prog.invars[P + j]) for j, o in enumerate(prog.outvars[P:])
                  if isinstance(o, int) and o in rd.outs}
        p_sh = {i: step.param_sharding[i] for i, _, _ in rd.applies}
        unpack = self._unpack
        # with ``donate``: a parameter, state leaf or gradient in the round reading it last, where
        # an output of its shape and dtype can take its buffer
        vals, free = prog.values, {}
        for v in [p for _, p, _ in rd.applies] + list(rd.outs):
            key = (vals[v].shape, str(vals[v].dtype))
            free[key] = free.get(key, 0) + 1
        donated = set()
        for v in rd.ins:
            key = (vals[v].shape, str(vals[v].dtype))
            if step.donate and v in self.inv and self.last[(rd.stage, v)] == rd.round and free.get(key, 0):
                free[key] -= 1
                donated.add(v)
        self.donated[(rd.stage, rd.round)] = [v for v in rd.ins if v in donated]
        order = {v: n for n, v in enumerate(rd.ins)}

        def fn(don, keep, packs):
            ins = [None] * len(rd.ins)
            for v, x in zip([v for v in rd.ins if v in donated], don):
                ins[order[v]] = x
            for v, x in zip([v for v in rd.ins if v not in donated], keep):
                ins[order[v]] = x
            ins = [_wsc(x, s) if s is not None else x for x, s in zip(ins, in_sh)]
            env = dict(zip(rd.ins, ins))
            env.update((v, unpack(v, packs)) for v in rd.recv)
            if run is not None:
                env.update(zip(made, run(*ins, *[env[v] for v in rd.recv])))

            def val(v):
                return jnp.full(v.shape, v.val, v.dtype) if isinstance(v, Lit) else env[v]
            new_p = []
            for i, p, u in rd.applies:  # optax.apply_updates, in the optimizer state's layout
                new_p.append(_wsc(jnp.asarray(env[p] + val(u)).astype(env[p].dtype), p_sh[i]))
            kept = [_wsc(env[v], out_sh[v]) if v in out_sh else env[v] for v in rd.outs]
            sent = [_wsc(jnp.concatenate([jnp.ravel(env[v]) for v in ids]), repl) for ids in rd.sends]
            return new_p, kept, sent
        return jax.jit(fn, donate_argnums=(0,))

    def _unpack(self, v, packs):
        key, off = self.pack_of[v]
        val = self.split.program.values[v]
        return packs[key][off:off + _size(val)].reshape(val.shape)

    def __call__(self, owner_params, grads, o_leaves):
        step, split, prog = self.step, self.split, self.split.program
        P, S = len(split.owner), len(split.state_home)
        n_stages = len(step.execs)
        env = [dict() for _ in range(n_stages)]      # per stage: value id -> array
        packs = [dict() for _ in range(n_stages)]    # per stage: pack key -> packed partials
        inv = self.inv

        def place(k, v):
            n = inv[v]
            if n < P:
                return owner_params[n]
            if n >= P + S:
                return grads[n - P - S]
            return step._place_opt(o_leaves[n - P], n - P, k, step.state_sharding(k, n - P))
        # every stage's inputs first (in one order in every process: placing a state leaf may
        # move it from another process)
        for row in split.rounds:
            for rd in row:
                for v in (rd.ins if rd is not None else ()):
                    if v in inv and v not in env[rd.stage]:
                        env[rd.stage][v] = place(rd.stage, v)
        new_p, new_o = [None] * P, [None] * S
        for row in split.rounds:
            for rd in row:
                if rd is None or not step._here(rd.stage):
                    continue
                k = rd.stage
                don = self.donated[(k, rd.round)]
                p_out, kept, sent = self.fns[(k, rd.round)]([env[k][v] for v in don],
                                                            [env[k][v] for v in rd.ins if v not in don], packs[k])
                for (i, _, _), x in zip(rd.applies, p_out):
                    new_p[i] = x
                env[k].update(zip(rd.outs, kept))
                for g, x in enumerate(sent):
                    packs[k][(k, rd.round, g)] = x
            for rd in row:
                for g, ids in enumerate(rd.sends if rd is not None else ()):
                    key, src = (rd.stage, rd.round, g), rd.stage
                    aval = jax.ShapeDtypeStruct((sum(_size(prog.values[v]) for v in ids),), prog.values[ids[0]].dtype)
                    for dst in sorted(self.readers.get(key, ())):
                        if dst != src:
                            x = step._move(packs[src].get(key), step.execs[src].repl, step.execs[dst].repl, aval)
                            if step._here(dst):
                                packs[dst][key] = x
        for j, o in enumerate(prog.outvars[P:]):
            k = split.state_home[j]
            if not step._here(k):
                continue
            if isinstance(o, Lit):
                new_o[j] = jax.device_put(jnp.full(o.shape, o.val, o.dtype), step.execs[k].repl)
            elif o in env[k]:
                new_o[j] = env[k][o]
            elif o in inv:  # a state leaf passed through
                new_o[j] = place(k, o)
            else:
                new_o[j] = jax.device_put(self._unpack(o, packs[k]), step.execs[k].repl)
        return new_p, new_o
