"""Weight import from PyTorch and Flax: numpy in, lstm_jax params out.

Neither torch nor flax is imported here: pass the weights as arrays (``module.state_dict()``
tensors are converted with ``.detach().cpu().numpy()``; Flax params are already arrays).

* ``from_torch(state_dict)`` takes the state dict of ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` (any
  ``num_layers``, ``bidirectional``; ``batch_first`` only changes the input layout, so pass
  ``time_major=not batch_first`` when applying) and returns ``(RecurrentStack, params)``.
* ``from_flax_lstm(params)`` takes the params of a Flax linen ``LSTMCell`` or
  ``OptimizedLSTMCell``; ``from_flax_gru(params)`` those of a ``GRUCell``;
  ``from_flax_mgu(params, reset_gate=...)`` those of an ``MGUCell``;
  ``from_flax_convlstm(params, strides=..., padding=...)`` those of a ``ConvLSTMCell``. All return
  ``(cell, params)``.
  Flax's LSTM carry is ``(c, h)``; ours is ``LSTMCarry(h=h, c=c)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lstm_jax.core.cells import GRUCell, LSTMCell, MGUCell, RNNCell
from lstm_jax.core.convlstm import ConvLSTMCell
from lstm_jax.core.errors import ConfigError
from lstm_jax.layers.sequence import RecurrentStack

__all__ = ["from_torch", "from_flax_lstm", "from_flax_gru", "from_flax_mgu", "from_flax_convlstm"]

_TORCH_KEY = re.compile(r"^(weight_(?:ih|hh|hr)|bias_(?:ih|hh))_l(\d+)(_reverse)?$")


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
    if "weight_hr" + suffix in sd:  # LSTMP: (P, H) in PyTorch, (H, P) here
        params["projection_kernel"] = jnp.asarray(_np(sd["weight_hr" + suffix]).T)
    if gates == 3:  # GRU: the recurrent bias sits inside r * (h @ W_hn + b_hn)
        params.update(bias=jnp.asarray(b_ih), recurrent_bias=jnp.asarray(b_hh))
    else:
        params["bias"] = jnp.asarray(b_ih + b_hh)
    return params


def from_torch(state_dict: Mapping[str, Any], *, nonlinearity: str = "tanh") -> tuple[RecurrentStack, list]:
    """Convert a PyTorch ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` state dict.

    The cell kind, hidden size, input size, ``num_layers`` and ``bidirectional`` are read from
    the weight shapes; ``nonlinearity`` ('tanh' or 'relu') must be given for ``nn.RNN`` since the
    state dict does not record it. ``nn.LSTM(proj_size=P)`` (keys ``weight_hr_l{k}``) becomes an
    ``LSTMCell(H, proj_size=P)`` stack; ``bias=False`` modules get zero biases (their function
    exactly). Returns ``(stack, params)`` with ``stack.apply(params, x)`` equal to the PyTorch
    module's output (``time_major=True`` unless ``batch_first``); packed sequences are
    ``seq_lengths``.
    """
    keys = [k for k in state_dict if _TORCH_KEY.match(k)]
    unknown = sorted(set(state_dict) - set(keys))
    if "weight_ih_l0" not in state_dict or unknown:
        raise ConfigError(
            "from_torch expects the state_dict() of nn.LSTM, nn.GRU or nn.RNN (keys like "
            f"'weight_ih_l0'); got unexpected keys {unknown or sorted(state_dict)[:5]}. "
            "Wrapped modules are not supported: pass the recurrent module's own state dict."
        )
    proj = _np(state_dict["weight_hr_l0"]).shape[0] if "weight_hr_l0" in state_dict else 0
    hidden = _np(state_dict["weight_hr_l0"]).shape[1] if proj else _np(state_dict["weight_hh_l0"]).shape[1]
    gates = _np(state_dict["weight_ih_l0"]).shape[0] // hidden
    num_layers = 1 + max(int(_TORCH_KEY.match(k).group(2)) for k in keys)
    bidirectional = any(k.endswith("_reverse") for k in keys)
    if proj and gates != 4:
        raise ConfigError(f"from_torch: weight_hr_l0 (a projection) belongs to an nn.LSTM only, but weight_ih_l0 has "
                          f"{gates}x{hidden} rows (not an LSTM's 4x); pass an nn.LSTM state dict.")
    cells = {4: LSTMCell(hidden, proj_size=proj), 3: GRUCell(hidden, reset_after=True),
             1: RNNCell(hidden, activation=nonlinearity)}
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


def _flat_paths(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{'if': {'kernel': k}}`` -> ``{'if/kernel': k}``; leaves are anything but a non-empty mapping."""
    if not isinstance(tree, Mapping) or not tree:
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flat_paths(value, f"{prefix}/{key}" if prefix else str(key)))
    return flat


def _mgu_paths(reset_gate: bool) -> list[str]:
    return ["if/kernel", "if/bias", "hf/kernel", "in/kernel", "in/bias", "hn/kernel"] + (
        ["hn/bias"] if reset_gate else [])


def from_flax_mgu(flax_params: Mapping[str, Any], reset_gate: bool = True) -> tuple[MGUCell, dict]:
    """Convert Flax linen ``MGUCell(reset_gate=reset_gate)`` params (``{'params': ...}`` or inner).

    Flax's ``f = sigmoid(W_if x + b_if + W_hf h)``, ``n = tanh(W_in x + b_in + f * (W_hn h + b_hn))``
    (``+ W_hn h`` without the reset gate, and no ``b_hn``) map onto ``MGUCell``'s fused ``f, n``
    kernels; ``b_hn`` becomes the ``n`` slice of ``recurrent_bias``. Every weight is placed: a tree
    with an entry this conversion cannot place, or without one it needs, raises ``ConfigError``.
    """
    if not isinstance(flax_params, Mapping):
        raise ConfigError(f"from_flax_mgu: flax_params must be a mapping of a linen MGUCell's params, "
                          f"got {type(flax_params).__name__}.")
    if "params" in flax_params:  # a variables dict: other collections are entries it cannot place
        others = {k: v for k, v in flax_params.items() if k != "params"}
        flat = {**(_flat_paths(others) if others else {}), **_flat_paths(flax_params["params"])}
    else:
        flat = _flat_paths(flax_params)
    expected = _mgu_paths(reset_gate)
    extra, missing = sorted(set(flat) - set(expected)), sorted(set(expected) - set(flat))
    if extra or missing:
        hint = (f"; that is a linen MGUCell(reset_gate={not reset_gate}), so pass reset_gate={not reset_gate}"
                if (extra, missing) in ((["hn/bias"], []), ([], ["hn/bias"])) else "")
        found = " and ".join(([f"has unexpected {extra}"] if extra else []) + ([f"lacks {missing}"] if missing else []))
        raise ConfigError(f"from_flax_mgu: flax_params must hold exactly the entries {expected} of a linen "
                          f"MGUCell(reset_gate={reset_gate}), but {found}{hint}.")
    w = {k: _np(v) for k, v in flat.items()}
    n_in, hidden = w["if/kernel"].shape if w["if/kernel"].ndim == 2 else (1, 0)
    shapes = {k: ((n_in, hidden) if k[0] == "i" else (hidden, hidden)) if k.endswith("kernel") else (hidden,)
              for k in expected}
    wrong = {k: w[k].shape for k in expected if w[k].shape != shapes[k] or not hidden}
    if wrong:
        want = {k: shapes[k] for k in wrong} if hidden else "(I, H) input kernels, (H, H) recurrent ones, (H,) biases"
        raise ConfigError(f"from_flax_mgu: flax_params' weights must have the shapes {want} of one MGUCell "
                          f"layer, got {wrong}.")
    params = {
        "input_kernel": jnp.asarray(np.concatenate([w["if/kernel"], w["in/kernel"]], axis=1)),
        "recurrent_kernel": jnp.asarray(np.concatenate([w["hf/kernel"], w["hn/kernel"]], axis=1)),
        "bias": jnp.asarray(np.concatenate([w["if/bias"], w["in/bias"]])),
    }
    if reset_gate:
        params["recurrent_bias"] = jnp.asarray(np.concatenate([np.zeros(hidden, np.float32), w["hn/bias"]]))
    return MGUCell(hidden, reset_gate=reset_gate), params


def from_flax_convlstm(flax_params: Mapping[str, Any], *, strides: Any = None,
                       padding: Any = "SAME") -> tuple[ConvLSTMCell, dict]:
    """Convert Flax linen ``ConvLSTMCell`` params (``{'params': ...}`` or inner) to a ``ConvLSTMCell``.

    The kernel size, channels and features are read from the ``ih``/``hh`` kernels; ``strides``
    and ``padding`` are not in the params, so pass the ones the Flax cell was built with. Flax's
    gates ``i, g, f, o`` become ``i, f, g, o``; its two biases are summed, plus the 1 Flax adds to
    the forget gate in every step (so a Flax cell with ``use_bias=False`` becomes one with a bias
    holding that constant). Every weight is placed: a tree with an entry this conversion cannot
    place, or without one it needs, raises ``ConfigError``.
    """
    what = "from_flax_convlstm"
    if not isinstance(flax_params, Mapping):
        raise ConfigError(f"{what}: flax_params must be a mapping of a linen ConvLSTMCell's params, "
                          f"got {type(flax_params).__name__}.")
    if "params" in flax_params:
        others = {k: v for k, v in flax_params.items() if k != "params"}
        flat = {**(_flat_paths(others) if others else {}), **_flat_paths(flax_params["params"])}
    else:
        flat = _flat_paths(flax_params)
    use_bias = "ih/bias" in flat or "hh/bias" in flat
    expected = ["ih/kernel", "hh/kernel"] + (["ih/bias", "hh/bias"] if use_bias else [])
    extra, missing = sorted(set(flat) - set(expected)), sorted(set(expected) - set(flat))
    if extra or missing:
        found = " and ".join(([f"has unexpected {extra}"] if extra else []) + ([f"lacks {missing}"] if missing else []))
        raise ConfigError(f"{what}: flax_params must hold exactly the entries {expected} of a linen ConvLSTMCell, "
                          f"but {found}.")
    w = {k: _np(v) for k, v in flat.items()}
    k_in, k_hh = w["ih/kernel"], w["hh/kernel"]
    n = k_in.ndim - 2
    four_h = k_in.shape[-1] if k_in.ndim >= 3 else 0
    hidden = four_h // 4
    shapes = {"ih/kernel": (*k_in.shape[:n], k_in.shape[-2] if n > 0 else 0, 4 * hidden),
              "hh/kernel": (*k_in.shape[:n], hidden, 4 * hidden), "ih/bias": (4 * hidden,),
              "hh/bias": (4 * hidden,)}
    wrong = {k: w[k].shape for k in expected if w[k].shape != shapes[k]}
    if wrong or not 1 <= n <= 3 or not hidden or four_h % 4:
        raise ConfigError(f"{what}: flax_params' weights must have the shapes of one ConvLSTMCell over 1 to 3 "
                          f"spatial dimensions ((*k, C, 4H) and (*k, H, 4H) kernels, (4H,) biases), got "
                          f"{ {k: w[k].shape for k in expected} }.")
    reorder = lambda a: np.concatenate([np.split(a, 4, axis=-1)[i] for i in (0, 2, 1, 3)], axis=-1)  # igfo->ifgo
    bias = reorder(w["ih/bias"] + w["hh/bias"]) if use_bias else np.zeros(4 * hidden, np.float32)
    bias[hidden : 2 * hidden] += 1.0  # Flax's sigmoid(f + 1)
    cell = ConvLSTMCell(hidden, kernel_size=tuple(k_in.shape[:n]), strides=strides, padding=padding)
    return cell, {"input_kernel": jnp.asarray(reorder(k_in)), "recurrent_kernel": jnp.asarray(reorder(k_hh)),
                  "bias": jnp.asarray(bias)}
