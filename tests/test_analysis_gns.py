"""deepnorm.analysis.gns: both sides of Gray et al.'s comparison against per-example gradients
computed one example at a time, the ratio-of-means summary, a tiny training run, and the
``gns`` command's settings."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepnorm import TransformerConfig, norm_probes
from deepnorm.analysis import cli, gns
from deepnorm.analysis.batches import stacked_batches
from deepnorm.analysis.train_steps import optimizer_config
from deepnorm.training import noise_scale
from deepnorm.training.loss import cross_entropy, model_forward
from test_analysis_cli import OUT, _fails  # tests/ is on sys.path (pytest's default)
from test_norm_probes import _batch, _randomized_model

TINY = dict(d_model=16, num_heads=2, d_ff=32, vocab_size=40, max_len=16, dropout_rate=0.0)


def test_batch_sums_against_one_example_at_a_time():
    cfg = TransformerConfig(arch="decoder", num_layers=2, residual="post", **TINY)
    graphdef, params = _randomized_model(cfg)
    batch = _batch(cfg.arch, np.random.default_rng(0))
    got = jax.device_get(jax.jit(lambda p, b: gns.batch_sums(graphdef, p, b))(params, batch))
    denom = jnp.sum(batch["weights"])

    @jax.jit
    def share_grad(p, one):
        def loss(p):
            logits, _ = model_forward(nnx.merge(graphdef, p), one)
            return cross_entropy(logits, one["targets"], one["weights"])[0] / denom
        return jax.grad(loss)(p)

    shares = [share_grad(params, {k: v[i:i + 1] for k, v in batch.items()})
              for i in range(batch["inputs"].shape[0])]
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(s)]) for s in shares]
    np.testing.assert_allclose(got["full_share_sq"], sum(np.sum(f ** 2) for f in flat),
                               rtol=1e-4)
    np.testing.assert_allclose(got["full_batch_sq"], np.sum(np.sum(flat, axis=0) ** 2),
                               rtol=1e-4)
    def norm_sq(tree):
        """Sum of squares of the norm parameters of a model-shaped tree."""
        return sum(float(jnp.sum(v[...] ** 2))
                   for norm in norm_probes.norm_modules(nnx.merge(graphdef, tree)).values()
                   for v in vars(norm).values() if isinstance(v, nnx.Param))

    norm_share_sq = sum(norm_sq(s) for s in shares)
    norm_batch = norm_sq(jax.tree.map(lambda *g: sum(g), *shares))
    np.testing.assert_allclose(got["norms_share_sq"], norm_share_sq, rtol=1e-4)
    np.testing.assert_allclose(got["norms_batch_sq"], norm_batch, rtol=1e-4)
    assert got["norms_share_sq"] < got["full_share_sq"]


def test_summarize_is_the_ratio_of_the_mean_estimates():
    rng = np.random.default_rng(0)
    sums = {k: rng.uniform(1, 2, 5) for k in ("full_share_sq", "norms_share_sq", "loss")}
    sums["full_batch_sq"] = sums["full_share_sq"] * 1.5  # B = 4: |G_B|^2 within range
    sums["norms_batch_sq"] = sums["norms_share_sq"] * 2.0
    out = gns.summarize(sums, 4)
    for side in ("full", "norms"):
        g, t = noise_scale.from_shares(sums[f"{side}_share_sq"], sums[f"{side}_batch_sq"], 4)
        np.testing.assert_allclose(out[f"b_simple_{side}"], np.mean(t) / np.mean(g), rtol=1e-6)
        np.testing.assert_allclose(out[f"trace_{side}"], np.mean(t), rtol=1e-6)
    np.testing.assert_allclose(out["loss"], np.mean(sums["loss"]))


def test_measure_records_each_checkpoint_of_a_short_run():
    cfg = TransformerConfig(arch="decoder", num_layers=1, residual="pre", remat_policy="none",
                            **dict(TINY, vocab_size=260))  # the byte tokenizer's ids
    stream = stacked_batches(None, arch="decoder", num_batches=3, batch_size=2, seq_len=8)
    measured = {k: v[:1] for k, v in stream.items()}
    train = {k: v[1:] for k, v in stream.items()}
    records = gns.measure(cfg, seeds=[0], batches=measured, train_batches=train, num_steps=3,
                          checkpoints=[3, 0, 1], opt_config=optimizer_config(1e-2))
    assert [r["step"] for r in records] == [0, 1, 3]
    for r in records:
        assert r["residual"] == "pre" and r["num_layers"] == 1
        np.testing.assert_allclose(r["b_simple_norms"], r["trace_norms"] / r["grad_sq_norms"])
        assert np.isfinite(r["b_simple_full"])
    assert records[-1]["loss"] != records[0]["loss"]  # the run trained between checkpoints


@pytest.mark.parametrize("argv, expected", [
    (["gns", OUT, "--config.analysis.batch_size=1"],
     "analysis.batch_size=1: the noise scale compares batch sizes 1 and B"),
    (["gns", OUT, "--config.analysis.checkpoints=0,500"],
     "analysis.checkpoints: step 500 is after the run's last, analysis.steps=200"),
    (["gns", OUT, "--config.analysis.checkpoints=0,-1"],
     "analysis.checkpoints='0,-1': every value must be an integer >= 0"),
    (["gns", OUT, "--config.analysis.residuals=pre,rezero"],
     "analysis.residuals: 'rezero' has no norm layers to measure"),
    (["gns", OUT, "--config.analysis.train_batches=0"],
     "analysis.train_batches=0 must be a positive integer"),
])
def test_bad_gns_settings_fail_in_one_line(capsys, argv, expected):
    assert expected in _fails(capsys, argv)


@pytest.mark.slow
def test_gns_command_writes_json_and_figure(tmp_path):
    argv = ["gns", f"--config.analysis.out={tmp_path}", "--config.analysis.residuals=pre",
            "--config.analysis.depths=1", "--config.analysis.steps=2",
            "--config.analysis.checkpoints=0,2", "--config.analysis.batches=1",
            "--config.analysis.train_batches=1", "--config.analysis.batch_size=2",
            "--config.analysis.seq_len=8", "--config.model.d_model=16",
            "--config.model.d_ff=32"]
    assert cli.main(argv) == 0
    records = json.loads((tmp_path / "gns.json").read_text())
    assert [r["step"] for r in records] == [0, 2]
    assert (tmp_path / "gns.png").stat().st_size > 0


def test_gns_defaults_are_the_notebooks_setup():
    """configs/analysis/gns.py is what notebooks/gradient_noise_scale.py measures."""
    from deepnorm.analysis import settings

    _, config = cli.load(["gns", OUT])
    values, base = cli.check("gns", config)
    assert set(settings.FIELDS["gns"]) == set(config.analysis)
    assert values["checkpoints"] == [0, 25, 100, 200] and values["steps"] == 200
    assert (base.arch, base.num_layers, base.d_model, base.d_ff, base.num_heads,
            base.dropout_rate) == ("decoder", 4, 64, 128, 2, 0.0)
    assert config.optimizer.to_dict() == optimizer_config(1e-3, warmup_steps=10).to_dict()
