"""``--recipe auto``: flags chosen for the machine at hand (``lstm_jax.charlm.recipe``), the measured
compute dtype behind it (``lstm_jax.dispatch.compute_dtype``), and the CLI that applies them."""

import json

import pytest

from lstm_jax import dispatch
from lstm_jax.charlm import budget, recipe
from lstm_jax.charlm import train as train_script
from lstm_jax.core.errors import ConfigError
from lstm_jax.dispatch import cache, measure
from tests.test_training import TINY, _train


def test_regularisation_turns_dropout_on_at_the_step_threshold_between_layers():
    n = recipe.DROPOUT_FROM_STEPS
    assert recipe.regularisation(n - 1, 2) == {"weight_decay": recipe.WEIGHT_DECAY, "dropout": 0.0}
    assert recipe.regularisation(n, 2) == {"weight_decay": recipe.WEIGHT_DECAY, "dropout": recipe.DROPOUT}
    assert recipe.regularisation(10 * n, 1)["dropout"] == 0.0  # it drops between layers: one has none


def test_recipe_dropout_counts_the_steps_of_each_kind_of_run():
    """``--total-steps`` and ``--epochs`` give the steps; a ``--minutes`` budget forecasts the timed
    steps that fit in the seconds left, the plan's margin kept."""
    n = recipe.DROPOUT_FROM_STEPS
    quiet = lambda *a, **k: None  # noqa: E731
    fit = 480.0 * (1 - budget.MARGIN)  # the seconds a plan fills
    cases = [({"total_steps": n, "minutes": None, "epochs": 1}, 100, 0.0, None, recipe.DROPOUT),
             ({"total_steps": None, "minutes": 8, "epochs": 5}, 100, 480.0, fit / n * 0.999, recipe.DROPOUT),
             ({"total_steps": None, "minutes": 8, "epochs": 5}, 100, 480.0, fit / n * 1.001, 0.0),
             ({"total_steps": None, "minutes": None, "epochs": 25}, n // 25, 0.0, None, recipe.DROPOUT),
             ({"total_steps": None, "minutes": None, "epochs": 5}, n // 25, 0.0, None, 0.0)]
    for config, spe, left, step_s, dropout in cases:
        config = {**config, "dropout": 0.0, "num_layers": 2}
        assert train_script.recipe_dropout(config, *train_script.run_steps(config, spe, left, step_s), quiet) == (
            dropout > 0), config
        assert config["dropout"] == dropout, config


def test_recipe_is_checked_against_the_preset():
    recipe.check_recipe("auto", "lm")
    recipe.check_recipe("none", "keras")
    with pytest.raises(ConfigError, match="--recipe auto chooses flags for the stateful language model"):
        recipe.check_recipe("auto", "keras")
    with pytest.raises(ConfigError, match="--recipe must be one of none, auto"):
        recipe.check_recipe("fast", "lm")


def test_compute_dtype_takes_what_measured_faster_and_caches_it(monkeypatch):
    """Both dtypes' layer passes are timed together; bf16 only where it wins by the margin; the
    answer is cached on disk for the next process. Off CPU, or unmeasured, the proposal stands."""
    shape = ("lstm", 24, 8, 64)
    dtype, seconds = dispatch.compute_dtype(*shape)
    assert set(seconds) == {"float32", "bfloat16"} and all(s > 0 for s in seconds.values())
    assert dtype == ("bfloat16" if seconds["float32"] >= measure.MARGIN * seconds["bfloat16"] else "float32")
    entries = json.loads(cache.cache_path().read_text())
    mine = [v for k, v in entries.items() if "|compute-dtype|lstm|" in k and "|24x8x64|" in k]
    assert len(mine) == 1 and mine[0]["dtype"] == dtype
    assert dispatch.compute_dtype(*shape) == (dtype, seconds)  # read back, not timed again
    assert dispatch.compute_dtype("lstm", 24, 8, 64, platform="tpu") == ("bfloat16", {})
    assert dispatch.compute_dtype("mgu", 24, 8, 64) == ("float32", {})  # no layer pass to time for it
    monkeypatch.setenv("LSTM_JAX_DISPATCH", "fixed")
    assert dispatch.compute_dtype("lstm", 24, 8, 96) == ("float32", {})


def test_cli_recipe_auto_chooses_the_flags_not_given_and_a_resume_keeps_them(text_corpus, tmp_path, capsys,
                                                                              monkeypatch):
    run = tmp_path / "run"
    assert _train(["--corpus", text_corpus, "--run-dir", run, "--total-steps", 6, "--recipe", "auto", *TINY]) == 0
    out = capsys.readouterr().out
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"] == "auto" and config["weight_decay"] == recipe.WEIGHT_DECAY
    assert config["dropout"] == 0.0 and config["dtype"] in ("float32", "bfloat16")  # 6 steps: no dropout
    assert f"--recipe auto: --dtype {config['dtype']}" in out and "--recipe auto: --dropout 0 (about 6 steps" in out

    assert _train(["--run-dir", run, "--recipe", "auto"]) == 0  # resumed: the saved choices, nothing chosen again
    out = capsys.readouterr().out
    assert "--recipe auto" not in out and "resumed" in out
    assert json.loads((run / "config.json").read_text()) == config

    monkeypatch.setattr(recipe, "DROPOUT_FROM_STEPS", 5)  # 6 steps now count as many: dropout on
    on, one = tmp_path / "on", tmp_path / "one"
    assert _train(["--corpus", text_corpus, "--run-dir", on, "--total-steps", 6, "--recipe", "auto", *TINY]) == 0
    config = json.loads((on / "config.json").read_text())
    assert config["dropout"] == config["model"]["dropout"] == recipe.DROPOUT  # the model was built with it
    assert "--recipe auto: --dropout 0.25 (about 6 steps; dropout from 5)" in capsys.readouterr().out
    assert _train(["--corpus", text_corpus, "--run-dir", one, "--total-steps", 6, "--recipe", "auto", *TINY,
                   "--num-layers", 1]) == 0
    assert json.loads((one / "config.json").read_text())["model"]["dropout"] == 0.0
    assert "it drops between layers, and the model has one" in capsys.readouterr().out

    given = tmp_path / "given"
    assert _train(["--corpus", text_corpus, "--run-dir", given, "--total-steps", 3, "--recipe", "auto", *TINY,
                   "--dtype", "float32", "--dropout", "0.1", "--weight-decay", "0"]) == 0
    out = capsys.readouterr().out
    config = json.loads((given / "config.json").read_text())
    assert (config["dtype"], config["dropout"], config["weight_decay"]) == ("float32", 0.1, 0.0)
    assert "--recipe auto" not in out  # every choice was given

    assert _train(["--corpus", text_corpus, "--run-dir", tmp_path / "keras", "--recipe", "auto", "--preset", "keras",
                   *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--recipe auto chooses flags for the stateful language model" in err
    assert not (tmp_path / "keras" / "config.json").exists()
