"""``<workdir>/divergence/step_<s>/``: what a researcher needs to look at a spike or divergence.

Written when a run diverges or its loss spikes (``deepnorm.training.divergence``), before the
run stops, continues or rewinds:

* ``batch.npz``: the offending step's batch as this process fed it (``inputs``, ``targets``,
  ``weights``, ...; with several processes each writes its own slice,
  ``batch.process<k>.npz``). Feed it to the restored checkpoint to replay the step.
* ``history.jsonl``: the metrics of the last ``train.forensics_steps`` steps up to and
  including the offending one, one JSON line per step, every step (not only logged ones):
  loss, norms and, where the step computed them (``train.diagnostics``), the per-layer
  gradient, update and activation norms.
* ``event.json``: ``step``, ``kind`` (``spike`` / ``divergence``), ``line`` (the one-line
  description), ``loss``, for spikes ``median`` and ``ratio``, ``newest_checkpoint_step``
  (the newest finite checkpoint on disk, null if none; a non-finite state is never
  checkpointed) and ``action`` (``stop`` / ``continue`` / ``rewind``), plus for rewinds the
  checkpoint restored and the batch positions skipped.

A second event at the same step (after a rewind) gets ``step_<s>.1/``, and so on.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from deepnorm.training.metrics import to_python

DIRECTORY = "divergence"


def event_directory(workdir: str, step: int, repeat: int) -> str:
    """``step_<s>`` for the first event at ``step`` in this process, ``step_<s>.<k>`` after."""
    name = f"step_{step}" + (f".{repeat}" if repeat else "")
    return os.path.join(workdir, DIRECTORY, name)


def write(directory: str, *, event: dict, batch, history, primary: bool) -> str:
    """Writes the three files (the batch on every process, the rest on the primary)."""
    os.makedirs(directory, exist_ok=True)
    if batch is not None:
        name = ("batch.npz" if jax.process_count() == 1
                else f"batch.process{jax.process_index()}.npz")
        np.savez(os.path.join(directory, name), **{k: np.asarray(v) for k, v in batch.items()})
    if primary:
        with open(os.path.join(directory, "history.jsonl"), "w") as f:
            for step, metrics in history:
                row = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
                f.write(json.dumps(row) + "\n")
        with open(os.path.join(directory, "event.json"), "w") as f:
            json.dump({k: to_python(v) if isinstance(v, np.generic) else v
                       for k, v in event.items()}, f, indent=2)
    return directory
