"""A few Adam steps on every seed at once, for measurements taken during early training.

This is plain optax Adam on the model's training loss (``deepnorm.training.loss.loss_fn``),
written as a ``lax.scan`` so that it vmaps over the seed axis and can record a quantity after
every step (DeepNet's model update). The training package's ``train_step`` carries sharding,
logging and checkpoint state that a vmapped measurement has no use for; the stability map,
which is about training itself, runs the real training code instead.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepnorm.training.loss import loss_fn


def adam(peak_lr: float, warmup_steps: int = 0, b1: float = 0.9, b2: float = 0.98,
         eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam with a linear warmup to ``peak_lr`` (then constant); betas as in DeepNet."""
    if warmup_steps:
        lr = optax.linear_schedule(peak_lr / warmup_steps, peak_lr, warmup_steps - 1)
    else:
        lr = peak_lr
    return optax.adam(lr, b1=b1, b2=b2, eps=eps)


def scan_train(graphdef, params, batches, tx, num_steps: int,
               record: Callable | None = None):
    """``num_steps`` optimizer steps on one model, cycling through the K stacked ``batches``.

    Returns (final params, stacked ``record(params)`` after each step, or None). Records taken
    after step t are at index t-1.
    """
    num_batches = jax.tree.leaves(batches)[0].shape[0]

    def loss(p, batch):
        return loss_fn(nnx.merge(graphdef, p), batch)[0]

    def body(carry, step):
        p, opt_state = carry
        batch = jax.tree.map(lambda b: b[step % num_batches], batches)
        grads = jax.grad(loss)(p, batch)
        updates, opt_state = tx.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        return (p, opt_state), (None if record is None else record(p))

    (params, _), recorded = jax.lax.scan(body, (params, tx.init(params)), jnp.arange(num_steps))
    return params, recorded


def adam_train(graphdef, params_S, batches, *, num_steps: int, peak_lr: float,
               warmup_steps: int = 0):
    """``scan_train`` with Adam on every seed of ``params_S`` (leading seed axis)."""
    tx = adam(peak_lr, warmup_steps)

    @jax.jit
    def train(p, b):
        return jax.vmap(lambda q: scan_train(graphdef, q, b, tx, num_steps)[0])(p)

    return train(params_S, jax.tree.map(jnp.asarray, batches))
