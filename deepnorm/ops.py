"""The model's only matmul and attention: every backend-specific path sits behind these.

``deepnorm.layers`` and ``deepnorm.transformer`` call ``matmul``, ``project`` and ``attention``
and never ask which backend they run on. What a backend needs for speed lives here, each path
with the reason it exists and what it measured (docs/performance.md):

- ``bf16_matmul``: the bfloat16 matmul with a hand-written gradient, for the AMX units of
  recent Intel CPUs (XLA:CPU uses them only for bfloat16 dots returning float32).
- ``project``: several projections of one input as one matmul (concatenated kernels).
- ``attention``: two einsums on CPU for ``impl=None``; ``jax.nn.dot_product_attention``
  (XLA's own choice, or "xla" / "cudnn" when forced) elsewhere. ``attention_with_stats``
  adds the training diagnostics' logit statistics (max logit, entropy per head).

None of the accelerator paths (cuDNN attention, ``dot_product_attention`` on GPU/TPU, bfloat16
on a GPU/TPU) has been run on a GPU or TPU by the tests or benchmarks (docs/backends.md).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# A masked logit: finite, so a fully masked row softmaxes to uniform instead of NaN. The value
# jax.nn.dot_product_attention's XLA path uses, so both paths agree bit for bit on masked rows.
_MASKED_LOGIT = -0.7 * float(jnp.finfo(jnp.float32).max)


# --- matmul ----------------------------------------------------------------------------------

# ``model.matmul_precision``: what a dot of float32 operands asks of the backend. Left to
# itself a GPU runs float32 dots in TensorFloat-32 (10-bit mantissa) and a TPU in one bfloat16
# pass; "float32" asks for full float32 everywhere. The names are those of jax's
# ``jax_default_matmul_precision`` flag. XLA:CPU computes float32 dots the same way under all
# three (docs/precision.md).
MATMUL_PRECISIONS = {
    "float32": lax.Precision.HIGHEST,
    "tensorfloat32": lax.Precision.HIGH,  # TF32 on GPU, three bfloat16 passes on TPU
    "default": lax.Precision.DEFAULT,  # the backend's fastest
}


def lax_precision(name: str) -> lax.Precision:
    if name not in MATMUL_PRECISIONS:
        raise ValueError(f"matmul precision {name!r} is not one of "
                         f"{', '.join(MATMUL_PRECISIONS)}")
    return MATMUL_PRECISIONS[name]


def matmul(x: jax.Array, kernel: jax.Array, dtype, kernel_axis: int = 0,
           precision: str = "float32") -> jax.Array:
    """x's last axis against kernel's axis ``kernel_axis`` (0: x @ kernel, 1: x @ kernel^T),
    with both operands in the compute dtype ``dtype``.

    float32: one ``dot_general`` at ``precision`` (``MATMUL_PRECISIONS``). bfloat16:
    ``bf16_matmul``; float16: operands rounded to float16, products summed in float32. Both
    return float32, so everything between two matmuls stays float32 whatever the compute dtype.
    In float16 JAX's own gradient of the dot rounds each cotangent to float16 on its way to
    the operands: that is where a too-large loss scale overflows (deepnorm.training.loss_scale).
    """
    dims = (((x.ndim - 1,), (kernel_axis,)), ((), ()))
    if jnp.dtype(dtype) == jnp.bfloat16:
        return bf16_matmul(x, kernel, kernel_axis)
    if jnp.dtype(dtype) == jnp.float16:
        return lax.dot_general(x.astype(jnp.float16), kernel.astype(jnp.float16), dims,
                               preferred_element_type=jnp.float32)
    return lax.dot_general(x.astype(dtype), kernel.astype(dtype), dims,
                           precision=lax_precision(precision))


def project(x: jax.Array, kernels: Sequence[jax.Array], biases: Sequence[jax.Array] | None,
            dtype, precision: str = "float32") -> tuple[jax.Array, ...]:
    """``tuple(matmul(x, w, dtype) + b for w, b in zip(kernels, biases))`` as one matmul.

    Why: one [d, 3d] matmul instead of three [d, d] ones runs closer to the matmul peak on a CPU
    and launches a third of the kernels (docs/performance.md, "Process settings on CPU"). The caller keeps
    its parameters separate (each projection has its own DeepNorm gain and its own name in the
    tree); only the product is shared, by concatenating the kernels along the output axis.
    ``biases`` is None for bias-free projections. Every kernel must have the same output width.
    """
    kernels = tuple(kernels)
    y = matmul(x, jnp.concatenate(kernels, axis=1), dtype, precision=precision)
    if biases is not None:
        y = y + jnp.concatenate(tuple(biases)).astype(y.dtype)
    return tuple(jnp.split(y, len(kernels), axis=-1))


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
    2048^3 on a 2-core Xeon with AMX against ~275 for float32; a dot returning bfloat16 ran at
    225-240, slower than float32: benchmarks/matmul_forms.py, docs/performance.md). And JAX's
    own transpose of that dot multiplies the float32 cotangent by a bfloat16 operand, which XLA
    promotes to a float32 dot (the slow path), then rounds the gradient to bfloat16; here
    gradients come back in the inputs' dtypes.
    The tied output head (``kernel_axis=1``) names the contracted axis instead of transposing
    the embedding: XLA:CPU's fallback dot kernel has no bfloat16 -> float32 variant, and the
    gradient of ``bf16_matmul(x, embed.T)`` gave it a transposed dot that YNNPACK declines
    (the step failed with "UNIMPLEMENTED: ... DotThunk::Execute: BF16 x BF16 = F32").
    On a GPU/TPU the same dots are ordinary bfloat16-in, float32-out matmuls (not measured).
    """
    if kernel_axis not in (0, 1) or kernel.ndim != 2:
        raise ValueError(f"bf16_matmul needs a 2-D kernel and kernel_axis 0 or 1, got shape "
                         f"{kernel.shape} and kernel_axis={kernel_axis!r}")
    return _bf16_matmul(x, kernel, kernel_axis,
                        (jnp.dtype(x.dtype).name, jnp.dtype(kernel.dtype).name))


# --- attention -------------------------------------------------------------------------------

def attention(q_BxTxHxK: jax.Array, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array, *,
              mask: jax.Array | None = None, causal: bool = False, impl: str | None = None,
              dtype=jnp.float32, precision: str = "float32") -> jax.Array:
    """softmax(q k^T / sqrt(K) + masked) v per head: [B, T, H, K] queries against [B, S, H, K]
    keys and values, returning [B, T, H, K].

    ``mask``: True where a query may attend to a key, broadcastable to [B, H, T, S] (e.g. a
    [B, 1, 1, S] padding mask, or a [B, 1, T, S] mask of a decoding cache's filled slots).
    ``causal``: query i sees keys 0..i; it needs T == S. A decoding step with queries shorter
    than keys (T < S) passes ``causal=False`` and says what each query sees in ``mask``.
    A row with every key masked gives the mean of the values (finite, never NaN).
    ``impl``: None picks per backend (two einsums on CPU, ``jax.nn.dot_product_attention``'s
    own choice elsewhere); "xla" / "cudnn" force that implementation of dot_product_attention.
    ``dtype``: the compute dtype q, k, v are cast to for dot_product_attention (cuDNN's kernel
    takes bfloat16 / float16 only); the CPU einsum path keeps its operands' dtype (float32
    from the projections) and computes logits and softmax in float32.
    ``precision``: ``MATMUL_PRECISIONS`` for float32 operands (both einsums on CPU; passed to
    dot_product_attention, which takes no precision argument, as jax's default for its dots).
    """
    _check_causal(q_BxTxHxK, k_BxSxHxK, causal)
    if impl is None and jax.default_backend() == "cpu":
        return einsum_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask, causal,
                                precision=precision)
    dt = jnp.dtype(dtype)
    lax_precision(precision)  # a bad name fails here too, not only on CPU
    with jax.default_matmul_precision(precision):
        return jax.nn.dot_product_attention(q_BxTxHxK.astype(dt), k_BxSxHxK.astype(dt),
                                            v_BxSxHxK.astype(dt), mask=mask, is_causal=causal,
                                            implementation=impl)


def _check_causal(q_BxTxHxK, k_BxSxHxK, causal: bool) -> None:
    t, s = q_BxTxHxK.shape[1], k_BxSxHxK.shape[1]
    if causal and t != s:
        raise ValueError(f"causal attention needs as many queries as keys, got {t} queries and "
                         f"{s} keys; pass causal=False and a [B, 1, T, S] mask instead")


def einsum_attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_Bx1xTxS=None, causal=False,
                     precision: str = "float32"):
    """softmax(q k^T / sqrt(K), masked) v, written out as two einsums.

    The same maths as ``jax.nn.dot_product_attention``'s XLA path (logits and softmax in
    float32, masked logits set to -0.7 x float32 max, so a fully masked row is uniform), without
    its grouped-query vmap, whose extra axis and transposes cost about 2x in the backward pass
    on XLA:CPU (docs/performance.md, "Process settings on CPU"). ``attention`` uses it for
    ``impl=None`` on CPU.
    """
    logits, _ = masked_logits(q_BxTxHxK, k_BxSxHxK, mask_Bx1xTxS, causal, precision)
    return _weighted_values(logits, v_BxSxHxK, precision)


def masked_logits(q_BxTxHxK, k_BxSxHxK, mask_Bx1xTxS=None, causal=False,
                  precision: str = "float32"):
    """The float32 logits q k^T / sqrt(K) [B, H, T, S], masked keys set to the masked logit,
    and the keep mask (True where a query attends to a key; None when nothing is masked)."""
    t, s = q_BxTxHxK.shape[1], k_BxSxHxK.shape[1]
    scale = q_BxTxHxK.shape[-1] ** -0.5
    logits = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k_BxSxHxK,
                        precision=lax_precision(precision),
                        preferred_element_type=jnp.float32) * jnp.float32(scale)
    keep = mask_Bx1xTxS
    if causal:
        tri = jnp.tril(jnp.ones((t, s), bool))[None, None]
        keep = tri if keep is None else jnp.logical_and(keep, tri)
    if keep is not None:
        logits = jnp.where(keep, logits, jnp.float32(_MASKED_LOGIT))
    return logits, keep


def _weighted_values(logits_BxHxTxS, v_BxSxHxK, precision: str, probs=None):
    if probs is None:
        probs = jax.nn.softmax(logits_BxHxTxS, axis=-1)
    return jnp.einsum("bhts,bshk->bthk", probs.astype(v_BxSxHxK.dtype), v_BxSxHxK,
                      precision=lax_precision(precision))


# --- attention statistics (training diagnostics) -----------------------------------------------

def logit_statistics(logits_BxHxTxS: jax.Array, probs_BxHxTxS: jax.Array, keep,
                     query_weights_BxT: jax.Array) -> dict:
    """Per head [H]: ``logit_max``, the largest logit a real query gives a key it attends to,
    and ``entropy``, the mean over real queries (weighted by ``query_weights_BxT``, which sum
    to 1 over them) of the attention's entropy in nats, ``-sum_s p_s ln p_s`` over the keys
    (``probs_BxHxTxS``, the softmax of the logits). Masked keys have probability exactly 0
    and drop out of both. No gradient flows through either statistic.
    """
    logits = lax.stop_gradient(logits_BxHxTxS)
    probs = lax.stop_gradient(probs_BxHxTxS).astype(jnp.float32)
    real_q = (query_weights_BxT > 0)[:, None, :, None]
    valid = real_q if keep is None else jnp.logical_and(keep, real_q)
    logit_max = jnp.max(jnp.where(valid, logits, -jnp.inf), axis=(0, 2, 3))
    # -sum p ln p = lse - sum p z with ln p = z - lse, and lse = max z - ln(max p) because the
    # largest probability is the largest logit's: one ln per query row instead of one per
    # (query, key) pair, the cost that made this the dearest diagnostic on a CPU. A masked key
    # has p exactly 0 and a finite logit, so it adds 0 to sum p z.
    z = logits.astype(jnp.float32)
    lse_BxHxT = jnp.max(z, axis=-1) - jnp.log(jnp.max(probs, axis=-1))
    entropy_BxHxT = lse_BxHxT - jnp.sum(probs * z, axis=-1)
    entropy = jnp.einsum("bht,bt->h", entropy_BxHxT, query_weights_BxT.astype(jnp.float32))
    return {"logit_max": logit_max, "entropy": entropy}


def attention_with_stats(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, query_weights_BxT, *,
                         mask=None, causal=False, impl: str | None = None, dtype=jnp.float32,
                         precision: str = "float32"):
    """``attention(...)`` and ``logit_statistics`` of its logits: ``(out, {"logit_max": [H],
    "entropy": [H]})``; ``query_weights_BxT`` weigh the queries (0 at padding).

    On the CPU einsum path the statistics come from the very logits and probabilities the
    attention uses (an elementwise pass over them, no extra matmul).
    ``jax.nn.dot_product_attention`` (GPU/TPU, or ``impl`` forced) never hands out its
    logits, cuDNN's fused kernel least of all, so there the logits are computed a second time
    for the statistics, from the float32 q and k (one more q k^T per attention, forward only):
    the statistics are those of full-precision logits even when the attention itself ran in
    bfloat16.
    """
    if impl is None and jax.default_backend() == "cpu":
        _check_causal(q_BxTxHxK, k_BxSxHxK, causal)
        logits, keep = masked_logits(q_BxTxHxK, k_BxSxHxK, mask, causal, precision)
        probs = jax.nn.softmax(logits, axis=-1)
        out = _weighted_values(logits, v_BxSxHxK, precision, probs=probs)
        return out, logit_statistics(logits, probs, keep, query_weights_BxT)
    out = attention(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask, causal=causal, impl=impl,
                    dtype=dtype, precision=precision)
    logits, keep = masked_logits(lax.stop_gradient(q_BxTxHxK), lax.stop_gradient(k_BxSxHxK),
                                 mask, causal, precision)
    return out, logit_statistics(logits, jax.nn.softmax(logits, axis=-1), keep,
                                 query_weights_BxT)
