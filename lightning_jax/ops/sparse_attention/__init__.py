"""GSA attention over a selection (SPEC §2.3) and the lightning indexer's scores: reference.py
(gather / dense_masked attention, indexer scores, float32-obvious), kernel.py (Pallas kernels,
config-free, GSAKernelOptions), api.py (the entry point: picks the implementation, flash
attention through jax.nn.dot_product_attention, runs per device under a mesh)."""
