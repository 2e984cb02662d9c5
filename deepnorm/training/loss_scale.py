"""Dynamic loss scaling for float16 matmuls (``model.dtype="float16"``).

float16 has 5 exponent bits: gradients below ~6e-8 flush to zero and above 65504 overflow to
inf. The loss is multiplied by a scale S before differentiation, so the backward pass carries
S x the true cotangents (kept away from the underflow end), and the gradients are divided by S
again in float32 before the optimizer sees them. The scale is adjusted as the run goes:

* a step whose gradients are not finite (an overflow) halves S and is skipped: parameters
  and optimizer state stay as they were;
* after ``period`` finite steps in a row S doubles.

S never drops below 1; a non-finite step at S = 1 is not an overflow the scale can fix and
goes to the divergence policy (``train.on_nonfinite``) like any other non-finite step.

The arithmetic is DeepMind's ``jmp.DynamicLossScale`` (scale, unscale, adjust). It is kept in
the TrainState as a plain dict of two arrays, ``{"scale": float32, "good_steps": int32}``, so
it is checkpointed with the parameters and a resumed run continues with the same scale; the
``jmp`` object, whose period is static, is rebuilt from it inside the step.
"""

from __future__ import annotations

import jax.numpy as jnp
import jmp

from deepnorm.config import ConfigError

INITIAL_SCALE = 2.0**15  # jmp's and PyTorch GradScaler's starting point (2^16 there)
DEFAULT_PERIOD = 2000  # finite steps between doublings, as in jmp and PyTorch
MIN_SCALE = 1.0  # jmp.DynamicLossScale's floor


def uses_loss_scaling(dtype: str) -> bool:
    """Only float16 needs it: bfloat16 has float32's exponent range."""
    return jnp.dtype(dtype) == jnp.float16


def initial_state(scale: float = 1.0) -> dict:
    """The TrainState's ``loss_scale`` entry. Runs without loss scaling keep scale 1 there."""
    return {"scale": jnp.asarray(scale, jnp.float32), "good_steps": jnp.zeros((), jnp.int32)}


def from_state(state: dict, period: int) -> jmp.DynamicLossScale:
    # jmp counts finite steps modulo the period in ``counter``: the same number as good_steps.
    return jmp.DynamicLossScale(loss_scale=state["scale"], counter=state["good_steps"],
                                period=period, factor=2,
                                min_loss_scale=jnp.asarray(MIN_SCALE, jnp.float32))


def to_state(loss_scale: jmp.DynamicLossScale) -> dict:
    return {"scale": loss_scale.loss_scale, "good_steps": loss_scale.counter}


def check_config(train) -> None:
    """One-line errors for ``train.initial_loss_scale`` / ``train.loss_scale_period`` (checked
    for every dtype, so a bad value fails before it matters; only float16 reads them)."""
    period, initial = train.loss_scale_period, train.initial_loss_scale
    if not isinstance(period, int) or isinstance(period, bool) or period <= 0:
        raise ConfigError(f"train.loss_scale_period={period!r} must be a positive integer")
    if (not isinstance(initial, (int, float)) or isinstance(initial, bool)
            or not MIN_SCALE <= initial < float(jnp.finfo(jnp.float32).max)):
        raise ConfigError(f"train.initial_loss_scale={initial!r} must be a finite number >= "
                          f"{MIN_SCALE:g}")
