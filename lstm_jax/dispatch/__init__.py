"""The one place that decides how a recurrent layer runs (see ``dispatch.plan`` for the rules).

* ``plan`` — ``plan_layer`` returns a ``Plan`` (kernel, layout, threads, input route) for a layer;
  the oneDNN and carry-layout rules; the in-process memo of measured choices.
* ``measure`` — the timing routines behind the measured choices, and the margin a more complex
  candidate must win by.
* ``cache`` — the machine's JSON cache of measured choices (``filelock``, ``platformdirs``).
* ``switches`` — every ``LSTM_JAX_*`` environment variable, read and checked here only.

Layers (``lstm_jax.layers``) ask for plans; kernels (``lstm_jax.kernels``) take a plan's settings
as arguments and import nothing from here.
"""

from lstm_jax.dispatch import cache, measure, switches
from lstm_jax.dispatch.plan import (
    IMPLS,
    Plan,
    check_impl,
    compute_dtype,
    cpu_choices_apply,
    cudnn_unsupported_reason,
    current_platform,
    embedding_route,
    likely_platform,
    measuring,
    onednn_ready,
    onednn_threads,
    onednn_unavailable_reason,
    plan_layer,
    proposed_compute_dtype,
    step_impls,
    transposed_carry_pays,
)

__all__ = ["Plan", "plan_layer", "IMPLS", "check_impl", "embedding_route", "measuring", "onednn_ready",
           "onednn_threads", "onednn_unavailable_reason", "transposed_carry_pays", "cpu_choices_apply",
           "cudnn_unsupported_reason", "current_platform", "likely_platform", "proposed_compute_dtype", "compute_dtype",
           "step_impls",
           "cache", "measure", "switches"]
