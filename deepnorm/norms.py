"""Normalization functions, one small NNX module each (``model.norm``).

All of them compute their statistics in float32 whatever the activation dtype, because a
bfloat16 mean of squares over d_model elements loses the precision that makes very deep
residual streams stable; the result is cast back to the input's dtype.

``affine=False`` builds a norm with no gain and no bias parameters at all (DyT keeps its alpha):
the normalization alone, for a model whose gains and biases were folded into the adjacent
projections (``deepnorm.export.fold_norms``). Gains of 1 and biases of 0 would give the same
outputs but still cost the multiply-add; a norm without them does not compute it.

Every parameter ``p`` of a norm is read through ``_param``, which adds the norm's *probe* for
``p`` when one is attached (``deepnorm.norm_probes``): a zero array with one row per example,
``[B, *p.shape]``, broadcast over that example's tokens. The forward pass is unchanged (the
probe is zero), and the gradient of the loss with respect to probe row b is the per-example
gradient of ``p`` for example b: that is how the gradient noise scale is measured from the
norm layers (Gray et al. 2024) without per-example gradients of any weight matrix.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def _f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)


def _gain(g: jax.Array | None, y: jax.Array) -> jax.Array:
    return y if g is None else y * g


def _shift(b: jax.Array | None, y: jax.Array) -> jax.Array:
    return y if b is None else y + b


class NormProbe(nnx.Variable):
    """A zero per-example offset of one norm parameter, ``[B, *param.shape]``; its gradient is
    that parameter's per-example gradient. Attached only while measuring (never a Param, so
    optimizers, checkpoints and the param tree never see it)."""


PROBE_SUFFIX = "_probe"  # the probe of parameter ``scale`` is the attribute ``scale_probe``


def _param(norm: nnx.Module, name: str, x: jax.Array) -> jax.Array:
    """Parameter ``name`` of ``norm`` as applied to ``x`` [B, ..., d]: the parameter itself, or
    with a probe attached ``param + probe[b]`` for every token of example b, [B, 1.., *shape].

    Exact per-example gradients: y_bt depends on the parameter only through p + probe_b, so
    dL/dprobe_b = sum over example b's tokens of dL/dy_bt * dy_bt/dp, which is example b's
    share of dL/dp (all B rows sum to dL/dp).
    """
    param = getattr(norm, name)
    if param is None:  # an affine-free norm (affine=False) has no such parameter
        return None
    value = param[...]
    probe = getattr(norm, name + PROBE_SUFFIX, None)
    if probe is None:
        return value
    probe = probe[...]
    # [B, *S] -> [B, 1, ..., 1, *S]: one row per example, the same for all its positions.
    middle = (1,) * (x.ndim - 1 - value.ndim)
    return value + probe.reshape(probe.shape[:1] + middle + value.shape)


class LayerNorm(nnx.Module):
    """y = g * (x - mean(x)) / sqrt(var(x) + eps) + b (Ba, Kiros, Hinton 2016)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, affine: bool = True,
                 rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init; the argument keeps every norm's signature the same
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=("norm",)) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), axes=("norm",)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = _f32(x)
        mean = jnp.mean(h, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)
        y = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return _shift(_param(self, "bias", x), _gain(_param(self, "scale", x), y)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """y = g * x / sqrt(mean(x^2) + eps) (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, *, eps: float = 1e-5, affine: bool = True,
                 rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=("norm",)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = _f32(x)
        ms = jnp.mean(jnp.square(h), axis=-1, keepdims=True)
        return _gain(_param(self, "scale", x), h * jax.lax.rsqrt(ms + self.eps)).astype(x.dtype)


class ScaleNorm(nnx.Module):
    """y = g * x / max(||x||_2, eps), one scalar g initialised to sqrt(d) (Nguyen & Salazar 2019).

    With g = sqrt(d) the output has unit RMS at initialization, like LayerNorm's.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, affine: bool = True,
                 rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.scale = (nnx.Param(jnp.full((), math.sqrt(dim), jnp.float32), axes=())
                      if affine else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = _f32(x)
        norm = jnp.sqrt(jnp.sum(jnp.square(h), axis=-1, keepdims=True))
        return _gain(_param(self, "scale", x), h / jnp.maximum(norm, self.eps)).astype(x.dtype)


class UnitNorm(nnx.Module):
    """y = g * D^(k/2) x / max(||x||_2, eps) + b (Huang, Kuemmerle & Zhang 2024, "UnitNorm:
    Rethinking Normalization for Transformers in Time Series", arXiv 2405.15903).

    No centering, so the signs of dot products in attention survive; k (``model.unitnorm_k``)
    sets the output norm D^(k/2) and with it how peaked attention can get (k = 1: the norm of
    RMSNorm's output, sqrt(D); k = 0: unit vectors). The paper's equation is the division
    and the D^(k/2); g and b per feature are this codebase's reading of it as a LayerNorm
    variant, and eps only bounds the division for an all-zero vector.
    """

    def __init__(self, dim: int, *, eps: float = 1e-5, affine: bool = True, k: float = 1.0,
                 rngs: nnx.Rngs | None = None):
        del rngs
        self.eps, self.factor = eps, float(dim) ** (k / 2)
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=("norm",)) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), axes=("norm",)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = _f32(x)
        norm = jnp.sqrt(jnp.sum(jnp.square(h), axis=-1, keepdims=True))
        y = self.factor * h / jnp.maximum(norm, self.eps)
        return _shift(_param(self, "bias", x), _gain(_param(self, "scale", x), y)).astype(x.dtype)


class DyT(nnx.Module):
    """Dynamic Tanh: y = gamma * tanh(alpha * x) + beta, scalar alpha initialised to 0.5.

    Zhu et al. 2025, "Transformers without Normalization": an element-wise stand-in for LN
    with no statistics at all.
    """

    def __init__(self, dim: int, *, alpha_init: float = 0.5, eps: float = 0.0,
                 affine: bool = True, rngs: nnx.Rngs | None = None):
        del rngs, eps  # DyT has no epsilon; accepted so every norm builds the same way
        # alpha is inside the tanh, so it is no affine parameter and affine=False keeps it.
        self.alpha = nnx.Param(jnp.full((), alpha_init, jnp.float32), axes=())
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), axes=("norm",)) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32), axes=("norm",)) if affine else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.tanh(_param(self, "alpha", x) * _f32(x))
        return _shift(_param(self, "bias", x), _gain(_param(self, "scale", x), h)).astype(x.dtype)


class Identity(nnx.Module):
    """``norm="none"``: no normalization (T-Fixup, ReZero, plain residual stacks)."""

    def __init__(self, dim: int, *, eps: float = 0.0, affine: bool = True,
                 rngs: nnx.Rngs | None = None):
        del dim, eps, affine, rngs

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class BatchStatNorm(nnx.Module):
    """Base of the norms with batch statistics (deepnorm.batch_norms): ``__call__(x, ctx)``
    with a ``BatchContext`` (the token mask and whether it trains)."""


NORM_CLASSES = {
    "layernorm": LayerNorm,
    "rmsnorm": RMSNorm,
    "scalenorm": ScaleNorm,
    "dyt": DyT,
    "unitnorm": UnitNorm,
    "none": Identity,
}

# The norms with batch statistics (they need the token mask, a train flag and running
# statistics) live in deepnorm.batch_norms, which adds them to NORM_CLASSES; imported here, after
# everything it uses from this module, so every ``model.norm`` value is there whichever of the
# two modules is imported first.
import deepnorm.batch_norms  # noqa: E402,F401


def make_norm(kind: str, dim: int, *, eps: float = 1e-5, affine: bool = True,
              momentum: float = 0.9, warmup: int = 0, unitnorm_k: float = 1.0) -> nnx.Module:
    """The norm named by ``model.norm`` (``affine=False``: without gain and bias); unknown
    names are a one-line error. ``momentum`` and ``warmup`` are the running statistics' of
    the batch-statistics norms (``model.norm_momentum``, ``model.norm_warmup``),
    ``unitnorm_k`` UnitNorm's k (``model.unitnorm_k``); the other norms ignore them."""
    try:
        cls = NORM_CLASSES[kind]
    except KeyError:
        raise ValueError(
            f"norm {kind!r} is not one of {', '.join(NORM_CLASSES)}") from None
    if issubclass(cls, BatchStatNorm):
        return cls(dim, eps=eps, affine=affine, momentum=momentum, warmup=warmup)
    if cls is UnitNorm:
        return cls(dim, eps=eps, affine=affine, k=unitnorm_k)
    return cls(dim, eps=eps, affine=affine)


def config_norm(cfg, dim: int) -> nnx.Module:
    """``model.norm`` of width ``dim`` with the model's epsilon and running-statistic options."""
    return make_norm(cfg.norm, dim, eps=cfg.norm_eps, momentum=cfg.norm_momentum,
                     warmup=cfg.norm_warmup, unitnorm_k=cfg.unitnorm_k)
