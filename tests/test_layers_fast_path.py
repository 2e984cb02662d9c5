"""The CPU fast paths of deepnorm.layers equal what they replace.

einsum_attention replaces jax.nn.dot_product_attention's XLA path for attention_impl=None on
CPU; fused_projection replaces separate q/k/v matmuls (the parameters, and so DeepNorm's
per-role init, stay separate).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepnorm.layers import Dense, einsum_attention, fused_projection


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
