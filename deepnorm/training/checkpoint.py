"""Orbax checkpoints of the train state and the data iterator, with automatic resume.

One ``ocp.CheckpointManager`` per workdir (``<workdir>/checkpoints/<step>/``), saving
asynchronously (the device arrays are copied to host memory, then written in a background
thread while training continues) and keeping the last ``keep`` steps. Each checkpoint has two
items: ``state`` (params, optimizer state, step, rng) and ``data`` (the grain iterator's
position, one small JSON file per process), so a resumed run sees exactly the batches the
uninterrupted run would have seen.

Restoring tries the newest step first and falls back to older ones if it cannot be read
(a truncated file, a missing item), warning with both step numbers.
"""

from __future__ import annotations

import logging
import os

import grain
import jax
import orbax.checkpoint as ocp

from deepnorm.config import ConfigError


class Checkpointer:
    """Saves every ``every`` steps (and on demand), keeps ``keep``, restores the latest good."""

    def __init__(self, workdir: str, *, every: int, keep: int, async_save: bool = True):
        if every <= 0 or keep <= 0:
            raise ConfigError(
                f"train.checkpoint_every={every} and train.keep_checkpoints={keep} must be "
                "positive")
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data"))

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state, data_iterator) -> None:
        """Starts an asynchronous save of ``state`` and the iterator's current position."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state, data_iterator):
        """``(state, step)`` from the newest readable checkpoint, or ``(None, 0)`` if none.

        ``abstract_state`` is a TrainState of ``jax.ShapeDtypeStruct`` with shardings, so each
        array is read straight into its shards (on any mesh: orbax reshards on load).
        ``data_iterator`` is set to the saved position in place.
        """
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iterator)))
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: try older
                failures.append(step)
                logging.warning("checkpoint step %d in %s is unreadable (%s: %s); trying an "
                                "older one", step, self.directory, type(err).__name__,
                                str(err).splitlines()[0][:200])
                continue
            if failures:
                logging.warning("resumed from checkpoint step %d because step(s) %s could not "
                                "be read", step, failures)
            return restored.state, step
        if failures:
            raise ConfigError(
                f"no readable checkpoint in {self.directory} (tried steps {failures}); move "
                "the directory away to start fresh")
        return None, 0

    def wait(self) -> None:
        """Blocks until the last asynchronous save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state, shardings):
    """``jax.ShapeDtypeStruct`` leaves with the given shardings: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
