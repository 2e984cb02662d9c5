"""Attention and feed-forward sublayers.

Parameters are float32 and carry logical axis names in their ``axes`` metadata (``embed``,
``heads``, ``mlp``, ``vocab``, ``norm``); ``deepnorm.partitioning`` maps them to mesh axes.
Matmuls run in the configured compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepnorm.initializers import xavier_normal
from deepnorm.norms import make_norm


class Dense(nnx.Module):
    """y = x W + b with W ~ Xavier-normal(gain): the one projection every sublayer uses."""

    def __init__(self, fan_in: int, fan_out: int, *, gain, axes: tuple[str, str],
                 use_bias: bool, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = nnx.Param(xavier_normal(rngs.params(), (fan_in, fan_out), gain), axes=axes)
        self.bias = (nnx.Param(jnp.zeros((fan_out,), jnp.float32), axes=axes[1:])
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Attention(nnx.Module):
    """Multi-head dot-product attention with separate q, k, v, o projections.

    Separate projections because DeepNorm initializes them differently (gain 1 for query and
    key, beta for value and output). ``inner_norm`` is SubLN's extra norm on the concatenated
    heads, just before the output projection.
    """

    def __init__(self, cfg, gains: dict, *, inner_norm: bool, rngs: nnx.Rngs):
        d, dtype = cfg.d_model, jnp.dtype(cfg.dtype)
        kw = dict(use_bias=cfg.use_bias, dtype=dtype, rngs=rngs)
        self.num_heads, self.impl = cfg.num_heads, cfg.attention_impl
        self.query = Dense(d, d, gain=gains["query"], axes=("embed", "heads"), **kw)
        self.key = Dense(d, d, gain=gains["key"], axes=("embed", "heads"), **kw)
        self.value = Dense(d, d, gain=gains["value"], axes=("embed", "heads"), **kw)
        self.out = Dense(d, d, gain=gains["out"], axes=("heads", "embed"), **kw)
        self.inner_norm = make_norm(cfg.norm, d, eps=cfg.norm_eps) if inner_norm else None

    def __call__(self, x_BxTxD: jax.Array, context_BxSxD: jax.Array | None = None, *,
                 mask_Bx1xTxS: jax.Array | None = None, causal: bool = False) -> jax.Array:
        context = x_BxTxD if context_BxSxD is None else context_BxSxD
        b, t, d = x_BxTxD.shape
        s = context.shape[1]
        h = self.num_heads
        q = self.query(x_BxTxD).reshape(b, t, h, d // h)
        k = self.key(context).reshape(b, s, h, d // h)
        v = self.value(context).reshape(b, s, h, d // h)
        o = jax.nn.dot_product_attention(q, k, v, mask=mask_Bx1xTxS, is_causal=causal,
                                         implementation=self.impl)
        o = o.reshape(b, t, d)
        if self.inner_norm is not None:
            o = self.inner_norm(o)
        return self.out(o)


class FeedForward(nnx.Module):
    """act(x W1 + b1) W2 + b2; ``inner_norm`` is SubLN's norm after the activation."""

    def __init__(self, cfg, gains: dict, *, inner_norm: bool, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        kw = dict(use_bias=cfg.use_bias, dtype=dtype, rngs=rngs)
        self.act = jax.nn.gelu if cfg.activation == "gelu" else jax.nn.relu
        self.ffn_in = Dense(cfg.d_model, cfg.d_ff, gain=gains["ffn_in"], axes=("embed", "mlp"),
                            **kw)
        self.ffn_out = Dense(cfg.d_ff, cfg.d_model, gain=gains["ffn_out"],
                             axes=("mlp", "embed"), **kw)
        self.inner_norm = make_norm(cfg.norm, cfg.d_ff, eps=cfg.norm_eps) if inner_norm else None

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        h = self.act(self.ffn_in(x_BxTxD))
        if self.inner_norm is not None:
            h = self.inner_norm(h)
        return self.ffn_out(h)
