"""Norms with batch statistics (``model.norm`` = ``batchnorm`` / ``powernorm``).

Unlike the per-token norms of ``deepnorm.norms`` these normalize each feature by statistics
over the batch and the positions, so they need two things besides ``x``: which tokens are real
(padding must not enter the statistics) and whether they train (batch statistics, running
statistics updated) or evaluate (running statistics only). Both come in a
:class:`BatchContext`; a call without one evaluates. The running statistics are
``nnx.BatchStat`` variables: never parameters, so the optimizer never sees them; in a scanned
stack they are stacked [L, d] like the weights and carried through the scan
(``deepnorm.transformer.Stack``); the train state holds them as ``batch_stats``.

Under ``jax.jit`` with the batch sharded over data-parallel devices, the means over the batch
below are means over the *global* batch (XLA inserts the cross-device reductions), so the
statistics are synchronized across devices without any explicit all-reduce.

A running statistic may also be updated by the backward pass (PowerNorm's nu): the custom VJP
returns the update as the "cotangent" of that statistic, and the train step adds the
cotangents of the batch statistics to their forward-updated values
(``new = forward_update + cotangent``; every other statistic's cotangent is zero).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from deepnorm.norms import NORM_CLASSES, BatchStatNorm, _f32, _gain, _param, _shift


@dataclasses.dataclass(frozen=True)
class BatchContext:
    """What a batch-statistics norm needs besides ``x``: ``token_mask`` [B, T] (True at real
    tokens; None: all are real) and ``train`` (batch statistics, running ones updated)."""

    token_mask: jax.Array | None = None
    train: bool = False


def apply_norm(norm, x: jax.Array, ctx: BatchContext | None) -> jax.Array:
    """``norm(x)``, with the batch context for a batch-statistics norm; None is the identity."""
    if norm is None:
        return x
    if isinstance(norm, BatchStatNorm):
        return norm(x, ctx)
    return norm(x)


def bind(norm, ctx: BatchContext | None):
    """``norm`` as a one-argument function of x (the residual schemes call ``s.ln(x)``)."""
    if norm is None or not isinstance(norm, BatchStatNorm):
        return norm
    return partial(norm, ctx=ctx)


def _token_weights(x: jax.Array, token_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``(w, n)``: float32 weights [..., B, T, 1] broadcastable to x (1 at real tokens, 0 at
    padding) and their count n, the number of real token vectors in x (x may have leading axes
    before [B, T, d], e.g. several residual streams, each counted)."""
    if token_mask is None:
        w = jnp.ones(x.shape[:-1] + (1,), jnp.float32)
    else:
        w = jnp.broadcast_to(token_mask.astype(jnp.float32)[..., None], x.shape[:-1] + (1,))
    return w, jnp.maximum(jnp.sum(w), 1.0)  # an all-padding batch: 0 statistics, not NaN


def _reduce(a: jax.Array) -> jax.Array:
    """Sum over every axis but the feature axis: [..., d] -> [d]."""
    return jnp.sum(a, axis=tuple(range(a.ndim - 1)))


class BatchNorm(BatchStatNorm):
    """y = g (x - mu_B) / sqrt(var_B + eps) + b, mu_B and var_B per feature over the batch's
    real tokens (Ioffe & Szegedy 2015); eval uses the running mean and variance.

    Running statistics: ``stat <- momentum * stat + (1 - momentum) * batch_stat``, the running
    variance from the unbiased batch variance (n / (n - 1)), as torch's BatchNorm keeps it
    (and the PowerNorm authors' masked BatchNorm, built on it); the forward pass normalizes by
    the biased one. ``momentum`` is Flax's convention (torch's momentum is 1 - it).
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, affine: bool = True,
                 momentum: float = 0.9, warmup: int = 0, rngs: nnx.Rngs | None = None):
        del rngs
        if warmup:
            raise ValueError("BatchNorm has no warmup (model.norm_warmup is PowerNorm's)")
        self.eps, self.momentum = eps, momentum
        self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32), axes=("norm",))
        self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32), axes=("norm",))
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=("norm",)) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), axes=("norm",)) if affine else None

    def __call__(self, x: jax.Array, ctx: BatchContext | None = None) -> jax.Array:
        h = _f32(x)
        if ctx is not None and ctx.train:
            w, n = _token_weights(h, ctx.token_mask)
            mean = _reduce(w * h) / n
            var = _reduce(w * jnp.square(h - mean)) / n
            m = self.momentum
            # The running statistics carry no gradient: they are bookkeeping for eval.
            unbiased = jax.lax.stop_gradient(var * n / jnp.maximum(n - 1.0, 1.0))
            self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
            self.var[...] = m * self.var[...] + (1 - m) * unbiased
        else:
            mean, var = self.mean[...], self.var[...]
        y = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return _shift(_param(self, "bias", x), _gain(_param(self, "scale", x), y)).astype(x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def power_normalize(h, psi2, nu, w, eps, momentum):
    """x_hat = h / sqrt(psi2 + eps) with PowerNorm's approximate backward (Shen et al. 2020,
    Algorithm 1), h [..., d] float32, psi2 and nu [d], w [..., 1] the real-token weights.

    Backward, with g = dL/dx_hat:  g' = g - nu * x_hat (at real tokens; g at padding),
    dL/dh = g' / sqrt(psi2 + eps), and the cotangent returned for ``nu`` is nu's update
    (1 - momentum) * Gamma, Gamma = mean over real tokens of x_hat * g' (per feature);
    ``psi2`` gets none (the running statistic is a constant of the step).
    """
    return h * jax.lax.rsqrt(psi2 + eps)


def _power_fwd(h, psi2, nu, w, eps, momentum):
    x_hat = h * jax.lax.rsqrt(psi2 + eps)
    return x_hat, (x_hat, psi2, nu, w)


def _power_bwd(eps, momentum, res, g):
    x_hat, psi2, nu, w = res
    # At padding the correction is left out: padding carries no loss, and the correction
    # would give its positions a gradient that reaches the weights through earlier layers.
    g_prime = g - w * nu * x_hat
    n = jnp.maximum(jnp.sum(jnp.broadcast_to(w, x_hat.shape[:-1] + (1,))), 1.0)
    gamma = _reduce(w * x_hat * g_prime) / n
    return (g_prime * jax.lax.rsqrt(psi2 + eps), jnp.zeros_like(psi2),
            (1 - momentum) * gamma, jnp.zeros_like(w))


power_normalize.defvjp(_power_fwd, _power_bwd)


class PowerNorm(BatchStatNorm):
    """y = g x / psi + b with psi^2 the running quadratic mean mean_B(x^2) per feature, no
    mean subtraction, and an approximate backward (Shen et al. 2020, "PowerNorm: Rethinking
    Batch Normalization in Transformers", Algorithm 1).

    Training step t (``count`` = t - 1 steps done before it):
      psi_B^2 = mean over the batch's real tokens of x^2
      x_hat = x / sqrt(psi_{t-1}^2 + eps)
      psi_t^2 = psi_{t-1}^2 + (1 - momentum) (psi_B^2 - psi_{t-1}^2)
      backward: ``power_normalize`` (nu_t = nu_{t-1} + (1 - momentum) Gamma_t)
    ``warmup`` > 0 (the authors' code; not in Algorithm 1): for the first ``warmup`` steps
    x_hat = x / sqrt(psi_B^2 + eps) (same approximate backward, psi_B a constant) and psi_t^2
    is the running average of the psi_B^2 seen so far; the moving average takes over after.
    Eval: y = g x / sqrt(psi^2 + eps) + b.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, affine: bool = True,
                 momentum: float = 0.9, warmup: int = 0, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps, self.momentum, self.warmup = eps, momentum, warmup
        self.psi2 = nnx.BatchStat(jnp.ones((dim,), jnp.float32), axes=("norm",))
        self.nu = nnx.BatchStat(jnp.zeros((dim,), jnp.float32), axes=("norm",))
        # float32, not int: the train step differentiates with respect to every batch statistic
        # (to collect nu's backward update), and jax.grad takes float inputs only. Exact to 2^24.
        self.count = nnx.BatchStat(jnp.zeros((), jnp.float32), axes=())
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=("norm",)) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), axes=("norm",)) if affine else None

    def __call__(self, x: jax.Array, ctx: BatchContext | None = None) -> jax.Array:
        h = _f32(x)
        psi2 = self.psi2[...]
        if ctx is not None and ctx.train:
            w, n = _token_weights(h, ctx.token_mask)
            batch = jax.lax.stop_gradient(_reduce(w * jnp.square(h)) / n)
            count = self.count[...]
            ema = psi2 + (1 - self.momentum) * (batch - psi2)
            if self.warmup:
                warming = count < self.warmup
                scale2 = jnp.where(warming, batch, psi2)
                self.psi2[...] = jnp.where(warming, psi2 + (batch - psi2) / (count + 1), ema)
            else:
                scale2 = psi2
                self.psi2[...] = ema
            self.count[...] = count + 1
            y = power_normalize(h, scale2, self.nu[...], w, self.eps, self.momentum)
        else:
            y = h * jax.lax.rsqrt(psi2 + self.eps)
        return _shift(_param(self, "bias", x), _gain(_param(self, "scale", x), y)).astype(x.dtype)


def add_backward_updates(forward_stats, stat_cotangents):
    """The batch statistics after a train step: the forward pass's updates plus the updates
    the backward pass returned as their cotangents (zero for all but PowerNorm's nu)."""
    return jax.tree.map(jnp.add, forward_stats, stat_cotangents)


NORM_CLASSES.update(batchnorm=BatchNorm, powernorm=PowerNorm)
