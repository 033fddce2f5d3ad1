"""Generate text from a trained run: ``python sample.py --help`` (installed: ``lstm-jax-sample``).

A thin entry point; the script itself is ``lstm_jax/charlm/sample.py``.
"""

import sys

from lstm_jax.charlm.sample import main

if __name__ == "__main__":
    sys.exit(main())
