"""lstm_jax: LSTM, GRU, MGU, RNN, ConvLSTM, minGRU/minLSTM and xLSTM cells as pure JAX functions, and a char-level
text generator.

The package is built in layers; each imports only from the layers below it:

1. ``core`` — errors, matrix products, the cells (``init``, ``initial_carry``, ``apply``) and the
   plain ``lax.scan`` driver. Pure functions over plain pytrees.
2. ``kernels`` — faster ways to run one layer over a sequence, every choice an argument: the fused
   custom-VJP layers and the oneDNN binding (an optional C++ extension).
3. ``dispatch`` — the one place that decides which kernel runs a layer and how (it alone reads the
   ``LSTM_JAX_*`` switches, measures and caches).
4. ``layers`` — ``scan_cell`` (check, plan, run), ``RecurrentStack``, ``scan_steps``, ``parallel``.
5. ``adapters`` — PyTorch, Flax and Keras weights in (``interop``, ``adapters.keras``), the layers as Flax modules
   (``nnx``, ``linen``).
6. ``charlm`` — the character language model: corpus, model, Trainer, sampling, checkpoints and
   the two command-line scripts.

``import lstm_jax`` loads jax, numpy and layers 1-4, and changes nothing in the process. The
names of ``adapters`` and ``charlm`` (and orbax, optax, nltk, flax behind them) load on first use;
``lstm_jax.runtime.tune_malloc()`` is the explicit call that tunes the C allocator.
"""

from __future__ import annotations

import importlib
from typing import Any

from lstm_jax.core.cells import GRUCell, LeakyRNNCell, LSTMCarry, LSTMCell, MGUCell, RNNCell, make_cell
from lstm_jax.core.convlstm import ConvLSTMCell
from lstm_jax.core.errors import CheckpointError, ConfigError, CorpusError, LstmJaxError, NonFiniteLossError
from lstm_jax.core.mincells import MinGRUCell, MinLSTMCell
from lstm_jax.core.xlstm import MLSTMCarry, MLSTMCell, SLSTMCarry, SLSTMCell
from lstm_jax.kernels.fused import fused_gru, fused_lstm, fused_rnn
from lstm_jax.layers.sequence import RecurrentStack, reverse_padded, scan_cell
from lstm_jax.layers.steps import scan_steps

__version__ = "0.1.0"

# name -> module that defines it, imported on first access (PEP 562)
_LAZY = {
    **dict.fromkeys(["from_torch", "from_flax_lstm", "from_flax_gru", "from_flax_mgu", "from_flax_convlstm"],
                    "lstm_jax.adapters.interop"),
    "from_keras": "lstm_jax.adapters.keras",
    "from_keras_seed": "lstm_jax.charlm.keras_seed",
    **dict.fromkeys(["CharLM", "CharLMConfig", "cross_entropy", "nats_to_bpc"], "lstm_jax.charlm.model"),
    **dict.fromkeys(["Corpus", "Document", "Vocabulary", "load_corpus", "split_documents"], "lstm_jax.charlm.data"),
    **dict.fromkeys(["Trainer", "TrainConfig", "TrainState", "evaluate_bpc", "make_optimizer", "fastest_setup",
                     "Setup", "fastest_device_count"], "lstm_jax.charlm.training"),
    **dict.fromkeys(["generate", "generate_stream"], "lstm_jax.charlm.sampling"),
    **dict.fromkeys(["Checkpointer", "load_run"], "lstm_jax.charlm.checkpoint"),
    **dict.fromkeys(["onednn_lstm", "onednn_gru"], "lstm_jax.kernels.onednn"),
}
_SUBMODULES = {"onednn", "parallel", "runtime", "interop", "nnx", "linen", "dispatch", "core", "kernels", "layers",
               "adapters", "charlm"}

__all__ = [
    # cells and sequences
    "LSTMCell", "GRUCell", "MGUCell", "RNNCell", "LeakyRNNCell", "ConvLSTMCell", "LSTMCarry", "make_cell",
    "MinGRUCell", "MinLSTMCell", "SLSTMCell", "MLSTMCell", "SLSTMCarry", "MLSTMCarry",
    "scan_cell", "reverse_padded", "RecurrentStack", "fused_lstm", "fused_gru", "fused_rnn", "onednn_lstm",
    "onednn_gru", "onednn",
    # weight import
    "from_torch", "from_flax_lstm", "from_flax_gru", "from_flax_mgu", "from_flax_convlstm", "from_keras",
    # the character model, data, training, sampling, checkpoints
    "CharLM", "CharLMConfig", "cross_entropy", "nats_to_bpc",
    "Corpus", "Document", "Vocabulary", "load_corpus", "split_documents",
    "Trainer", "TrainConfig", "TrainState", "evaluate_bpc", "make_optimizer", "fastest_setup", "Setup",
    "fastest_device_count", "scan_steps",
    "generate", "generate_stream", "Checkpointer", "load_run", "from_keras_seed", "parallel", "runtime",
    # errors
    "LstmJaxError", "ConfigError", "CorpusError", "CheckpointError", "NonFiniteLossError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"lstm_jax.{name}")
    else:
        raise AttributeError(f"module 'lstm_jax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
