"""Weight import from Keras 3: ``LSTM``, ``GRU`` (both ``reset_after``), ``SimpleRNN`` and
``Bidirectional`` around any of them.

Neither keras nor h5py is imported here: a layer object is read through its own ``get_config()``
and ``get_weights()`` (numpy arrays), so the conversion runs wherever the weights came from.

``from_keras(layer)`` or ``from_keras(weights, config)`` returns ``(RecurrentStack, params)``, as
``lstm_jax.interop.from_torch`` does: a Keras recurrent layer is a whole-sequence layer, like
``nn.LSTM``. ``stack.apply(params, x)`` takes Keras's batch-major ``(B, T, F)`` inputs and returns
``(carries, ys)``: ``ys`` is the layer's output with ``return_sequences=True``, ``carries[0]`` its
final state (``LSTMCarry(h, c)`` for an LSTM, ``h`` otherwise; a ``(forward, backward)`` pair for
``Bidirectional``).

Conventions (Keras -> lstm_jax):

* ``LSTM``: gates ``i, f, c, o`` are our ``i, f, g, o``; ``kernel``, ``recurrent_kernel`` and
  ``bias`` are copied as they are. Keras's state list is ``[h, c]``; ours is ``LSTMCarry(h, c)``.
* ``GRU``: Keras orders the gates ``z, r, h``, we order them ``r, z, n`` (PyTorch's), so every
  kernel's and bias's columns are permuted. ``reset_after=True`` (Keras 3's default) has a
  ``(2, 3H)`` bias, input and recurrent rows: ``GRUCell(reset_after=True)``'s ``bias`` and
  ``recurrent_bias``. ``reset_after=False`` has one ``(3H,)`` bias: ``GRUCell(reset_after=False)``.
* ``SimpleRNN``: ``RNNCell`` with the same ``activation`` (``'tanh'`` or ``'relu'``).
* ``use_bias=False``: the biases are exact zeros (adding a zero changes no float), so the import
  gives the same numbers; note that training the imported params would then move those biases.
* ``dropout`` / ``recurrent_dropout`` act only in training; the imported layer is the layer in
  inference and carries no dropout. ``unroll`` changes how Keras runs the loop, not the numbers:
  it is accepted (``stack.apply`` has its own ``unroll``).

Anything it cannot place is an error (``ConfigError``), never dropped: ``go_backwards``,
``stateful``, an activation our cells lack, another layer type, weights of other
shapes or count, or a ``Bidirectional`` whose ``merge_mode`` is not ``'concat'``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from lstm_jax.core.cells import GRUCell, LSTMCell, RNNCell
from lstm_jax.core.errors import ConfigError
from lstm_jax.layers.sequence import RecurrentStack

__all__ = ["from_keras", "keras_lstm_params"]

_KINDS = {"LSTM": 4, "GRU": 3, "SimpleRNN": 1}
_BY_GATES = {4: "LSTM", 3: "GRU", 1: "SimpleRNN"}
_OWN_ACTIVATIONS = {"LSTM": ("tanh",), "GRU": ("tanh",), "SimpleRNN": ("tanh", "relu")}


def _np(value: Any) -> np.ndarray:
    return np.asarray(value, dtype=np.float32)


def _activation_name(value: Any) -> Any:
    """A Keras config's activation: a name, or a serialised ``{'config': {'name': ...}}``."""
    if isinstance(value, Mapping):
        return value.get("config", {}).get("name", value.get("class_name", value))
    return value


def _class_and_config(layer_or_weights: Any, config: Any) -> tuple[str | None, dict, list | None]:
    """``(class name or None, config dict, weights or None)`` of what ``from_keras`` was given."""
    if hasattr(layer_or_weights, "get_config") and hasattr(layer_or_weights, "get_weights"):
        if config is not None:
            raise ConfigError("from_keras: config must be None when a Keras layer is given (its own get_config() "
                              "is used); pass config only with a get_weights() list.", "config")
        return type(layer_or_weights).__name__, dict(layer_or_weights.get_config()), None
    if isinstance(layer_or_weights, str | bytes) or not isinstance(layer_or_weights, Sequence):
        raise ConfigError(f"from_keras: layer_or_weights must be a Keras LSTM, GRU, SimpleRNN or Bidirectional "
                          f"layer, or its get_weights() list, got {type(layer_or_weights).__name__}.",
                          "layer_or_weights")
    if not isinstance(config, Mapping):
        raise ConfigError(f"from_keras: config must be the layer's get_config() dict (or keras.layers.serialize("
                          f"layer)) when layer_or_weights is a list of weights, got {type(config).__name__}.",
                          "config")
    if "class_name" in config and isinstance(config.get("config"), Mapping):
        return str(config["class_name"]), dict(config["config"]), list(layer_or_weights)
    return None, dict(config), list(layer_or_weights)


def _check_options(kind: str, config: Mapping[str, Any], where: str) -> None:
    """Refuse every option of a Keras recurrent layer config that the import cannot reproduce."""
    for option, allowed in (("go_backwards", False), ("stateful", False)):
        if config.get(option, allowed) != allowed:
            hint = {"go_backwards": "reverse the inputs yourself, or use keras.layers.Bidirectional",
                    "stateful": "carry the state yourself with stack.apply(..., initial_carry=carries)"}[option]
            raise ConfigError(f"from_keras: {where} has {option}={config[option]!r}, which the import does not "
                              f"support (only {option}={allowed}); {hint}.", option)
    act = _activation_name(config.get("activation", "tanh"))
    if act not in _OWN_ACTIVATIONS[kind]:
        raise ConfigError(f"from_keras: {where} has activation={act!r}; a Keras {kind} imports only with "
                          f"activation in {list(_OWN_ACTIVATIONS[kind])}.", "activation")
    if kind != "SimpleRNN":
        rec = _activation_name(config.get("recurrent_activation", "sigmoid"))
        if rec != "sigmoid":
            raise ConfigError(f"from_keras: {where} has recurrent_activation={rec!r}; a Keras {kind} imports only "
                              "with recurrent_activation='sigmoid'.", "recurrent_activation")


def _layer_params(kind: str, config: Mapping[str, Any], weights: list, where: str) -> tuple[Any, dict]:
    """``(cell, params)`` of one Keras recurrent layer from its config and ``get_weights()``."""
    _check_options(kind, config, where)
    gates = _KINDS[kind]
    use_bias = bool(config.get("use_bias", True))
    reset_after = bool(config.get("reset_after", True)) if kind == "GRU" else None
    w = [_np(a) for a in weights]
    expected = 3 if use_bias else 2
    if not w:
        raise ConfigError(f"from_keras: {where} ({kind}) has no weights yet; build it first (call it on an input, "
                          "or layer.build(input_shape)).", "layer_or_weights")
    if len(w) != expected or w[0].ndim != 2:
        raise ConfigError(f"from_keras: {where} ({kind}, use_bias={use_bias}) must have {expected} weights "
                          f"(kernel, recurrent_kernel{', bias' if use_bias else ''}), got {len(w)} of shapes "
                          f"{[a.shape for a in w]}.", "layer_or_weights")
    n_in, gh = w[0].shape
    hidden = gh // gates
    units = config.get("units", hidden)
    shapes = [(n_in, gates * units), (units, gates * units)]
    if use_bias:
        shapes.append((2, gates * units) if reset_after else (gates * units,))
    if units <= 0 or [a.shape for a in w] != shapes:
        raise ConfigError(f"from_keras: {where} ({kind}, units={units}, use_bias={use_bias}"
                          f"{f', reset_after={reset_after}' if kind == 'GRU' else ''}) must have weights of shapes "
                          f"{shapes}, got {[a.shape for a in w]}.", "layer_or_weights")
    kernel, recurrent = w[0], w[1]
    zeros = np.zeros(gates * units, np.float32)
    bias = w[2] if use_bias else (np.zeros((2, gates * units), np.float32) if reset_after else zeros)
    if kind == "GRU":  # Keras z, r, h -> ours r, z, n
        order = np.concatenate([np.arange(units, 2 * units), np.arange(units), np.arange(2 * units, 3 * units)])
        kernel, recurrent, bias = kernel[:, order], recurrent[:, order], bias[..., order]
    params = {"input_kernel": jnp.asarray(kernel), "recurrent_kernel": jnp.asarray(recurrent)}
    if kind == "GRU" and reset_after:
        params.update(bias=jnp.asarray(bias[0]), recurrent_bias=jnp.asarray(bias[1]))
    else:
        params["bias"] = jnp.asarray(bias)
    if kind == "LSTM":
        cell = LSTMCell(units)
    elif kind == "GRU":
        cell = GRUCell(units, reset_after=reset_after)
    else:
        cell = RNNCell(units, activation=_activation_name(config.get("activation", "tanh")))
    return cell, params


def _kind(class_name: str | None, config: Mapping[str, Any], weights: list | None, where: str) -> str:
    if class_name is None:  # a bare get_config(): the kind from the kernel's width over units
        if not weights or "units" not in config:
            raise ConfigError(f"from_keras: config of {where} has no 'units'; pass the layer's get_config() or "
                              "keras.layers.serialize(layer).", "config")
        gates = _np(weights[0]).shape[-1] // max(int(config["units"]), 1)
        if gates not in _BY_GATES:
            raise ConfigError(f"from_keras: {where}'s kernel has {_np(weights[0]).shape[-1]} columns for "
                              f"units={config['units']}; expected 4x (LSTM), 3x (GRU) or 1x (SimpleRNN).",
                              "layer_or_weights")
        return _BY_GATES[gates]
    if class_name not in _KINDS:
        raise ConfigError(f"from_keras: {where} is a Keras {class_name}; only LSTM, GRU, SimpleRNN and "
                          "Bidirectional around one of them can be imported.", "layer_or_weights")
    return class_name


def from_keras(layer_or_weights: Any, config: Mapping[str, Any] | None = None) -> tuple[RecurrentStack, list]:
    """Convert a Keras 3 ``LSTM``, ``GRU``, ``SimpleRNN`` or ``Bidirectional`` layer.

    Args:
      layer_or_weights: a built Keras layer, or its ``get_weights()`` list of arrays.
      config: with a weights list, the layer's ``get_config()`` dict (the kind is then read from
        the kernel's width: 4, 3 or 1 times ``units``) or ``keras.layers.serialize(layer)``
        (needed for ``Bidirectional``); ``None`` with a layer.

    Returns:
      ``(stack, params)``: a one-layer ``RecurrentStack`` (``bidirectional`` for
      ``Bidirectional``) and its params, so that ``stack.apply(params, x)`` on batch-major
      ``x (B, T, F)`` gives ``(carries, ys)`` with ``ys`` the Keras layer's
      ``return_sequences=True`` output and ``carries[0]`` its final state.

    Warning:
      Keras orders the GRU's gates ``z, r, h``; ours are ``r, z, n`` (PyTorch's): the columns are
      permuted. Keras's LSTM state list is ``[h, c]``, ours ``LSTMCarry(h=..., c=...)``. Keras's
      ``Bidirectional`` state list is ``[h_f, (c_f,) h_b, (c_b)]``; ours is
      ``carries[0] = (forward, backward)``. The layer's ``dropout`` and ``recurrent_dropout``
      become the stack's ``input_dropout`` and ``recurrent_dropout``: they act only where
      ``stack.apply`` gets a ``dropout_key`` (Keras's ``training=True``), with one mask per sequence
      for all steps as Keras's, drawn from JAX's keys (so not the same masks). Options the cells cannot reproduce
      (``go_backwards``, ``stateful``, other activations, a ``merge_mode`` other
      than ``'concat'``) raise ``ConfigError``, as does any weight the import cannot place.
    """
    class_name, cfg, weights = _class_and_config(layer_or_weights, config)
    layer_weights = list(layer_or_weights.get_weights()) if weights is None else weights
    if class_name == "Bidirectional":
        merge = cfg.get("merge_mode", "concat")
        if merge != "concat":
            raise ConfigError(f"from_keras: the Bidirectional layer has merge_mode={merge!r}; only 'concat' "
                              "(Keras's default) can be imported.", "merge_mode")
        if weights is None:
            fwd_layer, bwd_layer = layer_or_weights.forward_layer, layer_or_weights.backward_layer
            parts = [(type(l).__name__, dict(l.get_config()), list(l.get_weights())) for l in (fwd_layer, bwd_layer)]
        else:
            subs = [cfg.get("layer"), cfg.get("backward_layer") or cfg.get("layer")]
            if not all(isinstance(s, Mapping) and "class_name" in s for s in subs):
                raise ConfigError("from_keras: a Bidirectional config must hold its serialised 'layer' (pass "
                                  "keras.layers.serialize(bidirectional_layer) as config).", "config")
            if not weights or len(weights) % 2:
                raise ConfigError(f"from_keras: a Bidirectional layer's weights must split evenly between its two "
                                  f"directions, got {len(weights)} arrays.", "layer_or_weights")
            half = len(weights) // 2
            parts = [(str(s["class_name"]), dict(s["config"]), w) for s, w in zip(subs, (weights[:half],
                                                                                         weights[half:]))]
        converted = []
        for (name, sub_cfg, w), where in zip(parts, ("its forward layer", "its backward layer")):
            if where == "its backward layer":  # Keras runs it with go_backwards=True and flips its outputs back
                if not sub_cfg.get("go_backwards", False):
                    raise ConfigError("from_keras: the Bidirectional layer's backward layer has go_backwards=False; "
                                      "Keras's own Bidirectional sets it to True, which the import expects.",
                                      "backward_layer")
                sub_cfg = {**sub_cfg, "go_backwards": False}
            kind = _kind(name, sub_cfg, w, where)
            converted.append(_layer_params(kind, sub_cfg, w, where))
        (cell_f, p_f), (cell_b, p_b) = converted
        if cell_f != cell_b:
            raise ConfigError(f"from_keras: a Bidirectional layer's two directions must be the same kind and size "
                              f"to import, got {cell_f} and {cell_b}.", "layer_or_weights")
        return RecurrentStack(cell_f, bidirectional=True, **_dropout(parts[0][1])), [(p_f, p_b)]
    where = f"the layer {cfg['name']!r}" if cfg.get("name") else "the layer"
    kind = _kind(class_name, cfg, layer_weights, where)
    cell, params = _layer_params(kind, cfg, layer_weights, where)
    return RecurrentStack(cell, **_dropout(cfg)), [params]


def _dropout(cfg: Mapping[str, Any]) -> dict:
    """A Keras layer's variational dropout rates as ``RecurrentStack`` fields."""
    return {"input_dropout": float(cfg.get("dropout", 0.0) or 0.0),
            "recurrent_dropout": float(cfg.get("recurrent_dropout", 0.0) or 0.0)}


def keras_lstm_params(kernel: Any, recurrent_kernel: Any, bias: Any | None, where: str = "the LSTM") -> dict:
    """``LSTMCell`` params from a Keras LSTM's three arrays (``bias=None`` for ``use_bias=False``);
    ``ConfigError`` naming ``where`` if their shapes are not one LSTM layer's."""
    weights = [kernel, recurrent_kernel] + ([] if bias is None else [bias])
    units = _np(recurrent_kernel).shape[0] if _np(recurrent_kernel).ndim == 2 else 0
    _, params = _layer_params("LSTM", {"units": units, "use_bias": bias is not None}, weights, where)
    return params
