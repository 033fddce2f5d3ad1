"""The package's shape: the public API pinned, the import paths users know, layers that import only
downward, ``import lstm_jax`` free of side effects and heavy imports, errors in the caller's words."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import lstm_jax
from lstm_jax import ConfigError

PACKAGE = Path(lstm_jax.__file__).parent

PUBLIC = [
    "LSTMCell", "GRUCell", "MGUCell", "RNNCell", "LeakyRNNCell", "ConvLSTMCell", "LSTMCarry", "make_cell",
    "MinGRUCell", "MinLSTMCell", "SLSTMCell", "MLSTMCell", "SLSTMCarry", "MLSTMCarry",
    "scan_cell", "reverse_padded", "RecurrentStack", "fused_lstm", "fused_gru", "fused_rnn", "onednn_lstm",
    "onednn_gru", "onednn", "from_torch", "from_flax_lstm", "from_flax_gru", "from_flax_mgu", "from_flax_convlstm",
    "from_keras", "CharLM", "CharLMConfig", "cross_entropy", "nats_to_bpc",
    "Corpus", "Document", "Vocabulary", "load_corpus", "split_documents",
    "Trainer", "TrainConfig", "TrainState", "evaluate_bpc", "make_optimizer", "fastest_setup", "Setup",
    "fastest_device_count", "scan_steps",
    "generate", "generate_stream", "Checkpointer", "load_run", "from_keras_seed", "parallel", "runtime",
    "LstmJaxError", "ConfigError", "CorpusError", "CheckpointError", "NonFiniteLossError",
]

# bottom to top; a module may import from its own layer and those below it
LAYERS = ["core", "kernels", "dispatch", "runtime", "layers", "adapters", "charlm", "facades"]
FACADES = {"onednn", "interop", "nnx", "linen", "parallel"}


def test_the_public_api_is_pinned_and_every_name_resolves():
    assert sorted(lstm_jax.__all__) == sorted(PUBLIC)
    for name in PUBLIC:
        assert getattr(lstm_jax, name) is not None, name


def test_the_import_paths_users_know_still_work():
    import lstm_jax.parallel as by_path
    from lstm_jax import interop, linen, nnx, onednn, parallel, runtime  # noqa: F401
    from lstm_jax.interop import from_torch  # noqa: F401
    from lstm_jax.onednn import available, onednn_lstm, pays  # noqa: F401
    from lstm_jax.parallel import data_mesh, value_and_grad  # noqa: F401

    assert by_path is lstm_jax.layers.parallel and lstm_jax.parallel is by_path  # one module, not a copy
    assert lstm_jax.nnx is lstm_jax.adapters.nnx and lstm_jax.interop is lstm_jax.adapters.interop


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "package"
    if parts[1] in FACADES and len(parts) == 2:
        return "facades"
    return parts[1]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lstm_jax"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("lstm_jax"))
    return found


def test_each_layer_imports_only_from_the_layers_below_it():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("lstm_jax", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        here = _layer(module)
        if here == "package":
            continue
        for target in _imports(path):
            there = _layer(target)
            if there in ("package",) or target.split(".")[1] not in {p.name.removesuffix(".py") for p in
                                                                     PACKAGE.iterdir()}:
                continue
            if there != here and LAYERS.index(there) > LAYERS.index(here):
                upward.append(f"{module} ({here}) imports {target} ({there})")
    assert not upward, "\n".join(upward)


def test_import_lstm_jax_loads_no_heavy_library_and_changes_nothing():
    """A fresh interpreter: ``import lstm_jax`` (and a cell over a sequence) loads jax and numpy, not
    orbax, tensorstore, optax, nltk, matplotlib, tqdm or flax, and leaves the allocator alone."""
    code = """
import json, sys, time
t0 = time.perf_counter()
import lstm_jax
seconds = time.perf_counter() - t0
import jax, jax.numpy as jnp
cell = lstm_jax.LSTMCell(8)
lstm_jax.scan_cell(cell, cell.init(jax.random.key(0), 3), jnp.ones((2, 5, 3)))
heavy = [m for m in ("orbax", "tensorstore", "optax", "nltk", "matplotlib", "tqdm", "flax", "torch",
                                  "keras", "h5py")
         if m in sys.modules]
print(json.dumps({"heavy": heavy, "tuned": lstm_jax.runtime.malloc_tuned(), "seconds": seconds}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == [] and report["tuned"] is False, report


def test_library_errors_name_the_argument_and_the_scripts_name_their_flag():
    from lstm_jax import TrainConfig
    from lstm_jax.charlm import train

    with pytest.raises(ConfigError) as err:
        TrainConfig(batch_size=0)
    assert str(err.value) == "TrainConfig.batch_size must be >= 1, got 0."
    assert err.value.in_words_of(train.FLAGS) == "--batch-size must be >= 1, got 0."
