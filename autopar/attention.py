"""``jax.nn.dot_product_attention`` as one planned operation.

While autopar traces (``autopar.trace.trace``), ``jax.nn.dot_product_attention`` is replaced
by :func:`planned_dot_product_attention`, which binds two primitives of our own instead of
the einsum/softmax ops (whose S×S scores the planner would charge as memory) or the cuDNN
custom call (which cannot be traced on a machine without cuDNN):

* ``dot_product_attention`` (q, k, v[, mask]) → out, FLOPs 4·B·N·T·S·H;
* ``dot_product_attention_bwd`` (q, k, v[, mask], out, dout) → (dq, dk, dv), FLOPs 2.5× the
  forward's (flash-style: the scores are recomputed, 5 matmuls).

The gradient: a ``jax.custom_vjp`` whose forward binds the first primitive (residuals q, k,
v and out: no S×S buffer is saved between forward and backward) and whose backward binds
the second. Both are therefore separate *planned* ops of a training step (each gets its
own sharding and costs), and the saved-for-backward memory is what a flash/cuDNN kernel
keeps. Their implementations call the real ``jax.nn.dot_product_attention`` with the
``implementation`` the user asked for (the backward through ``jax.vjp`` of it), so on a GPU
``"cudnn"`` runs cuDNN; on a backend without cuDNN (a CPU) ``"cudnn"`` runs as ``"xla"`` and
a ``CudnnOnCpuWarning`` says so (once per process, when the program is lowered).
A JVP rule (``jax.jvp`` of the real function) makes the forward primitive differentiable
again outside the trace (pipeline stages take ``jax.vjp`` of the planned program).

Intercepted: 4-D (B, T, N, H) inputs, no ``bias``, no ``query_seq_lengths`` /
``key_value_seq_lengths`` / ``local_window_size``, a mask of rank 4 if any; other calls
run the original function (traced into ordinary ops, as before). Only calls through the
attribute ``jax.nn.dot_product_attention`` are seen (a ``from jax.nn import
dot_product_attention`` done before tracing keeps the original).
"""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings

import jax
from jax._src.interpreters import ad
from jax.extend import core as jcore
from jax.interpreters import mlir

_ORIGINAL = jax.nn.dot_product_attention
FWD_NAME, BWD_NAME = "dot_product_attention", "dot_product_attention_bwd"
BWD_FLOPS_FACTOR = 2.5

DPA = jcore.Primitive(FWD_NAME)
DPA_BWD = jcore.Primitive(BWD_NAME)
DPA_BWD.multiple_results = True


class CudnnOnCpuWarning(UserWarning):
    """implementation="cudnn" executed as "xla" on a backend without cuDNN."""


_warned = set()


def runs_as(implementation, platform: str | None = None):
    """The implementation that actually runs on ``platform`` (default: JAX's backend)."""
    platform = platform or jax.default_backend()
    if implementation == "cudnn" and platform not in ("gpu", "cuda", "rocm"):
        if platform not in _warned:
            _warned.add(platform)
            warnings.warn(f"autopar: dot_product_attention(implementation='cudnn') runs as implementation='xla' on "
                          f"{platform} (no cuDNN); the plan is the same, only the kernel differs", CudnnOnCpuWarning,
                          stacklevel=3)
        return "xla"
    return implementation


def cudnn_note(platform: str | None = None) -> str | None:
    """The report's line for a plan with implementation="cudnn" attention (None on a GPU)."""
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        return None
    return (f"note: dot_product_attention(implementation='cudnn') is planned as one fused op; on this {platform} "
            "backend (no cuDNN) plan.apply runs it as implementation='xla'")


def _call(q, k, v, mask, *, scale, is_causal, implementation, platform=None):
    return _ORIGINAL(q, k, v, mask=mask, scale=scale, is_causal=is_causal,
                     implementation=runs_as(implementation, platform))


def _fwd_impl(q, k, v, *mask, scale, is_causal, implementation, platform=None):
    return _call(q, k, v, mask[0] if mask else None, scale=scale, is_causal=is_causal,
                 implementation=implementation, platform=platform)


def _bwd_impl(q, k, v, *rest, scale, is_causal, implementation, platform=None):
    mask, (out, g) = rest[:-2], rest[-2:]
    del out  # a flash/cuDNN backward reads it; the XLA one recomputes the scores
    fwd = functools.partial(_fwd_impl, scale=scale, is_causal=is_causal, implementation=implementation,
                            platform=platform)
    _, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, *mask), q, k, v)
    return list(vjp(g))


def _fwd_abstract(q, k, v, *mask, **params):
    return q.update(shape=tuple(q.shape[:-1]) + (v.shape[-1],), dtype=q.dtype)


def _bwd_abstract(q, k, v, *rest, **params):
    return [q.update(shape=q.shape, dtype=q.dtype), k.update(shape=k.shape, dtype=k.dtype),
            v.update(shape=v.shape, dtype=v.dtype)]


def _lowering(impl, multiple_results):
    def rule(ctx, *args, **params):
        platform = ctx.module_context.platforms[0] if getattr(ctx.module_context, "platforms", None) else None
        fn = functools.partial(impl, platform=platform, **params)
        return mlir.lower_fun(fn, multiple_results=multiple_results)(ctx, *args)
    return rule


def _fwd_jvp(primals, tangents, **params):
    q, k, v, *mask = primals
    tq, tk, tv = (ad.instantiate_zeros(t) for t in tangents[:3])
    return jax.jvp(lambda q, k, v: _fwd_impl(q, k, v, *mask, **params), (q, k, v), (tq, tk, tv))


DPA.def_impl(_fwd_impl)
DPA.def_abstract_eval(_fwd_abstract)
DPA_BWD.def_impl(_bwd_impl)
DPA_BWD.def_abstract_eval(_bwd_abstract)
mlir.register_lowering(DPA, _lowering(_fwd_impl, False))
mlir.register_lowering(DPA_BWD, _lowering(_bwd_impl, True))
ad.primitive_jvps[DPA] = _fwd_jvp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, mask, scale, is_causal, implementation):
    return DPA.bind(q, k, v, *mask, scale=scale, is_causal=is_causal, implementation=implementation)


def _attention_fwd(q, k, v, mask, scale, is_causal, implementation):
    out = DPA.bind(q, k, v, *mask, scale=scale, is_causal=is_causal, implementation=implementation)
    return out, (q, k, v, mask, out)


def _attention_bwd(scale, is_causal, implementation, res, g):
    q, k, v, mask, out = res
    dq, dk, dv = DPA_BWD.bind(q, k, v, *mask, out, g, scale=scale, is_causal=is_causal,
                              implementation=implementation)
    return dq, dk, dv, tuple(None for _ in mask)


_attention.defvjp(_attention_fwd, _attention_bwd)


def planned_dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                                  query_seq_lengths=None, key_value_seq_lengths=None, local_window_size=None,
                                  implementation=None, **kwargs):
    """Drop-in for ``jax.nn.dot_product_attention`` while autopar traces (see module doc)."""
    q, k, v = (jax.numpy.asarray(x) for x in (query, key, value))
    if (bias is not None or query_seq_lengths is not None or key_value_seq_lengths is not None or kwargs
            or local_window_size is not None or q.ndim != 4 or k.ndim != 4 or v.ndim != 4
            or (mask is not None and jax.numpy.ndim(mask) != 4)):
        return _ORIGINAL(query, key, value, bias, mask, scale=scale, is_causal=is_causal,
                         query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
                         local_window_size=local_window_size, implementation=implementation, **kwargs)
    scale = float(1.0 / q.shape[-1] ** 0.5) if scale is None else float(scale)
    masks = () if mask is None else (jax.numpy.asarray(mask),)
    return _attention(q, k, v, masks, scale, bool(is_causal), implementation)


_lock = threading.RLock()
ENABLED = True   # False: trace dot_product_attention into its ordinary ops (the planner's old view)


@contextlib.contextmanager
def intercept():
    """Within this block ``jax.nn.dot_product_attention`` is :func:`planned_dot_product_attention`."""
    if not ENABLED:
        yield
        return
    with _lock:
        saved = jax.nn.dot_product_attention
        jax.nn.dot_product_attention = planned_dot_product_attention
        try:
            yield
        finally:
            jax.nn.dot_product_attention = saved
