"""Random draws over the batch in pipeline steps (``autopar.pipeline.rng_form``): a dropout
mask (or per-example keys) drawn over a micro-batch is made as that micro-batch's rows of the
whole batch's draw, so the pipelined step equals ``jax.jit`` of the loss over the whole batch;
a scalar PRNG key in the batch (a fresh key per step) is given whole to every micro-batch;
draws that cannot be made so are refused with a clear error."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from autopar import TrainingPlan, plan_training, stage_boundary
from autopar.pipeline.rng_form import RowsLoss, _mul64, counters, per_microbatch, rows_of
from conftest import make_cluster
from test_pipeline import assert_tree_close, reference_step

STAGES = [(0, 1, (1, 4), (4,)), (1, 2, (1, 4), (4,))]
KW = dict(cluster=make_cluster(4), nodes=2, remat="none", zero="none")
B = 4


def _abstract(tree):
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def test_each_micro_batch_draws_its_rows_of_the_whole_batch_draw():
    key = jax.random.key(3)

    def draws(p, b):
        h = b["x"] @ p
        per_example = jax.random.split(b["key"], h.shape[0])
        return dict(
            mask=jax.random.bernoulli(key, 0.7, h.shape),                        # closed-over key, axis 0
            example=jax.vmap(lambda k, r: jax.random.uniform(k, r.shape))(per_example, h),
            middle=jax.random.bits(jax.random.fold_in(b["key"], 1), (3, h.shape[0], 5), jnp.uint8),  # axis 1
            shared=jax.random.normal(key, (h.shape[1],)))                       # does not grow: shared
    p = jnp.ones((4, 6))
    batch = {"x": jax.random.normal(jax.random.key(1), (16, 4)), "key": jax.random.key(9)}
    full = draws(p, batch)
    mb = {"x": jax.ShapeDtypeStruct((4, 4), jnp.float32), "key": _abstract(batch["key"])}
    fn, mb_rows = per_microbatch(draws, _abstract(p), mb, B)
    assert isinstance(fn, RowsLoss) and sorted(fn.axes.values()) == [0, 0, 1] and fn.count == 3
    assert mb_rows[1].shape == (4,) and mb_rows[1].dtype == jnp.int32
    rows = rows_of(16)
    for m in range(B):
        got = jax.jit(fn)(p, ({"x": batch["x"][4 * m:4 * m + 4], "key": batch["key"]}, rows[4 * m:4 * m + 4]))
        for name in ("mask", "example"):
            np.testing.assert_array_equal(got[name], full[name][4 * m:4 * m + 4])
        np.testing.assert_array_equal(got["middle"], full["middle"][:, 4 * m:4 * m + 4])
        np.testing.assert_array_equal(got["shared"], full["shared"])
    # without draws over the batch, or with one micro-batch: the loss as it is
    plain = lambda p_, b_: jnp.sum(b_["x"] @ p_)  # noqa: E731
    assert per_microbatch(plain, _abstract(p), mb, B)[0] is plain
    assert per_microbatch(draws, _abstract(p), mb, 1)[0] is draws


def test_counters_are_the_whole_draws_flat_indices():
    """A block's threefry counters are its elements' flat indices in the whole draw, also past
    2**32 elements (64-bit sums of uint32 pairs; a small block of a huge draw tests them)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, size=64, dtype=np.uint64)
    for c in (1, 3, 2**16 + 7, 2**32 - 1, 2**32 + 5, 3 * 2**40 + 12345, 2**63 + 2**31):
        hi, lo = jax.jit(lambda v, c=c: _mul64(v, c))(jnp.asarray(x.astype(np.uint32)))
        want = [(int(v) * c) % 2**64 for v in x]
        got = [(int(h) << 32) | int(lo_) for h, lo_ in zip(np.asarray(hi), np.asarray(lo))]
        assert got == want, c
    for shape, axis, B, m in (((3, 4, 5), 0, 4, 2), ((3, 4, 5), 1, 4, 3), ((2, 3), 0, 2**31, 2**31 - 1),
                              ((3, 2, 5), 1, 2**31 + 7, 2**31 + 3), ((2, 3, 4), 2, 3 * 2**30, 2**31 + 11)):
        full = list(shape)
        full[axis] *= B
        hi, lo = jax.jit(lambda m_, s=shape, a=axis, b=B: counters(s, a, b, m_))(jnp.uint32(m))
        got = (np.asarray(hi).astype(object) << 32) | np.asarray(lo).astype(object)
        idx = np.indices(shape).astype(object)
        idx[axis] += m * shape[axis]
        want = sum(idx[k] * int(np.prod(full[k + 1:], dtype=object)) for k in range(len(shape)))
        assert (got == want).all(), (shape, axis, B, m)


def _block(p, x, key, i):
    h = jnp.tanh(x @ p["w"])
    keep = jax.random.bernoulli(jax.random.fold_in(key, i), 0.8, h.shape)
    return jnp.where(keep, h / 0.8, 0.0)


def dropout_mlp(params, batch):
    x = batch["x"]
    for i, p in enumerate(params):
        x = _block(p, stage_boundary(x) if i else x, batch["dropout"], i)
    return jnp.mean(jnp.square(x - batch["y"]))


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(0)
    params = [{"w": jnp.asarray(rng.normal(size=(32, 32)) / 6, jnp.float32)} for _ in range(2)]
    batch = {"x": jnp.asarray(rng.normal(size=(16, 8, 32)), jnp.float32),
             "y": jnp.asarray(rng.normal(size=(16, 8, 32)), jnp.float32), "dropout": jax.random.key(5)}
    return params, batch


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_dropout_with_a_fresh_key_per_step_equals_jit_over_the_batch(devices8, mlp, schedule):
    params, batch = mlp
    opt = optax.sgd(0.5)
    tplan = plan_training(dropout_mlp, params, batch, optimizer=opt, num_microbatches=B, schedule=schedule,
                          stages=STAGES, **KW)
    assert tplan.batch_draws == 2 and "random draws over the batch (dropout masks …): 2" in tplan.report()
    # the plan's JSON keeps the key's dtype: a loaded plan runs too
    loaded = TrainingPlan.from_json(tplan.to_json())
    assert "key<fry>" in loaded.batch_dtypes
    ref = reference_step(dropout_mlp, opt)
    for plan in (tplan, loaded):
        step = plan.apply(dropout_mlp, opt, donate=False)
        got = want = (params, opt.init(params))
        for s in range(2):
            b = dict(batch, dropout=jax.random.key(100 + s))
            got, want = step(*got[:2], b), ref(*want[:2], b)
            assert_tree_close(got, want)
        # the forward alone draws the same masks: the whole batch's loss
        on_host = jax.tree_util.tree_map(np.asarray, got[0])
        np.testing.assert_allclose(step.evaluate(got[0], b), dropout_mlp(on_host, b), rtol=1e-5)


def test_dropout_inside_jax_checkpoint_with_recomputed_stages(devices8, mlp):
    """Each block under the user's jax.checkpoint (the draw is rewritten inside it, the
    checkpoint re-made around it), the stages planned with remat "full" on top."""
    params, batch = mlp
    block = jax.checkpoint(_block, static_argnums=(3,), policy=jax.checkpoint_policies.nothing_saveable)

    def loss(params, batch):
        x = batch["x"]
        for i, p in enumerate(params):
            x = block(p, stage_boundary(x) if i else x, batch["dropout"], i)
        return jnp.mean(jnp.square(x - batch["y"]))
    opt = optax.sgd(0.5)
    tplan = plan_training(loss, params, batch, optimizer=opt, num_microbatches=B, stages=STAGES,
                          **dict(KW, remat="full"))
    assert tplan.batch_draws == 2 and {s.remat for s in tplan.stages} == {"full"}
    step, ref = tplan.apply(loss, opt, donate=False), reference_step(loss, opt)
    got = want = (params, opt.init(params))
    for s in range(2):
        b = dict(batch, dropout=jax.random.key(100 + s))
        got, want = step(*got[:2], b), ref(*want[:2], b)
        assert_tree_close(got, want)


def test_a_flax_linen_nn_scan_decoder_with_dropout_equals_jit(devices8):
    """GPT-2's attention and residual dropout in the zoo's nn.scan decoder (``split_rngs``
    dropout: a key per layer), the scan kept whole in one stage accumulating 4 micro-batches:
    the draws rewritten inside the scan's body (a scan split into stages with dropout in its
    body: ``test_a_scanned_stack_with_dropout_and_aux_runs_stacked_and_split``; this decoder
    split into 2 stages was checked by hand, equal)."""
    from examples.zoo import linen_transformer as zoo
    opt = optax.adamw(1e-3, eps=1e-3)
    ref = reference_step(zoo.dropout_loss_fn, opt)
    params, _, tokens = zoo.linen_scan_step_args("tiny")
    batch = {"tokens": tokens, "dropout": jax.random.key(0)}
    tplan = plan_training(zoo.dropout_loss_fn, params, batch, optimizer=opt, num_microbatches=B, num_stages=1,
                          split_scans=False, **KW)
    assert tplan.num_stages == 1 and tplan.scan_split is None
    # the two residual dropouts in the scan's body; the attention-probability mask is drawn
    # once for the whole batch (flax's broadcast_dropout: shape (1, 1, T, T)), left as it is
    assert tplan.batch_draws == 2
    step = tplan.apply(zoo.dropout_loss_fn, opt, donate=False)
    got = want = (params, opt.init(params))
    for s in range(2):
        b = dict(batch, dropout=jax.random.key(100 + s))
        got, want = step(*got[:2], b), ref(*want[:2], b)
        assert_tree_close(got[2], want[2])
        assert_tree_close(got[1], want[1])     # Adam's moments: the gradients (tests/test_zoo.py)


def test_draws_that_cannot_be_made_per_micro_batch_are_refused(devices8, mlp):
    params, batch = mlp
    opt = optax.sgd(0.1)
    kw = dict(optimizer=opt, num_microbatches=B, stages=STAGES, **KW)
    with jax.threefry_partitionable(False):
        with pytest.raises(ValueError, match=r"dropout_mlp draws random bits of shape \(4, 8, 32\) at .*"
                                             r"jax_threefry_partitionable off.*num_microbatches=1"):
            plan_training(dropout_mlp, params, batch, **kw)
    rbg = dict(batch, dropout=jax.random.key(0, impl="rbg"))
    with pytest.raises(ValueError, match=r"from a key<rbg> key; per micro-batch only threefry keys"):
        plan_training(dropout_mlp, params, rbg, **kw)

    def in_cond(p, b):
        x = stage_boundary(jnp.tanh(b["x"] @ p[0]["w"]))
        x = jax.lax.cond(jnp.sum(x) > 0, lambda y: _block(p[1], y, b["dropout"], 1), lambda y: y, x)
        return jnp.mean(x)
    with pytest.raises(ValueError, match=r"in_cond draws over the batch at .* inside cond"):
        plan_training(in_cond, params, batch, **kw)

    def fixed_rows(p, b):   # shapes written for one micro-batch size
        return dropout_mlp(p, dict(b, x=b["x"].reshape(4, 8, 32)))
    with pytest.raises(ValueError, match=r"fixed_rows makes random draws; .*traced for twice the micro-batch's rows, "
                                         r"which failed \(TypeError"):
        plan_training(fixed_rows, params, batch, **kw)
    legacy = dict(batch, dropout=jax.random.PRNGKey(0))   # a raw uint32[2] key: cut like a batch leaf
    with pytest.raises(ValueError, match=r"batch leaf \['dropout'\] has shape \(2,\).*a PRNG key.*jax.random.key"):
        plan_training(dropout_mlp, params, legacy, **kw)
    # one micro-batch draws over the whole batch: nothing to make per micro-batch
    tplan = plan_training(dropout_mlp, params, batch, optimizer=opt, num_microbatches=1, stages=STAGES, **KW)
    assert tplan.batch_draws == 0


def test_a_scanned_stack_with_dropout_and_aux_runs_stacked_and_split(devices8):
    """lax.scan over stacked layers, dropout from a key in the batch (a key per layer), the
    loss returning (loss, aux) (``has_aux``): the stacked step and the split form
    (``stacked=False``) equal jax.jit's, aux included."""
    from autopar.pipeline.loss_form import full_batch_loss
    from pipeline_multihost_worker import scan_loss, scan_params_and_batch

    def with_aux(p, b):
        loss = scan_loss(p, b)
        return loss, {"loss": loss, "embedded": b["x"] @ p["emb"]}
    params, batch = scan_params_and_batch()
    opt = optax.adam(1e-2)
    tplan = plan_training(with_aux, params, batch, optimizer=opt, num_microbatches=B, num_stages=2, has_aux=True,
                          **KW)
    assert tplan.scan_split is not None and tplan.aux_grows == [True, False] and tplan.batch_draws == 1
    reference = reference_step(full_batch_loss(with_aux, has_aux=True), opt, has_aux=True)
    for stacked in (True, False):
        step = tplan.apply(with_aux, opt, donate=False, stacked=stacked)
        mine = params if stacked else step.split(params)
        got, want = (mine, opt.init(mine)), (params, opt.init(params))
        for _ in range(2):
            got, want = step(*got[:2], batch), reference(*want[:2], batch)
            assert_tree_close(got[2], want[2])
            assert_tree_close(got[1] if stacked else step.stack(got[1]), want[1])


def test_a_flax_nnx_module_with_dropout_and_a_scalar_step_in_the_batch(devices8):
    """flax NNX: ``nnx.Dropout`` given call-time ``nnx.Rngs`` from the batch's key folded with
    the batch's step number (scalar leaves: every micro-batch gets them whole)."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up, self.down = nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 16, rngs=rngs)
            self.drop = nnx.Dropout(0.2)

        def __call__(self, x, rngs):
            return self.down(stage_boundary(self.drop(jax.nn.relu(self.up(x)), rngs=rngs)))
    graphdef, params = nnx.split(Net(nnx.Rngs(params=0)), nnx.Param)

    def loss(params, batch):
        rngs = nnx.Rngs(dropout=jax.random.fold_in(batch["dropout"], batch["step"]))
        return jnp.mean((nnx.merge(graphdef, params)(batch["x"], rngs) - batch["y"]) ** 2)
    rng = np.random.default_rng(0)
    batch = {"x": jnp.asarray(rng.normal(size=(16, 16)), jnp.float32), "dropout": jax.random.key(3),
             "y": jnp.asarray(rng.normal(size=(16, 16)), jnp.float32), "step": jnp.int32(0)}
    opt = optax.sgd(0.1)
    tplan = plan_training(loss, params, batch, optimizer=opt, num_microbatches=B, num_layers=2, stages=STAGES, **KW)
    assert tplan.batch_draws == 1
    step, ref = tplan.apply(loss, opt, donate=False), reference_step(loss, opt)
    got = want = (params, opt.init(params))
    for s in range(2):
        b = dict(batch, step=jnp.int32(s))
        got, want = step(*got[:2], b), ref(*want[:2], b)
        assert_tree_close(got, want)
