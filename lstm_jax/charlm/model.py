"""The character language model: embedding, recurrent stack, output projection, loss.

With ``embed_size=0`` (the default) the input is one-hot, done as a row gather of the first
layer's input kernel (``token_inputs``): the lesson's one-hot LSTM without the one-hot matrix.
With ``embed_size > 0`` an embedding table ``(V, E)``, initialised N(0, 1) as in PyTorch and Flax,
feeds the first layer. Embedding then input projection, ``embedding[x] @ W_i``, equals the row
gather ``(embedding @ W_i)[x]``: ``apply`` hands the table to the first layer, which folds the two
into one ``(V, G*H)`` table before the scan (a ``V x E x G*H`` matmul) instead of multiplying
every character's embedding, which saves the first layer's largest matmul in the forward pass and
two in the backward pass. Where oneDNN runs the first layer (``lstm_jax.onednn``) it multiplies
either way, and there the narrower embedding rows can be the faster input than the one-hot of the
vocabulary: the layer measures both (``scan_cell``, ``onednn.embedded_inputs``). The parameters
are the usual ones (``embedding`` and the layer's ``(E, G*H)`` input kernel) and the gradients
reach both by the chain rule; results equal the unfolded model to float32 rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import optax

from lstm_jax.core.cells import make_cell
from lstm_jax.core.errors import ConfigError
from lstm_jax.core.products import matmul
from lstm_jax.layers.sequence import RecurrentStack, apply_keep_mask, fold_embedding, sequence_masks

__all__ = ["CharLMConfig", "CharLM", "cross_entropy", "nats_to_bpc"]

Array = jax.Array
OUTPUT_DROPOUT_SALT = 0x68656164  # fold_in data of the output dropout's masks, apart from the stack's
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}
_RATES = {  # CharLMConfig's dropout rates: what each one drops
    "dropout": "of each layer's outputs dropped before the next layer",
    "recurrent_dropout": "of the state dropped before each recurrent product",
    "output_dropout": "of the last layer's outputs dropped before the output layer",
}


@dataclasses.dataclass(frozen=True)
class CharLMConfig:
    """Shape of the model; stored with every checkpoint so sampling needs no model flags."""

    vocab_size: int
    cell: str = "lstm"
    hidden_size: int = 256
    num_layers: int = 2
    embed_size: int = 0
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype of the matrix products; params stay float32
    recurrent_dropout: float = 0.0  # variational, on the state entering each layer's recurrent product
    output_dropout: float = 0.0  # on the last layer's outputs before the output layer, one mask per sequence

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"CharLMConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}.",
                              "CharLMConfig.dtype")
        if self.vocab_size < 2:
            raise ConfigError(f"CharLMConfig.vocab_size must be at least 2, got {self.vocab_size}; the corpus needs "
                              "more than one distinct character.", "CharLMConfig.vocab_size")
        for name, what in (("hidden_size", "units per layer"), ("num_layers", "recurrent layers")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"CharLMConfig.{name} must be an int >= 1 ({what}), got {value!r}.",
                                  f"CharLMConfig.{name}")
        for name, what in _RATES.items():
            rate = getattr(self, name)
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
                raise ConfigError(f"CharLMConfig.{name} must be in [0, 1) (the fraction {what}), got {rate!r}.",
                                  f"CharLMConfig.{name}")
        if self.embed_size < 0:
            raise ConfigError(f"CharLMConfig.embed_size must be >= 0 (0 = one-hot input), got {self.embed_size}.",
                              "CharLMConfig.embed_size")


@dataclasses.dataclass(frozen=True)
class CharLM:
    """``init(key) -> params``; ``apply(params, carry, tokens) -> (carry, logits)``."""

    config: CharLMConfig

    @functools.cached_property
    def stack(self) -> RecurrentStack:
        c = self.config
        cell = make_cell(c.cell, c.hidden_size, dtype=DTYPES[c.dtype], token_inputs=True)
        return RecurrentStack(cell, num_layers=c.num_layers, dropout=c.dropout, recurrent_dropout=c.recurrent_dropout)

    def init(self, key: Array) -> dict:
        c = self.config
        k_emb, k_rnn, k_out = jax.random.split(key, 3)
        params = {
            "rnn": self.stack.init(k_rnn, c.embed_size or c.vocab_size),
            "head": {
                "kernel": jax.nn.initializers.glorot_uniform()(k_out, (c.hidden_size, c.vocab_size)),
                "bias": jnp.zeros((c.vocab_size,)),
            },
        }
        if c.embed_size:
            params["embedding"] = jax.random.normal(k_emb, (c.vocab_size, c.embed_size))  # N(0, 1) as PyTorch and Flax
        return params

    def initial_carry(self, batch_shape: tuple[int, ...] | int = ()) -> list:
        return self.stack.initial_carry(batch_shape)

    def apply(self, params: dict, carry: Any, tokens: Array, *, dropout_key: Array | None = None,
              remat: bool = False, impl: str = "auto", unroll: int | bool = 1) -> tuple[Any, Array]:
        """Tokens ``(*batch, T)`` int -> ``(carry, logits (*batch, T, V) float32)``; ``remat``,
        ``impl`` and ``unroll`` as in ``scan_cell``.

        With a ``dropout_key`` (training; one key, or one per sequence as ``RecurrentStack``'s) the
        stack drops what its rates say, and ``output_dropout`` drops the last layer's outputs before
        the output layer: ``y_t * m / (1 - p)`` with one keep-mask ``m ~ Bernoulli(1 - p)`` per
        sequence, drawn from ``fold_in(key, OUTPUT_DROPOUT_SALT)`` and used at every step (as the
        stack's masks between layers). PyTorch's word-language-model example applies its
        ``nn.Dropout`` there too, with a fresh mask per step. Without a key there is none."""
        params = self._embedding_in_first_layer(params)  # it folds it or feeds its rows to oneDNN (scan_cell)
        # Time-major through the stack and the head, so the head is one 2-D matmul: XLA:CPU
        # differentiates a product over (*batch, T) rows slower than over one axis of rows.
        carry, ys = self.stack.apply(params["rnn"], jnp.moveaxis(tokens, -1, 0), initial_carry=carry,
                                     time_major=True, dropout_key=dropout_key, remat=remat, impl=impl,
                                     unroll=unroll)
        rate = self.config.output_dropout
        if dropout_key is not None and rate > 0:
            keep = sequence_masks(dropout_key, 1.0 - rate, ys.shape[1:-1], ys.shape[-1], salt=OUTPUT_DROPOUT_SALT)
            ys = apply_keep_mask(ys, keep, rate)  # (B, H) masks over the (T, B, H) outputs
        head = params["head"]
        logits = matmul(ys.reshape(-1, ys.shape[-1]), head["kernel"], DTYPES[self.config.dtype], jnp.float32)
        return carry, jnp.moveaxis((logits + head["bias"]).reshape(*ys.shape[:-1], -1), 0, -2)

    def fold_embedding(self, params: dict) -> dict:
        """The same function's params without the embedding: it is folded into the first layer's
        input kernel, ``(V, E) @ (E, G*H) -> (V, G*H)``, a table the first layer gathers rows of.

        ``apply`` hands the embedding to the first layer, which folds it the same way (or, on
        oneDNN, may feed it the embedding rows instead; ``scan_cell``); fold once outside a loop
        that calls ``apply`` many times (generation). ``apply(fold_embedding(p), ...) ==
        apply(p, ...)`` to rounding; differentiable.
        """
        first, *rest = self._embedding_in_first_layer(params)["rnn"]
        return {"rnn": [fold_embedding(self.stack.cell, first), *rest], "head": params["head"]}

    @staticmethod
    def _embedding_in_first_layer(params: dict) -> dict:
        """The params with the ``embedding`` moved into the first layer's (``scan_cell``'s form)."""
        if "embedding" not in params:
            return params
        first, *rest = params["rnn"]
        return {"rnn": [{**first, "embedding": params["embedding"]}, *rest], "head": params["head"]}


def cross_entropy(logits: Array, targets: Array, weights: Array | None = None) -> Array:
    """Mean (or ``weights``-weighted mean) cross-entropy in nats."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if weights is None:
        return nll.mean()
    return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def nats_to_bpc(nats: Any) -> Any:
    """Nats per character to bits per character."""
    return nats / math.log(2.0)
