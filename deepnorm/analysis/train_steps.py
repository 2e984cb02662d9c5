"""Several seeds trained at once by the training package's own step, for measurements taken
during early training.

The step is ``deepnorm.training.steps.make_train_step`` with the optimizer of
``deepnorm.training.optim.make_optimizer``, i.e. what train.py runs. Here it is vmapped over a
leading seed axis and scanned over steps, so all seeds train in one compiled program and a
quantity can be recorded after every step (DeepNet's model update).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from deepnorm.training.optim import make_optimizer
from deepnorm.training.state import _DROPOUT_STREAM, TrainState
from deepnorm.training.steps import make_train_step


def seed_states(params_S, seeds, tx) -> TrainState:
    """TrainStates at step 0 for per-seed ``params_S`` (leading seed axis); each seed's dropout
    key is the one ``create_train_state`` gives that seed."""
    rngs = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(s), _DROPOUT_STREAM)
                      for s in seeds])
    return TrainState(step=jnp.zeros((len(seeds),), jnp.int32), params=params_S,
                      opt_state=jax.vmap(tx.init)(params_S), rng=rngs)


def scan_steps(train_step, state, batches, num_steps: int, record: Callable | None = None):
    """``num_steps`` of ``train_step`` on one state, cycling through the K stacked ``batches``.

    Returns (final state, stacked ``record(params)`` after each step, or None); the record
    taken after step t is at index t-1.
    """
    num_batches = jax.tree.leaves(batches)[0].shape[0]

    def body(s, t):
        s, _ = train_step(s, jax.tree.map(lambda b: b[t % num_batches], batches))
        return s, (None if record is None else record(s.params))

    return jax.lax.scan(body, state, jnp.arange(num_steps))


def train_seeds(graphdef, params_S, seeds, batches, opt_config, *, num_steps: int,
                record: Callable | None = None):
    """Every seed of ``params_S`` trained ``num_steps`` steps with ``opt_config``'s optimizer.

    ``record(params)`` (optional) is evaluated after every step. Returns (params_S, records
    [S, num_steps, ...] or None).
    """
    tx, _ = make_optimizer(opt_config, num_steps)
    train_step = make_train_step(graphdef, tx, diagnostics=False,
                                 label_smoothing=float(opt_config.label_smoothing),
                                 z_loss=float(opt_config.get("z_loss", 0.0)))

    @jax.jit
    def run(state_S, b):
        return jax.vmap(lambda s: scan_steps(train_step, s, b, num_steps, record))(state_S)

    state_S, recorded = run(seed_states(params_S, list(seeds), tx),
                            jax.tree.map(jnp.asarray, batches))
    return state_S.params, recorded


def optimizer_config(learning_rate: float, warmup_steps: int = 0):
    """The analysis's default ``optimizer`` block for ``make_optimizer``: AdamW with DeepNet's
    betas (0.9, 0.98), no weight decay, no clipping, no label smoothing, no z-loss, a linear warmup and
    then a constant rate. configs/analysis/*.py set the same values (tests check they agree)."""
    from ml_collections import config_dict

    return config_dict.ConfigDict(dict(
        learning_rate=learning_rate, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.0,
        warmup_steps=warmup_steps, decay_start=0, schedule="constant", grad_clip_norm=0.0,
        label_smoothing=0.0, z_loss=0.0))
