"""Orbax checkpoints of the train state and the data iterator, with automatic resume.

One ``ocp.CheckpointManager`` per workdir (``<workdir>/checkpoints/<step>/``), saving
asynchronously (the device arrays are copied to host memory, then written in a background
thread while training continues) and keeping the last ``keep`` steps. Each checkpoint has two
items: ``state`` (params, optimizer state, step, rng) and ``data`` (the grain iterator's
position, one small JSON file per process), so a resumed run sees exactly the batches the
uninterrupted run would have seen.

Restoring tries the newest step first and falls back to older ones if it cannot be read
(a truncated file, a missing item) or holds non-finite values, warning with both step numbers;
the damaged steps are moved to ``<workdir>/damaged_checkpoints/`` so that new saves can reuse
their step numbers. A save interrupted by a kill never becomes a step: orbax writes each
checkpoint into ``<step>.orbax-checkpoint-tmp-<time>/`` and renames it to ``<step>/`` only
once every file is written (atomic on POSIX file systems); unfinished tmp directories are
never listed and are deleted when the manager opens (``cleanup_tmp_directories``). A
checkpoint whose arrays have other shapes than the config's model is refused (``ConfigError``
naming the config keys that changed) instead of being "repaired".
"""

from __future__ import annotations

import logging
import os

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from deepnorm import layerwise
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

    def save(self, step: int, state, data_iterator) -> bool:
        """Starts an asynchronous save of ``state`` and the iterator's current position.

        Returns False (and saves nothing) when ``step`` is already saved or when ``state`` holds
        a NaN or infinity: a non-finite state is never checkpointed, so the newest checkpoint
        is always one a run can continue from.
        """
        if step in self.manager.all_steps():
            return False
        if not bool(all_finite(state)):
            logging.error("not checkpointing step %d: the train state holds non-finite values",
                          step)
            return False
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)), force=True)
        return True

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state, data_iterator, changed_keys=()):
        """``(state, step)`` from the newest usable checkpoint, or ``(None, 0)`` if none.

        ``abstract_state`` is a TrainState of ``jax.ShapeDtypeStruct`` with shardings, so each
        array is read straight into its shards (on any mesh: orbax reshards on load).
        ``data_iterator`` is set to the saved position in place. A step that cannot be read or
        holds non-finite values is damaged: older steps are tried, and the damaged ones are
        moved aside once a good one is found (one warning naming both); if none is usable,
        ``ConfigError``. A step whose arrays do not have ``abstract_state``'s shapes is
        refused with ``ConfigError`` naming ``changed_keys`` (the config keys that differ from
        the run that wrote the checkpoint, e.g. ``["model.d_model: 16 -> 32"]``).
        """
        damaged: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                mismatch = shape_mismatch(
                    os.path.join(self.directory, str(step), "state"), abstract_state)
            except Exception as err:  # noqa: BLE001 - unreadable metadata: damaged
                damaged.append((step, _reason(err)))
                continue
            if mismatch:
                changed = "; ".join(changed_keys) or "no config key differs from config.json"
                raise ConfigError(
                    f"cannot resume from {self.directory}: checkpoint step {step} holds a model "
                    f"of other shapes ({mismatch}); changed config: {changed}. Use a new "
                    f"--workdir, or move {self.directory} away to start this config from "
                    "scratch")
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iterator)))
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: try older
                damaged.append((step, _reason(err)))
                continue
            if not bool(all_finite(restored.state)):
                damaged.append((step, "it holds non-finite values"))
                continue
            if damaged:
                self._set_aside(damaged, step)
            return restored.state, step
        if damaged:
            raise ConfigError(
                f"no usable checkpoint in {self.directory}: "
                + "; ".join(f"step {s}: {why}" for s, why in damaged)
                + ". Move that directory away to start from scratch")
        return None, 0

    def _set_aside(self, damaged: list[tuple[int, str]], restored_step: int) -> None:
        """Moves damaged steps out of the manager's directory (kept for inspection)."""
        aside = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
        moved = []
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for step, _ in damaged:
                target = os.path.join(aside, str(step))
                suffix = 1
                while os.path.exists(target):  # damaged twice at the same step: keep both
                    target, suffix = os.path.join(aside, f"{step}.{suffix}"), suffix + 1
                os.rename(os.path.join(self.directory, str(step)), target)
                moved.append(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("deepnorm_set_aside_damaged_checkpoints")
        self.manager.reload()
        for step, why in damaged:
            logging.warning(
                "checkpoint step %d in %s is damaged (%s); resumed from step %d instead, the "
                "newest usable one; moved step %d to %s", step, self.directory, why,
                restored_step, step, aside)

    def wait(self) -> None:
        """Blocks until the last asynchronous save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _reason(err: BaseException) -> str:
    """The first line of an exception, short enough for a one-line warning."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:160] if lines else ''}"


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when no floating-point leaf of ``tree`` holds a NaN or an infinity."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _path_name(path) -> str:
    """``opt_state/0/mu/decoder/...`` for a pytree path of dict, sequence or attribute keys."""
    return "/".join(layerwise.path_names(path))


def shape_mismatch(state_dir: str, abstract_state) -> str:
    """'' when the checkpoint item at ``state_dir`` has exactly ``abstract_state``'s arrays and
    shapes; otherwise a short description of the first differences (read from orbax's
    metadata, without reading any array)."""
    # The handler, not StandardCheckpointer: it reads the item's tree metadata only (the
    # checkpointer also looks for a step-level metadata file and warns that it is missing).
    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
    saved = {_path_name(p): tuple(m.shape) for p, m in jax.tree_util.tree_flatten_with_path(
        getattr(metadata, "item_metadata", metadata))[0]}
    wanted = {_path_name(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    order = lambda keys: sorted(keys, key=lambda k: (not k.startswith("params/"), k))  # noqa: E731
    diffs = [f"{k} {saved[k]} saved, {wanted[k]} now" for k in order(saved.keys() & wanted.keys())
             if saved[k] != wanted[k]]
    diffs += [f"{k} only in the checkpoint" for k in order(saved.keys() - wanted.keys())]
    diffs += [f"{k} only in the new model" for k in order(wanted.keys() - saved.keys())]
    if not diffs:
        return ""
    more = f" and {len(diffs) - 2} more arrays" if len(diffs) > 2 else ""
    return ", ".join(diffs[:2]) + more


def abstract_like(state, shardings):
    """``jax.ShapeDtypeStruct`` leaves with the given shardings: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        state, shardings)
