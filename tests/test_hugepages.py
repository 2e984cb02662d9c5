"""Huge-page malloc is opt-in for train.py (DEEPNORM_HUGEPAGES=1) and on by default for the
benchmarks; either way it is one re-execution of the same process (Linux)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunable")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A script's __main__ as train.py (by_default=False) or a benchmark (True) writes it.
SCRIPT = textwrap.dedent("""
    import os, sys
    print("pid", os.getpid(), flush=True)
    from deepnorm.training.hugepages import reexec_with_hugepages, describe
    reexec_with_hugepages(by_default=sys.argv[1] == "benchmark")
    print("tunables", os.environ.get("GLIBC_TUNABLES", ""))
    print(describe())
""")


def clean_env(**env):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("GLIBC_TUNABLES", "DEEPNORM_HUGEPAGES")}
    full_env["PYTHONPATH"] = ROOT
    full_env.update(env)
    return full_env


def run(tmp_path, kind="train", **env):
    script = tmp_path / "child.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script), kind], env=clean_env(**env),
                         capture_output=True, text=True, check=True, timeout=120)
    return out.stdout.splitlines()


def pids(out):
    return [line for line in out if line.startswith("pid")]


def test_train_script_does_not_reexecute_unless_asked(tmp_path):
    out = run(tmp_path)
    assert len(pids(out)) == 1
    assert "tunables " in out and out[-1] == "malloc huge pages off"


def test_asked_it_reexecutes_once_in_the_same_process_with_the_tunable(tmp_path):
    out = run(tmp_path, DEEPNORM_HUGEPAGES="1")
    assert len(pids(out)) == 2 and pids(out)[0] == pids(out)[1]  # execve: same PID
    assert "tunables glibc.malloc.hugetlb=1" in out
    assert out[-1] == "malloc huge pages on"


def test_benchmarks_reexecute_by_default_and_zero_turns_it_off(tmp_path):
    on = run(tmp_path, "benchmark")
    assert len(pids(on)) == 2 and on[-1] == "malloc huge pages on"
    off = run(tmp_path, "benchmark", DEEPNORM_HUGEPAGES="0")
    assert len(pids(off)) == 1 and off[-1] == "malloc huge pages off"


def test_keeps_other_tunables(tmp_path):
    out = run(tmp_path, DEEPNORM_HUGEPAGES="1", GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert "tunables glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" in out


def test_tunable_set_by_hand_needs_no_reexecution(tmp_path):
    out = run(tmp_path, DEEPNORM_HUGEPAGES="1", GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    assert len(pids(out)) == 1 and out[-1] == "malloc huge pages on"


def test_bad_switch_value_is_one_line_and_exit_code_2_in_train_py():
    result = subprocess.run([sys.executable, "train.py"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120, env=clean_env(DEEPNORM_HUGEPAGES="yes"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == ("train.py: error: DEEPNORM_HUGEPAGES='yes' is not one of "
                                     "0 (plain malloc), 1 (re-execute with huge-page malloc)")
