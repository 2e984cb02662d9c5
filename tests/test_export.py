"""deepnorm.export.fold_norms: the folded model's outputs equal the original's on random inputs
for every (scheme, norm) it folds, the report names what stays, and cached decoding works.

Every parameter is perturbed first (gains away from 1, biases away from 0, DeepNorm / Admin /
ReZero / DyT scalars too), so a fold that dropped a gain or a bias would show.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepnorm import Transformer, TransformerConfig, export, norms
from deepnorm import residual as residual_lib
from deepnorm.config import BATCH_STAT_NORMS, NORMS, RESIDUALS

# The norms fold_norms folds (it refuses the batch-statistics ones: tests/test_batch_stats_model.py).
FOLDED_NORMS = [n for n in NORMS if n != "none" and n not in BATCH_STAT_NORMS]
from deepnorm.decoding import incremental

V = 40
# The schemes whose every norm folds (an untied head), the ones among them whose LayerNorm
# centering folds too, and the ones where some norm stays or none folds.
FULL = {"pre", "subln", "lnscale", "layerscale", "deepscale", "hyper"}
CENTERED = {"pre", "subln", "lnscale", "deepscale", "hyper"}
PARTLY = {"sandwich", "peri", "mixln", "normformer", "respost", "dlcl"}
NONE = {"post", "deepnorm", "admin", "b2t", "rezero", "fixup", "rescaled", "resi_dual", "ngpt"}
NORM_FREE = {r for r in RESIDUALS if not residual_lib.get(r).uses_norm}  # rezero, fixup


def test_the_sets_cover_every_declared_scheme():
    assert FULL | PARTLY | NONE == set(RESIDUALS) and not (FULL & PARTLY) and not FULL & NONE


def make(residual="pre", norm="layernorm", arch="decoder", *, tie=False, positions="learned",
         use_bias=False, seed=0, **kw):
    if residual in NORM_FREE:
        norm = "none"
    layers = (dict(num_encoder_layers=2, num_decoder_layers=2) if arch == "encoder_decoder"
              else dict(num_layers=2))
    cfg = TransformerConfig(arch=arch, residual=residual, norm=norm, d_model=16, num_heads=2,
                            d_ff=32, vocab_size=V, tie_embeddings=tie, positions=positions,
                            max_len=16, use_bias=use_bias, scan_layers=False, **layers, **kw)
    model = Transformer(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    key = jax.random.PRNGKey(seed + 1)
    noisy = [x + 0.3 * jax.random.normal(jax.random.fold_in(key, i), x.shape)
             for i, x in enumerate(leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, noisy))


def logits(model):
    x = jax.random.randint(jax.random.PRNGKey(7), (2, 8), 1, V)
    x = x.at[1, 6:].set(0)  # padding in the batch: masks go through the folded model too
    args = (x, x[:, ::-1]) if model.config.arch == "encoder_decoder" else (x,)
    return np.asarray(model(*args)[0])


def assert_same_outputs(model, folded):
    a, b = logits(model), logits(folded)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def param_count(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("residual", RESIDUALS)
def test_every_scheme_folds_what_it_claims_and_keeps_outputs(residual):
    model = make(residual)
    folded, report = export.fold_norms(model)
    assert type(folded) is Transformer
    assert_same_outputs(model, folded)
    assert report.complete == (residual in FULL | NORM_FREE), str(report)
    if residual in CENTERED:  # centering too: layernorm, untied head, learned positions
        assert report.centered and report.not_centered is None
        assert isinstance(folded.decoder.layers.ffn_norm, norms.RMSNorm)
        assert folded.decoder.layers.ffn_norm.scale is None
    if residual in NONE:
        assert not report.folded and param_count(folded) == param_count(model)
    else:  # the final norm's gain and bias are gone (use_bias=False: its bias b W_head
        # became the head's bias, so the parameter count need not fall)
        assert folded.decoder.final_norm.scale is None
        assert folded.head.bias is not None
    # What stays is named, with why
    for site, why in report.remaining:
        assert site.startswith("decoder.") and len(why) > 20


@pytest.mark.parametrize("norm", FOLDED_NORMS)
@pytest.mark.parametrize("residual", ["pre", "subln", "sandwich"])
def test_every_norm_folds(residual, norm):
    model = make(residual, norm, use_bias=True)
    folded, report = export.fold_norms(model)
    assert_same_outputs(model, folded)
    block = folded.decoder.layers
    assert block.self_attn_norm.scale is None and block.ffn_norm.scale is None
    if norm == "dyt":  # alpha is inside the tanh: it stays
        np.testing.assert_array_equal(block.ffn_norm.alpha[...],
                                      model.decoder.layers.ffn_norm.alpha[...])
        assert any("alpha stays" in into for _, into in report.folded)
    if residual == "subln":
        assert block.ffn.inner_norm.scale is None and block.self_attn.inner_norm.scale is None
    if residual == "sandwich":
        assert block.ffn_norm_out.scale is not None
        assert [s for s, _ in report.remaining] == ["decoder.layers.self_attn_norm_out",
                                                    "decoder.layers.ffn_norm_out"]


@pytest.mark.parametrize("arch", ["encoder", "encoder_decoder"])
@pytest.mark.parametrize("residual,norm", [("pre", "layernorm"), ("lnscale", "dyt"),
                                           ("peri", "rmsnorm")])
def test_encoder_and_encoder_decoder_fold(arch, residual, norm):
    model = make(residual, norm, arch)
    folded, report = export.fold_norms(model)
    assert_same_outputs(model, folded)
    assert report.complete == (residual != "peri"), str(report)
    if arch == "encoder_decoder":  # the encoder's final norm went into the cross k, v
        assert folded.encoder.final_norm.scale is None
        into = dict(report.folded)["encoder.final_norm"]
        assert into.startswith("decoder.layers.cross_attn.key, decoder.layers.cross_attn.value")
        assert folded.decoder.layers.cross_attn_norm.scale is None


def test_tied_head_keeps_the_final_norm_unless_untied():
    model = make("pre", tie=True)
    folded, report = export.fold_norms(model)
    assert_same_outputs(model, folded)
    assert [s for s, _ in report.remaining] == ["decoder.final_norm"]
    assert "tie_embeddings" in report.remaining[0][1]
    assert "head" in report.not_centered
    untied, report = export.fold_norms(model, untie_head=True)
    assert_same_outputs(model, untied)
    assert report.complete and untied.head is not None
    assert "sinusoidal" not in (report.not_centered or "")  # learned positions: centered
    assert report.centered


def test_centering_needs_learned_positions_and_layernorm():
    _, report = export.fold_norms(make("pre", positions="sinusoidal"))
    assert report.complete and not report.centered and "sinusoidal" in report.not_centered
    _, report = export.fold_norms(make("pre", "rmsnorm"))
    assert not report.centered and "mean" in report.not_centered
    _, report = export.fold_norms(make("sandwich"))
    assert not report.centered


def test_centering_makes_the_stream_zero_mean():
    """The premise of dropping the mean subtraction: every write is centered, so the stream
    entering each norm has zero mean over d_model at every token."""
    model = make("pre")
    folded, _ = export.fold_norms(model)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 8), 1, V)
    x = folded._embed(tokens, None)
    block = folded.decoder.layers
    w = block.ffn.ffn_out.kernel[...]
    assert float(jnp.max(jnp.abs(jnp.mean(x, -1)))) < 1e-5
    assert float(jnp.max(jnp.abs(jnp.mean(w, -1)))) < 1e-6
    assert float(jnp.max(jnp.abs(jnp.mean(block.self_attn.out.kernel[...], -1)))) < 1e-6


def test_fold_math_on_one_projection_against_numpy():
    """N(x) W + c == n(x) W' + c' with W' = diag(g) W, c' = s * b W + c (s: LNS's scalar)."""
    rng = np.random.default_rng(0)
    d, f = 6, 5
    g, b, c = rng.normal(size=d), rng.normal(size=d), rng.normal(size=f)
    w, x = rng.normal(size=(d, f)), rng.normal(size=(3, d))
    n = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    s = 0.7
    want = s * (g * n + b) @ w + c
    dense = export.Dense(d, f, gain=1.0, axes=("embed", "mlp"), use_bias=True,
                         dtype=jnp.float32, rngs=nnx.Rngs(0))
    dense.kernel.set_value(jnp.asarray(w, jnp.float32))
    dense.bias.set_value(jnp.asarray(c, jnp.float32))
    export._fold_into(dense, jnp.asarray(g, jnp.float32), jnp.asarray(b, jnp.float32),
                      jnp.asarray(s, jnp.float32))
    np.testing.assert_allclose(np.asarray(dense(jnp.asarray(s * n, jnp.float32))), want,
                               rtol=1e-5, atol=1e-5)


def test_strict_raises_and_original_is_untouched():
    with pytest.raises(export.FoldError, match="(?s)residual='post'.*decoder.layers.ffn_norm: the norm's output is the residual stream"):
        export.fold_norms(make("post"), strict=True)
    export.fold_norms(make("pre"), strict=True)  # a full fold passes strict
    pre = make("pre")
    pre_before = jax.tree.map(np.asarray, nnx.state(pre, nnx.Param))
    export.fold_norms(pre)
    jax.tree.map(np.testing.assert_array_equal, pre_before,
                 jax.tree.map(np.asarray, nnx.state(pre, nnx.Param)))


def test_a_scheme_without_a_rule_is_reported_not_folded(monkeypatch):
    undeclared = dataclasses.replace(residual_lib.get("pre"), norm_feeds=None, centerable=False)
    monkeypatch.setitem(residual_lib.SCHEMES, "pre", undeclared)
    model = make("pre")
    folded, report = export.fold_norms(model)
    assert_same_outputs(model, folded)
    assert any("no fold rule for residual='pre'" in why for _, why in report.remaining)
    assert folded.decoder.layers.ffn_norm.scale is not None
    assert report.not_centered


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm", "scalenorm", "dyt"])
def test_bare_norm_is_the_normalization_alone(kind):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8)) * 2 + 1
    full, bare = norms.make_norm(kind, 8), norms.make_norm(kind, 8, affine=False)
    if kind == "scalenorm":  # init gain sqrt(d): the bare norm is the unit-norm direction
        np.testing.assert_allclose(np.asarray(bare(x)) * np.sqrt(8), np.asarray(full(x)),
                                   rtol=1e-6)
    else:  # init gain 1, bias 0
        np.testing.assert_allclose(np.asarray(bare(x)), np.asarray(full(x)), rtol=1e-6)
    names = {str(p[-1]) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(bare))}
    assert not names & {"scale", "bias"}


def test_cached_greedy_decoding_of_a_folded_decoder():
    model = make("pre", use_bias=True)
    folded, report = export.fold_norms(model)
    assert report.complete
    prompt = jax.random.randint(jax.random.PRNGKey(5), (2, 4), 2, V)
    outs = []
    for m in (model, folded):
        graphdef, params = nnx.split(m)
        tokens, length = incremental.continue_text(graphdef, params, prompt,
                                                   jnp.array([4, 3]), max_new=6)
        outs.append((np.asarray(tokens), np.asarray(length)))
    np.testing.assert_array_equal(outs[1][0], outs[0][0])
    np.testing.assert_array_equal(outs[1][1], outs[0][1])


def test_cached_greedy_translation_of_a_folded_encoder_decoder():
    model = make("subln", arch="encoder_decoder", use_bias=True)
    folded, report = export.fold_norms(model)
    assert report.complete and report.centered
    src = jax.random.randint(jax.random.PRNGKey(6), (2, 6), 2, V)
    outs = [np.asarray(incremental.translate_batch(*nnx.split(m), src, beam_size=1,
                                                   max_steps=6))
            for m in (model, folded)]
    np.testing.assert_array_equal(outs[1], outs[0])


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["decoder", "encoder", "encoder_decoder"])
@pytest.mark.parametrize("norm", FOLDED_NORMS)
@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("tie", [False, True])
def test_every_scheme_norm_arch_and_head(residual, norm, arch, tie):
    """The whole grid (opt-in): outputs equal, and a full fold exactly where FULL says."""
    if residual in NORM_FREE and norm != "layernorm":
        pytest.skip(f"{residual} has no norm: one case covers it")
    model = make(residual, norm, arch, tie=tie)
    folded, report = export.fold_norms(model)
    assert_same_outputs(model, folded)
    assert report.complete == (residual in NORM_FREE or (residual in FULL and not tie)), str(report)


def test_export_page_snippet_runs():
    """docs/export.md's example, as written (it asserts a complete fold itself)."""
    import pathlib
    import re
    page = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "export.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert blocks and "fold_norms" in blocks[0]
    exec(compile(blocks[0], "docs/export.md", "exec"), {})


def test_bfloat16_model_folds_within_bfloat16_rounding():
    """With bfloat16 matmuls the folded kernel diag(g) W is rounded where W was: the logits
    agree to bfloat16's precision, not float32's."""
    model = make("pre", dtype="bfloat16")
    folded, report = export.fold_norms(model)
    assert report.complete
    a, b = logits(model), logits(folded)
    assert np.abs(b - a).max() < 0.05 * np.abs(a).max()
