"""Layer 5, other people's code in and out: ``interop`` (PyTorch and Flax weights into our
params), ``keras`` (Keras 3 layers' weights; it imports neither keras nor h5py), ``nnx`` and
``linen`` (the layers as Flax modules). Nothing below imports them; Flax is imported only when
``nnx`` or ``linen`` is."""
