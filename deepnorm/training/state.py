"""The training state: one pytree of plain arrays, so it jits, shards and checkpoints as is.

Parameters are kept as a pure nested dict (``nnx.to_pure_dict``), not as ``nnx.State``: the
functional hot path merges them with the graphdef inside the jitted step
(``nnx.merge(graphdef, params)``), and orbax / optax see nothing but dicts of arrays. The running
statistics of BatchNorm / PowerNorm are a second dict, ``batch_stats`` (``deepnorm.variables``;
None for every other norm), which the train step updates and checkpoints save with the rest.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from deepnorm import variables
from deepnorm.config import TransformerConfig
from deepnorm.training import loss_scale as loss_scale_lib
from deepnorm.transformer import Transformer


# Keeps the dropout stream apart from the parameter-init stream drawn from the same seed.
_DROPOUT_STREAM = 1


@struct.dataclass
class TrainState:
    """``step`` counts finished updates; ``rng`` is the run's base key (dropout folds in step);
    ``loss_scale`` is ``deepnorm.training.loss_scale``'s ``{"scale", "good_steps"}`` (scale 1
    and unused unless ``model.dtype="float16"``), checkpointed like everything else;
    ``batch_stats`` the running statistics of batch-statistics norms (None without any)."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    loss_scale: Any = None
    batch_stats: Any = None


def build_model(model_cfg: TransformerConfig, seed: int, admin_batch=None) -> Transformer:
    """The model at initialization; Admin's omegas are profiled on ``admin_batch`` if given."""
    model = Transformer(model_cfg, rngs=nnx.Rngs(params=seed))
    if model_cfg.scheme.profiled:
        if admin_batch is None:
            raise ValueError("residual='admin' needs a batch to profile (admin_batch)")
        from deepnorm.profiling import admin_initialize  # only Admin needs the profiling pass
        admin_initialize(model, admin_batch["inputs"], admin_batch.get("decoder_inputs"))
    return model


def abstract_params(model_cfg: TransformerConfig, seed: int = 0):
    """``(graphdef, param_state)`` with shapes only (no FLOPs): the Variables keep their
    logical-axis metadata, which ``deepnorm.partitioning.partition_specs`` reads."""
    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(params=seed)))
    graphdef, param_state, _ = nnx.split(model, nnx.Param, ...)
    return graphdef, param_state


def _init_fn(model_cfg: TransformerConfig, tx, seed: int, admin_batch=None,
             loss_scale: float = 1.0):
    def init():
        model = build_model(model_cfg, seed, admin_batch)
        _, params, batch_stats = variables.split(model)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=tx.init(params),
                          rng=jax.random.fold_in(jax.random.PRNGKey(seed), _DROPOUT_STREAM),
                          loss_scale=loss_scale_lib.initial_state(loss_scale),
                          batch_stats=batch_stats)
    return init


def abstract_train_state(model_cfg: TransformerConfig, tx, seed: int = 0) -> TrainState:
    """The TrainState's shapes and dtypes, without computing anything (a restore target)."""
    profile_stub = None
    if model_cfg.scheme.profiled:  # the omegas' shapes do not depend on the batch
        profile_stub = {"inputs": jnp.ones((1, 2), jnp.int32),
                        "decoder_inputs": (jnp.ones((1, 2), jnp.int32)
                                           if model_cfg.arch == "encoder_decoder" else None)}
    return jax.eval_shape(_init_fn(model_cfg, tx, seed, profile_stub))


def create_train_state(model_cfg: TransformerConfig, tx, seed: int, *, shardings=None,
                       admin_batch=None, loss_scale: float = 1.0):
    """Returns ``(graphdef, TrainState)`` at step 0.

    The state is built inside ``jax.jit``, so with ``shardings`` (a TrainState of
    ``NamedSharding``, see ``deepnorm.training.mesh.state_shardings``) every array is created
    directly in its shard and no device ever holds the whole model. ``admin_batch`` (a batch
    dict) is needed only for ``residual="admin"``, whose omegas are profiled on it.
    ``loss_scale``: the initial dynamic loss scale (float16 runs; 1 otherwise).
    """
    graphdef, _ = abstract_params(model_cfg, seed)
    state = jax.jit(_init_fn(model_cfg, tx, seed, admin_batch, loss_scale),
                    out_shardings=shardings)()
    return graphdef, state
