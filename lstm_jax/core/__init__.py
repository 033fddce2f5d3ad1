"""Layer 1, the pure core: errors, matrix products with a compute dtype, the cells, the plain
``lax.scan`` driver, and read-only facts about the host. Knows nothing of kernels, devices,
corpora or files (but one atomic-write helper the layers above share)."""
