"""Weight import from PyTorch and Flax: numpy in, lstm_jax params out.

Neither torch nor flax is imported here: pass the weights as arrays (``module.state_dict()``
tensors are converted with ``.detach().cpu().numpy()``; Flax params are already arrays).

* ``from_torch(state_dict)`` takes the state dict of ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` (any
  ``num_layers``, ``bidirectional``; ``batch_first`` only changes the input layout, so pass
  ``time_major=not batch_first`` when applying) and returns ``(RecurrentStack, params)``.
* ``from_flax_lstm(params)`` takes the params of a Flax linen ``LSTMCell`` or
  ``OptimizedLSTMCell``; ``from_flax_gru(params)`` those of a ``GRUCell``. Both return
  ``(cell, params)``. Flax's LSTM carry is ``(c, h)``; ours is ``LSTMCarry(h=h, c=c)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lstm_jax.core.cells import GRUCell, LSTMCell, RNNCell
from lstm_jax.core.errors import ConfigError
from lstm_jax.layers.sequence import RecurrentStack

__all__ = ["from_torch", "from_flax_lstm", "from_flax_gru"]

_TORCH_KEY = re.compile(r"^(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")


def _np(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, converted without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _torch_layer(sd: Mapping[str, Any], suffix: str, gates: int, hidden: int) -> dict:
    w_ih, w_hh = _np(sd["weight_ih" + suffix]), _np(sd["weight_hh" + suffix])
    zeros = np.zeros(gates * hidden, np.float32)
    b_ih = _np(sd["bias_ih" + suffix]) if "bias_ih" + suffix in sd else zeros
    b_hh = _np(sd["bias_hh" + suffix]) if "bias_hh" + suffix in sd else zeros
    params = {"input_kernel": jnp.asarray(w_ih.T), "recurrent_kernel": jnp.asarray(w_hh.T)}
    if gates == 3:  # GRU: the recurrent bias sits inside r * (h @ W_hn + b_hn)
        params.update(bias=jnp.asarray(b_ih), recurrent_bias=jnp.asarray(b_hh))
    else:
        params["bias"] = jnp.asarray(b_ih + b_hh)
    return params


def from_torch(state_dict: Mapping[str, Any], *, nonlinearity: str = "tanh") -> tuple[RecurrentStack, list]:
    """Convert a PyTorch ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` state dict.

    The cell kind, hidden size, input size, ``num_layers`` and ``bidirectional`` are read from
    the weight shapes; ``nonlinearity`` ('tanh' or 'relu') must be given for ``nn.RNN`` since the
    state dict does not record it. Returns ``(stack, params)`` with ``stack.apply(params, x)``
    equal to the PyTorch module's output (``time_major=True`` unless ``batch_first``).
    """
    keys = [k for k in state_dict if _TORCH_KEY.match(k)]
    unknown = sorted(set(state_dict) - set(keys))
    if "weight_ih_l0" not in state_dict or unknown:
        raise ConfigError(
            "from_torch expects the state_dict() of nn.LSTM, nn.GRU or nn.RNN (keys like "
            f"'weight_ih_l0'); got unexpected keys {unknown or sorted(state_dict)[:5]}. "
            "proj_size > 0 and wrapped modules are not supported: pass the recurrent module's own state dict."
        )
    hidden = _np(state_dict["weight_hh_l0"]).shape[1]
    gates = _np(state_dict["weight_ih_l0"]).shape[0] // hidden
    num_layers = 1 + max(int(_TORCH_KEY.match(k).group(3)) for k in keys)
    bidirectional = any(k.endswith("_reverse") for k in keys)
    cells = {4: LSTMCell(hidden), 3: GRUCell(hidden, reset_after=True), 1: RNNCell(hidden, activation=nonlinearity)}
    if gates not in cells:
        raise ConfigError(f"from_torch: weight_ih_l0 has {gates * hidden} rows for hidden size {hidden}; "
                          "expected 4x (LSTM), 3x (GRU) or 1x (RNN).")
    stack = RecurrentStack(cells[gates], num_layers=num_layers, bidirectional=bidirectional)
    params = []
    for layer in range(num_layers):
        fwd = _torch_layer(state_dict, f"_l{layer}", gates, hidden)
        params.append((fwd, _torch_layer(state_dict, f"_l{layer}_reverse", gates, hidden))
                      if bidirectional else fwd)
    return stack, params


def _flax_inner(params: Mapping[str, Any]) -> Mapping[str, Any]:
    return params["params"] if "params" in params else params


def _flax_dense(p: Mapping[str, Any], name: str, what: str) -> Mapping[str, Any]:
    if name not in p:
        raise ConfigError(f"{what}: expected Flax params with a '{name}' entry, got keys {sorted(p)}.")
    return p[name]


def from_flax_lstm(params: Mapping[str, Any]) -> tuple[LSTMCell, dict]:
    """Convert Flax linen ``LSTMCell`` or ``OptimizedLSTMCell`` params (``{'params': ...}`` or inner)."""
    p = _flax_inner(params)
    what = "from_flax_lstm"
    i_k = [_np(_flax_dense(p, "i" + g, what)["kernel"]) for g in "ifgo"]
    h = [_flax_dense(p, "h" + g, what) for g in "ifgo"]
    cell = LSTMCell(i_k[0].shape[1])
    return cell, {
        "input_kernel": jnp.asarray(np.concatenate(i_k, axis=1)),
        "recurrent_kernel": jnp.asarray(np.concatenate([_np(d["kernel"]) for d in h], axis=1)),
        "bias": jnp.asarray(np.concatenate([_np(d["bias"]) for d in h])),
    }


def from_flax_gru(params: Mapping[str, Any]) -> tuple[GRUCell, dict]:
    """Convert Flax linen ``GRUCell`` params: its reset gate acts after the recurrent product
    (``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``), as ``GRUCell(reset_after=True)``."""
    p = _flax_inner(params)
    what = "from_flax_gru"
    i = {g: _flax_dense(p, "i" + g, what) for g in "rzn"}
    h = {g: _flax_dense(p, "h" + g, what) for g in "rzn"}
    hidden = _np(i["r"]["kernel"]).shape[1]
    zeros = np.zeros(hidden, np.float32)
    return GRUCell(hidden, reset_after=True), {
        "input_kernel": jnp.asarray(np.concatenate([_np(i[g]["kernel"]) for g in "rzn"], axis=1)),
        "recurrent_kernel": jnp.asarray(np.concatenate([_np(h[g]["kernel"]) for g in "rzn"], axis=1)),
        "bias": jnp.asarray(np.concatenate([_np(i[g]["bias"]) for g in "rzn"])),
        "recurrent_bias": jnp.asarray(np.concatenate([zeros, zeros, _np(h["n"]["bias"])])),
    }
