"""Exceptions raised for bad input.

Every message is one full sentence that names the argument, says what was expected and what
was given, and what to do. The command-line scripts print ``LstmJaxError`` messages as a single
line and exit with status 2; library users can catch the specific subclasses.
"""

from __future__ import annotations

__all__ = [
    "LstmJaxError",
    "ConfigError",
    "CorpusError",
    "CheckpointError",
    "NonFiniteLossError",
]


class LstmJaxError(Exception):
    """Base class of every error lstm_jax raises on purpose for bad input."""


class ConfigError(LstmJaxError, ValueError):
    """An option, shape or dtype that cannot work (bad flag, wrong input size, unknown option)."""


class CorpusError(LstmJaxError, ValueError):
    """A corpus that is missing, empty, binary or too short to train on."""


class CheckpointError(LstmJaxError, ValueError):
    """A checkpoint folder that is missing, foreign, or was written for another configuration."""


class NonFiniteLossError(LstmJaxError, FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept untouched."""
