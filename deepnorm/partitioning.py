"""Logical axis names of the model's parameters, for sharding over a device mesh.

Parameters name their axes in ``axes`` metadata (``vocab``, ``embed``, ``heads``, ``mlp``,
``norm``); a stacked layer parameter has one more leading axis, named ``layers``. The model
knows nothing about meshes: ``deepnorm.training`` maps these names to mesh axes with rules
from the config (e.g. ``embed -> fsdp``, ``mlp -> tensor``).
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import PartitionSpec


def logical_axes(state: nnx.State):
    """A tree like ``state`` whose leaves are tuples of logical axis names (None: unnamed)."""

    def axes_of(variable):
        names = tuple(variable.get_metadata().get("axes", ()))
        extra = variable.get_value().ndim - len(names)
        if extra == 1:
            names = ("layers",) + names
        elif extra:
            names = (None,) * extra + names
        return names

    return jax.tree.map(axes_of, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def partition_specs(state: nnx.State, rules: dict[str, str | tuple[str, ...] | None]):
    """PartitionSpecs for ``state`` given ``rules`` (logical name -> mesh axis or None).

    A mesh axis is used at most once per array (the first logical axis that maps to it wins),
    since one array dimension cannot share a mesh axis with another.
    """

    def spec(names):
        used, out = set(), []
        for name in names:
            axis = rules.get(name) if name is not None else None
            axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
            if any(a in used for a in axes):
                axis = None
            used.update(axes if axis is not None else ())
            out.append(axis)
        return PartitionSpec(*out)

    return jax.tree.map(spec, logical_axes(state), is_leaf=lambda x: isinstance(x, tuple))
