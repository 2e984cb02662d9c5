"""deepnorm.ops: the one attention and the one fused projection the layers call.

``attention`` takes queries shorter than keys with a mask (a decoding cache), refuses causal
attention when T != S, and on CPU with ``impl=None`` is the einsum path; ``project`` is the
separate projections' products.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepnorm import ops


def _softmax_attention_np(q, k, v, keep):
    """NumPy float64 reference: softmax over keys of q k^T / sqrt(K), masked, times v."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(keep, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshk->bthk", p, v)


def test_attention_with_fewer_queries_than_keys_and_a_cache_mask():
    """T=2 new queries against S=7 cache slots, of which each query sees a prefix (a KV cache
    that has filled 4 and 5 slots); the rest of the cache must not leak in."""
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(k[0], (2, 2, 3, 4))
    key = jax.random.normal(k[1], (2, 7, 3, 4))
    value = jax.random.normal(k[2], (2, 7, 3, 4))
    filled = np.array([4, 5])  # slots 0..3 for query 0, 0..4 for query 1
    keep = (np.arange(7)[None, :] < filled[:, None])[None, None]  # [1, 1, T, S]
    keep = np.broadcast_to(keep, (2, 1, 2, 7))
    ref = _softmax_attention_np(q, key, value, keep)
    ours = ops.attention(q, key, value, mask=jnp.asarray(keep), causal=False)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    xla = ops.attention(q, key, value, mask=jnp.asarray(keep), impl="xla")
    np.testing.assert_allclose(xla, ref, rtol=1e-5, atol=1e-6)
    # Garbage in the unfilled slots changes nothing.
    junk = value.at[:, 5:].set(1e4)
    np.testing.assert_allclose(ops.attention(q, key, junk, mask=jnp.asarray(keep)), ours,
                               rtol=1e-6, atol=1e-6)
    jitted = jax.jit(lambda q, k, v, m: ops.attention(q, k, v, mask=m))(q, key, value, keep)
    np.testing.assert_allclose(jitted, ours, rtol=1e-6, atol=1e-6)


def test_causal_attention_needs_as_many_queries_as_keys():
    q = jnp.ones((1, 2, 1, 4))
    kv = jnp.ones((1, 5, 1, 4))
    with pytest.raises(ValueError, match="got 2 queries and 5 keys; pass causal=False"):
        ops.attention(q, kv, kv, causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_on_cpu_is_the_einsum_path_and_equals_the_xla_path(causal):
    assert jax.default_backend() == "cpu"
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    q, key, value = (jax.random.normal(k[i], (2, 5, 2, 4)) for i in range(3))
    mask = jax.random.bernoulli(k[3], 0.7, (2, 1, 1, 5)).at[1, ..., 0].set(True)
    ours = ops.attention(q, key, value, mask=mask, causal=causal)
    np.testing.assert_array_equal(ours, ops.einsum_attention(q, key, value, mask, causal))
    xla = ops.attention(q, key, value, mask=mask, causal=causal, impl="xla")
    np.testing.assert_allclose(ours, xla, rtol=1e-6, atol=1e-6)
    keep = np.asarray(mask) & (np.tril(np.ones((5, 5), bool)) if causal else True)
    np.testing.assert_allclose(ours, _softmax_attention_np(q, key, value, keep),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_project_is_the_separate_matmuls(dtype):
    k = jax.random.split(jax.random.PRNGKey(2), 7)
    x = jax.random.normal(k[0], (2, 3, 6))
    kernels = [jax.random.normal(k[i], (6, 4)) for i in (1, 2, 3)]
    biases = [jax.random.normal(k[i], (4,)) for i in (4, 5, 6)]
    for with_bias in (False, True):
        outs = ops.project(x, kernels, biases if with_bias else None, dtype)
        assert len(outs) == 3
        for y, w, b in zip(outs, kernels, biases):
            ref = ops.matmul(x, w, dtype) + (b if with_bias else 0.0)
            np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    if dtype == "float32":
        np.testing.assert_allclose(outs[0], np.asarray(x) @ np.asarray(kernels[0])
                                   + np.asarray(biases[0]), rtol=1e-5, atol=1e-5)
