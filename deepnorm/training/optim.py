"""AdamW with warmup, a decay schedule and gradient clipping, built from ``config.optimizer``.

The schedules are written out (not optax's) so each is one line that can be checked by hand:

* ``inverse_sqrt`` (Vaswani et al. 2017; what fairseq and the DeepNet paper use):
  ``lr * min(1, s / w) * sqrt(max(w, 1) / max(s, w, 1))``, i.e. linear warmup to ``lr`` over
  ``w`` steps, then ``lr * sqrt(w / s)``.
* ``cosine``: linear warmup, then half a cosine from ``lr`` down to 0 at ``num_steps``.
* ``constant``: linear warmup, then ``lr``.

``s`` is the 1-based number of the update being made, so the first update already has a
non-zero rate; ``warmup_steps = 0`` skips warmup entirely (DeepNet's claim that DeepNorm needs
no warmup is tested exactly this way).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from deepnorm.config import ConfigError

SCHEDULES = ("inverse_sqrt", "cosine", "constant")
# Weight decay applies to matrices only: decaying LayerNorm scales or biases pulls them to zero,
# which is not what AdamW's decoupled decay is for (Loshchilov & Hutter 2019).
DECAYED_LEAVES = ("kernel", "embed")


def make_schedule(opt_config, num_steps: int):
    """The learning rate as a function of the optimizer's update count (0-based)."""
    lr = float(opt_config.learning_rate)
    warmup = int(opt_config.warmup_steps)
    kind = opt_config.schedule
    if kind not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule={kind!r} is not one of {', '.join(SCHEDULES)}")
    if warmup < 0:
        raise ConfigError(f"optimizer.warmup_steps={warmup} must be >= 0")
    if not lr > 0:
        raise ConfigError(f"optimizer.learning_rate={lr} must be positive")
    anchor = max(warmup, 1)
    decay_span = max(num_steps - warmup, 1)

    def schedule(count):
        s = jnp.asarray(count, jnp.float32) + 1.0
        warm = jnp.minimum(1.0, s / warmup) if warmup else 1.0
        if kind == "inverse_sqrt":
            decay = jnp.sqrt(anchor / jnp.maximum(s, anchor))
        elif kind == "cosine":
            progress = jnp.clip((s - warmup) / decay_span, 0.0, 1.0)
            decay = 0.5 * (1.0 + jnp.cos(math.pi * progress))
        else:
            decay = 1.0
        return lr * warm * decay

    return schedule


def decay_mask(params):
    """True for the leaves AdamW decays: weight matrices and the embedding, not norms/biases."""
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
    clip = float(opt_config.grad_clip_norm)
    if clip < 0:
        raise ConfigError(f"optimizer.grad_clip_norm={clip} must be >= 0 (0 disables clipping)")
    schedule = make_schedule(opt_config, num_steps)
    adamw = optax.adamw(schedule, b1=float(opt_config.b1), b2=float(opt_config.b2),
                        eps=float(opt_config.eps), weight_decay=float(opt_config.weight_decay),
                        mask=decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw
    return tx, schedule
