"""Each norm (``model.norm``) against a NumPy reference, in float32 and with bfloat16 inputs.

The references are the papers' one-line definitions written in NumPy: LayerNorm (Ba et al.
2016), RMSNorm (Zhang & Sennrich 2019), ScaleNorm (Nguyen & Salazar 2019, g init sqrt(d)),
DyT (Zhu et al. 2025, alpha init 0.5), UnitNorm (Huang et al. 2024, D^(k/2) x / ||x||).
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from deepnorm import norms

D = 24
EPS = 1e-5


def _layernorm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + EPS) * p["scale"] + p["bias"]


def _rmsnorm(x, p):
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + EPS) * p["scale"]


def _scalenorm(x, p):
    return p["scale"] * x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)


def _dyt(x, p):
    return p["scale"] * np.tanh(p["alpha"] * x) + p["bias"]


def _unitnorm(x, p, k=1.0):
    unit = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)
    return x.shape[-1] ** (k / 2) * unit * p["scale"] + p["bias"]


REFERENCES = {
    "layernorm": _layernorm, "rmsnorm": _rmsnorm, "scalenorm": _scalenorm, "dyt": _dyt,
    "unitnorm": _unitnorm,
    "none": lambda x, p: x,
}


def _randomize(module, rng):
    """Moves every parameter away from its init so the affine part is tested too; returns
    the values as float64 NumPy arrays."""
    values = {}
    for name in ("scale", "bias", "alpha"):
        param = getattr(module, name, None)
        if param is None:
            continue
        new = rng.normal(1.0, 0.3, param[...].shape).astype(np.float32)
        param.set_value(jnp.asarray(new))
        values[name] = new.astype(np.float64)
    return values


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_norm_matches_numpy_float32(kind):
    rng = np.random.default_rng(0)
    module = norms.make_norm(kind, D, eps=EPS)
    params = _randomize(module, rng)
    x = (rng.normal(0.5, 3.0, (3, 5, D))).astype(np.float32)
    y = module(jnp.asarray(x))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), REFERENCES[kind](x.astype(np.float64), params),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_norm_bfloat16_input_keeps_dtype_and_float32_statistics(kind):
    rng = np.random.default_rng(1)
    module = norms.make_norm(kind, D, eps=EPS)
    params = _randomize(module, rng)
    # A large common offset: a bfloat16 mean/variance would lose it, float32 statistics do not.
    x_bf16 = jnp.asarray(rng.normal(4.0, 1.0, (4, 7, D)), jnp.bfloat16)
    y = module(x_bf16)
    assert y.dtype == jnp.bfloat16
    # Reference: float32 maths on the bf16-rounded input; the only error left is the final
    # rounding of the output to bfloat16 (relative 2^-8).
    ref = REFERENCES[kind](np.asarray(x_bf16, np.float32).astype(np.float64), params)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2 ** -7, atol=2 ** -7)


def test_initial_values_follow_the_papers():
    assert float(norms.ScaleNorm(D).scale[...]) == pytest.approx(math.sqrt(D))
    dyt = norms.DyT(D)
    assert float(dyt.alpha[...]) == 0.5
    np.testing.assert_array_equal(np.asarray(dyt.scale[...]), np.ones(D))
    np.testing.assert_array_equal(np.asarray(dyt.bias[...]), np.zeros(D))
    ln = norms.LayerNorm(D)
    np.testing.assert_array_equal(np.asarray(ln.scale[...]), np.ones(D))
    np.testing.assert_array_equal(np.asarray(ln.bias[...]), np.zeros(D))
    np.testing.assert_array_equal(np.asarray(norms.RMSNorm(D).scale[...]), np.ones(D))


def test_scalenorm_at_init_gives_unit_rms():
    """g = sqrt(d): the output's RMS over d_model is 1, like LayerNorm's (the paper's reason)."""
    x = jnp.asarray(np.random.default_rng(2).normal(0, 7.0, (6, D)), jnp.float32)
    rms = jnp.sqrt(jnp.mean(jnp.square(norms.ScaleNorm(D)(x)), axis=-1))
    np.testing.assert_allclose(np.asarray(rms), 1.0, rtol=1e-5)


def test_make_norm_rejects_unknown_name():
    with pytest.raises(ValueError, match="'groupnorm'.*layernorm.*powernorm"):
        norms.make_norm("groupnorm", D)


@pytest.mark.parametrize("k", [0.0, 0.5, 2.0])
def test_unitnorm_k_sets_the_output_norm(k):
    """k = 0: unit vectors; the output norm is D^(k/2) (gain 1, bias 0), against NumPy with
    the affine off its init too."""
    rng = np.random.default_rng(3)
    x = rng.normal(0.5, 2.0, (3, 5, D)).astype(np.float32)
    norm = norms.make_norm("unitnorm", D, eps=EPS, unitnorm_k=k)
    y = np.asarray(norm(jnp.asarray(x)))
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), D ** (k / 2), rtol=1e-5)
    p = _randomize(norm, rng)
    want = _unitnorm(x.astype(np.float64), p, k)
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)


def test_unitnorm_k_is_a_model_config_value():
    from flax import nnx
    from deepnorm import Transformer, TransformerConfig
    from deepnorm.config import ConfigError
    cfg = TransformerConfig(arch="decoder", num_layers=1, d_model=D, num_heads=2, d_ff=32,
                            norm="unitnorm", unitnorm_k=0.0, residual="pre")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert model.decoder.final_norm.factor == 1.0
    with pytest.raises(ConfigError, match="unitnorm_k"):
        TransformerConfig(arch="decoder", num_layers=1, norm="unitnorm", unitnorm_k="big")
