"""Runs in a subprocess of tests/test_parallel.py, where the device count can be forced.

    python tests/parallel_worker.py '{"devices": 4, "jobs": [...], "out": "result.json"}'

Optional "distributed": {"coordinator": ..., "num_processes": ..., "process_id": ...}. Each job
trains a small CharLM on the given text with the real Trainer and records its per-step losses;
"save" writes an orbax checkpoint after "save_at" steps, "restore" continues from one.
"""

import json
import os
import sys

if __name__ == "__main__":  # before JAX starts
    CONFIG = json.loads(sys.argv[1])
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={CONFIG['devices']}"
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lstm_jax import parallel  # noqa: E402
from lstm_jax.charlm.checkpoint import Checkpointer  # noqa: E402
from lstm_jax.charlm.model import CharLM, CharLMConfig  # noqa: E402
from lstm_jax.charlm.training import TrainConfig, Trainer, evaluate_bpc  # noqa: E402

TEXT = ("The state of our union is strong. We will work together for the good of the nation, "
        "and we will keep the promises we made to the people. ") * 40
VOCAB = sorted(set(TEXT))
IDS = np.array([VOCAB.index(c) for c in TEXT], np.int32)


def trainer_for(job: dict) -> Trainer:
    model = CharLM(CharLMConfig(len(VOCAB), cell=job["cell"], hidden_size=16, num_layers=2, embed_size=8,
                                dropout=job.get("dropout", 0.1)))
    train = TrainConfig(preset=job["preset"], batch_size=8, seq_len=20, chunk_steps=4, learning_rate=3e-3)
    return Trainer(model, train, IDS, epochs=2)


def run_job(job: dict) -> dict:
    trainer = trainer_for(job)
    state, losses = trainer.init_state(), []
    if "restore" in job:
        ckpt = Checkpointer(job["restore"])
        state, _ = ckpt.restore(trainer.abstract_state())
        ckpt.close()
    while int(state.step) < job["steps"]:
        state, chunk = trainer.run_chunk(state, 4)
        losses += chunk.tolist()
        if job.get("save") and int(state.step) == job["save_at"]:
            ckpt = Checkpointer(job["save"])
            ckpt.save(int(state.step), state, {"epoch": 0})
            ckpt.close()
    bpc = evaluate_bpc(trainer.model, state.params, IDS[:1500], streams=3, chunk_len=64, mesh=trainer.mesh)
    carry = jax.tree.leaves(state.carry)[0]
    return {"losses": losses, "val_bpc": bpc, "carry_spec": str(carry.sharding.spec),
            "carry_shard_rows": [s.data.shape[0] for s in carry.addressable_shards],
            "params": [np.asarray(p).tolist() for p in jax.tree.leaves(state.params)][:2]}


def run_jobs(jobs: list) -> dict:
    return {"devices": jax.device_count(), "processes": jax.process_count(), "jobs": [run_job(j) for j in jobs]}


if __name__ == "__main__":
    if "distributed" in CONFIG:
        d = CONFIG["distributed"]
        parallel.initialize(d["coordinator"], d["num_processes"], d["process_id"])
    results = run_jobs(CONFIG["jobs"])
    if parallel.is_main_process():
        with open(CONFIG["out"], "w") as f:
            json.dump(results, f)
