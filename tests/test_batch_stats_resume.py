"""A PowerNorm run stopped by SIGTERM and resumed is bit-identical to an uninterrupted one: the
losses of every step and the running statistics in the last checkpoint (test_reliability's
pattern on a tiny PowerNorm model)."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for `configs`
from configs import decoder_lm  # noqa: E402

from deepnorm.training.loop import train_and_evaluate  # noqa: E402
from deepnorm.training.metrics import read_metrics  # noqa: E402

NUM_STEPS = 8
TRAIN = dict(num_steps=NUM_STEPS, batch_size=8, seq_len=16, log_every=1, eval_every=100,
             eval_steps=1, checkpoint_every=2, keep_checkpoints=2, progress_bar=False)
MODEL = dict(d_model=16, d_ff=32, norm="powernorm", norm_warmup=2)


def losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if r["kind"] == "train"}


def saved_batch_stats(workdir, step):
    import orbax.checkpoint as ocp
    tree = ocp.StandardCheckpointer().restore(
        os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state"))
    return jax.tree.map(np.asarray, tree["batch_stats"])


@pytest.mark.slow  # three train.py runs; test_reliability.py runs the default suite's resume
def test_sigterm_then_resume_is_bit_identical_statistics_included(tmp_path):
    reference = str(tmp_path / "reference")
    config = decoder_lm.get_config("quick")
    config.model.update(MODEL)
    config.train.update(TRAIN)
    assert train_and_evaluate(config, reference)["status"] == "completed"

    workdir = str(tmp_path / "stopped")
    argv = [sys.executable, "train.py", "--config=configs/decoder_lm.py:quick",
            *[f"--config.model.{k}={v}" for k, v in MODEL.items()],
            *[f"--config.train.{k}={v}" for k, v in TRAIN.items()], f"--workdir={workdir}"]
    process = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    metrics, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + 400
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=400)
    assert process.returncode == 0, err[-3000:]
    with open(os.path.join(workdir, "summary.json")) as f:
        stopped = json.load(f)["final_step"]
    assert 3 <= stopped < NUM_STEPS, stopped

    resumed = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint step {stopped}" in resumed.stderr
    assert losses(workdir) == losses(reference)  # exact floats, every step
    want, got = saved_batch_stats(reference, NUM_STEPS), saved_batch_stats(workdir, NUM_STEPS)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert float(got["decoder"]["layers"]["ffn_norm"]["count"][0]) == NUM_STEPS
