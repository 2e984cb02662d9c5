"""The device mesh and the sharding of parameters, optimizer state and batches.

The mesh has three named axes from ``config.mesh``: ``data`` (pure data parallelism: a
replica of the model per slice), ``fsdp`` (data parallel, with parameters and optimizer state
sharded over it, ZeRO-3 style) and ``tensor`` (Megatron-style: attention heads and the
feed-forward width split across devices). Parameters carry logical axis names
(``deepnorm.partitioning``); ``config.mesh.rules`` maps each name to a mesh axis. Batches are
split over ``(data, fsdp)``. XLA's GSPMD partitioner inserts every collective, so the step
function is the same code for every layout.
"""

from __future__ import annotations

import logging
import math

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from deepnorm.config import ConfigError
from deepnorm.partitioning import partition_specs
from deepnorm.training.state import TrainState

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_AXES = ("vocab", "embed", "heads", "mlp", "norm", "layers")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, tensor); at most one may be -1, meaning "all devices left"."""
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    fills = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    bad = [f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
    if bad or len(fills) > 1:
        raise ConfigError(
            f"{', '.join(bad) or 'mesh.' + ' and mesh.'.join(fills) + ' = -1'}: each mesh size "
            "must be a positive integer, and at most one may be -1 (fill)")
    known = math.prod(s for s in sizes if s != -1)
    if fills:
        if num_devices % known:
            raise ConfigError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the {num_devices} "
                "devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"{num_devices} are available; set one of mesh.data/fsdp/tensor to -1 to fill")
    return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> Mesh:
    """A ``Mesh`` over all (or the given) devices with the automatic (GSPMD) axis types."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def sharding_rules(mesh_config) -> dict[str, str | None]:
    """``{logical axis: mesh axis or None}`` from ``mesh.rules``, checked against the names."""
    rules = {}
    for name, axis in dict(mesh_config.rules).items():
        if name not in LOGICAL_AXES:
            raise ConfigError(
                f"mesh.rules.{name}: unknown logical axis; known: {', '.join(LOGICAL_AXES)}")
        axis = axis or None  # "" and None both mean replicated
        if axis is not None and axis not in MESH_AXES:
            raise ConfigError(
                f"mesh.rules.{name}={axis!r} is not a mesh axis ({', '.join(MESH_AXES)}) or ''")
        rules[name] = axis
    return rules


def _fit(spec: PartitionSpec, shape, mesh: Mesh, path, dropped: list) -> PartitionSpec:
    """Drops mesh axes that do not divide their dimension (e.g. 2 heads over 4 devices)."""
    out = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axis is not None and dim % mesh.shape[axis]:
            dropped.append(f"{jax.tree_util.keystr(path)} dim {dim} over {axis}")
            axis = None
        out.append(axis)
    return PartitionSpec(*out)


def param_specs(param_state, mesh: Mesh, rules) -> dict:
    """PartitionSpecs for the params (pure dict) from the Variables' logical axes."""
    specs = nnx.to_pure_dict(partition_specs(param_state, rules))
    shapes = nnx.to_pure_dict(param_state)
    dropped: list[str] = []
    fitted = jax.tree_util.tree_map_with_path(
        lambda path, spec, x: _fit(spec, x.shape, mesh, path, dropped), specs, shapes,
        is_leaf=lambda x: isinstance(x, PartitionSpec))
    if dropped:
        logging.info("replicated where the mesh does not divide: %s", "; ".join(dropped))
    return fitted


def state_shardings(mesh: Mesh, tx, param_state, rules, batch_stats=None) -> TrainState:
    """A TrainState of ``NamedSharding``: optimizer moments follow their parameter's spec,
    scalars (step, counts, rng, loss scale) are replicated, and so are the running statistics
    ``batch_stats`` (a tree of their shapes, or None; [L, d] vectors: every device updates
    them from the same global batch statistics)."""
    pspecs = param_specs(param_state, mesh, rules)
    abstract = nnx.to_pure_dict(param_state)
    opt_shapes = jax.eval_shape(tx.init, abstract)
    opt_specs = optax.tree_map_params(
        tx, lambda _, spec: spec, opt_shapes, pspecs,
        transform_non_params=lambda _: PartitionSpec(),
        is_leaf=lambda x: isinstance(x, PartitionSpec))
    named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    replicated = named(PartitionSpec())
    return TrainState(step=replicated, params=jax.tree.map(named, pspecs, is_leaf=is_spec),
                      opt_state=jax.tree.map(named, opt_specs, is_leaf=is_spec),
                      rng=replicated,
                      loss_scale={"scale": replicated, "good_steps": replicated},
                      batch_stats=jax.tree.map(lambda _: replicated, batch_stats))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, metrics)."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Examples split over (data, fsdp); positions and features unsplit."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def check_batch_size(global_batch: int, mesh: Mesh, process_count: int) -> None:
    """The global batch must split evenly over the data-parallel devices and the processes."""
    replicas = math.prod(mesh.shape[a] for a in BATCH_AXES)
    for what, n in (("data x fsdp devices", replicas), ("processes", process_count)):
        if global_batch % n:
            raise ConfigError(
                f"train.batch_size={global_batch} does not split over the {n} {what}; use a "
                f"multiple of {n}")


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """Assembles each process's slice of the batch into one global, sharded jax.Array."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
