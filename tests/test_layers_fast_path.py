"""The CPU fast paths of deepnorm.ops (and layers.fused_projection) equal what they replace.

einsum_attention replaces jax.nn.dot_product_attention's XLA path for attention_impl=None on
CPU; fused_projection replaces separate q/k/v matmuls (the parameters, and so DeepNorm's
per-role init, stay separate); bf16_matmul (model.dtype=bfloat16) is the float32 product of
bfloat16-rounded inputs, with its hand-written gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepnorm.layers import Dense, fused_projection
from deepnorm.ops import bf16_matmul, einsum_attention


@pytest.mark.parametrize("causal", [False, True])
def test_einsum_attention_matches_jax_xla_path(causal):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(k[0], (2, 5, 3, 4))
    kv_len = 5 if causal else 7
    key = jax.random.normal(k[1], (2, kv_len, 3, 4))
    value = jax.random.normal(k[2], (2, kv_len, 3, 4))
    mask = jax.random.bernoulli(k[3], 0.7, (2, 1, 1, kv_len)).at[1].set(False)  # row 1: all pad
    ours = einsum_attention(q, key, value, mask, causal)
    ref = jax.nn.dot_product_attention(q, key, value, mask=mask, is_causal=causal,
                                       implementation="xla")
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def test_einsum_attention_is_softmax_of_scaled_scores():
    """One head, no mask: softmax(q k^T / sqrt(K)) v against NumPy."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 3, 1, 4)).astype(np.float32) for _ in range(3))
    s = q[0, :, 0] @ k[0, :, 0].T / 2.0
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(einsum_attention(q, k, v)[0, :, 0], p @ v[0, :, 0], rtol=1e-5)


@pytest.mark.parametrize("use_bias", [False, True])
def test_fused_projection_equals_separate_denses(use_bias):
    rngs = nnx.Rngs(0)
    denses = tuple(Dense(6, 6, gain=g, axes=("embed", "heads"), use_bias=use_bias,
                         dtype=jnp.float32, rngs=rngs) for g in (1.0, 1.0, 0.3))
    if use_bias:
        for i, dn in enumerate(denses):
            dn.bias[...] = jnp.full((6,), float(i + 1))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 6))
    for fused, dn in zip(fused_projection(denses, x), denses):
        np.testing.assert_allclose(fused, dn(x), rtol=1e-6, atol=1e-6)


# --- bf16_matmul: bfloat16 inputs, float32 products, hand-written VJP -----------------------

def _bf16(a) -> np.ndarray:
    """a rounded to bfloat16, as float64 NumPy (exact: every bfloat16 is a float64)."""
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)


def test_bf16_matmul_is_the_float_product_of_rounded_inputs_and_its_gradients():
    """y = r(x) r(W); dx = r(g) r(W)^T; dW = r(x)^T r(g), summed over every leading axis,
    with r = rounding to bfloat16 and products summed in float32 (NumPy float64 reference)."""
    k = jax.random.split(jax.random.PRNGKey(2), 3)
    x = jax.random.normal(k[0], (2, 5, 12))
    w = jax.random.normal(k[1], (12, 7))
    g = jax.random.normal(k[2], (2, 5, 7))
    y, vjp = jax.vjp(bf16_matmul, x, w)
    dx, dw = vjp(g)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32
    rx, rw, rg = _bf16(x), _bf16(w), _bf16(g)
    np.testing.assert_allclose(y, rx @ rw, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, rg @ rw.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, np.einsum("btk,btn->kn", rx, rg), rtol=1e-5, atol=1e-5)
    # Not the float32 product: the rounding is real (8-bit mantissa, ~0.4% per input).
    assert np.max(np.abs(np.asarray(y) - np.asarray(x) @ np.asarray(w))) > 1e-3


def test_bf16_matmul_gradients_keep_the_input_dtypes_and_agree_under_jit():
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 6)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.PRNGKey(4), (6, 3))
    loss = lambda x, w: jnp.sum(bf16_matmul(x, w) ** 2)  # noqa: E731
    dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)
    assert (dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.float32)
    jdx, jdw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    np.testing.assert_array_equal(dx, jdx)
    np.testing.assert_allclose(dw, jdw, rtol=1e-6)


def test_bf16_matmul_transposed_kernel_and_bad_axis():
    """kernel_axis=1 is x @ kernel^T (the tied head); anything else is refused in one line."""
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 3, 8))
    e = jax.random.normal(jax.random.PRNGKey(7), (5, 8))
    np.testing.assert_allclose(bf16_matmul(x, e, 1), bf16_matmul(x, e.T, 0), rtol=1e-6)
    g = jax.grad(lambda e: jnp.sum(bf16_matmul(x, e, 1) ** 2))(e)
    np.testing.assert_allclose(g, jax.grad(lambda e: jnp.sum(bf16_matmul(x, e.T) ** 2))(e),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"got shape \(5, 8\) and kernel_axis=2"):
        bf16_matmul(x, e, 2)


def test_bfloat16_dense_and_fused_projection_use_bf16_matmul():
    """dtype=bfloat16: Dense is bf16_matmul + bias in float32, and fusing q/k/v changes nothing."""
    rngs = nnx.Rngs(0)
    denses = tuple(Dense(8, 8, gain=g, axes=("embed", "heads"), use_bias=True,
                         dtype=jnp.bfloat16, rngs=rngs) for g in (1.0, 1.0, 0.3))
    for i, dn in enumerate(denses):
        dn.bias[...] = jnp.full((8,), 0.1 * (i + 1))
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 3, 8))
    for fused, dn in zip(fused_projection(denses, x), denses):
        assert fused.dtype == dn(x).dtype == jnp.float32
        np.testing.assert_allclose(dn(x), bf16_matmul(x, dn.kernel[...]) + dn.bias[...],
                                   rtol=1e-6)
        np.testing.assert_allclose(fused, dn(x), rtol=1e-6, atol=1e-6)
