"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard event files and a progress bar.

Only the primary process (``jax.process_index() == 0``) writes. ``metrics.jsonl`` is opened
in append mode and never truncated: a resumed run re-logs the steps after its last checkpoint,
and a reader keeps the last line per step (``read_metrics`` does).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import numpy as np

# Per-layer vectors get one TensorBoard scalar per layer up to this depth (a readable set of
# curves); deeper stacks get a histogram over layers plus the max and the argmax layer.
MAX_PER_LAYER_SCALARS = 64
_TIMINGS = ("tokens_per_s", "steps_per_s")


def to_python(value: Any) -> Any:
    """A JSON-ready value: numpy/jax scalars -> float/int, arrays -> lists. Non-finite floats
    stay floats; Python's json writes and reads them as ``NaN`` / ``Infinity``."""
    array = np.asarray(value)
    if array.ndim:
        return [to_python(v) for v in array.tolist()]
    item = array.item()
    return float(item) if isinstance(item, float) else item


def read_metrics(path: str) -> list[dict]:
    """The rows of a ``metrics.jsonl``, sorted by step, the last line winning per step."""
    rows: dict[tuple, dict] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[(row["step"], row.get("kind", "train"))] = row
    return [rows[k] for k in sorted(rows)]


class MetricsWriter:
    """Writes one JSON line per logged step and the same values to TensorBoard."""

    def __init__(self, workdir: str, *, primary: bool, start_step: int, num_steps: int,
                 progress: bool = True):
        self.primary = primary
        self._jsonl = self._tb = self._bar = None
        if not primary:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
        from tensorboardX import SummaryWriter  # imported here: only the primary writes

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=num_steps, initial=start_step, unit="step",
                             dynamic_ncols=True, smoothing=0.1)

    def write(self, step: int, values: Mapping[str, Any], kind: str = "train") -> dict:
        """Logs ``values`` at ``step``; ``kind`` ("train" / "eval") prefixes TensorBoard tags."""
        row = {"step": int(step), "kind": kind, **{k: to_python(v) for k, v in values.items()}}
        if not self.primary:
            return row
        self._jsonl.write(json.dumps(row) + "\n")
        for name, value in row.items():
            if name in ("step", "kind"):
                continue
            tag = f"{kind}/{name}"
            if isinstance(value, list):
                self._write_vector(tag, np.asarray(value, np.float64), step)
            elif isinstance(value, (int, float)):
                if name in _TIMINGS and not math.isfinite(value):
                    continue  # the first step has no timing yet (compilation)
                self._tb.add_scalar(tag, value, step)
        if self._bar is not None and kind == "train":
            self._bar.set_postfix(loss=f"{row.get('loss', math.nan):.4f}", refresh=False)
        return row

    def _write_vector(self, tag: str, vector: np.ndarray, step: int) -> None:
        if vector.size <= MAX_PER_LAYER_SCALARS:
            for i, v in enumerate(vector):
                self._tb.add_scalar(f"{tag}/{i:03d}", v, step)
            return
        finite = vector[np.isfinite(vector)]
        if finite.size:
            self._tb.add_histogram(tag, finite, step)
        self._tb.add_scalar(f"{tag}/max", float(np.max(vector)), step)
        self._tb.add_scalar(f"{tag}/argmax", int(np.argmax(vector)), step)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def rewind(self, step: int) -> None:
        """The run went back to ``step`` (a rewind): the bar follows."""
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def message(self, text: str) -> None:
        """A line on the terminal that does not break the progress bar."""
        if self._bar is not None:
            self._bar.write(text)
        elif self.primary:
            print(text, flush=True)

    def flush(self) -> None:
        if self.primary:
            self._jsonl.flush()
            self._tb.flush()

    def close(self) -> None:
        if not self.primary:
            return
        if self._bar is not None:
            self._bar.close()
        self._jsonl.close()
        self._tb.close()
