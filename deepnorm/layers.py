"""Attention and feed-forward sublayers.

Parameters are float32 and carry logical axis names in their ``axes`` metadata (``embed``,
``heads``, ``mlp``, ``vocab``, ``norm``); ``deepnorm.partitioning`` maps them to mesh axes.
Every matmul and attention goes through ``deepnorm.ops`` (``matmul``, ``project``,
``attention``), which holds whatever a backend needs for speed; nothing here asks which backend
it runs on. Matmul inputs are in the configured compute dtype; with bfloat16 the products come
back in float32, so everything between two matmuls stays float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepnorm import ops
from deepnorm.initializers import xavier_normal
from deepnorm.batch_norms import BatchContext, apply_norm
from deepnorm.norms import RMSNorm, config_norm
from deepnorm.residual import l2_normalize, ngpt_scale


class Dense(nnx.Module):
    """y = x W + b with W ~ Xavier-normal(gain): the one projection every sublayer uses."""

    def __init__(self, fan_in: int, fan_out: int, *, gain, axes: tuple[str, str],
                 use_bias: bool, dtype, rngs: nnx.Rngs, precision: str = "float32"):
        self.dtype, self.precision = dtype, precision
        self.kernel = nnx.Param(xavier_normal(rngs.params(), (fan_in, fan_out), gain), axes=axes)
        self.bias = (nnx.Param(jnp.zeros((fan_out,), jnp.float32), axes=axes[1:])
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = ops.matmul(x, self.kernel[...], self.dtype, precision=self.precision)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


def fused_projection(denses: tuple[Dense, ...], x: jax.Array) -> tuple[jax.Array, ...]:
    """``tuple(dense(x) for dense in denses)`` computed as one matmul (``ops.project``).

    The parameters stay separate (each projection keeps its own DeepNorm gain and its own name
    in the tree); only the matmul is shared.
    """
    biases = None if denses[0].bias is None else [dn.bias[...] for dn in denses]
    return ops.project(x, [dn.kernel[...] for dn in denses], biases, denses[0].dtype,
                       precision=denses[0].precision)


class Attention(nnx.Module):
    """Multi-head dot-product attention with separate q, k, v, o projections.

    Separate projections because DeepNorm initializes them differently (gain 1 for query and
    key, beta for value and output). ``inner_norm`` is SubLN's extra norm on the concatenated
    heads, just before the output projection; ``head_scale`` NormFormer's learned scalar per
    head (1 at init) at the same place. ``cfg.qk_norm``: QK-norm, an RMSNorm over each head's
    query and key vector (learned per-dimension scale, shared by the heads) before the dot
    product, so no logit exceeds sqrt(head_dim) times the scales at init. ``sphere_qk``:
    nGPT's s_qk Norm(q) and s_qk Norm(k) per head (s_qk [H, K], stored 1/sqrt(d_model), used
    times sqrt(d_model)) and softmax scale sqrt(K) instead of 1/sqrt(K).
    """

    def __init__(self, cfg, gains: dict, *, inner_norm: bool, head_scale: bool = False,
                 sphere_qk: bool = False, rngs: nnx.Rngs):
        d, dtype = cfg.d_model, jnp.dtype(cfg.dtype)
        kw = dict(use_bias=cfg.use_bias, dtype=dtype, rngs=rngs, precision=cfg.matmul_precision)
        self.num_heads, self.impl, self.dtype = cfg.num_heads, cfg.attention_impl, dtype
        self.precision = cfg.matmul_precision
        self.query = Dense(d, d, gain=gains["query"], axes=("embed", "heads"), **kw)
        self.key = Dense(d, d, gain=gains["key"], axes=("embed", "heads"), **kw)
        self.value = Dense(d, d, gain=gains["value"], axes=("embed", "heads"), **kw)
        self.out = Dense(d, d, gain=gains["out"], axes=("heads", "embed"), **kw)
        self.inner_norm = config_norm(cfg, d) if inner_norm else None
        self.head_scale = (nnx.Param(jnp.ones((cfg.num_heads,), jnp.float32), axes=(None,))
                           if head_scale else None)
        qk = lambda: RMSNorm(d // cfg.num_heads, eps=cfg.norm_eps)  # noqa: E731
        self.query_norm, self.key_norm = (qk(), qk()) if cfg.qk_norm else (None, None)
        self.qk_scale = (nnx.Param(jnp.full((cfg.num_heads, d // cfg.num_heads),
                                            ngpt_scale(d), jnp.float32), axes=(None, None))
                         if sphere_qk else None)

    def _sphere(self, x_BxTxHxK):
        s = self.qk_scale[...] / ngpt_scale(self.qk_scale.shape[0] * self.qk_scale.shape[1])
        return s * l2_normalize(x_BxTxHxK)

    def _q(self, q_BxTxHxK):
        if self.qk_scale is not None:
            # ops.attention divides the logits by sqrt(K): a query times K makes that sqrt(K).
            return self._sphere(q_BxTxHxK) * q_BxTxHxK.shape[-1]
        return q_BxTxHxK if self.query_norm is None else self.query_norm(q_BxTxHxK)

    def _k(self, k_BxSxHxK):
        if self.qk_scale is not None:
            return self._sphere(k_BxSxHxK)
        return k_BxSxHxK if self.key_norm is None else self.key_norm(k_BxSxHxK)

    def _mix_heads(self, o_BxTxHxK: jax.Array, norm_ctx: BatchContext | None = None) -> jax.Array:
        """The heads, concatenated and projected out (with the scheme's head scales and inner
        norm first; ``norm_ctx`` for a batch-statistics norm, deepnorm.batch_norms)."""
        b, t, h, k = o_BxTxHxK.shape
        if self.head_scale is not None:
            o_BxTxHxK = o_BxTxHxK * self.head_scale[...][:, None].astype(o_BxTxHxK.dtype)
        o = o_BxTxHxK.reshape(b, t, h * k)
        return self.out(apply_norm(self.inner_norm, o, norm_ctx))

    def __call__(self, x_BxTxD: jax.Array, context_BxSxD: jax.Array | None = None, *,
                 mask_Bx1xTxS: jax.Array | None = None, causal: bool = False,
                 stats_out: dict | None = None,
                 query_weights_BxT: jax.Array | None = None,
                 norm_ctx: BatchContext | None = None) -> jax.Array:
        """``stats_out`` (a dict, training diagnostics): filled with the attention's
        ``logit_max`` and ``entropy`` per head [H] (``ops.attention_with_stats``), over the
        queries ``query_weights_BxT`` weighs (they sum to 1 over the real tokens)."""
        b, t, d = x_BxTxD.shape
        h = self.num_heads
        if context_BxSxD is None:  # self-attention: q, k, v in one matmul
            q, k, v = fused_projection((self.query, self.key, self.value), x_BxTxD)
        else:  # cross-attention: q from the stream, k and v in one matmul from the context
            q = self.query(x_BxTxD)
            k, v = fused_projection((self.key, self.value), context_BxSxD)
        s = k.shape[1]
        q, k, v = (q.reshape(b, t, h, d // h), k.reshape(b, s, h, d // h),
                   v.reshape(b, s, h, d // h))
        q, k = self._q(q), self._k(k)
        kw = dict(mask=mask_Bx1xTxS, causal=causal, impl=self.impl, dtype=self.dtype,
                  precision=self.precision)
        if stats_out is None:
            o = ops.attention(q, k, v, **kw)
        else:
            o, stats = ops.attention_with_stats(q, k, v, query_weights_BxT, **kw)
            stats_out.update(stats)
        return self._mix_heads(o, norm_ctx)


    # Incremental decoding (deepnorm.decoding.incremental) ----------------------------------

    def context_kv(self, context_BxSxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Cross-attention keys and values [B, S, H, K] of a context: computed once per
        decoded sentence instead of once per decoded token."""
        b, s, d = context_BxSxD.shape
        k, v = fused_projection((self.key, self.value), context_BxSxD)
        h = self.num_heads
        return self._k(k.reshape(b, s, h, d // h)), v.reshape(b, s, h, d // h)

    def cached_self_attention(self, x_BxTxD, cache_k, cache_v, index):
        """Causal self-attention of T new positions ``index .. index + T - 1`` against a cache
        of keys and values [B, T_max, H, K] holding positions ``0 .. index - 1``; returns the
        output and the cache with the new positions written in."""
        b, t, d = x_BxTxD.shape
        h = self.num_heads
        q, k, v = fused_projection((self.query, self.key, self.value), x_BxTxD)
        q, k, v = (y.reshape(b, t, h, d // h) for y in (q, k, v))
        q, k = self._q(q), self._k(k)
        start = (0, index, 0, 0)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
        # Query at position index + i sees keys 0 .. index + i: the causal mask of the full
        # pass, restricted to the rows being decoded; unfilled slots are masked out.
        keys = jnp.arange(cache_k.shape[1])[None, :]
        queries = index + jnp.arange(t)[:, None]
        mask_1x1xTxS = (keys <= queries)[None, None]
        return self._finish(q, cache_k, cache_v, mask_1x1xTxS), cache_k, cache_v

    def attend_kv(self, x_BxTxD, k_BxSxHxK, v_BxSxHxK, mask_Bx1xTxS=None):
        """Cross-attention of the stream to precomputed keys and values (``context_kv``)."""
        b, t, d = x_BxTxD.shape
        q = self.query(x_BxTxD).reshape(b, t, self.num_heads, d // self.num_heads)
        q = self._q(q)
        return self._finish(q, k_BxSxHxK, v_BxSxHxK, mask_Bx1xTxS)

    def _finish(self, q, k, v, mask):
        o = ops.attention(q, k, v, mask=mask, causal=False, impl=self.impl, dtype=self.dtype)
        return self._mix_heads(o)


class FeedForward(nnx.Module):
    """act(x W1 + b1) W2 + b2; ``inner_norm`` is SubLN's norm after the activation;
    ``scale``: nGPT's act(s_v sqrt(d_model) (x W1 + b1)) W2 + b2, s_v [d_ff] learned, 1 at init
    (the sqrt(d_model) undoes the unit-norm rows' cosine scale, so act sees O(1) inputs)."""

    def __init__(self, cfg, gains: dict, *, inner_norm: bool, scale: bool = False,
                 rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        kw = dict(use_bias=cfg.use_bias, dtype=dtype, rngs=rngs, precision=cfg.matmul_precision)
        self.act = jax.nn.gelu if cfg.activation == "gelu" else jax.nn.relu
        self.ffn_in = Dense(cfg.d_model, cfg.d_ff, gain=gains["ffn_in"], axes=("embed", "mlp"),
                            **kw)
        self.ffn_out = Dense(cfg.d_ff, cfg.d_model, gain=gains["ffn_out"],
                             axes=("mlp", "embed"), **kw)
        self.inner_norm = config_norm(cfg, cfg.d_ff) if inner_norm else None
        self.scale = (nnx.Param(jnp.ones((cfg.d_ff,), jnp.float32), axes=("mlp",))
                      if scale else None)

    def __call__(self, x_BxTxD: jax.Array, norm_ctx: BatchContext | None = None) -> jax.Array:
        """``norm_ctx``: the batch context of a batch-statistics inner norm (None: eval)."""
        h = self.ffn_in(x_BxTxD)
        if self.scale is not None:  # nGPT's s_v, times sqrt(d_model) (deepnorm.residual.ngpt)
            h = h * (self.scale[...] * x_BxTxD.shape[-1] ** 0.5)
        return self.ffn_out(apply_norm(self.inner_norm, self.act(h), norm_ctx))
