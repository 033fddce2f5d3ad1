"""Exceptions raised for bad input.

Every message is one full sentence that names the argument, says what was expected and what
was given, and what to do. The command-line scripts print ``LstmJaxError`` messages as a single
line and exit with status 2; library users can catch the specific subclasses.
"""

from __future__ import annotations

import re

__all__ = [
    "LstmJaxError",
    "ConfigError",
    "CorpusError",
    "CheckpointError",
    "NonFiniteLossError",
]


class LstmJaxError(Exception):
    """Base class of every error lstm_jax raises on purpose for bad input.

    ``argument`` names what the caller passed, as the message spells it (e.g.
    ``'TrainConfig.batch_size'``), where one argument is at fault: the command-line scripts
    rewrite it to their flag (``--batch-size``) so that each layer speaks its caller's words.
    """

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument

    def in_words_of(self, names: dict[str, str]) -> str:
        """The message in the caller's words: each name in ``names`` replaced by ``names[name]``
        (e.g. ``{'TrainConfig.batch_size': '--batch-size'}``), as a whole word. A single plain
        word (``'corpus'``) is replaced only where it is this error's ``argument``, since it may
        stand in the message as a plain word; dotted names and phrases are replaced wherever found."""
        message = str(self)
        for name in sorted(names, key=len, reverse=True):
            if name.isidentifier() and name != self.argument:
                continue
            message = re.sub(rf"(?<![\w.-]){re.escape(name)}(?![\w])", names[name], message)
        return message


class ConfigError(LstmJaxError, ValueError):
    """An option, shape or dtype that cannot work (bad flag, wrong input size, unknown option)."""


class CorpusError(LstmJaxError, ValueError):
    """A corpus that is missing, empty, binary or too short to train on."""


class CheckpointError(LstmJaxError, ValueError):
    """A checkpoint folder that is missing, foreign, or was written for another configuration."""


class NonFiniteLossError(LstmJaxError, FloatingPointError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept untouched."""
