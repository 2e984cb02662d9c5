"""Parameters of several seeds at once: the model's init vmapped over PRNG keys.

Every seed's parameters are one slice of a tree with a leading [S] seed axis, so a measurement
written for one model runs for all seeds with ``jax.vmap`` and one compilation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from deepnorm.profiling import admin_initialize
from deepnorm.transformer import Transformer


def graphdef_of(cfg):
    """The model's graph definition, built abstractly (no parameters are materialized)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract, nnx.Param)
    return graphdef


def init_params(cfg, seeds, profile_batch=None):
    """Parameters for each seed in ``seeds``, stacked on a leading axis: (graphdef, params).

    ``profile_batch`` (one batch) is needed by Admin (Liu et al. 2020), whose residual weights
    omega come from a forward pass at initialization; each seed is profiled on its own model.
    """
    if not cfg.scheme.profiled:
        profile_batch = None  # only Admin reads it; None keeps one compiled init per config
    elif profile_batch is None:
        raise ValueError("residual='admin' needs a profile_batch to set its omegas")
    else:
        profile_batch = {k: jnp.asarray(profile_batch[k]) for k in ("inputs", "decoder_inputs")
                         if k in profile_batch}
    seeds = jnp.asarray(list(seeds), jnp.uint32)
    return graphdef_of(cfg), _init_seeds(cfg, seeds, profile_batch)


@functools.partial(jax.jit, static_argnums=0)
def _init_seeds(cfg, seeds, profile_batch):
    def init(key):
        model = Transformer(cfg, rngs=nnx.Rngs(key))
        if profile_batch is not None:
            admin_initialize(model, profile_batch["inputs"], profile_batch.get("decoder_inputs"))
        return nnx.split(model, nnx.Param)[1]

    return jax.vmap(init)(jax.vmap(jax.random.key)(seeds))
