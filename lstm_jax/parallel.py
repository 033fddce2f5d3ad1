"""``lstm_jax.parallel``: a stable import path for ``lstm_jax.layers.parallel`` (the same module object)."""

import sys

from lstm_jax.layers import parallel as _module

sys.modules[__name__] = _module
