"""Parity with PyTorch nn.LSTM/GRU/RNN and Flax linen cells after weight import, to 1e-5 in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lstm_jax import ConfigError, LSTMCarry, scan_cell
from lstm_jax.adapters.interop import from_flax_gru, from_flax_lstm, from_torch

ATOL = 1e-5


# --- PyTorch ----------------------------------------------------------------------------------

torch = pytest.importorskip("torch", reason="PyTorch parity tests need torch installed")
TORCH_MODULES = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}


def _torch_module(kind, **kw):
    torch.manual_seed(0)
    extra = {"nonlinearity": "relu"} if kind == "rnn_relu" else {}
    module = TORCH_MODULES[kind.split("_")[0]](**kw, **extra)
    with torch.no_grad():  # bigger weights than PyTorch's default so every gate matters
        for p in module.parameters():
            p.uniform_(-0.6, 0.6)
    return module


def _sd(module):
    return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def _to_torch_carry(carries, kind, bidirectional):
    """Our per-layer carries -> PyTorch's stacked (h, c) or h."""
    per_dir = [c for layer in carries for c in (layer if bidirectional else (layer,))]
    if kind == "lstm":
        return (torch.from_numpy(np.stack([np.asarray(c.h) for c in per_dir])),
                torch.from_numpy(np.stack([np.asarray(c.c) for c in per_dir])))
    return torch.from_numpy(np.stack([np.asarray(c) for c in per_dir]))


def _assert_carry_close(carries, torch_carry, kind, bidirectional):
    expected = _to_torch_carry(carries, kind, bidirectional)
    for ours, theirs in zip(expected if kind == "lstm" else (expected,),
                            torch_carry if kind == "lstm" else (torch_carry,)):
        np.testing.assert_allclose(ours.numpy(), theirs.detach().numpy(), atol=ATOL)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn", "rnn_relu"])
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (3, False), (2, True)])
def test_torch_parity_sequences_and_final_carries(kind, num_layers, bidirectional):
    module = _torch_module(kind, input_size=5, hidden_size=7, num_layers=num_layers,
                           bidirectional=bidirectional, batch_first=True)
    stack, params = from_torch(_sd(module), nonlinearity="relu" if kind == "rnn_relu" else "tanh")
    assert (stack.num_layers, stack.bidirectional) == (num_layers, bidirectional)
    x = np.random.default_rng(0).normal(size=(3, 9, 5)).astype(np.float32)
    y_t, carry_t = module(torch.from_numpy(x))
    carries, ys = jax.jit(stack.apply)(params, jnp.asarray(x))
    np.testing.assert_allclose(ys, y_t.detach().numpy(), atol=ATOL)
    _assert_carry_close(carries, carry_t, kind.split("_")[0], bidirectional)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_torch_parity_initial_carries_time_major(kind):
    module = _torch_module(kind, input_size=4, hidden_size=6, num_layers=2, bidirectional=True)
    stack, params = from_torch(_sd(module))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 3, 4)).astype(np.float32)  # time-major, batch_first=False
    init = stack.initial_carry((3,))
    init = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), init)
    y_t, carry_t = module(torch.from_numpy(x), _to_torch_carry(init, kind, True))
    carries, ys = stack.apply(params, jnp.asarray(x), initial_carry=init, time_major=True)
    np.testing.assert_allclose(ys, y_t.detach().numpy(), atol=ATOL)
    _assert_carry_close(carries, carry_t, kind, True)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_torch_parity_seq_lengths_packed(kind, bidirectional):
    module = _torch_module(kind, input_size=4, hidden_size=5, num_layers=2,
                           bidirectional=bidirectional, batch_first=True)
    stack, params = from_torch(_sd(module))
    lengths = [6, 2, 4]
    x = np.random.default_rng(2).normal(size=(3, 6, 4)).astype(np.float32)
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.from_numpy(x), lengths, batch_first=True,
                                                     enforce_sorted=False)
    y_packed, carry_t = module(packed)
    y_t, _ = torch.nn.utils.rnn.pad_packed_sequence(y_packed, batch_first=True)
    carries, ys = stack.apply(params, jnp.asarray(x), seq_lengths=jnp.array(lengths))
    np.testing.assert_allclose(ys, y_t.detach().numpy(), atol=ATOL)
    _assert_carry_close(carries, carry_t, kind, bidirectional)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_torch_parity_single_step_cell(kind):
    module = _torch_module(kind, input_size=3, hidden_size=4)
    stack, params = from_torch(_sd(module))
    x = np.random.default_rng(3).normal(size=(2, 1, 3)).astype(np.float32)
    y_t, _ = module(torch.from_numpy(x).transpose(0, 1))
    _, y = stack.cell.apply(params[0], stack.cell.initial_carry((2,)), jnp.asarray(x[:, 0]))
    np.testing.assert_allclose(y, y_t[0].detach().numpy(), atol=ATOL)


def test_torch_import_of_module_without_bias_and_with_tensors():
    module = _torch_module("lstm", input_size=3, hidden_size=4, bias=False)
    stack, params = from_torch(module.state_dict())  # tensors, not numpy
    x = np.random.default_rng(4).normal(size=(5, 2, 3)).astype(np.float32)
    y_t, _ = module(torch.from_numpy(x))
    _, ys = stack.apply(params, jnp.asarray(x), time_major=True)
    np.testing.assert_allclose(ys, y_t.detach().numpy(), atol=ATOL)


def test_torch_import_rejects_foreign_state_dicts():
    with pytest.raises(ConfigError, match="weight_ih_l0"):
        from_torch({"weight": np.zeros((3, 3))})
    gru = _sd(_torch_module("gru", input_size=3, hidden_size=4))
    with pytest.raises(ConfigError, match="weight_hr_l0 .a projection. belongs to an nn.LSTM only"):
        from_torch({**gru, "weight_hr_l0": np.zeros((2, 4), np.float32)})


@pytest.mark.parametrize("num_layers,bidirectional,packed,impl", [(1, False, False, "fused"), (2, True, False, "scan"),
                                                                  (2, True, True, "fused"), (2, False, True, "scan")])
def test_torch_lstm_with_projection_values_and_gradients(num_layers, bidirectional, packed, impl):
    """nn.LSTM(proj_size=P): outputs, final (h, c) and every weight's gradient equal PyTorch's,
    packed sequences included, on the fused layer and the scan."""
    module = _torch_module("lstm", input_size=4, hidden_size=7, proj_size=3, num_layers=num_layers,
                           bidirectional=bidirectional, batch_first=True)
    stack, params = from_torch(_sd(module))
    assert stack.cell.proj_size == 3 and stack.output_size == 3 * (2 if bidirectional else 1)
    lengths = [6, 2, 4]
    x = np.random.default_rng(5).normal(size=(3, 6, 4)).astype(np.float32)
    x_t = torch.from_numpy(x)
    if packed:
        y_p, carry_t = module(torch.nn.utils.rnn.pack_padded_sequence(x_t, lengths, batch_first=True,
                                                                      enforce_sorted=False))
        y_t = torch.nn.utils.rnn.pad_packed_sequence(y_p, batch_first=True)[0]
    else:
        y_t, carry_t = module(x_t)
    w = np.cos(np.arange(y_t.numel(), dtype=np.float32)).reshape(y_t.shape)
    loss_t = (y_t * torch.from_numpy(w)).sum() + carry_t[0].sin().sum() + carry_t[1].sin().sum()
    loss_t.backward()

    seq = jnp.array(lengths) if packed else None

    def loss(p):
        carries, ys = stack.apply(p, jnp.asarray(x), seq_lengths=seq, impl=impl)
        h, c = _stacked(carries, bidirectional)
        return jnp.sum(ys * w) + jnp.sum(jnp.sin(h)) + jnp.sum(jnp.sin(c)), (carries, ys)

    (value, (carries, ys)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    np.testing.assert_allclose(ys, y_t.detach().numpy(), atol=ATOL)
    _assert_carry_close(carries, carry_t, "lstm", bidirectional)
    np.testing.assert_allclose(value, loss_t.item(), rtol=1e-5)
    named = dict(module.named_parameters())
    for layer in range(num_layers):
        for d, suffix in enumerate(["", "_reverse"][: 1 + bidirectional]):
            g = grads[layer][d] if bidirectional else grads[layer]
            sfx = f"_l{layer}{suffix}"
            np.testing.assert_allclose(g["input_kernel"], named["weight_ih" + sfx].grad.numpy().T, atol=1e-4)
            np.testing.assert_allclose(g["recurrent_kernel"], named["weight_hh" + sfx].grad.numpy().T, atol=1e-4)
            np.testing.assert_allclose(g["projection_kernel"], named["weight_hr" + sfx].grad.numpy().T, atol=1e-4)
            np.testing.assert_allclose(g["bias"], named["bias_ih" + sfx].grad.numpy(), atol=1e-4)


def _stacked(carries, bidirectional):
    per_dir = [c for layer in carries for c in (layer if bidirectional else (layer,))]
    return jnp.stack([c.h for c in per_dir]), jnp.stack([c.c for c in per_dir])


@pytest.mark.parametrize("kind", ["gru", "rnn"])
def test_torch_import_of_gru_and_rnn_without_bias(kind):
    module = _torch_module(kind, input_size=3, hidden_size=4, bias=False, num_layers=2)
    stack, params = from_torch(_sd(module))
    x = np.random.default_rng(4).normal(size=(5, 2, 3)).astype(np.float32)
    y_t, _ = module(torch.from_numpy(x))
    _, ys = stack.apply(params, jnp.asarray(x), time_major=True)
    np.testing.assert_allclose(ys, y_t.detach().numpy(), atol=ATOL)


# --- Flax -------------------------------------------------------------------------------------

nn = pytest.importorskip("flax.linen")


@pytest.mark.parametrize("flax_cell", ["LSTMCell", "OptimizedLSTMCell"])
def test_flax_lstm_parity_step_and_sequence(flax_cell):
    cell_f = getattr(nn, flax_cell)(features=6)
    x = jax.random.normal(jax.random.key(1), (3, 8, 4))
    carry_f = cell_f.initialize_carry(jax.random.key(0), x[:, 0].shape)
    variables = cell_f.init(jax.random.key(2), carry_f, x[:, 0])
    variables = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(5), a.shape), variables)
    cell, params = from_flax_lstm(variables)
    c0 = jax.random.normal(jax.random.key(3), (3, 6))
    h0 = jax.random.normal(jax.random.key(4), (3, 6))
    (c_f, h_f), y_f = cell_f.apply(variables, (c0, h0), x[:, 0])
    carry, y = cell.apply(params, LSTMCarry(h=h0, c=c0), x[:, 0])
    np.testing.assert_allclose(y, y_f, atol=ATOL)
    np.testing.assert_allclose(carry.c, c_f, atol=ATOL)
    rnn = nn.RNN(cell_f, return_carry=True)
    (c_f, h_f), ys_f = rnn.apply({"params": {"cell": variables["params"]}}, x)
    carry, ys = scan_cell(cell, params, x)
    np.testing.assert_allclose(ys, ys_f, atol=ATOL)
    np.testing.assert_allclose(carry.h, h_f, atol=ATOL)
    np.testing.assert_allclose(carry.c, c_f, atol=ATOL)


def test_flax_gru_parity_sequence():
    cell_f = nn.GRUCell(features=5)
    x = jax.random.normal(jax.random.key(1), (2, 7, 3))
    variables = cell_f.init(jax.random.key(2), jnp.zeros((2, 5)), x[:, 0])
    variables = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(6), a.shape), variables)
    cell, params = from_flax_gru(variables["params"])
    h_f, ys_f = nn.RNN(cell_f, return_carry=True).apply({"params": {"cell": variables["params"]}}, x)
    h, ys = scan_cell(cell, params, x)
    np.testing.assert_allclose(ys, ys_f, atol=ATOL)
    np.testing.assert_allclose(h, h_f, atol=ATOL)


def test_flax_import_names_missing_entries():
    with pytest.raises(ConfigError, match="'ii'"):
        from_flax_lstm({"params": {"Dense_0": {}}})
