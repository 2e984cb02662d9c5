"""Residual-stream statistics (and so Admin's omegas) average over real tokens only.

Trailing padding changes no real token's stream (the encoder masks pad keys, the decoder is
causal), so every statistic of a padded batch must equal that of the same batch unpadded.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepnorm import Transformer, TransformerConfig
from deepnorm.profiling import admin_initialize
from deepnorm.transformer import _token_norm, _token_weights, token_var

VOCAB = 30


def make_cfg(arch, residual="pre", **kw):
    counts = (dict(num_encoder_layers=2, num_decoder_layers=2)
              if arch == "encoder_decoder" else dict(num_layers=2))
    return TransformerConfig(arch=arch, d_model=16, num_heads=2, d_ff=32, vocab_size=VOCAB,
                             remat_policy="none", residual=residual, **counts, **kw)


def real_tokens(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, shape), jnp.int32)


def pad(ids, extra):
    return jnp.pad(ids, ((0, 0), (0, extra)))  # PAD_ID = 0, trailing


def test_masked_token_norm_and_var_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3)).astype(np.float32) * 3 + 1
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)  # ragged: 3 and 5 real tokens
    real = x[mask]  # [8, 3]
    w = _token_weights(jnp.asarray(x), jnp.asarray(mask))
    np.testing.assert_allclose(_token_norm(jnp.asarray(x), w),
                               np.linalg.norm(real, axis=-1).mean(), rtol=1e-6)
    np.testing.assert_allclose(token_var(jnp.asarray(x), jnp.asarray(mask)), real.var(),
                               rtol=1e-5)
    np.testing.assert_allclose(token_var(jnp.asarray(x)), x.var(), rtol=1e-5)  # no mask: all
    # All padding: zero, not NaN.
    assert float(token_var(jnp.asarray(x), jnp.zeros((2, 5), bool))) == 0.0


@pytest.mark.parametrize("arch", ["encoder", "decoder", "encoder_decoder"])
def test_statistics_ignore_trailing_padding(arch):
    cfg = make_cfg(arch)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    inputs, dec = real_tokens((2, 5), 1), real_tokens((2, 4), 2)
    if arch == "encoder_decoder":
        _, clean = model(inputs, dec)
        _, padded = jax.jit(lambda a, b: model(a, b))(pad(inputs, 3), pad(dec, 2))
    else:
        _, clean = model(inputs)
        _, padded = jax.jit(lambda a: model(a))(pad(inputs, 3))
    for stack in clean:
        for name in ("stream_in_norm", "branch_norm", "branch_var", "stream_out_norm",
                     "input_var"):
            np.testing.assert_allclose(padded[stack][name], clean[stack][name], rtol=2e-5,
                                       atol=1e-6, err_msg=f"{stack} {name}")


@pytest.mark.parametrize("arch", ["encoder", "encoder_decoder"])
def test_admin_omegas_ignore_padding(arch):
    inputs, dec = real_tokens((2, 5), 3), real_tokens((2, 4), 4)
    omegas = {}
    for extra in (0, 4):
        model = Transformer(make_cfg(arch, residual="admin"), rngs=nnx.Rngs(1))
        omegas[extra] = admin_initialize(model, pad(inputs, extra),
                                         pad(dec, extra) if arch == "encoder_decoder" else None)
    for stack in omegas[0]:
        np.testing.assert_allclose(omegas[4][stack], omegas[0][stack], rtol=2e-5)
