"""AdamW with warmup, a decay schedule and gradient clipping, built from ``config.optimizer``.

The schedules are written out (not optax's) so each is one line that can be checked by hand.
``s`` is the 1-based number of the update being made (the first update already has a non-zero
rate), ``w`` is ``warmup_steps`` and ``n`` is ``train.num_steps``; every schedule is
``lr * min(1, s / w) * decay(s)`` (no warmup factor when ``w = 0``: the first update uses the
full rate):

* ``inverse_sqrt`` (Vaswani et al. 2017; what fairseq and the DeepNet paper use):
  ``decay = sqrt(a / max(s, a))`` with the decay anchor ``a = decay_start`` if set, else ``w``:
  flat at ``lr`` until update ``a``, then ``lr * sqrt(a / s)``. With ``w = 0`` and no
  ``decay_start`` there is nothing to set the decay's time scale, so the rate stays at ``lr``
  (as fairseq's rate stays at the peak until its warmup ends); to compare a no-warmup run with
  a warmup-``w`` run on the same decay, give the no-warmup run ``decay_start = w``.
* ``cosine``: ``decay = 0.5 * (1 + cos(pi * (s - p) / (n + 1 - p)))`` from update
  ``p = max(w, 1)`` on (the first update at the full rate): half a cosine that would reach 0
  one update *after* the last, so the last update still moves the weights (at
  ``lr * (1 - cos(pi / (n + 1 - p))) / 2``, the rate just above 0).
* ``constant``: ``decay = 1``.

DeepNet's claim that DeepNorm needs no warmup is tested with ``warmup_steps = 0``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from deepnorm.config import ConfigError

SCHEDULES = ("inverse_sqrt", "cosine", "constant")
# Weight decay applies to matrices only: decaying LayerNorm scales or biases pulls them to zero,
# which is not what AdamW's decoupled decay is for (Loshchilov & Hutter 2019). Both lookup
# tables are matrices and are decayed alike: the token embedding (also the tied output
# projection) and the learned position embedding, which would otherwise be the one weight
# matrix free to grow without bound.
DECAYED_LEAVES = ("kernel", "embed", "pos_embed")


def make_schedule(opt_config, num_steps: int):
    """The learning rate as a function of the optimizer's update count (0-based)."""
    lr = float(opt_config.learning_rate)
    warmup = int(opt_config.warmup_steps)
    decay_start = int(opt_config.get("decay_start", 0))
    kind = opt_config.schedule
    if kind not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule={kind!r} is not one of {', '.join(SCHEDULES)}")
    if warmup < 0:
        raise ConfigError(f"optimizer.warmup_steps={warmup} must be >= 0")
    if not lr > 0:
        raise ConfigError(f"optimizer.learning_rate={lr} must be positive")
    if decay_start and kind != "inverse_sqrt":
        raise ConfigError(f"optimizer.decay_start={decay_start} is for schedule=inverse_sqrt "
                          f"only (schedule={kind!r}); leave it 0")
    if decay_start < 0 or 0 < decay_start < warmup:
        raise ConfigError(f"optimizer.decay_start={decay_start} must be 0 (the end of warmup) "
                          f"or >= optimizer.warmup_steps={warmup}")
    anchor = decay_start or warmup
    peak = max(warmup, 1)  # the update at full rate where cosine starts (the 1st without warmup)
    cosine_span = max(num_steps + 1 - peak, 1)

    def schedule(count):
        s = jnp.asarray(count, jnp.float32) + 1.0
        warm = jnp.minimum(1.0, s / warmup) if warmup else 1.0
        if kind == "inverse_sqrt" and anchor:
            decay = jnp.sqrt(anchor / jnp.maximum(s, anchor))
        elif kind == "cosine":
            progress = jnp.clip((s - peak) / cosine_span, 0.0, 1.0)
            decay = 0.5 * (1.0 + jnp.cos(math.pi * progress))
        else:
            decay = 1.0
        return lr * warm * decay

    return schedule


def update_count(opt_state) -> jax.Array:
    """How many updates the optimizer has applied: the count its learning-rate schedule reads.

    This is not ``TrainState.step``: a step dropped by ``train.on_nonfinite=skip`` keeps the
    old optimizer state, count included, so the next update reuses the dropped one's rate.
    """
    # A NamedTuple's class name is a key tree_get understands; AdamW holds one such state.
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "ScaleByScheduleState")
    if not found:
        raise ValueError("the optimizer state holds no learning-rate schedule count")
    return found[0][1].count


def learning_rate(schedule, opt_state) -> jax.Array:
    """The rate the next update made from ``opt_state`` uses (jit-friendly)."""
    return schedule(update_count(opt_state))


def decay_mask(params):
    """True for the leaves AdamW decays: weight matrices and the embeddings, not norms/biases."""
    def is_decayed(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return name in DECAYED_LEAVES
    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(opt_config, num_steps: int):
    """Returns ``(tx, schedule)``: clip-by-global-norm (if ``grad_clip_norm > 0``) then AdamW."""
    for name in ("b1", "b2"):
        value = float(opt_config[name])
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"optimizer.{name}={value} must be in [0, 1)")
    if not float(opt_config.eps) > 0:
        raise ConfigError(f"optimizer.eps={opt_config.eps} must be positive")
    if float(opt_config.weight_decay) < 0:
        raise ConfigError(f"optimizer.weight_decay={opt_config.weight_decay} must be >= 0")
    z_loss = opt_config.get("z_loss", 0.0)
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or not z_loss >= 0:
        raise ConfigError(f"optimizer.z_loss={z_loss!r} must be a number >= 0 (PaLM: 1e-4; "
                          "0 disables it)")
    clip = float(opt_config.grad_clip_norm)
    if clip < 0:
        raise ConfigError(f"optimizer.grad_clip_norm={clip} must be >= 0 (0 disables clipping)")
    schedule = make_schedule(opt_config, num_steps)
    adamw = optax.adamw(schedule, b1=float(opt_config.b1), b2=float(opt_config.b2),
                        eps=float(opt_config.eps), weight_decay=float(opt_config.weight_decay),
                        mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
    return tx, schedule
