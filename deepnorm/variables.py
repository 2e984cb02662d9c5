"""The model's two variable collections as pure dicts: ``params`` (``nnx.Param``, what the
optimizer trains) and ``batch_stats`` (``nnx.BatchStat``, the running statistics of BatchNorm /
PowerNorm, updated by the forward and backward passes of a train step, never by the optimizer).

A model without batch-statistics norms has ``batch_stats = None``, so its train state,
checkpoints and every function over its params are what they were without the collection.
"""

from __future__ import annotations

from flax import nnx


def split(model: nnx.Module):
    """``(graphdef, params, batch_stats)``: the pure dicts of the model's Params and
    BatchStats (None without any); every other variable is left in the graphdef's model."""
    graphdef, params, stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    stats = nnx.to_pure_dict(stats)
    return graphdef, nnx.to_pure_dict(params), (stats or None)


def merge(graphdef, params, batch_stats=None) -> nnx.Module:
    """The model from ``split``'s graphdef and collections (a model with batch-statistics
    norms needs its ``batch_stats``: a one-line error without them)."""
    if batch_stats is None:
        try:
            return nnx.merge(graphdef, params)
        except ValueError as err:
            if "leaves" in str(err):
                raise ValueError("this model has batch-statistics norms (model.norm batchnorm / "
                                 "powernorm): pass its batch_stats with its params") from None
            raise
    return nnx.merge(graphdef, params, batch_stats)


def batch_stats(model: nnx.Module):
    """The model's current running statistics as a pure dict (None without any)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)) or None
