"""lstm_jax: LSTM, GRU and RNN cells as pure JAX functions, and a character-level text generator.

The library layers, each importing only from the ones above it:

* ``cells`` — ``LSTMCell``, ``GRUCell``, ``RNNCell``, ``LeakyRNNCell``: ``init``, ``initial_carry``, ``apply``.
* ``sequence`` / ``fused`` — ``scan_cell`` and ``RecurrentStack`` over ``lax.scan``; the
  custom-VJP layers ``fused_lstm``, ``fused_gru`` and ``fused_rnn``.
* ``onednn`` — ``onednn_lstm``, ``onednn_gru``: the LSTM and GRU layers as oneDNN's RNN primitives
  on CPU (an optional extension built by ``pip install``; ``scan_cell(impl='auto')`` takes them
  where they measured faster).
* ``interop`` — ``from_torch``, ``from_flax_lstm``, ``from_flax_gru``.
* ``model`` — ``CharLM``, the character language model.
* ``data`` — ``load_corpus``, ``split_documents``, ``Vocabulary``.
* ``training``, ``sampling``, ``checkpoint`` — ``Trainer``, ``scan_steps`` (your own train step,
  several per call), ``generate``, ``Checkpointer``.
* ``parallel`` — the data-parallel mesh over every device of every process (``data_mesh``,
  ``shard_batch``, ``replicate``, ``value_and_grad``, ``initialize``, ``cpu_devices_per_core``).

* ``runtime`` — ``tune_malloc``: on glibc, ``import lstm_jax`` keeps freed memory for reuse, so
  a jitted step called again does not page-fault its temporaries in afresh
  (``LSTM_JAX_MALLOC=default`` opts out).

Imported on demand, not here: ``lstm_jax.nnx`` and ``lstm_jax.linen`` (the layers as Flax
modules), so that ``import lstm_jax`` works with any Flax version.
"""

from lstm_jax import runtime

runtime.tune_malloc()  # before the arrays of this process are allocated; see lstm_jax.runtime

from lstm_jax.cells import GRUCell, LeakyRNNCell, LSTMCarry, LSTMCell, RNNCell, make_cell
from lstm_jax.errors import (
    CheckpointError,
    ConfigError,
    CorpusError,
    LstmJaxError,
    NonFiniteLossError,
)
from lstm_jax.fused import fused_gru, fused_lstm, fused_rnn
from lstm_jax import onednn
from lstm_jax.onednn import onednn_gru, onednn_lstm
from lstm_jax.sequence import RecurrentStack, reverse_padded, scan_cell
from lstm_jax.interop import from_flax_gru, from_flax_lstm, from_torch
from lstm_jax.model import CharLM, CharLMConfig, cross_entropy, nats_to_bpc
from lstm_jax.data import Corpus, Document, Vocabulary, load_corpus, split_documents
from lstm_jax.training import (Setup, Trainer, TrainConfig, TrainState, evaluate_bpc, fastest_device_count, fastest_setup,
                               make_optimizer, scan_steps)
from lstm_jax.sampling import generate, generate_stream
from lstm_jax.checkpoint import Checkpointer, load_run
from lstm_jax import parallel

__version__ = "0.1.0"

__all__ = [
    # cells and sequences
    "LSTMCell", "GRUCell", "RNNCell", "LeakyRNNCell", "LSTMCarry", "make_cell",
    "scan_cell", "reverse_padded", "RecurrentStack", "fused_lstm", "fused_gru", "fused_rnn", "onednn_lstm", "onednn_gru",
    "onednn",
    # weight import
    "from_torch", "from_flax_lstm", "from_flax_gru",
    # the character model, data, training, sampling, checkpoints
    "CharLM", "CharLMConfig", "cross_entropy", "nats_to_bpc",
    "Corpus", "Document", "Vocabulary", "load_corpus", "split_documents",
    "Trainer", "TrainConfig", "TrainState", "evaluate_bpc", "make_optimizer", "fastest_setup", "Setup",
    "fastest_device_count", "scan_steps",
    "generate", "generate_stream", "Checkpointer", "load_run", "parallel", "runtime",
    # errors
    "LstmJaxError", "ConfigError", "CorpusError", "CheckpointError", "NonFiniteLossError",
]
