"""Real-text batches for the analysis, from the same pipeline training uses.

The gradient and update measurements average over many batches inside one compiled ``lax.scan``,
so they take the batches stacked: every array gets a leading [K] batch axis.
"""

from __future__ import annotations

import numpy as np

from deepnorm.data import default_data_config, make_iterator, task_for_arch


def stacked_batches(data_config, *, arch: str, num_batches: int, batch_size: int, seq_len: int,
                    seed: int = 0, split: str = "train") -> dict[str, np.ndarray]:
    """``num_batches`` consecutive batches of ``arch``'s task, stacked: {key: [K, B, ...]}."""
    if data_config is None:
        data_config = default_data_config()
    if num_batches < 1:
        raise ValueError(f"num_batches={num_batches} must be at least 1")
    iterator = make_iterator(data_config, task=task_for_arch(arch), split=split,
                             batch_size=batch_size, seq_len=seq_len, seed=seed)
    batches = [next(iterator) for _ in range(num_batches)]
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def first(batches: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The first batch of a stacked set."""
    return {key: value[0] for key, value in batches.items()}
