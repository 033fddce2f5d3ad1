"""The seed's Keras model as a ``CharLM``: its weights file in, a model ``sample.py`` generates from.

The lesson's model is ``Sequential([LSTM(128, input_shape=(40, V)), Dense(V),
Activation('softmax')])`` over one-hot windows of 40 characters, saved with
``model.save_weights``. ``from_keras_seed(path, vocab)`` reads such a file with h5py (imported
here, on first use; keras is not needed) in either layout:

* Keras 3, ``model.save_weights('x.weights.h5')``: ``layers/<lstm>/cell/vars/0..2`` and
  ``layers/<dense>/vars/0..1`` (an ``optimizer`` group, written after ``fit``, is the optimizer's
  state, not the model's, and is left out).
* Keras 2 (legacy), ``model.save_weights('x.h5')`` or ``model.save('x.h5')``: the layer groups
  named by the ``layer_names`` attribute (under ``model_weights`` in a whole-model file), each
  listing its arrays in ``weight_names`` (``lstm/lstm_cell/kernel:0``, ...).

It returns ``(CharLM, params, Vocabulary)``: a one-layer LSTM ``CharLM`` with one-hot inputs
(``embed_size=0``), the ``keras`` preset's shape, whose logits are the Dense layer's output, so
``softmax(logits)`` is ``model.predict``'s next-character distribution.

Warning:
  The Keras model sees one window of 40 characters from a zero state for each prediction.
  ``sample.py`` by default primes with the whole ``--prime`` text and carries the state on while
  it generates, so its context is not cut at 40 characters; ``--window 40`` (``generate(...,
  window=40)``) runs each prediction over the last 40 characters from a zero state, as the
  lesson's loop did. The file records no vocabulary: pass the characters in the order the
  lesson's ``sorted(set(text))`` gave them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from lstm_jax.adapters.keras import keras_lstm_params
from lstm_jax.charlm.data import Vocabulary
from lstm_jax.charlm.model import CharLM, CharLMConfig
from lstm_jax.core.errors import CheckpointError, ConfigError

__all__ = ["from_keras_seed", "read_keras_weights"]

EXPECTED = ("the seed's Keras model: one LSTM (kernel (V, 4H), recurrent_kernel (H, 4H), bias (4H,)) and one "
            "Dense (kernel (H, V), bias (V,))")


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _natural(path: str) -> list:
    """Sort key putting ``vars/2`` before ``vars/10``."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def read_keras_weights(path: str | Path) -> list[tuple[str, list[np.ndarray]]]:
    """``[(layer name, [arrays])]`` of every layer with weights in a Keras weights file, each
    layer's arrays in Keras's order (``kernel``, ``recurrent_kernel``, ``bias``; ``kernel``,
    ``bias``); layers without weights are left out, as are the optimizer's variables."""
    try:
        import h5py
    except ImportError:
        raise ConfigError("Reading a Keras weights file needs h5py, which is not installed; pip install h5py (or "
                          "the keras extra: pip install 'lstm-jax[keras]').", "path") from None
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"The Keras weights file {path} does not exist; pass the file model.save_weights "
                              "wrote.", "path")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise CheckpointError(f"The Keras weights file {path} is not an HDF5 file; expected what Keras's "
                              "model.save_weights writes (.weights.h5, or .h5/.hdf5 from Keras 2).", "path") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:  # Keras 2 (legacy) layout
            layers = []
            for name in map(_text, root.attrs["layer_names"]):
                group = root[name]
                arrays = [np.asarray(group[_text(w)]) for w in group.attrs.get("weight_names", [])]
                if arrays:
                    layers.append((name, arrays))
            return layers
        if "layers" in f and isinstance(f["layers"], h5py.Group):  # Keras 3 layout
            extra = sorted(k for k in f if k not in ("layers", "vars", "optimizer"))
            stray = [k for k in ("vars",) if k in f and len(f[k])]
            if extra or stray:
                raise CheckpointError(f"The Keras weights file {path} holds entries {extra + stray} outside its "
                                      f"layers; expected {EXPECTED}.", "path")
            layers = []
            for name, group in f["layers"].items():
                found: list[str] = []
                group.visititems(lambda sub, obj: found.append(sub) if isinstance(obj, h5py.Dataset) else None)
                if found:
                    layers.append((name, [np.asarray(group[p]) for p in sorted(found, key=_natural)]))
            return layers
        raise CheckpointError(f"The file {path} is HDF5 but not a Keras weights file (no 'layers' group and no "
                              f"'layer_names' attribute); expected {EXPECTED}.", "path")


def from_keras_seed(path: str | Path, vocab: Vocabulary | str) -> tuple[CharLM, dict, Vocabulary]:
    """``(model, params, vocab)`` of the lesson's Keras model from its weights file.

    Args:
      path: the file ``model.save_weights`` wrote: Keras 3 ``.weights.h5`` or Keras 2 ``.h5`` /
        ``.hdf5`` (a whole-model Keras 2 ``.h5`` works too).
      vocab: the characters in id order (a ``Vocabulary`` or a string), as the lesson's
        ``sorted(set(text))``; its size must be the file's ``V``.

    Returns:
      A ``CharLM`` (``cell='lstm'``, one layer of ``H`` units, ``embed_size=0``: the ``keras``
      preset's shape), its params and the vocabulary: the softmax of the last step's logits of
      ``model.apply(params, model.initial_carry((B,)), windows)`` equals
      ``keras_model.predict`` on the one-hot windows.
      ``ConfigError`` if ``vocab`` has the wrong size; ``CheckpointError`` if the file holds
      another architecture (anything but those two layers' five arrays).
    """
    vocab = vocab if isinstance(vocab, Vocabulary) else Vocabulary(str(vocab))
    layers = read_keras_weights(path)
    shapes = [(name, [a.shape for a in arrays]) for name, arrays in layers]
    lstm = [arrays for _, arrays in layers if len(arrays) == 3]
    dense = [arrays for _, arrays in layers if len(arrays) == 2]
    ok = len(layers) == 2 and len(lstm) == 1 and len(dense) == 1
    if ok:
        (kernel, recurrent, bias), (d_kernel, d_bias) = lstm[0], dense[0]
        v, gh = kernel.shape if kernel.ndim == 2 else (0, 0)
        hidden = gh // 4
        ok = (v >= 2 and hidden > 0 and recurrent.shape == (hidden, 4 * hidden) and bias.shape == (4 * hidden,)
              and d_kernel.shape == (hidden, v) and d_bias.shape == (v,))
    if not ok:
        raise CheckpointError(f"The Keras weights file {path} holds layers {shapes}; expected {EXPECTED}.", "path")
    if len(vocab) != v:
        raise ConfigError(f"vocab has {len(vocab)} characters but the model in {path} was trained on {v}; pass the "
                          "characters the lesson's sorted(set(text)) gave, in that order.", "vocab")
    model = CharLM(CharLMConfig(vocab_size=v, cell="lstm", hidden_size=hidden, num_layers=1, embed_size=0))
    params = {"rnn": [keras_lstm_params(kernel, recurrent, bias, where=f"the LSTM in {path}")],
              "head": {"kernel": jnp.asarray(d_kernel, jnp.float32), "bias": jnp.asarray(d_bias, jnp.float32)}}
    return model, params, vocab
