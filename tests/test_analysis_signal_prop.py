"""signal-prop: the token cosine similarity against NumPy, the analysis-side hook against the
model's own hidden states, the per-layer curves from block statistics, and the command."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepnorm import TransformerConfig
from deepnorm import transformer as transformer_lib
from deepnorm.analysis import cli, signal_prop
from deepnorm.transformer import Transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def numpy_cosine(x_BxTxD, mask_BxT):
    """Pairs (b, t, s), t != s, both real: the mean of their cosine similarities."""
    sims = []
    for b in range(x_BxTxD.shape[0]):
        real = [t for t in range(x_BxTxD.shape[1]) if mask_BxT[b, t]]
        for t in real:
            for s in real:
                if t != s:
                    u, v = x_BxTxD[b, t], x_BxTxD[b, s]
                    sims.append(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    return np.mean(sims)


def test_mean_cosine_similarity_against_numpy_over_real_tokens_without_self_pairs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7, 5)) + 0.7  # a shared offset: cosines well away from 0
    mask = rng.random((3, 7)) > 0.3
    mask[2] = [True] + [False] * 6  # a sequence with one real token has no pair
    expected = numpy_cosine(x, mask)
    got = signal_prop.mean_cosine_similarity(jnp.asarray(x, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    jitted = jax.jit(signal_prop.mean_cosine_similarity)(jnp.asarray(x, jnp.float32),
                                                          jnp.asarray(mask))
    np.testing.assert_allclose(jitted, got, rtol=1e-6)
    np.testing.assert_allclose(signal_prop.mean_cosine_similarity(jnp.asarray(x, jnp.float32)),
                               numpy_cosine(x, np.ones((3, 7), bool)), rtol=1e-5)
    same = jnp.ones((2, 4, 3))  # every token the same vector: collapsed, cosine 1
    assert float(signal_prop.mean_cosine_similarity(same)) == pytest.approx(1.0)
    assert np.isnan(signal_prop.mean_cosine_similarity(same, jnp.eye(2, 4, dtype=bool)))


def tiny(**fields):
    return TransformerConfig(**{**dict(arch="encoder", num_layers=3, d_model=16, num_heads=2,
                                       d_ff=32, vocab_size=260, remat_policy="none"), **fields})


def test_the_hook_measures_the_streams_the_model_computes_and_then_goes_away():
    cfg = tiny(residual="post")  # no final norm: the stack's output is the last stream
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    inputs = jnp.asarray(np.random.default_rng(1).integers(3, 260, (2, 6)), jnp.int32)
    inputs = inputs.at[1, 4:].set(transformer_lib.PAD_ID)
    real = np.asarray(inputs != transformer_lib.PAD_ID)
    embedded = model._embed(inputs, None)
    with signal_prop.cosine_hook():
        out, stats = model.encoder(embedded, self_mask=jnp.asarray(real)[:, None, None, :],
                                   token_mask_BxT=jnp.asarray(real))
    np.testing.assert_allclose(stats["cosine_in"][0], numpy_cosine(np.asarray(embedded), real),
                               rtol=1e-5)
    np.testing.assert_allclose(stats["cosine_out"][-1], numpy_cosine(np.asarray(out), real),
                               rtol=1e-5)
    np.testing.assert_allclose(stats["cosine_in"][1:], stats["cosine_out"][:-1], rtol=1e-6)
    _, after = model.encoder(embedded, token_mask_BxT=jnp.asarray(real))
    assert set(after) == set(transformer_lib.STAT_NAMES)


def test_layer_profile_is_the_ratios_of_the_block_statistics():
    rng = np.random.default_rng(2)
    stats = {name: rng.uniform(0.5, 2.0, (4, 2)) for name in transformer_lib.STAT_NAMES}
    stats.update(cosine_in=rng.uniform(size=4), cosine_out=rng.uniform(size=4))
    curves = signal_prop.layer_profile(stats)
    stream = np.r_[stats["stream_in_norm"][0, 0], stats["stream_out_norm"][:, -1]]
    np.testing.assert_allclose(curves["stream_norm"], stream)
    np.testing.assert_allclose(curves["stream_growth"], stream / stream[0])
    np.testing.assert_allclose(curves["branch_to_skip"],
                               stats["branch_norm"] / stats["stream_in_norm"])
    np.testing.assert_allclose(curves["branch_to_skip_mean"],
                               (stats["branch_norm"] / stats["stream_in_norm"]).mean(1))
    np.testing.assert_allclose(curves["cosine"], np.r_[stats["cosine_in"][0],
                                                       stats["cosine_out"]])


def test_pre_ln_stream_grows_and_post_ln_stays_normalized_at_init():
    batch = {"inputs": np.random.default_rng(3).integers(3, 260, (2, 8)).astype(np.int32)}
    pre, = signal_prop.measure(tiny(residual="pre", num_layers=4), seeds=[0], batch=batch)
    post, = signal_prop.measure(tiny(residual="post", num_layers=4), seeds=[0], batch=batch)
    assert np.all(np.diff(pre["stream_norm"]) > 0)  # x + F(LN(x)): the sum only grows
    # Post-LN's stream leaves every layer through a LayerNorm (unit gain): norm sqrt(d).
    np.testing.assert_allclose(post["stream_norm"][1:], np.sqrt(16), rtol=1e-3)
    assert len(pre["cosine"]) == 5 and np.shape(pre["branch_to_skip"]) == (4, 2)
    assert all(-1 <= c <= 1 for c in pre["cosine"] + post["cosine"])


def test_defaults_are_every_scheme_up_to_1000_layers():
    _, config = cli.load(["signal-prop", "--config.analysis.out=x"])
    values, base = cli.check("signal-prop", config)
    assert values["depths"] == [12, 100, 1000]
    assert values["residuals"] == list(signal_prop.schemes_lib.SCHEMES)
    assert (base.arch, base.d_model) == ("encoder", 64)


def test_signal_prop_command_writes_json_and_png(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "deepnorm.analysis", "signal-prop",
         f"--config.analysis.out={out}", "--config.model.d_model=16",
         "--config.model.d_ff=32", "--config.model.num_heads=2",
         "--config.analysis.depths=3", "--config.analysis.residuals=pre,rezero",
         "--config.analysis.seeds=2", "--config.analysis.batch_size=2",
         "--config.analysis.seq_len=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads((out / "signal-prop.json").read_text())
    assert sorted((r["residual"], r["seed"]) for r in records) == [
        ("pre", 0), ("pre", 1), ("rezero", 0), ("rezero", 1)]
    for r in records:
        assert len(r["cosine"]) == 4 and len(r["branch_to_skip_mean"]) == 3
    rezero = [r for r in records if r["residual"] == "rezero"]
    # ReZero's gates start at 0: every layer passes its input through unchanged.
    for r in rezero:
        np.testing.assert_allclose(r["stream_growth"], 1.0, rtol=1e-6)
        np.testing.assert_allclose(r["cosine"], r["cosine"][0], rtol=1e-5)
    assert (out / "signal-prop.png").stat().st_size > 10_000


@pytest.mark.parametrize("scheme", ["resi_dual", "hyper", "fixup", "normformer", "dlcl"])
def test_every_declared_scheme_measures_multi_stream_ones_on_their_first_stream(scheme):
    base = tiny(num_layers=3)
    cfg = signal_prop.schemes_lib.scheme_config(base, scheme, 3)
    batch = {"inputs": np.random.default_rng(4).integers(3, 260, (2, 8)).astype(np.int32)}
    record, = signal_prop.measure(cfg, seeds=[0], batch=batch, scheme=scheme)
    assert len(record["cosine"]) == 4 and np.shape(record["branch_to_skip"]) == (3, 2)
    assert np.all(np.isfinite(record["stream_norm"]))
    assert all(-1 <= c <= 1 + 1e-6 for c in record["cosine"])
