"""Every ``LSTM_JAX_*`` environment variable, read and checked in one place.

* ``LSTM_JAX_DISPATCH``: ``measure`` (default) or ``fixed`` (each platform's fixed plan, nothing timed).
* ``LSTM_JAX_ONEDNN``: ``auto`` (default: oneDNN layers where measured faster), ``0`` (never) or
  ``1`` (wherever supported, unmeasured).
* ``LSTM_JAX_LAYOUT``: ``auto`` (default), ``row-major`` or ``transposed``: the fused loop's carry
  layout on CPU.
* ``LSTM_JAX_CACHE_DIR``: the folder of the cache of measured choices (default: the user cache folder).
* ``LSTM_JAX_MALLOC``: ``tuned`` (default) or ``default`` (``runtime.tune_malloc()`` changes nothing).

The variables are read when a choice is made (not at import), so a test or a script may set them
at any time before it runs a layer. A value outside the allowed ones raises ``ConfigError`` naming
the variable and its allowed values.
"""

from __future__ import annotations

import os

from lstm_jax.core.errors import ConfigError

__all__ = ["DISPATCH", "ONEDNN", "LAYOUT", "CACHE_DIR", "MALLOC", "dispatch_mode", "onednn_mode", "layout_mode",
           "cache_dir", "malloc_mode", "check_all"]

DISPATCH, ONEDNN, LAYOUT, CACHE_DIR, MALLOC = (
    "LSTM_JAX_DISPATCH", "LSTM_JAX_ONEDNN", "LSTM_JAX_LAYOUT", "LSTM_JAX_CACHE_DIR", "LSTM_JAX_MALLOC")

# variable -> {spelling: meaning}; the empty string is "unset"
_VALUES = {
    DISPATCH: {"": "measure", "measure": "measure", "fixed": "fixed"},
    ONEDNN: {"": "auto", "auto": "auto", "0": "off", "1": "on"},
    LAYOUT: {"": "auto", "auto": "auto", "row-major": "row-major", "row_major": "row-major", "rowmajor": "row-major",
             "transposed": "transposed"},
    MALLOC: {"": "tuned", "tuned": "tuned", "1": "tuned", "on": "tuned", "default": "default", "0": "default",
             "off": "default", "no": "default"},
}


def _read(name: str) -> str:
    raw = os.environ.get(name, "")
    value = _VALUES[name].get(raw.strip().lower())
    if value is None:
        allowed = ", ".join(repr(k) for k in dict.fromkeys(_VALUES[name]) if k)
        raise ConfigError(f"{name} must be one of {allowed} (or unset), got {raw!r}; fix or unset the variable.")
    return value


def check_all() -> None:
    """Read every switch once: an unknown value raises ``ConfigError`` before anything is planned."""
    for name in _VALUES:
        _read(name)


def dispatch_mode() -> str:
    """``'measure'``: choices are timed on this machine and cached; ``'fixed'``: no timing."""
    return _read(DISPATCH)


def onednn_mode() -> str:
    """``'auto'`` (where measured faster), ``'off'`` (``LSTM_JAX_ONEDNN=0``) or ``'on'`` (``=1``)."""
    return _read(ONEDNN)


def layout_mode() -> str:
    """``'auto'``, ``'row-major'`` or ``'transposed'``."""
    return _read(LAYOUT)


def malloc_mode() -> str:
    """``'tuned'`` or ``'default'`` (``LSTM_JAX_MALLOC=default`` keeps the C library's settings)."""
    return _read(MALLOC)


def cache_dir() -> str | None:
    """``LSTM_JAX_CACHE_DIR`` when set (else None: the user cache folder)."""
    return os.environ.get(CACHE_DIR) or None
