"""PreemptionGuard: a signal becomes a flag; with several processes the flag is OR-ed over all
of them only every ``check_every`` steps (each OR is a collective and a host sync)."""

import os
import signal

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from deepnorm.training.preemption import PreemptionGuard


@pytest.fixture
def two_processes(monkeypatch):
    """This process as one of two; the peer's flag is ``peer[0]``; ``calls`` counts gathers."""
    peer, calls = [0], []

    def allgather(local):
        calls.append(int(local[0]))
        return np.array([[int(local[0])], [peer[0]]], np.int32)

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    return peer, calls


def test_one_process_reads_its_own_flag_after_every_step():
    guard = PreemptionGuard(check_every=10).install()
    try:
        assert not guard.requested(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested(3) and guard.signal_name == "SIGTERM"
    finally:
        guard.uninstall()


def test_several_processes_gather_only_every_check_every_steps(two_processes):
    peer, calls = two_processes
    guard = PreemptionGuard(check_every=5)
    answers = [guard.requested(step) for step in range(1, 21)]
    assert len(calls) == 4 and not any(answers)  # steps 5, 10, 15, 20: no per-step sync
    peer[0] = 1  # the other process got a SIGTERM
    assert not guard.requested(21) and len(calls) == 4  # every process answers alike
    assert guard.requested(25) and len(calls) == 5
    assert guard.signal_name == "a signal to another process"
