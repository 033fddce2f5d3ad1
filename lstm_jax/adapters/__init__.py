"""Layer 5, other people's code in and out: ``interop`` (PyTorch and Flax weights into our
params), ``nnx`` and ``linen`` (the layers as Flax modules). Nothing below imports them; Flax is
imported only when ``nnx`` or ``linen`` is."""
