"""train.py and the benchmarks re-execute themselves once with huge-page malloc (Linux)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunable")

SCRIPT = textwrap.dedent("""
    import os, sys
    print("pid", os.getpid(), flush=True)
    from deepnorm.training.hugepages import reexec_with_hugepages, describe
    reexec_with_hugepages()
    print("tunables", os.environ.get("GLIBC_TUNABLES", ""))
    print(describe())
""")


def run(tmp_path, **env):
    script = tmp_path / "child.py"
    script.write_text(SCRIPT)
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("GLIBC_TUNABLES", "DEEPNORM_PLAIN_MALLOC")}
    full_env.update(env)
    out = subprocess.run([sys.executable, str(script)], env=full_env, capture_output=True,
                         text=True, check=True, timeout=120).stdout.splitlines()
    return out


def test_reexecutes_once_in_the_same_process_with_the_tunable(tmp_path):
    out = run(tmp_path)
    pids = [line for line in out if line.startswith("pid")]
    assert len(pids) == 2 and pids[0] == pids[1]  # execve: same PID, run twice up to the call
    assert "tunables glibc.malloc.hugetlb=1" in out
    assert out[-1] == "malloc huge pages on"


def test_keeps_other_tunables(tmp_path):
    out = run(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=2")
    assert "tunables glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1" in out


def test_opt_out(tmp_path):
    out = run(tmp_path, DEEPNORM_PLAIN_MALLOC="1")
    assert len([line for line in out if line.startswith("pid")]) == 1
    assert "tunables " in out and out[-1] == "malloc huge pages off"
