"""Layer 6, the character language model application: ``data`` (corpus, vocabulary), ``model``
(``CharLM``), ``training`` (``Trainer``: chunks of jitted steps, optax), ``sampling``,
``checkpoint`` (orbax, seals, fallback; with ``runlock`` and ``quiet``), ``keras_seed`` (the
lesson's Keras model from its weights file) and the two command-line scripts ``train`` and
``sample``. Loaded on first use: ``import lstm_jax`` does not import it."""
