"""Data parallelism over every device of every host: one mesh, one ``data`` axis.

The model is small next to its activations, so the whole library scales out the simple way:
parameters and optimizer state are replicated (``NamedSharding`` with ``P()``), each device holds
its own slice of the batch (``P('data')``: its own text streams and carried state), and the
gradient is one all-reduce per step. The same jitted step runs on 1 device, N devices or P
processes; nothing in ``core``, ``kernels`` or ``layers.sequence`` knows about devices.

For your own training loop (``value_and_grad`` runs the loss on each device's rows and averages
the gradients with one all-reduce)::

    import jax, numpy as np
    from lstm_jax import CharLM, CharLMConfig, cross_entropy, parallel

    mesh = parallel.data_mesh()                       # every device (of every process)
    model = CharLM(CharLMConfig(vocab_size=60, hidden_size=64, num_layers=1))
    params = parallel.replicate(model.init(jax.random.key(0)), mesh)
    tokens = parallel.shard_batch(np.zeros((8, 33), np.int32), mesh)   # this process's rows

    def loss_fn(params, tokens):                      # the mean over the rows it is given
        _, logits = model.apply(params, None, tokens[:, :-1])
        return cross_entropy(logits, tokens[:, 1:])

    loss, grads = jax.jit(parallel.value_and_grad(loss_fn, mesh))(params, tokens)

Several processes (hosts) call :func:`initialize` first, each with its ``process_id``; then
``data_mesh()`` spans all their devices and ``shard_batch`` takes each process's own rows.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lstm_jax.core.errors import ConfigError
from lstm_jax.core.host import usable_cores

__all__ = ["DATA_AXIS", "cpu_devices_per_core", "largest_divisor_devices", "devices_for_batch", "data_mesh",
           "batch_sharding", "replicated", "replicate", "shard_batch", "shard_host_array", "check_divisible",
           "value_and_grad", "initialize", "is_main_process", "barrier", "from_process_0", "PeerWatchdog"]

DATA_AXIS = "data"


def cpu_devices_per_core(cores: int | None = None) -> int | None:
    """Give JAX's CPU backend one device per core (``cores``: this process's usable cores), so
    that a data-parallel step over ``data_mesh()`` runs a share of the batch on every core.

    XLA:CPU runs one program's small per-step products of a recurrent loop on about one core;
    split over per-core devices, each core runs a share of the batch (measured by
    ``benchmarks/scaling.py``), with the same numbers up to the order of the gradient sum
    (tested). Call it before anything starts JAX's backends (``jax.devices()``, the first
    array); it returns the device count it set, or None when it could not (backends
    already started, ``XLA_FLAGS`` already forcing a count, or a single core). On a machine with a
    GPU or TPU the setting only concerns the CPU devices, which training does not use.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    if cores is None:
        cores = usable_cores()
    if cores <= 1:
        return None
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            return None
    except (ImportError, AttributeError):  # a JAX without that function: try, and accept failure
        pass
    try:
        jax.config.update("jax_num_cpu_devices", cores)
    except (RuntimeError, AttributeError, KeyError):
        return None
    return cores


def largest_divisor_devices(batch_size: int, available: int) -> int:
    """The most devices, at most ``available``, that split ``batch_size`` rows evenly."""
    return max(d for d in range(1, max(1, available) + 1) if batch_size % d == 0)


def devices_for_batch(batch_size: int, min_rows: int = 16) -> int:
    """The most of this process's devices that split ``batch_size`` rows evenly with at least
    ``min_rows`` each (a floor so a device's share stays worth a program; not a measured constant)."""
    return largest_divisor_devices(batch_size, min(jax.local_device_count(), batch_size // min_rows))


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis ``'data'`` over the first ``num_devices`` devices (default: all).

    With several processes every process must use all of its local devices, so ``num_devices``
    must then be a multiple of the per-process device count.
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else num_devices
    if not 1 <= n <= len(devices):
        raise ConfigError(f"num_devices must be between 1 and the {len(devices)} devices JAX sees, got {n}.",
                          "num_devices")
    if jax.process_count() > 1 and n != len(devices):
        raise ConfigError(f"num_devices {n} was given, but a run of {jax.process_count()} processes uses all "
                          f"{len(devices)} devices; drop num_devices.", "num_devices")
    return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Split ``axis`` (the batch) over the mesh's ``data`` axis; the other axes are whole."""
    return NamedSharding(mesh, P(*([None] * axis), DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of ``tree`` on every device of ``mesh`` (params, optimizer state).

    The leaves must hold the same values in every process (the same seed gives the same init).
    """
    sharding = replicated(mesh)
    return jax.tree.map(lambda a: jax.make_array_from_callback(np.shape(a), sharding,
                                                               lambda idx: np.asarray(a)[idx]), tree)


def check_divisible(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    """``ConfigError`` naming ``what`` unless ``batch_size`` rows split evenly over the mesh's devices."""
    n = mesh.size
    if batch_size % n:
        lower, upper = batch_size // n * n, -(-batch_size // n) * n
        choices = f"{lower} or {upper}" if lower else f"{upper}"
        raise ConfigError(f"{what} {batch_size} does not split evenly over {n} devices; use a multiple of {n} "
                          f"(e.g. {choices}) or a mesh of fewer devices.", what)


def shard_batch(local: np.ndarray, mesh: Mesh, axis: int = 0) -> jax.Array:
    """A global array from this process's rows: ``local`` holds this process's share of ``axis``
    (all of it with one process), split again over its local devices."""
    sharding = batch_sharding(mesh, axis)
    shape = list(np.shape(local))
    shape[axis] *= jax.process_count()
    check_divisible(shape[axis], mesh, what=f"The batch axis ({shape[axis]} rows)")
    return jax.make_array_from_process_local_data(sharding, np.asarray(local), tuple(shape))


def shard_host_array(host: np.ndarray, mesh: Mesh, axis: int = 0) -> jax.Array:
    """A global array split along ``axis`` from a host array that every process holds whole:
    each device receives only its own slice (the corpus streams)."""
    return jax.make_array_from_callback(host.shape, batch_sharding(mesh, axis), lambda idx: host[idx])


def value_and_grad(loss_fn: Callable, mesh: Mesh, *, has_aux: bool = False) -> Callable:
    """``jax.value_and_grad(loss_fn)``, data parallel over ``mesh``: ``f(params, *batch)``.

    ``params`` (any pytree) are replicated; every leaf of every ``batch`` argument is split along
    its first axis. Each device runs ``loss_fn`` on its own rows, as the single-device program,
    and one all-reduce averages the losses and gradients (``loss_fn`` must return the mean over
    its rows; every device holds as many). With ``has_aux`` the aux output (e.g. the carried
    state, batch-first) stays split. Use it inside ``jax.jit``.

    Why not only shard the inputs and let XLA partition the whole step: a reshape that merges
    time with a split batch axis (``CharLM``'s head, the weight gradients) makes XLA gather the
    batch onto every device; here every such reshape is local to a device.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)
    if mesh.size == 1:  # nothing to average; XLA:CPU would keep a one-device pmean as an
        return grad_fn  # all-reduce, a copy of every gradient
    mean = lambda tree: jax.lax.pmean(tree, DATA_AXIS)

    def local(params, *batch):
        value, grads = grad_fn(params, *batch)
        value = (mean(value[0]), value[1]) if has_aux else mean(value)
        return value, mean(grads)

    def data_parallel(params, *batch):
        split = P(DATA_AXIS)
        # check_vma=False: custom VJPs (the fused layers) return per-device gradients of replicated
        # weights, which the pmean makes replicated again.
        return jax.shard_map(local, mesh=mesh, in_specs=(P(),) + (split,) * len(batch),
                             out_specs=((P(), split) if has_aux else P(), P()), check_vma=False)(params, *batch)

    return data_parallel


def is_main_process() -> bool:
    """True in process 0, the one that prints and writes logs, plots and samples."""
    return jax.process_index() == 0


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, heartbeat_timeout: int = 120) -> None:
    """``jax.distributed.initialize`` with gloo collectives on CPU.

    With no arguments JAX reads its environment (``JAX_COORDINATOR_ADDRESS`` with
    ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``, SLURM, TPU pods, ...). JAX's own heartbeat aborts a
    process whose peer died after ``heartbeat_timeout`` seconds; :class:`PeerWatchdog` stops
    sooner and with a readable message, so keep this the larger of the two.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; GPUs use NCCL
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   heartbeat_timeout_seconds=heartbeat_timeout)
    except (ValueError, TypeError) as err:  # JAX's own checks of the arguments
        raise ConfigError(f"jax.distributed could not start: {err} Pass coordinator='HOST:PORT', num_processes "
                          "and process_id (or set the JAX_* environment variables).", "coordinator") from None


class PeerWatchdog:
    """Stops this process with one line when another process of the run stops responding.

    Each process publishes a counter in the coordinator's key-value store every ``interval``
    seconds (a thread: it keeps beating while the main thread waits in a collective or compiles).
    A peer whose counter has not moved for ``timeout`` seconds of this process's clock, or a
    coordinator that cannot be reached, is lost: the watchdog calls ``on_lost(message)``, which
    by default prints the message and ends the process with status 4 (without the collective
    shutdown that would wait for the dead peer). A peer that finished calls :meth:`stop`, which
    marks it done so its silence is not mistaken for a failure.
    """

    def __init__(self, timeout: float = 30.0, interval: float = 1.0,
                 on_lost: Callable[[str], None] | None = None):
        from jax._src import distributed  # the client of jax.distributed.initialize (as orbax uses it)

        self.client = distributed.global_state.client
        self.me, self.count = jax.process_index(), jax.process_count()
        self.timeout, self.interval = timeout, interval
        self.on_lost = on_lost or _exit_lost
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lstm_jax-peer-watchdog", daemon=True)
        if self.client is not None and self.count > 1:
            self._thread.start()

    def _key(self, pid: int) -> str:
        return f"lstm_jax/alive/{pid}"

    def _run(self) -> None:
        beat = 0
        seen = {p: (None, time.monotonic()) for p in range(self.count) if p != self.me}
        while not self._stop.wait(self.interval):
            beat += 1
            try:
                self.client.key_value_set(self._key(self.me), str(beat), allow_overwrite=True)
                values = dict(self.client.key_value_dir_get("lstm_jax/alive/"))
            except Exception as err:  # the coordinator (process 0) is gone
                if self._stop.is_set():
                    return
                first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
                return self.on_lost(f"lost contact with the coordinator (process 0 of {self.count}): {first}")
            now = time.monotonic()
            for pid, (last, since) in seen.items():
                value = values.get(self._key(pid))
                if value == "done":
                    continue
                if value != last:
                    seen[pid] = (value, now)
                elif now - since > self.timeout:
                    return self.on_lost(f"process {pid} of {self.count} stopped responding "
                                        f"{now - since:.0f} s ago (killed, crashed or its host is down)")

    def stop(self) -> None:
        """This process is done: say so to the others and stop beating."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            try:
                self.client.key_value_set(self._key(self.me), "done", allow_overwrite=True)
            except Exception:
                pass


def _exit_lost(message: str) -> None:
    print(f"\nerror: {message}; this process stops too. The last complete checkpoint is kept: rerun the "
          f"same commands on every host to resume from it.", file=sys.stderr, flush=True)
    os._exit(4)


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def from_process_0(value: int) -> int:
    """Process 0's integer ``value`` in every process (a plan or a choice made on each host's own
    clock must be one run's); ``value`` itself with one process."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
