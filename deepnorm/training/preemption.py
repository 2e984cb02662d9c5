"""Preemption: SIGTERM or SIGINT asks the run to stop cleanly instead of dying mid-step.

Cluster schedulers (SLURM, Kubernetes, Cloud TPU maintenance events) send SIGTERM and give a
grace period before SIGKILL; a user presses Ctrl-C (SIGINT). While ``PreemptionGuard`` is
installed either signal only sets a flag: the training loop finishes the step in flight, writes
a checkpoint, flushes the metrics, and ``train.py`` exits 0 with one line saying where it
stopped. Running the same command again resumes from that checkpoint. A second Ctrl-C while the
checkpoint is being written raises ``KeyboardInterrupt`` (the user insists; the last committed
checkpoint is still intact, see ``deepnorm.training.checkpoint``).

With several processes (multi-host) only some may receive the signal; ``requested(step)``
then takes the logical OR over all processes, so they all stop after the same step and write
one consistent checkpoint. That OR is a collective and a host sync, so it runs only every
``check_every``-th step (``train.preemption_check_every``): a signal is acted on at most that
many steps late, which a scheduler's grace period (tens of seconds) easily covers. With one
process the flag is local and read after every step.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionGuard:
    """Turns SIGTERM / SIGINT into a flag between ``install()`` and ``uninstall()``."""

    def __init__(self, signals=SIGNALS, *, check_every: int = 1):
        self.signals = tuple(signals)
        self.check_every = check_every
        self.signal_name: str | None = None  # the first signal received, e.g. "SIGTERM"
        self._previous: dict = {}

    def install(self) -> "PreemptionGuard":
        # Python delivers signals to the main thread only; elsewhere (a notebook's worker
        # thread) leave the default behaviour rather than fail.
        if threading.current_thread() is not threading.main_thread():
            logging.warning("not in the main thread: SIGTERM / SIGINT will not checkpoint")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        del frame
        name = signal.Signals(signum).name
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signal_name is None:
            self.signal_name = name
            logging.warning("%s received: finishing the current step, then checkpointing "
                            "and exiting (Ctrl-C again to abort at once)", name)

    def requested(self, step: int) -> bool:
        """True once any process has received a signal. Multi-process: a collective on every
        ``check_every``-th ``step`` (every process calls it after the same steps), False on
        the others, so that all processes answer alike."""
        local = self.signal_name is not None
        if jax.process_count() == 1:
            return local
        if step % self.check_every:
            return False
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.array([int(local)], np.int32))
        if np.any(flags) and self.signal_name is None:
            self.signal_name = "a signal to another process"
        return bool(np.any(flags))
