"""Runs that survive kills, preemption and damaged checkpoints, and lose nothing.

Each test does the real thing: a real ``train.py`` process killed with SIGKILL or stopped with
SIGTERM / SIGINT, real checkpoint files truncated or deleted, a real change of device count
(8 simulated CPU devices in a subprocess, 1 in this process). Every run is compared step for
step with one uninterrupted run of the same config (``reference``): the losses must be
bit-identical on one device, equal to float tolerance across meshes.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for `configs`
from configs import decoder_lm  # noqa: E402

from deepnorm.config import ConfigError  # noqa: E402
from deepnorm.training.loop import train_and_evaluate  # noqa: E402
from deepnorm.training.metrics import read_metrics  # noqa: E402

# Reading a truncated checkpoint leaves orbax coroutines that raise when garbage-collected;
# the restore already failed over cleanly, so their noise is not a test failure.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

NUM_STEPS = 8
# d_model 16, 2 layers, seq 16, batch 8 (8 splits over 8 simulated devices), a checkpoint every
# 2 steps, keep 2, evaluation only at the end.
TRAIN = dict(num_steps=NUM_STEPS, batch_size=8, seq_len=16, log_every=1, eval_every=100,
             eval_steps=1, checkpoint_every=2, keep_checkpoints=2, progress_bar=False)


def cli(**train):
    """train.py's flags for ``tiny_config(**train)``."""
    return ["--config=configs/decoder_lm.py:quick", "--config.model.d_model=16",
            "--config.model.d_ff=32",
            *[f"--config.train.{k}={v}" for k, v in dict(TRAIN, **train).items()]]


def tiny_config(**train):
    config = decoder_lm.get_config("quick")
    config.model.update(d_model=16, d_ff=32)
    config.train.update(dict(TRAIN, **train))
    return config


def train_rows(workdir):
    """Every train line of metrics.jsonl, in file order (re-logged steps included)."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r["kind"] == "train"]


def losses(workdir):
    """{step: loss} from metrics.jsonl, the last line winning (what a reader sees)."""
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if r["kind"] == "train"}


def summary_of(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        return json.load(f)


def start_train_py(workdir, *extra, env=None, **train):
    return subprocess.Popen(
        [sys.executable, "train.py", *cli(**train), *extra, f"--workdir={workdir}"], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=None if env is None else {**os.environ, **env})


def run_train_py(workdir, *extra, env=None, timeout=400, **train):
    process = start_train_py(workdir, *extra, env=env, **train)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_for_step(process, workdir, step, timeout=400):
    """Blocks until metrics.jsonl shows ``step`` (the run is past it), or the run ended."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
            if steps and max(steps) >= step:
                return
        time.sleep(0.02)
    process.kill()
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (in this process, one device): the losses every test compares to."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    summary = train_and_evaluate(tiny_config(), workdir)
    assert summary["status"] == "completed"
    return workdir


def assert_same_losses(workdir, reference, exact=True):
    """Every logged line of every step (the first run's and the resumed run's re-logs of the
    same step) equals the uninterrupted run's value."""
    expected = losses(reference)
    rows = train_rows(workdir)
    assert sorted({r["step"] for r in rows}) == list(range(1, NUM_STEPS + 1))
    for row in rows:
        if exact:
            assert row["loss"] == expected[row["step"]], row["step"]
        else:
            np.testing.assert_allclose(row["loss"], expected[row["step"]], rtol=2e-5,
                                       err_msg=f"step {row['step']}")


def test_old_checkpoints_are_pruned_to_keep_checkpoints(reference):
    assert sorted(os.listdir(os.path.join(reference, "checkpoints")), key=int) == ["6", "8"]
    assert summary_of(reference)["checkpoint_steps"] == [6, 8]


def test_sigkill_then_the_same_command_resumes_bit_identically(reference, tmp_path):
    workdir = str(tmp_path)
    process = start_train_py(workdir)
    wait_for_step(process, workdir, 5)  # past the step-4 checkpoint (maybe still being written)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    before = train_rows(workdir)
    assert not os.path.exists(os.path.join(workdir, "summary.json"))

    code, _, err = run_train_py(workdir)  # the very same command
    assert code == 0, err[-3000:]
    summary = summary_of(workdir)
    assert summary["status"] == "completed" and summary["final_step"] == NUM_STEPS
    assert summary["resumed_from_step"] in (2, 4, 6), summary  # the newest committed one
    assert f"resuming from checkpoint step {summary['resumed_from_step']}" in err
    after = train_rows(workdir)
    assert after[:len(before)] == before  # appended, never truncated
    assert len(after) == len(before) + NUM_STEPS - summary["resumed_from_step"]
    assert_same_losses(workdir, reference)
    assert not [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in d]


@pytest.mark.slow  # SIGKILL's resume above runs by default; the handler: test_preemption.py
def test_sigterm_checkpoints_exits_0_and_resumes_bit_identically(reference, tmp_path):
    workdir = str(tmp_path)
    process = start_train_py(workdir)
    wait_for_step(process, workdir, 3)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=400)
    assert process.returncode == 0, err[-3000:]
    summary = summary_of(workdir)
    stopped = summary["final_step"]
    assert summary["status"] == "preempted" and 3 <= stopped < NUM_STEPS
    assert out.strip().splitlines()[-1] == (
        f"train.py: preempted by SIGTERM at step {stopped} of {NUM_STEPS}; checkpoint "
        f"{workdir}/checkpoints/{stopped}; run the same command to resume")
    assert stopped in summary["checkpoint_steps"]  # a checkpoint of the very step it stopped at
    assert [r["step"] for r in train_rows(workdir)] == list(range(1, stopped + 1))  # flushed

    code, _, err = run_train_py(workdir)
    assert code == 0, err[-3000:]
    assert summary_of(workdir)["resumed_from_step"] == stopped
    assert len(train_rows(workdir)) == NUM_STEPS  # nothing lost, nothing re-done
    assert_same_losses(workdir, reference)


@pytest.mark.slow  # SIGINT goes through the SIGTERM test's handler
def test_sigint_is_a_clean_stop_too(tmp_path):
    workdir = str(tmp_path)
    process = start_train_py(workdir)
    wait_for_step(process, workdir, 2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=400)
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "preempted by SIGINT at step" in out
    summary = summary_of(workdir)
    assert summary["status"] == "preempted"
    assert summary["final_step"] in summary["checkpoint_steps"]


def damage(workdir, step, how):
    """Damages checkpoint ``step`` as a crash or a full disk would."""
    root = os.path.join(workdir, "checkpoints", str(step))
    if how == "truncated_arrays":  # every array chunk cut short
        chunks = os.path.join(root, "state", "ocdbt.process_0", "d")
        for name in os.listdir(chunks):
            with open(os.path.join(chunks, name), "r+b") as f:
                f.truncate(7)
    elif how == "missing_iterator_state":
        os.remove(os.path.join(root, "data", "process_0-of-1.json"))
    elif how == "missing_metadata":
        os.remove(os.path.join(root, "state", "_METADATA"))
    else:
        raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated_arrays", pytest.param(
    "missing_iterator_state", marks=pytest.mark.slow)])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path, how,
                                                                    caplog):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    damage(workdir, 8, how)
    # What a kill during an async save leaves: a step directory orbax never renamed.
    unfinished = os.path.join(workdir, "checkpoints", "10.orbax-checkpoint-tmp-1700000000")
    shutil.copytree(os.path.join(reference, "checkpoints", "8"), unfinished)

    summary = train_and_evaluate(tiny_config(), workdir)

    assert summary["status"] == "completed" and summary["resumed_from_step"] == 6
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 1
    assert "checkpoint step 8" in warnings[0] and "resumed from step 6" in warnings[0]
    assert os.listdir(os.path.join(workdir, "damaged_checkpoints")) == ["8"]  # kept, aside
    assert not os.path.exists(unfinished)  # never listed, and cleaned up
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["6", "8"]
    assert_same_losses(workdir, reference)  # steps 7 and 8 redone, identically


def test_no_usable_checkpoint_is_one_clear_error(reference, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    damage(workdir, 8, "truncated_arrays")
    damage(workdir, 6, "missing_metadata")
    with pytest.raises(ConfigError) as err:
        train_and_evaluate(tiny_config(), workdir)
    message = str(err.value)
    assert "\n" not in message and message.startswith("no usable checkpoint in ")
    assert "step 8: " in message and "step 6: " in message and "Move that directory" in message
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["6", "8"]


def test_resuming_with_other_model_shapes_is_refused_naming_the_keys(reference, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    before = sorted(os.listdir(workdir)), open(os.path.join(workdir, "config.json")).read()
    config = tiny_config()
    config.model.update(d_model=32, d_ff=64)
    with pytest.raises(ConfigError) as err:
        train_and_evaluate(config, workdir)
    message = str(err.value)
    assert "\n" not in message and "checkpoint step 8 holds a model of other shapes" in message
    assert "model.d_ff: 32 -> 64; model.d_model: 16 -> 32" in message
    assert "params/" in message and "Use a new --workdir" in message
    after = sorted(os.listdir(workdir)), open(os.path.join(workdir, "config.json")).read()
    assert after == before  # nothing touched


@pytest.mark.slow  # three processes; test_sharding covers the 8-device layouts themselves
def test_restoring_onto_another_mesh_8_to_1_to_8_devices(reference, tmp_path):
    """Steps 1-4 on 8 devices (parameters and optimizer state sharded fsdp-style), 5-6 on one
    device (this process), 7-8 on 8 devices again: the losses follow the one-device run."""
    workdir = str(tmp_path)
    eight = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    code, _, err = run_train_py(workdir, "--config.mesh.fsdp=8", env=eight, num_steps=4)
    assert code == 0, err[-3000:]
    assert summary_of(workdir)["num_devices"] == 8
    summary = train_and_evaluate(tiny_config(num_steps=6), workdir)
    assert summary["resumed_from_step"] == 4 and summary["num_devices"] == 1
    code, _, err = run_train_py(workdir, "--config.mesh.fsdp=8", env=eight)
    assert code == 0, err[-3000:]
    summary = summary_of(workdir)
    assert summary["resumed_from_step"] == 6 and summary["mesh"]["fsdp"] == 8
    assert_same_losses(workdir, reference, exact=False)


def test_a_non_finite_state_is_never_checkpointed(tmp_path):
    import grain
    import jax.numpy as jnp

    from deepnorm.training.checkpoint import Checkpointer

    checkpointer = Checkpointer(str(tmp_path), every=1, keep=3)
    iterator = iter(grain.MapDataset.range(4).to_iter_dataset())
    assert checkpointer.save(1, {"w": jnp.ones(3)}, iterator)
    assert not checkpointer.save(2, {"w": jnp.array([1.0, jnp.nan, 1.0])}, iterator)
    assert not checkpointer.save(3, {"w": jnp.array([jnp.inf]), "count": jnp.ones(1, int)},
                                 iterator)
    assert not checkpointer.save(1, {"w": jnp.ones(3)}, iterator)  # already saved
    checkpointer.close()
    assert checkpointer.steps() == [1]
