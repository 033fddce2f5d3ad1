"""``lstm_jax.interop``: a stable import path for ``lstm_jax.adapters.interop`` (the same module object)."""

import sys

from lstm_jax.adapters import interop as _module

sys.modules[__name__] = _module
