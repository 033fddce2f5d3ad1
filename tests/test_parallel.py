"""Data parallelism for real: forced host devices and jax.distributed processes, in subprocesses.

The pytest process itself has one CPU device; the workers (tests/parallel_worker.py and
train.py) force 2 or 4 with XLA_FLAGS before JAX starts, and the two-process runs talk over
gloo on 127.0.0.1.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import parallel_worker
import pytest

from lstm_jax.charlm.checkpoint import load_run

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "parallel_worker.py"
COMBOS = [("lstm", "lm"), ("gru", "lm"), ("lstm", "keras"), ("gru", "keras")]
STEPS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with_devices(n: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def worker(tmp_path: Path, devices: int, jobs: list, processes: int = 1) -> dict:
    out = tmp_path / f"result-{devices}x{processes}-{time.monotonic_ns()}.json"
    config = {"devices": devices, "jobs": jobs, "out": str(out)}
    if processes == 1:
        subprocess.run([sys.executable, str(WORKER), json.dumps(config)], check=True, cwd=ROOT, timeout=300)
    else:
        port = free_port()
        procs = [subprocess.Popen([sys.executable, str(WORKER), json.dumps({**config, "distributed": {
            "coordinator": f"127.0.0.1:{port}", "num_processes": processes, "process_id": i}})], cwd=ROOT,
            stdout=subprocess.DEVNULL) for i in range(processes)]
        assert [p.wait(timeout=300) for p in procs] == [0] * processes
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """Every combination on this process's single device, and a checkpoint after 12 steps."""
    tmp = tmp_path_factory.mktemp("one")
    jobs = [{"cell": c, "preset": p, "steps": STEPS} for c, p in COMBOS]
    jobs.append({"cell": "lstm", "preset": "lm", "steps": STEPS, "save": str(tmp / "ckpt1"), "save_at": 12})
    assert jax.device_count() == 1
    return tmp, parallel_worker.run_jobs(jobs)


@pytest.fixture(scope="module")
def four_devices(one_device, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("four")
    jobs = [{"cell": c, "preset": p, "steps": STEPS} for c, p in COMBOS]
    jobs.append({"cell": "lstm", "preset": "lm", "steps": STEPS, "save": str(tmp / "ckpt4"), "save_at": 12})
    jobs.append({"cell": "lstm", "preset": "lm", "steps": STEPS, "restore": str(one_device[0] / "ckpt1")})
    return tmp, worker(tmp, 4, jobs)


def test_four_devices_give_the_losses_of_one(one_device, four_devices):
    one, four = one_device[1], four_devices[1]
    assert four["devices"] == 4
    for (cell, preset), a, b in zip(COMBOS, one["jobs"], four["jobs"]):
        assert len(a["losses"]) == STEPS
        np.testing.assert_allclose(b["losses"], a["losses"], atol=1e-5, err_msg=f"{cell} {preset}")
        assert abs(a["val_bpc"] - b["val_bpc"]) < 1e-5
        np.testing.assert_allclose(b["params"][0], a["params"][0], atol=1e-5)
    # each device holds its own rows of the carried state (8 streams / 4 devices), not a copy
    assert four["jobs"][0]["carry_spec"] == "P('data',)"
    assert four["jobs"][0]["carry_shard_rows"] == [2, 2, 2, 2]


def test_checkpoints_move_between_topologies(one_device, four_devices, tmp_path):
    uninterrupted = one_device[1]["jobs"][0]["losses"]
    # saved on 1 device, continued on 4
    np.testing.assert_allclose(four_devices[1]["jobs"][5]["losses"], uninterrupted[12:], atol=1e-5)
    # saved on 4 devices, continued on 2 and on 1 (this process)
    ckpt4 = str(four_devices[0] / "ckpt4")
    job = {"cell": "lstm", "preset": "lm", "steps": STEPS, "restore": ckpt4}
    two = worker(tmp_path, 2, [job])
    np.testing.assert_allclose(two["jobs"][0]["losses"], uninterrupted[12:], atol=1e-5)
    here = parallel_worker.run_jobs([job])
    np.testing.assert_allclose(here["jobs"][0]["losses"], uninterrupted[12:], atol=1e-5)


def test_two_processes_give_the_losses_of_one_process(one_device, tmp_path):
    jobs = [{"cell": c, "preset": p, "steps": STEPS} for c, p in COMBOS[:3]]
    two = worker(tmp_path, 2, jobs, processes=2)
    assert (two["devices"], two["processes"]) == (4, 2)
    for a, b in zip(one_device[1]["jobs"], two["jobs"]):
        np.testing.assert_allclose(b["losses"], a["losses"], atol=1e-5)
        assert abs(a["val_bpc"] - b["val_bpc"]) < 1e-5


# --- train.py ------------------------------------------------------------------------------------

TINY = ["--hidden-size", "16", "--num-layers", "2", "--batch-size", "4", "--seq-len", "20", "--chunk-steps", "3",
        "--sample-length", "30", "--eval-streams", "2", "--dropout", "0.1", "--lr-schedule", "constant"]


def train_cmd(run: Path, corpus: Path, epochs: int, *extra) -> list:
    return [sys.executable, str(ROOT / "train.py"), "--corpus", str(corpus), "--run-dir", str(run),
            "--epochs", str(epochs), *TINY, *map(str, extra)]


def start_pair(run: Path, corpus: Path, epochs: int, port: int) -> list:
    return [subprocess.Popen(train_cmd(run, corpus, epochs, "--coordinator", f"127.0.0.1:{port}",
                                       "--num-processes", 2, "--process-id", i, "--peer-timeout", 10),
                             cwd=ROOT, env=env_with_devices(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for i in range(2)]


def test_train_py_on_two_processes_equals_four_devices_and_survives_a_lost_process(text_corpus, tmp_path):
    four, pair, killed = tmp_path / "four", tmp_path / "pair", tmp_path / "killed"
    subprocess.run(train_cmd(four, text_corpus, 3), cwd=ROOT, env=env_with_devices(4), check=True,
                   capture_output=True, timeout=300)
    procs = start_pair(pair, text_corpus, 3, free_port())
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    rows = lambda d: [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows(pair)] == [1, 2, 3]  # written once, by process 0
    for a, b in zip(rows(four), rows(pair)):  # 66 steps: float32 rounding of the all-reduce adds up
        assert abs(a["train_bpc"] - b["train_bpc"]) < 1e-4 and abs(a["val_bpc"] - b["val_bpc"]) < 1e-4
    assert "epoch 3: train bpc" in outs[0][0] and "epoch" not in outs[1][0] and "temperature" not in outs[1][0]
    _, p_four, _, _ = load_run(four)  # a 4-device and a 2-process checkpoint both restore on this 1 device
    _, p_pair, _, _ = load_run(pair)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), p_four, p_pair)

    # SIGKILL process 1 after the first checkpoint: process 0 stops with one clear line, in bounded time
    procs = start_pair(killed, text_corpus, 400, free_port())
    deadline = time.time() + 120
    done = lambda: [p for p in (killed / "checkpoints").glob("*") if p.name.isdigit()]  # not *.orbax-checkpoint-tmp
    while time.time() < deadline and not ((killed / "checkpoints").is_dir() and done()):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    out, err = procs[0].communicate(timeout=120)
    procs[1].communicate()
    assert procs[0].returncode != 0 and time.time() - killed_at < 120
    last = err.strip().splitlines()[-1]
    assert (last.startswith("error: process 1 of 2 stopped responding")
            and "rerun the same commands" in last), err[-3000:]
    saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert saved
    # the same two commands resume from the last complete checkpoint and finish; the numbers
    # equal the uninterrupted two-process run's exactly (same topology)
    procs = start_pair(killed, text_corpus, 3, free_port())
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    assert f"resumed {killed} at step {saved[-1]}" in outs[0][0] or saved[-1] >= 3 * rows(pair)[0]["step"]
    _, p_killed, _, _ = load_run(killed)
    if saved[-1] < 3 * rows(pair)[0]["step"]:
        assert [(r["train_bpc"], r["val_bpc"]) for r in rows(killed)] == [
            (r["train_bpc"], r["val_bpc"]) for r in rows(pair)]
        jax.tree.map(np.testing.assert_array_equal, p_killed, p_pair)


def test_batch_size_the_devices_do_not_divide_gets_one_line(text_corpus, tmp_path):
    run = tmp_path / "run"
    cmd = train_cmd(run, text_corpus, 1) + ["--batch-size", "6"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_with_devices(4), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.splitlines() == [err] and "--batch-size 6 does not split evenly over 4 devices" in err, err
    assert not run.exists()


def test_library_value_and_grad_on_four_devices_equals_one_device(tmp_path):
    """The parallel module's own example, run on 4 forced devices, against jax.value_and_grad on one."""
    import lstm_jax.parallel as parallel_module

    example = parallel_module.__doc__.split("::\n", 1)[1].split("\nSeveral processes", 1)[0]
    code = "\n".join(line[4:] for line in example.splitlines())
    code += ("\nimport json, sys\n"
             "assert jax.device_count() == 4 and grads['head']['kernel'].sharding.is_fully_replicated\n"
             "tokens = np.random.default_rng(1).integers(0, 60, (8, 33)).astype(np.int32)\n"
             "params = model.init(jax.random.key(0))\n"
             "loss, grads = jax.jit(parallel.value_and_grad(loss_fn, mesh))(parallel.replicate(params, mesh), "
             "parallel.shard_batch(tokens, mesh))\n"
             "ref_loss, ref_grads = jax.value_and_grad(loss_fn)(params, tokens)\n"
             "diff = max(float(abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))\n"
             "print(json.dumps([float(loss), float(ref_loss), diff]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env_with_devices(4), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loss, ref_loss, diff = json.loads(out.stdout.strip().splitlines()[-1])
    assert abs(loss - ref_loss) < 1e-6 and diff < 1e-6 and ref_loss > 3.0


def test_cpu_devices_per_core_splits_the_cpu_before_jax_starts_and_not_after():
    code = ("import jax\nfrom lstm_jax import parallel\n"
            "n = parallel.cpu_devices_per_core(3)\n"
            "print(n, jax.local_device_count(), parallel.cpu_devices_per_core(2), jax.local_device_count(),"
            " parallel.largest_divisor_devices(64, 3), parallel.largest_divisor_devices(6, 4))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["3", "3", "None", "3", "2", "3"], out.stderr
    forced = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env_with_devices(4), "JAX_PLATFORMS": "cpu"},
                            capture_output=True, text=True, timeout=120)
    assert forced.stdout.split()[:2] == ["None", "4"], forced.stderr  # XLA_FLAGS wins


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_train_py_splits_the_cpu_where_measured_faster_and_caches_the_answer(tmp_path):
    """One process on a CPU: train.py times 1 and 2 devices once (a real Trainer each), trains on
    the faster, and a rerun reads the cached answer; the checkpoint resumes on either count."""
    corpus = tmp_path / "text.txt"
    corpus.write_text(("The state of our union is strong, and we will keep the promises we made. " * 40 + "\n") * 30)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"LSTM_JAX_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, str(ROOT / "train.py"), "--corpus", str(corpus), "--run-dir", str(tmp_path / "run"),
           "--batch-size", "32", "--seq-len", "20", "--hidden-size", "16", "--num-layers", "1", "--chunk-steps", "5",
           "--sample-length", "20", "--eval-streams", "2"]
    first = subprocess.run(cmd + ["--epochs", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    (line,) = [l for l in first.stdout.splitlines() if l.startswith("CPU set-up (devices:layers): ")]
    chosen, impl = line.rsplit(" ", 1)[1].split(":")
    chosen = int(chosen)  # a 16-unit LSTM keeps the fused layer under 'auto': one program per count
    assert f"1:{impl}: " in line and f"2:{impl}: " in line and chosen in (1, 2), line
    assert f"{chosen} device(s) in 1 process(es)" in first.stdout
    (entry,) = [v for k, v in json.loads((tmp_path / "cache" / "layouts.json").read_text()).items() if "|trainer|" in k]
    assert entry["setup"] == f"{chosen}:{impl}" and set(entry["seconds_per_step"]) == {f"1:{impl}", f"2:{impl}"}
    again = subprocess.run(cmd + ["--epochs", "2", "--cpu-devices", "1"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)  # resumed on one device, whatever the first run used
    assert again.returncode == 0 and "resumed" in again.stdout and "1 device(s)" in again.stdout, again.stderr[-2000:]


def test_value_and_grad_on_one_device_runs_no_all_reduce_and_keeps_its_outputs():
    """On a one-device mesh there is nothing to average, so the program holds no collective (XLA:CPU
    ran a one-device all-reduce, a copy of every gradient); values, aux and gradients are
    jax.value_and_grad's."""
    import jax.numpy as jnp

    from lstm_jax import parallel

    def loss(w, x):
        out = jnp.tanh(x @ w)
        return jnp.mean(out**2), out[:, 0]

    w = jax.random.normal(jax.random.key(0), (6, 3))
    x = jax.random.normal(jax.random.key(1), (4, 6))
    for n in sorted({1, jax.device_count()}):
        fn = jax.jit(parallel.value_and_grad(loss, parallel.data_mesh(n), has_aux=True))
        hlo = fn.lower(w, x).compile().as_text()
        assert ("all-reduce" in hlo) == (n > 1), (n, hlo[:2000])
        (value, aux), grads = fn(w, x)
        (ref, ref_aux), ref_grads = jax.value_and_grad(loss, has_aux=True)(w, x)
        np.testing.assert_allclose(value, ref, rtol=1e-6)
        np.testing.assert_allclose(aux, ref_aux, rtol=1e-6)
        np.testing.assert_allclose(grads, ref_grads, rtol=1e-5, atol=1e-7)
