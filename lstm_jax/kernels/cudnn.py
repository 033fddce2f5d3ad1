"""LSTM layers through cuDNN (CUDA) or MIOpen (ROCm): ``jax.experimental.rnn.lstm``.

``cudnn_lstm(xs, h0, c0, layers, seq_lengths, bidirectional=..., reference=...)`` runs a stack of
``LSTMCell`` layers (one or ``(forward, backward)`` params per layer) as one call of
``jax.experimental.rnn.lstm``. Our params are converted to its one flat weight vector inside the
traced program, with ``jnp`` operations only, so gradients flow back to ``input_kernel``,
``recurrent_kernel`` and ``bias``.

The flat vector (cuDNN's layout, as ``jax.experimental.rnn`` documents it), for pseudo-layers
``l = 0 .. L*D-1`` (forward layer 0, backward layer 0, forward layer 1, ...)::

    W_ih^0, W_hh^0, W_ih^1, W_hh^1, ..., b_ih^0, b_hh^0, b_ih^1, b_hh^1, ...
    W_ih^l = input_kernel.T      (4H, I)     gates i, f, g, o on the leading axis
    W_hh^l = recurrent_kernel.T  (4H, H)
    b_ih^l = bias                (4H,)
    b_hh^l = 0                   (4H,)

The gate order of ``LSTMCell`` (``i, f, g, o``) is cuDNN's, so no gate is permuted.

Warning:
  cuDNN (like PyTorch) has two biases per layer; ours is one, put in ``b_ih`` with ``b_hh = 0``
  (the sum is what counts). Float32 only: ``jax.experimental.rnn`` has no bf16, and its products
  may use TF32 unless ``precision=jax.lax.Precision.HIGHEST``. JAX's cuDNN primitive has no
  ``jax.vmap`` rule and no forward-mode derivative: ``scan_cell`` takes any leading batch shape
  itself (no vmap needed); under ``jax.vmap`` or ``jax.jvp`` on a GPU pass ``impl='fused'``.

Two known limits of ``jax.experimental.rnn`` are worked around here: a zero sequence length
fails in cuDNN (jax#17966), so lengths are clamped to at least 1 and those rows get zero outputs
and their initial carry back; the sizes are passed positionally (jax#19177: as keywords, ``jit``
fails). ``seq_lengths`` is copied to the host on every call by cuDNN's binding.

``reference=True`` runs the same conversion into ``jax.experimental.rnn.lstm_ref`` through
``unpack_lstm_weights`` (pure JAX, runs anywhere): that is how the conversion is tested on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["cudnn_lstm", "flat_weights", "layer_params", "num_weights"]

Array = jax.Array


def _pseudo_layers(layers: Sequence, bidirectional: bool) -> list[dict]:
    """Each layer's params, forward then backward per layer when ``bidirectional``."""
    out = []
    for p in layers:
        out.extend(p if bidirectional else [p])
    return out


def num_weights(input_size: int, hidden_size: int, num_layers: int, bidirectional: bool) -> int:
    """The length of the flat weight vector of such a stack."""
    d = 2 if bidirectional else 1
    gh = 4 * hidden_size
    first = gh * (input_size + hidden_size)
    rest = gh * (d * hidden_size + hidden_size)
    return d * (first + (num_layers - 1) * rest) + num_layers * d * 2 * gh


def flat_weights(layers: Sequence, bidirectional: bool = False) -> Array:
    """Our stack's params (a list over layers of ``LSTMCell`` params, or of ``(forward,
    backward)`` pairs when ``bidirectional``) as ``jax.experimental.rnn``'s flat vector (float32)."""
    pseudo = _pseudo_layers(layers, bidirectional)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    mats = []
    for p in pseudo:
        mats += [f32(p["input_kernel"]).T.reshape(-1), f32(p["recurrent_kernel"]).T.reshape(-1)]
    biases = []
    for p in pseudo:
        b = f32(p["bias"])
        biases += [b, jnp.zeros_like(b)]
    return jnp.concatenate(mats + biases)


def layer_params(weights: Array, input_size: int, hidden_size: int, num_layers: int,
                 bidirectional: bool = False) -> list:
    """The inverse of ``flat_weights``: our params from a flat vector (``b_ih + b_hh`` as ``bias``),
    read through ``jax.experimental.rnn.unpack_lstm_weights``."""
    from jax.experimental import rnn

    w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(weights, input_size, hidden_size, num_layers, bidirectional)
    pseudo = [{"input_kernel": w_ih[k].T, "recurrent_kernel": w_hh[k].T, "bias": b_ih[k] + b_hh[k]}
              for k in range(len(w_ih))]
    if not bidirectional:
        return pseudo
    return [(pseudo[2 * k], pseudo[2 * k + 1]) for k in range(num_layers)]


def cudnn_lstm(xs: Array, h0: Array, c0: Array, layers: Sequence, seq_lengths: Array | None = None, *,
               bidirectional: bool = False, precision: Any = None, reference: bool = False
               ) -> tuple[Array, Array, Array]:
    """A stack of LSTM layers through ``jax.experimental.rnn``.

    Args:
      xs: ``(T, N, I)`` float inputs, time-major.
      h0: ``(L*D, N, H)`` initial hidden states, pseudo-layers in cuDNN's order (layer 0 forward,
        layer 0 backward, layer 1 forward, ...).
      c0: the initial cell states, likewise.
      layers: ``L`` layers' ``LSTMCell`` params (``input_kernel (I, 4H)``, ``recurrent_kernel
        (H, 4H)``, ``bias (4H,)``), or ``(forward, backward)`` pairs when ``bidirectional``.
      seq_lengths: ``(N,)`` valid lengths in ``[0, T]`` (None: all ``T``). Outputs past a row's
        length are zero, its carry is the one at its last valid step (the initial one for 0), and
        the backward direction reads only the valid part, reversed.
      precision: passed to ``jax.experimental.rnn.lstm`` (None allows TF32).
      reference: run ``jax.experimental.rnn.lstm_ref`` on the unpacked weights instead of cuDNN
        (pure JAX, any platform: for tests).

    Returns:
      ``(ys (T, N, D*H), h_n (L*D, N, H), c_n (L*D, N, H))``.
    """
    from jax.experimental import rnn

    steps, rows, input_size = xs.shape
    if steps == 0 or rows == 0:
        raise ValueError(f"cudnn_lstm needs at least one step and one row, got inputs of shape {xs.shape}; "
                         f"run empty sequences through the scan (the dispatch does).")
    hidden = h0.shape[-1]
    num_layers = len(layers)
    weights = flat_weights(layers, bidirectional)
    full = jnp.full((rows,), steps, jnp.int32)
    lengths = full if seq_lengths is None else jnp.clip(jnp.asarray(seq_lengths, jnp.int32), 0, steps)
    safe = jnp.maximum(lengths, 1)  # jax#17966: cuDNN fails on zero lengths
    x = jnp.swapaxes(xs.astype(jnp.float32), 0, 1)  # batch-first
    h0, c0 = h0.astype(jnp.float32), c0.astype(jnp.float32)
    if reference:
        w_ih, w_hh, b_ih, b_hh = rnn.unpack_lstm_weights(weights, input_size, hidden, num_layers, bidirectional)
        y, h_n, c_n = rnn.lstm_ref(x, h0, c0, w_ih, w_hh, b_ih, b_hh, safe, input_size, hidden, num_layers, 0.0,
                                   bidirectional)
    else:  # sizes positionally: jax#19177
        y, h_n, c_n = rnn.lstm(x, h0, c0, weights, safe, input_size, hidden, num_layers, 0.0, bidirectional,
                               precision)
    empty = lengths == 0
    y = jnp.where(empty[:, None, None], 0.0, y)
    h_n = jnp.where(empty[None, :, None], h0, h_n)
    c_n = jnp.where(empty[None, :, None], c0, c_n)
    return jnp.swapaxes(y, 0, 1), h_n, c_n
