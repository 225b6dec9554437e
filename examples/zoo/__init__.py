"""Model zoo: models written the way the JAX ecosystem writes them, each as an optax training
step, for ``benchmarks/zoo.py`` and ``tests/test_zoo.py``.

One module per family; each defines ``<name>_step`` and ``<name>_step_args(size="tiny"|"full",
abstract=False)`` (so ``autopar plan examples/zoo/<module>.py:<name>_step`` works):

* ``linen_transformer``: flax linen decoder, unrolled (``linen_step``) and ``nn.scan`` (``linen_scan_step``)
* ``nnx_transformer``:   flax NNX decoder, unrolled (``nnx_step``) and ``nnx.scan`` (``nnx_scan_step``)
* ``eqx_transformer``:   equinox decoder (``eqx.partition``/``combine``), ``eqx_step``
* ``moe``:               flax linen GShard MoE decoder, top-2 routing with ``lax.top_k``, ``moe_step``
* ``vit``:               flax linen ViT (conv patch embedding), ``vit_step``

Every step is ``(params, opt_state, batch) -> (params, opt_state, loss)`` with AdamW
(``common.OPTIMIZER``); ``<name>_sgd_step`` (same arguments, SGD state) is there for exact
numerics checks (AdamW turns float noise on ~zero gradients into ±lr updates).
"""
