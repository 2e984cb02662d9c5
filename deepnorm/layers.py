"""Attention and feed-forward sublayers.

Parameters are float32 and carry logical axis names in their ``axes`` metadata (``embed``,
``heads``, ``mlp``, ``vocab``, ``norm``); ``deepnorm.partitioning`` maps them to mesh axes.
Matmul inputs are in the configured compute dtype; with bfloat16 the products come back in
float32 (``bf16_matmul``), so everything between two matmuls stays float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from deepnorm.initializers import xavier_normal
from deepnorm.norms import make_norm


def matmul(x: jax.Array, kernel: jax.Array, dtype, kernel_axis: int = 0) -> jax.Array:
    """x's last axis against kernel's axis ``kernel_axis`` (0: x @ kernel, 1: x @ kernel^T):
    in float32 as is, in bfloat16 through ``bf16_matmul``."""
    if jnp.dtype(dtype) == jnp.bfloat16:
        return bf16_matmul(x, kernel, kernel_axis)
    dims = (((x.ndim - 1,), (kernel_axis,)), ((), ()))
    return lax.dot_general(x.astype(dtype), kernel.astype(dtype), dims)


def _dot_f32(a, b, dims) -> jax.Array:
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _bf16_forward(x, kernel, kernel_axis):
    xb, kb = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    y = _dot_f32(xb, kb, (((x.ndim - 1,), (kernel_axis,)), ((), ())))
    return y, (xb, kb)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _bf16_matmul(x, kernel, kernel_axis, grad_dtypes):
    return _bf16_forward(x, kernel, kernel_axis)[0]


def _bf16_matmul_fwd(x, kernel, kernel_axis, grad_dtypes):
    return _bf16_forward(x, kernel, kernel_axis)


def _bf16_matmul_bwd(kernel_axis, grad_dtypes, residuals, g):
    xb, kb = residuals
    gb = g.astype(jnp.bfloat16)
    dx = _dot_f32(gb, kb, (((g.ndim - 1,), (1 - kernel_axis,)), ((), ())))  # g kernel^T
    lead = tuple(range(g.ndim - 1))  # the kernel's gradient sums over every leading axis
    if kernel_axis == 0:  # kernel [k, n]: x^T g
        dk = _dot_f32(xb, gb, ((lead, lead), ((), ())))
    else:  # kernel [n, k]: g^T x
        dk = _dot_f32(gb, xb, ((lead, lead), ((), ())))
    return dx.astype(grad_dtypes[0]), dk.astype(grad_dtypes[1])


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def bf16_matmul(x: jax.Array, kernel: jax.Array, kernel_axis: int = 0) -> jax.Array:
    """x @ kernel (or x @ kernel^T for ``kernel_axis=1``) with both rounded to bfloat16 and
    the products summed in float32.

    The backward pass is written out: dx = g kernel^T and dkernel = x^T g, each from bfloat16
    operands (g rounded once) into float32. Two reasons. XLA:CPU multiplies bfloat16 on the
    AMX units of recent Intel CPUs only when the dot returns float32 (1,230-1,600 GFLOP/s at
    2048^3 on this project's Xeon against ~275 for float32; a dot returning bfloat16 ran at
    225-240, slower than float32: benchmarks/matmul_forms.py, RESULTS.md change 17). And JAX's
    own transpose of that dot multiplies the float32 cotangent by a bfloat16 operand, which XLA
    promotes to a float32 dot (the slow path), then rounds the gradient to bfloat16; here
    gradients come back in the inputs' dtypes.
    The tied output head (``kernel_axis=1``) names the contracted axis instead of transposing
    the embedding: XLA:CPU's fallback dot kernel has no bfloat16 -> float32 variant, and the
    gradient of ``bf16_matmul(x, embed.T)`` gave it a transposed dot that YNNPACK declines
    (the step failed with "UNIMPLEMENTED: ... DotThunk::Execute: BF16 x BF16 = F32").
    """
    if kernel_axis not in (0, 1) or kernel.ndim != 2:
        raise ValueError(f"bf16_matmul needs a 2-D kernel and kernel_axis 0 or 1, got shape "
                         f"{kernel.shape} and kernel_axis={kernel_axis!r}")
    return _bf16_matmul(x, kernel, kernel_axis,
                        (jnp.dtype(x.dtype).name, jnp.dtype(kernel.dtype).name))


class Dense(nnx.Module):
    """y = x W + b with W ~ Xavier-normal(gain): the one projection every sublayer uses."""

    def __init__(self, fan_in: int, fan_out: int, *, gain, axes: tuple[str, str],
                 use_bias: bool, dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = nnx.Param(xavier_normal(rngs.params(), (fan_in, fan_out), gain), axes=axes)
        self.bias = (nnx.Param(jnp.zeros((fan_out,), jnp.float32), axes=axes[1:])
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = matmul(x, self.kernel[...], self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


def fused_projection(denses: tuple[Dense, ...], x: jax.Array) -> tuple[jax.Array, ...]:
    """``tuple(dense(x) for dense in denses)`` computed as one matmul.

    The parameters stay separate (each projection keeps its own DeepNorm gain and its own name
    in the tree); only the matmul is shared, by concatenating the kernels along the output
    axis. One [d, 3d] matmul instead of three [d, d] ones runs closer to the matmul peak on a
    CPU and launches a third of the kernels (benchmarks/RESULTS.md, "fused qkv").
    """
    kernel = jnp.concatenate([dn.kernel[...] for dn in denses], axis=1)
    y = matmul(x, kernel, denses[0].dtype)
    if denses[0].bias is not None:
        y = y + jnp.concatenate([dn.bias[...] for dn in denses]).astype(y.dtype)
    return tuple(jnp.split(y, len(denses), axis=-1))


def einsum_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xTxS=None, causal=False):
    """softmax(q k^T / sqrt(K), masked) v, written out as two einsums.

    The same maths as ``jax.nn.dot_product_attention``'s XLA path (logits and softmax in
    float32, masked logits set to -0.7 x float32 max, so a fully masked row is uniform), without
    its grouped-query vmap, whose extra axis and transposes cost about 2x in the backward pass
    on XLA:CPU (benchmarks/RESULTS.md, "einsum attention"). Used for ``attention_impl=None``
    on CPU.
    """
    t, s = q_BxTxHxK.shape[1], k_BxSxHxK.shape[1]
    scale = q_BxTxHxK.shape[-1] ** -0.5
    logits = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK,
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
    keep = mask_Bx1xTxS
    if causal:
        tri = jnp.tril(jnp.ones((t, s), bool))[None, None]
        keep = tri if keep is None else jnp.logical_and(keep, tri)
    if keep is not None:
        logits = jnp.where(keep, logits, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
    probs = jax.nn.softmax(logits, axis=-1).astype(v_BxSxHxK.dtype)
    return jnp.einsum("bhts,bshk->bthk", probs, v_BxSxHxK)


class Attention(nnx.Module):
    """Multi-head dot-product attention with separate q, k, v, o projections.

    Separate projections because DeepNorm initializes them differently (gain 1 for query and
    key, beta for value and output). ``inner_norm`` is SubLN's extra norm on the concatenated
    heads, just before the output projection.
    """

    def __init__(self, cfg, gains: dict, *, inner_norm: bool, rngs: nnx.Rngs):
        d, dtype = cfg.d_model, jnp.dtype(cfg.dtype)
        kw = dict(use_bias=cfg.use_bias, dtype=dtype, rngs=rngs)
        self.num_heads, self.impl, self.dtype = cfg.num_heads, cfg.attention_impl, dtype
        self.query = Dense(d, d, gain=gains["query"], axes=("embed", "heads"), **kw)
        self.key = Dense(d, d, gain=gains["key"], axes=("embed", "heads"), **kw)
        self.value = Dense(d, d, gain=gains["value"], axes=("embed", "heads"), **kw)
        self.out = Dense(d, d, gain=gains["out"], axes=("heads", "embed"), **kw)
        self.inner_norm = make_norm(cfg.norm, d, eps=cfg.norm_eps) if inner_norm else None

    def __call__(self, x_BxTxD: jax.Array, context_BxSxD: jax.Array | None = None, *,
                 mask_Bx1xTxS: jax.Array | None = None, causal: bool = False) -> jax.Array:
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
        if self.impl is None and jax.default_backend() == "cpu":
            o = einsum_attention(q, k, v, mask_Bx1xTxS, causal)
        else:  # in the compute dtype: cuDNN's kernel takes bfloat16 / float16 only
            dt = self.dtype
            o = jax.nn.dot_product_attention(q.astype(dt), k.astype(dt), v.astype(dt),
                                             mask=mask_Bx1xTxS, is_causal=causal,
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
