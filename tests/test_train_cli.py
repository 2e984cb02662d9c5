"""train.py as a user runs it: exit codes, one-line errors, a run, a re-run that resumes."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "--config=configs/decoder_lm.py:quick"
TINY = [QUICK, "--config.model.d_model=16", "--config.model.d_ff=32",
        "--config.train.batch_size=4", "--config.train.seq_len=16",
        "--config.train.progress_bar=False"]


def train_py(*args, timeout=300):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


# (id, arguments, text the one error line must contain)
BAD_INPUT = [
    ("mistyped_key", [QUICK, "--config.train.num_step=5"], "num_step"),
    ("wrong_type", [QUICK, "--config.train.batch_size=many"], "many"),
    ("bad_model_value", [QUICK, "--config.model.norm=groupnorm"],
     "model.norm='groupnorm' is not one of layernorm"),
    ("batch_stats_grad_accum", [QUICK, "--config.model.norm=powernorm",
                                "--config.train.grad_accum_steps=2"],
     "train.grad_accum_steps=2 with model.norm='powernorm': batch-statistics norms need"),
    ("bad_policy", [QUICK, "--config.train.on_nonfinite=ignore"],
     "train.on_nonfinite='ignore' is not one of stop, skip"),
    ("mesh_needs_more_devices", [QUICK, "--config.mesh.data=3"],
     "needs 3 devices but 1 are available"),
    ("missing_config_file", ["--config=configs/nope.py"], "nope.py"),
]


@pytest.mark.parametrize("name,args,expected", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_code_2(name, args, expected, tmp_path):
    result = train_py(*args, f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert errors[0].startswith("train.py: error: ") and expected in errors[0], errors[0]
    assert errors[0] == result.stderr.splitlines()[-1]


def test_workdir_is_required(tmp_path):
    result = train_py(QUICK)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "train.py: error: both --config=configs/<experiment>.py and --workdir=<dir> are "
        "required")


def test_a_run_completes_and_the_same_command_resumes(tmp_path):
    args = [*TINY, "--config.train.num_steps=2", f"--workdir={tmp_path}"]
    first = train_py(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    assert summary["status"] == "completed" and summary["final_step"] == 2
    # The start line names the settings in force: auto remat resolved, matmul dtype, malloc
    # (plain unless DEEPNORM_HUGEPAGES=1 asks train.py to re-execute itself).
    malloc = "on" if "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "") or (
        os.environ.get("DEEPNORM_HUGEPAGES") == "1" and sys.platform.startswith("linux")) \
        else "off"
    settings = (f"remat save_dots; float32 matmuls, float32 dots at matmul_precision=float32; "
                f"malloc huge pages {malloc}")
    assert settings in first.stderr, first.stderr[-3000:]
    again = train_py(*args)  # the same command: finds the finished run, changes nothing
    assert again.returncode == 0 and "already completed 2 steps" in again.stderr
    with open(tmp_path / "summary.json") as f:
        assert json.load(f) == summary
    longer = train_py(*TINY, "--config.train.num_steps=3", f"--workdir={tmp_path}")
    assert longer.returncode == 0, longer.stderr[-3000:]
    with open(tmp_path / "summary.json") as f:
        resumed = json.load(f)
    assert resumed["resumed_from_step"] == 2 and resumed["final_step"] == 3


def test_divergence_exits_3_with_one_line(tmp_path):
    result = train_py(*TINY, "--config.train.max_loss=0.5", f"--workdir={tmp_path}")
    assert result.returncode == 3, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "diverged at step" in line]
    assert len(lines) == 1 and "above train.max_loss=0.5" in lines[0]
    assert "decoder layer" in lines[0]
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["status"] == "diverged"
