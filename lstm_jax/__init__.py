"""lstm_jax: LSTM, GRU and RNN cells as pure JAX functions, and a character-level text generator."""

from lstm_jax.cells import GRUCell, LSTMCarry, LSTMCell, RNNCell, make_cell
from lstm_jax.errors import (
    CheckpointError,
    ConfigError,
    CorpusError,
    LstmJaxError,
    NonFiniteLossError,
)
from lstm_jax.sequence import RecurrentStack, reverse_padded, scan_cell

__version__ = "0.1.0"

__all__ = [
    "LSTMCell",
    "GRUCell",
    "RNNCell",
    "LSTMCarry",
    "make_cell",
    "scan_cell",
    "reverse_padded",
    "RecurrentStack",
    "LstmJaxError",
    "ConfigError",
    "CorpusError",
    "CheckpointError",
    "NonFiniteLossError",
]
