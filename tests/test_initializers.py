"""Derived constants and initialization against the papers' formulas.

DeepNet (Wang et al. 2022, arXiv 2203.00555, Table/Fig. 2): alpha and beta per architecture;
Magneto (Wang et al. 2022, "Foundation Transformers"): gamma; T-Fixup (Huang et al. 2020);
DS-Init (Zhang, Titov, Sennrich 2019): layer l's std scaled by 1/sqrt(l).
"""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from deepnorm import ConfigError, Transformer, TransformerConfig, deepnorm_coefficients, subln_gamma
from deepnorm.initializers import layer_constants, role_gains, tfixup_scale

SIZES = [(1, 1), (6, 6), (18, 18), (100, 100), (500, 500), (12, 3), (3, 48)]


@pytest.mark.parametrize("n", [1, 6, 18, 100, 500, 1000])
def test_deepnorm_encoder_only_and_decoder_only(n):
    assert deepnorm_coefficients("encoder", num_encoder_layers=n) == {
        "encoder": pytest.approx(((2 * n) ** (1 / 4), (8 * n) ** (-1 / 4)))}
    assert deepnorm_coefficients("decoder", num_decoder_layers=n) == {
        "decoder": pytest.approx(((2 * n) ** (1 / 4), (8 * n) ** (-1 / 4)))}


@pytest.mark.parametrize("n,m", SIZES)
def test_deepnorm_encoder_decoder(n, m):
    got = deepnorm_coefficients("encoder_decoder", n, m)
    assert set(got) == {"encoder", "decoder"}
    enc_alpha, enc_beta = got["encoder"]
    assert enc_alpha == pytest.approx(0.81 * (n ** 4 * m) ** (1 / 16), rel=1e-12)
    assert enc_beta == pytest.approx(0.87 * (n ** 4 * m) ** (-1 / 16), rel=1e-12)
    # torchscale v0.3.0 multiplies the encoder weights by 1.15 (N^4 M)^(-1/16); we follow the
    # paper, and the two differ by 32%.
    assert enc_beta != pytest.approx(1.15 * (n ** 4 * m) ** (-1 / 16), rel=0.1)
    assert got["decoder"] == pytest.approx(((3 * m) ** (1 / 4), (12 * m) ** (-1 / 4)), rel=1e-12)


def test_deepnorm_500_500_values():
    """The paper's 1,000-layer model (500L-500L): N^4 M = 500^5, so (N^4 M)^(1/16) = 500^(5/16)."""
    got = deepnorm_coefficients("encoder_decoder", 500, 500)
    scale = 500 ** (5 / 16)
    assert got["encoder"] == pytest.approx((0.81 * scale, 0.87 / scale))
    assert got["decoder"] == pytest.approx((1500 ** 0.25, 6000 ** -0.25))
    assert got["encoder"][0] == pytest.approx(5.65, abs=0.01)  # 0.81 * 6.97
    assert got["decoder"][1] == pytest.approx(0.1136, abs=1e-4)


@pytest.mark.parametrize("arch,n,m", [
    ("encoder", 0, 0), ("encoder", 6, 6), ("decoder", 6, 6), ("decoder", 0, 0),
    ("encoder_decoder", 6, 0), ("encoder_decoder", 0, 6), ("encoder", -3, 0), ("nope", 1, 1),
])
def test_deepnorm_coefficients_reject_unused_or_missing_layers(arch, n, m):
    with pytest.raises(ConfigError):
        deepnorm_coefficients(arch, n, m)


@pytest.mark.parametrize("n,m", SIZES)
def test_subln_gamma(n, m):
    assert subln_gamma("encoder", n) == {"encoder": pytest.approx(math.sqrt(math.log(2 * n)))}
    assert subln_gamma("decoder", 0, m) == {"decoder": pytest.approx(math.sqrt(math.log(2 * m)))}
    got = subln_gamma("encoder_decoder", n, m)
    assert got["encoder"] == pytest.approx(math.sqrt(math.log(3 * m) * math.log(2 * n) / 3))
    assert got["decoder"] == pytest.approx(math.sqrt(math.log(3 * m)))


@pytest.mark.parametrize("layers", [1, 6, 100])
def test_tfixup_scales(layers):
    """T-Fixup: encoder v, w and MLP weights x 0.67 N^(-1/4); decoder's x (9M)^(-1/4)."""
    assert tfixup_scale("encoder", layers) == pytest.approx(0.67 * layers ** -0.25)
    assert tfixup_scale("decoder", layers) == pytest.approx((9 * layers) ** -0.25)
    cfg = TransformerConfig(arch="encoder_decoder", num_encoder_layers=layers,
                            num_decoder_layers=2 * layers, d_model=16, num_heads=2, d_ff=32,
                            norm="none", residual="post", init="tfixup")
    for stack, want in (("encoder", 0.67 * layers ** -0.25), ("decoder", (18 * layers) ** -0.25)):
        gains = role_gains(cfg, stack)
        assert gains["query"] == gains["key"] == 1.0
        for role in ("value", "out", "ffn_in", "ffn_out"):
            assert gains[role] == pytest.approx(want)


def _cfg(**kw):
    base = dict(arch="decoder", d_model=64, num_heads=2, d_ff=128, vocab_size=40)
    base.update(kw)
    return TransformerConfig(**base)


def _kernels(model, stack):
    """role -> stacked kernel [L, fan_in, fan_out] for one stack (self-attention and FFN)."""
    layers = getattr(model, stack).layers
    out = {r: getattr(layers.self_attn, r).kernel[...] for r in ("query", "key", "value", "out")}
    out.update({r: getattr(layers.ffn, r).kernel[...] for r in ("ffn_in", "ffn_out")})
    if layers.cross_attn is not None:
        out.update({f"cross_{r}": getattr(layers.cross_attn, r).kernel[...]
                    for r in ("query", "key", "value", "out")})
    return out


def _xavier_std(kernel):
    fan_in, fan_out = kernel.shape[-2:]
    return math.sqrt(2.0 / (fan_in + fan_out))


def _assert_std(kernel, want, rel=0.01):
    got = float(np.std(np.asarray(kernel)))
    assert got == pytest.approx(want, rel=rel), (got, want)


SCALED = ("value", "out", "ffn_in", "ffn_out", "cross_value", "cross_out")


def test_deepnorm_init_statistics_decoder_only():
    """64 layers x 64 x 64: ~262k draws per role, so the std is within ~0.2% of its target."""
    m = 64
    model = Transformer(_cfg(num_layers=m, residual="deepnorm"), rngs=nnx.Rngs(0))
    beta = (8 * m) ** -0.25
    for role, kernel in _kernels(model, "decoder").items():
        _assert_std(kernel, (beta if role in SCALED else 1.0) * _xavier_std(kernel))
        assert abs(float(np.mean(np.asarray(kernel)))) < 0.01 * _xavier_std(kernel)


def test_deepnorm_init_statistics_encoder_decoder_each_stack_has_its_own_beta():
    n, m = 24, 40
    model = Transformer(_cfg(arch="encoder_decoder", num_encoder_layers=n, num_decoder_layers=m,
                             residual="deepnorm"), rngs=nnx.Rngs(1))
    betas = {"encoder": 0.87 * (n ** 4 * m) ** (-1 / 16), "decoder": (12 * m) ** -0.25}
    for stack, beta in betas.items():
        kernels = _kernels(model, stack)
        assert ("cross_value" in kernels) == (stack == "decoder")
        for role, kernel in kernels.items():
            _assert_std(kernel, (beta if role in SCALED else 1.0) * _xavier_std(kernel),
                        rel=0.015)


def test_subln_init_multiplies_branch_weights_by_gamma():
    m = 32
    model = Transformer(_cfg(num_layers=m, residual="subln"), rngs=nnx.Rngs(2))
    gamma = math.sqrt(math.log(2 * m))
    for role, kernel in _kernels(model, "decoder").items():
        _assert_std(kernel, (gamma if role in SCALED else 1.0) * _xavier_std(kernel), rel=0.015)


def test_xavier_init_with_deepnorm_residual_keeps_alpha_but_does_not_scale():
    m = 32
    cfg = _cfg(num_layers=m, residual="deepnorm", init="xavier")
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    for kernel in _kernels(model, "decoder").values():
        _assert_std(kernel, _xavier_std(kernel), rel=0.015)
    np.testing.assert_allclose(layer_constants(cfg, "decoder", m)["alpha"], (2 * m) ** 0.25,
                               rtol=1e-6)


def test_dsinit_std_of_layer_l_is_xavier_over_sqrt_l():
    """DS-Init: every projection of layer l has std xavier / sqrt(l)."""
    num = 16
    model = Transformer(_cfg(num_layers=num, d_model=32, d_ff=64, init="dsinit"),
                        rngs=nnx.Rngs(4))
    kernels = _kernels(model, "decoder")
    for layer in range(1, num + 1):
        # Pool the six roles, each normalized by its own Xavier std: ~8k draws per layer.
        pooled = np.concatenate([np.asarray(k[layer - 1]).ravel() / _xavier_std(k)
                                 for k in kernels.values()])
        assert float(np.std(pooled)) == pytest.approx(layer ** -0.5, rel=0.04), layer
    # The trend over depth, fitted: log std = slope * log l with slope -1/2.
    stds = [np.std(np.asarray(kernels["ffn_in"][i])) for i in range(num)]
    slope = np.polyfit(np.log(np.arange(1, num + 1)), np.log(stds), 1)[0]
    assert slope == pytest.approx(-0.5, abs=0.03)


def test_auto_init_follows_the_residual_scheme():
    for residual, want in (("deepnorm", "deepnorm"), ("subln", "subln"), ("pre", "xavier"),
                           ("post", "xavier"), ("admin", "xavier")):
        assert _cfg(num_layers=2, residual=residual).resolved_init == want


def test_layer_constants():
    cfg = _cfg(num_layers=8, residual="mixln", mixln_fraction=0.25)
    c = layer_constants(cfg, "decoder", 8)
    np.testing.assert_array_equal(c["layer"], np.arange(1, 9))
    np.testing.assert_array_equal(c["is_post"], np.arange(8) < 2)
    np.testing.assert_array_equal(c["alpha"], np.ones(8))
    np.testing.assert_array_equal(c["lnscale"], np.ones(8))
    c = layer_constants(_cfg(num_layers=8, residual="lnscale"), "decoder", 8)
    np.testing.assert_allclose(c["lnscale"], 1 / np.sqrt(np.arange(1, 9)), rtol=1e-7)


@pytest.mark.parametrize("init", ["deepnorm", "subln", "tfixup", "dsinit"])
def test_every_init_changes_the_parameters(init):
    """No silent no-op: each init differs from plain Xavier with the same seed."""
    def kernels(init):
        model = Transformer(_cfg(num_layers=3, d_model=16, d_ff=32, init=init),
                            rngs=nnx.Rngs(5))
        return jax.tree.map(np.asarray, _kernels(model, "decoder"))

    base, other = kernels("xavier"), kernels(init)
    assert any(not np.allclose(base[r], other[r]) for r in base), init


@pytest.mark.parametrize("arch,n,m,branches", [("decoder", 0, 16, 32), ("encoder", 16, 0, 32),
                                               ("encoder_decoder", 4, 6, 8 + 18)])
def test_fixup_zeroes_last_projections_and_scales_the_others_by_inverse_sqrt_branches(
        arch, n, m, branches):
    """Fixup: L^(-1/(2m-2)) with m = 2 layers per branch is L^(-1/2), L the network's residual
    branches (2 per encoder / decoder-only layer, 3 per decoder layer with cross-attention)."""
    layers = (dict(num_encoder_layers=n, num_decoder_layers=m) if arch == "encoder_decoder"
              else dict(num_layers=n or m))
    cfg = _cfg(arch=arch, residual="fixup", norm="none", **layers)
    assert cfg.resolved_init == "fixup"
    scale = branches ** -0.5
    for stack in ("encoder", "decoder"):
        if not getattr(cfg, f"{stack}_layers"):
            continue
        assert role_gains(cfg, stack) == {"query": 1.0, "key": 1.0, "value": scale, "out": 0.0,
                                          "ffn_in": scale, "ffn_out": 0.0}
    if arch == "decoder":
        kernels = _kernels(Transformer(cfg, rngs=nnx.Rngs(6)), "decoder")
        for role in ("out", "ffn_out"):
            np.testing.assert_array_equal(np.asarray(kernels[role]), 0.0)
        for role in ("value", "ffn_in"):
            _assert_std(kernels[role], scale * _xavier_std(kernels[role]), rel=0.02)
        _assert_std(kernels["query"], _xavier_std(kernels["query"]), rel=0.02)
