"""``lstm_jax.linen``: a stable import path for ``lstm_jax.adapters.linen`` (the same module object)."""

import sys

from lstm_jax.adapters import linen as _module

sys.modules[__name__] = _module
