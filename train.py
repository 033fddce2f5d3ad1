"""Train the character-level language model: ``python train.py --help`` (installed: ``lstm-jax-train``).

A thin entry point; the script itself is ``lstm_jax/charlm/train.py``.
"""

import sys

from lstm_jax.charlm.train import main

if __name__ == "__main__":
    sys.exit(main())
