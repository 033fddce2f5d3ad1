"""Flags for the machine at hand: what ``train.py --recipe auto`` chooses, and the rule behind it.

How well a character model does in a fixed time depends on how many steps the machine does in
it, and that decides more than the learning rate: on a CPU with bf16 units (AVX512-BF16, AMX)
bf16 products give several times float32's steps at no cost in accuracy; dropout between the
layers helps once a run has thousands of steps and holds a short run back; decoupled weight decay
helped at every step count measured. ``--recipe auto`` makes those three choices for a new run,
the flags given explicitly winning over it:

* ``--dtype``: the compute dtype that trains the model's layers fastest here, timed
  (``lstm_jax.dispatch.compute_dtype``: a layer's training pass in both dtypes, cached per
  machine).
* ``--weight-decay``: ``WEIGHT_DECAY``.
* ``--dropout``: ``DROPOUT`` where the run has at least ``DROPOUT_FROM_STEPS`` steps and the
  model two layers or more (it drops between the layers), else none. A run of ``--epochs`` or
  ``--total-steps`` knows its steps; a ``--minutes`` budget forecasts them from the step time
  measured before the plan (``budget.plan_total_steps`` without the epoch ends), a forecast that
  can be a tenth off: near the threshold both choices measured alike.

In a run of several processes, process 0's choices are every process's. The rule and its
numbers come from the quality runs across CPUs and budgets
(``benchmarks/quality.py``; docs/performance.md, "Choosing flags for the step rate"). The choices
are saved with the run like any flag: a resumed run keeps them, whatever its machine.
"""

from __future__ import annotations

from lstm_jax.core.errors import ConfigError

__all__ = ["RECIPES", "KEYS", "WEIGHT_DECAY", "DROPOUT", "DROPOUT_FROM_STEPS", "check_recipe", "regularisation"]

RECIPES = ("none", "auto")
KEYS = ("dtype", "weight_decay", "dropout")  # what 'auto' may choose, where not given
WEIGHT_DECAY = 0.05
DROPOUT = 0.25
DROPOUT_FROM_STEPS = 2_500


def check_recipe(recipe: str, preset: str) -> None:
    """``recipe`` is one of ``RECIPES``; ``'auto'`` is a rule for the stateful language model
    (``--preset lm``), measured on it alone."""
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}.", "--recipe")
    if recipe == "auto" and preset != "lm":
        raise ConfigError(f"--recipe auto chooses flags for the stateful language model (--preset lm), not for "
                          f"--preset {preset}; drop --recipe or --preset.", "--recipe")


def regularisation(steps: int, num_layers: int) -> dict[str, float]:
    """``weight_decay`` and ``dropout`` for a run of ``steps`` training steps of a model of
    ``num_layers`` recurrent layers."""
    on = steps >= DROPOUT_FROM_STEPS and num_layers >= 2
    return {"weight_decay": WEIGHT_DECAY, "dropout": DROPOUT if on else 0.0}
