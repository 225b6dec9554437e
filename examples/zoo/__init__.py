"""Model zoo: models written the way the JAX ecosystem writes them, each as an optax training
step, for ``benchmarks/zoo.py`` and ``tests/test_zoo.py``.

One module per family; each defines ``<name>_step`` and ``<name>_step_args(size="tiny"|"full",
abstract=False)`` (so ``autopar plan examples/zoo/<module>.py:<name>_step`` works):

* ``linen_transformer``: flax linen decoder, unrolled (``linen_step``) and ``nn.scan`` (``linen_scan_step``)
* ``nnx_transformer``:   flax NNX decoder, unrolled (``nnx_step``) and ``nnx.scan`` (``nnx_scan_step``)
* ``eqx_transformer``:   equinox decoder (``eqx.partition``/``combine``), ``eqx_step``
* ``moe``:               flax linen GShard MoE decoder, top-2 routing with ``lax.top_k``, ``moe_step``
* ``vit``:               flax linen ViT (conv patch embedding), ``vit_step``
* ``llama``:             ``examples/llama.py`` as it is: ``llama_step`` (unrolled, einsum attention),
                         ``llama_scan_step`` (``lax.scan``, ``jax.nn.dot_product_attention``)

Every step is ``(params, opt_state, batch) -> (params, opt_state, loss)`` with AdamW
(``common.OPTIMIZER``; llama: ``examples/llama.py``'s own). For exact numerics compare the loss
and the optimizer state (first / second moments), not the parameters: AdamW turns float noise
on ~zero gradients into ±lr updates (tests/test_zoo.py).
"""
