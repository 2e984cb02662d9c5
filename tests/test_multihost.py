"""Two processes on localhost (jax.distributed, 2 CPU devices each) train one model together.

Each process reads its own shard of the data; the step's collectives run over all 4 devices
(gloo between the processes). Both must finish with the same loss, and only process 0 writes
the metrics. A SIGTERM to one process (a scheduler preempting one host) must stop both after
the same step (one where they compare their flags, ``train.preemption_check_every``) with one
checkpoint, from which the same command on both resumes to the losses of the uninterrupted
run. This file is also the worker:
``python tests/test_multihost.py PID PORT WORKDIR``.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 20  # the signal goes after step 3; the run must still be going when it lands
CHECK_EVERY = 5  # train.preemption_check_every: the processes agree on a stop at 5, 10, 15


def worker(process_id: int, port: int, workdir: str) -> dict:
    sys.path.insert(0, ROOT)
    from configs import decoder_lm
    from deepnorm.training.loop import train_and_evaluate

    config = decoder_lm.get_config("quick")
    config.model.update(d_model=16, d_ff=32)
    config.optimizer.update(schedule="constant", warmup_steps=0, learning_rate=3e-3)
    config.train.update(num_steps=STEPS, batch_size=8, seq_len=16, log_every=1,
                        eval_every=STEPS, eval_steps=1, checkpoint_every=STEPS,
                        progress_bar=False, preemption_check_every=CHECK_EVERY)
    config.mesh.update(data=2, fsdp=2)  # fsdp: parameters split across the two processes
    config.distributed.update(enabled=True, coordinator_address=f"localhost:{port}",
                              num_processes=2, process_id=process_id)
    return train_and_evaluate(config, workdir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir) -> list:
    port = free_port()
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    return [subprocess.Popen([sys.executable, __file__, str(pid), str(port), str(workdir)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for pid in (0, 1)]


def summaries_of(procs, timeout=300) -> list[dict]:
    """Waits for both processes; each must exit 0 and print its summary as the last line.
    A process stuck in a collective its peer never joins is killed, failing the test."""
    summaries = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"a process was still running after {timeout} s (stuck in a collective?)")
        assert proc.returncode == 0, stderr[-3000:]
        summaries.append(json.loads(stdout.strip().splitlines()[-1]))
    return summaries


def metrics_rows(workdir, kind="train") -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def wait_for_step(procs, workdir, step, timeout=300):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc in procs:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
        if os.path.exists(path):
            with open(path) as f:
                if any(json.loads(line)["step"] >= step for line in f if line.endswith("\n")):
                    return
        time.sleep(0.02)
    for proc in procs:
        proc.kill()
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return workdir, summaries_of(launch(workdir))


def test_two_processes_train_together(uninterrupted):
    workdir, (first, second) = uninterrupted
    assert first["num_processes"] == second["num_processes"] == 2
    assert first["num_devices"] == 4 and first["status"] == "completed"
    assert first["final_step"] == second["final_step"] == STEPS
    assert first["final_loss"] == second["final_loss"]
    assert first["final_eval_loss"] == second["final_eval_loss"]
    rows = metrics_rows(workdir)  # only process 0 writes
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert metrics_rows(workdir, "eval")[-1]["eval_loss"] == first["final_eval_loss"]
    data_dir = workdir / "checkpoints" / str(STEPS) / "data"
    assert sorted(os.listdir(data_dir)) == ["commit_success.txt", "process_0-of-2.json",
                                            "process_1-of-2.json"]


@pytest.mark.slow  # two processes twice; test_preemption covers the gathered stop flag
def test_sigterm_to_one_process_stops_both_and_the_same_command_resumes(uninterrupted,
                                                                         tmp_path):
    reference, (reference_summary, _) = uninterrupted
    procs = launch(tmp_path)
    wait_for_step(procs, tmp_path, 3)
    procs[1].send_signal(signal.SIGTERM)  # process 0 is not told
    first, second = summaries_of(procs)
    stopped = first["final_step"]
    assert first["status"] == second["status"] == "preempted", (first, second)
    assert second["final_step"] == stopped and 3 <= stopped < STEPS
    assert stopped % CHECK_EVERY == 0  # only the checked steps synchronize the processes
    assert second["preempted"].startswith(f"preempted by SIGTERM at step {stopped} of {STEPS}")
    assert first["preempted"].startswith(f"preempted by a signal to another process at step "
                                         f"{stopped} of {STEPS}")
    assert first["checkpoint_steps"] == second["checkpoint_steps"] == [stopped]
    assert sorted(os.listdir(tmp_path / "checkpoints" / str(stopped) / "data")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

    first, second = summaries_of(launch(tmp_path))  # the very same command on both
    assert first["resumed_from_step"] == second["resumed_from_step"] == stopped
    assert first["status"] == second["status"] == "completed"
    resumed, expected = metrics_rows(tmp_path), metrics_rows(reference)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # nothing lost or redone
    for a, b in zip(resumed, expected):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], a["step"]
    assert first["final_loss"] == reference_summary["final_loss"]
    assert first["final_eval_loss"] == reference_summary["final_eval_loss"]


if __name__ == "__main__":
    pid, port_arg, workdir_arg = sys.argv[1:]
    print(json.dumps(worker(int(pid), int(port_arg), workdir_arg)))
