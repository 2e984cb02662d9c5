"""Two processes on localhost (jax.distributed, 2 CPU devices each) train one model together.

Each process reads its own shard of the data; the step's collectives run over all 4 devices
(gloo between the processes). Both must finish with the same loss, and only process 0 writes
the metrics. This file is also the worker: ``python tests/test_multihost.py PID PORT WORKDIR``.
"""

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def worker(process_id: int, port: int, workdir: str) -> dict:
    sys.path.insert(0, ROOT)
    from configs import decoder_lm
    from deepnorm.training.loop import train_and_evaluate

    config = decoder_lm.get_config("quick")
    config.model.update(d_model=16, d_ff=32)
    config.optimizer.update(schedule="constant", warmup_steps=0, learning_rate=3e-3)
    config.train.update(num_steps=STEPS, batch_size=8, seq_len=16, log_every=1,
                        eval_every=STEPS, eval_steps=1, checkpoint_every=STEPS,
                        progress_bar=False)
    config.mesh.update(data=2, fsdp=2)  # fsdp: parameters split across the two processes
    config.distributed.update(enabled=True, coordinator_address=f"localhost:{port}",
                              num_processes=2, process_id=process_id)
    return train_and_evaluate(config, workdir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_together(tmp_path):
    port = free_port()
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, __file__, str(pid), str(port), str(tmp_path)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for pid in (0, 1)]
    summaries = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        summaries.append(json.loads(stdout.strip().splitlines()[-1]))
    first, second = summaries
    assert first["num_processes"] == second["num_processes"] == 2
    assert first["num_devices"] == 4 and first["status"] == "completed"
    assert first["final_step"] == second["final_step"] == STEPS
    assert first["final_loss"] == second["final_loss"]
    assert first["final_eval_loss"] == second["final_eval_loss"]
    with open(tmp_path / "metrics.jsonl") as f:  # only process 0 writes
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert rows[-1]["kind"] == "eval" and rows[-1]["eval_loss"] == first["final_eval_loss"]
    data_dir = tmp_path / "checkpoints" / str(STEPS) / "data"
    assert sorted(os.listdir(data_dir)) == ["commit_success.txt", "process_0-of-2.json",
                                            "process_1-of-2.json"]


if __name__ == "__main__":
    pid, port_arg, workdir_arg = sys.argv[1:]
    print(json.dumps(worker(int(pid), int(port_arg), workdir_arg)))
