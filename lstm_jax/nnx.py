"""``lstm_jax.nnx``: a stable import path for ``lstm_jax.adapters.nnx`` (the same module object)."""

import sys

from lstm_jax.adapters import nnx as _module

sys.modules[__name__] = _module
