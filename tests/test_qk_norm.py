"""QK-norm (``model.qk_norm``): each head's query and key RMS-normalized with a learned scale
before their dot product, whatever the residual scheme. Cached decoding with QK-norm is
checked against the full pass in tests/test_decoding.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepnorm import TransformerConfig
from deepnorm.layers import Attention

D, HEADS, K = 16, 2, 8


def _attention(qk_norm, seed=0):
    cfg = TransformerConfig(num_layers=1, d_model=D, num_heads=HEADS, d_ff=32, qk_norm=qk_norm)
    attn = Attention(cfg, dict.fromkeys(("query", "key", "value", "out"), 1.0),
                     inner_norm=False, rngs=nnx.Rngs(seed))
    if qk_norm:  # scales off 1, so a misplaced one shows
        rng = np.random.default_rng(seed)
        for norm in (attn.query_norm, attn.key_norm):
            norm.scale.set_value(jnp.asarray(rng.uniform(0.5, 2.0, K), jnp.float32))
    return attn


def _reference(attn, x, context, eps=1e-5):
    """softmax((g_q q / rms(q)) . (g_k k / rms(k)) / sqrt(K)) v, per head, from raw kernels."""
    def proj(dense, h):
        return np.asarray(h @ dense.kernel[...] + dense.bias[...])

    def rms_normed(a, scale):
        return a / np.sqrt(np.mean(a ** 2, axis=-1, keepdims=True) + eps) * np.asarray(scale)

    b, t, _ = x.shape
    s = context.shape[1]
    q = proj(attn.query, x).reshape(b, t, HEADS, K)
    k = proj(attn.key, context).reshape(b, s, HEADS, K)
    v = proj(attn.value, context).reshape(b, s, HEADS, K)
    q, k = rms_normed(q, attn.query_norm.scale[...]), rms_normed(k, attn.key_norm.scale[...])
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(K)
    o = np.einsum("bhts,bshd->bthd", np.asarray(jax.nn.softmax(logits, axis=-1)), v)
    return proj(attn.out, o.reshape(b, t, D))


@pytest.mark.parametrize("cross", [False, True])
def test_qk_norm_attention_equals_its_definition(cross):
    attn = _attention(True)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(0, 3.0, (2, 5, D)), jnp.float32)
    context = jnp.asarray(rng.normal(0, 3.0, (2, 7, D)), jnp.float32) if cross else x
    got = attn(x, context if cross else None)
    np.testing.assert_allclose(np.asarray(got), _reference(attn, x, context), rtol=1e-4,
                               atol=1e-4)
    jitted = nnx.jit(lambda m, a, c: m(a, c))(attn, x, context if cross else None)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(got), rtol=1e-5, atol=1e-5)


def test_qk_norm_bounds_the_logits_and_is_off_by_default():
    """With the scales at 1 every logit is at most sqrt(K) in size (|q_hat . k_hat| <= K),
    however large the stream; without QK-norm there are no such parameters."""
    attn = _attention(True)
    for norm in (attn.query_norm, attn.key_norm):
        norm.scale.set_value(jnp.ones((K,), jnp.float32))
    x = jnp.asarray(np.random.default_rng(2).normal(0, 100.0, (1, 6, D)), jnp.float32)
    q = attn.query_norm(attn.query(x).reshape(1, 6, HEADS, K))
    k = attn.key_norm(attn.key(x).reshape(1, 6, HEADS, K))
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(K)
    assert float(jnp.max(jnp.abs(logits))) <= np.sqrt(K) * (1 + 1e-5)
    plain = _attention(False)
    assert plain.query_norm is None and plain.key_norm is None
