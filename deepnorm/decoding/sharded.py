"""Decoding a batch split over a device mesh's data-parallel axes.

``DataParallelDecoder`` runs a search (``search(params, inputs_BxS, max_steps) -> tokens``,
e.g. ``incremental.translate_batch``) under ``jax.shard_map`` over the mesh's batch axes: each
data-parallel device decodes its own slice of the sentences with its own ``lax.while_loop``
(so it stops when *its* sentences are finished), and the beam reorder's gather stays on that
device, with no collective inside the loop. Every mesh axis is manual: the parameters enter
whole (XLA all-gathers fsdp- or tensor-sharded ones once, before the loop) and the devices of
one batch slice along any other axis (``tensor``) decode the same sentences. Leaving ``tensor``
to the automatic partitioner instead puts collectives inside loops that stop after different
numbers of steps on different slices, which deadlocks (seen on XLA:CPU, jax 0.10.2). A batch that does not divide the data-parallel devices is padded
with copies of its last row, which are dropped from the result. The tokens come back
replicated (an all-gather of a few int32 per sentence), so every process can read them.

This module knows meshes only as ``jax.sharding.Mesh`` and axis names; which axes carry the
batch is the caller's (``deepnorm.training.mesh.BATCH_AXES``).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def pad_to_multiple(rows_BxS: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    """``(rows padded to a multiple of multiple rows with copies of the last, real rows)``."""
    rows_BxS = np.asarray(rows_BxS)
    n = rows_BxS.shape[0]
    if n == 0:
        raise ValueError("an empty batch: nothing to decode")
    extra = (-n) % multiple
    if extra:
        rows_BxS = np.concatenate([rows_BxS, np.repeat(rows_BxS[-1:], extra, axis=0)])
    return rows_BxS, n


class DataParallelDecoder:
    """``decoder(params, inputs_BxS, max_steps) -> np.ndarray`` of the search's tokens for the
    B rows, decoded with the rows split over ``batch_axes`` of ``mesh``; one compilation per
    (padded batch, source length, max_steps)."""

    def __init__(self, search: Callable, mesh: Mesh, batch_axes: Sequence[str]):
        self.mesh = mesh
        self.batch_axes = tuple(a for a in batch_axes if a in mesh.axis_names)
        self.num_shards = math.prod(mesh.shape[a] for a in self.batch_axes)
        self.sharding = NamedSharding(mesh, PartitionSpec(self.batch_axes))
        self._search = search
        self._manual = frozenset(mesh.axis_names)  # all manual: see the module docstring
        self._compiled: dict[int, Callable] = {}

    def _jitted(self, max_steps: int) -> Callable:
        if max_steps not in self._compiled:
            spec = PartitionSpec(self.batch_axes)
            local = lambda params, inputs: self._search(params, inputs, max_steps)  # noqa: E731
            mapped = jax.shard_map(local, mesh=self.mesh, in_specs=(PartitionSpec(), spec),
                                   out_specs=spec, axis_names=self._manual, check_vma=False)
            self._compiled[max_steps] = jax.jit(
                mapped, out_shardings=NamedSharding(self.mesh, PartitionSpec()))
        return self._compiled[max_steps]

    def place(self, inputs_BxS: np.ndarray) -> tuple[jax.Array, int]:
        """``(the padded batch as one jax.Array split over the batch axes, real rows)``."""
        padded, n = pad_to_multiple(inputs_BxS, self.num_shards)
        return jax.device_put(padded, self.sharding), n

    def __call__(self, params, inputs_BxS: np.ndarray, max_steps: int) -> np.ndarray:
        placed, n = self.place(inputs_BxS)
        return np.asarray(jax.device_get(self._jitted(max_steps)(params, placed)))[:n]
