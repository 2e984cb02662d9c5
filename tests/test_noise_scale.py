"""The simple noise scale B_simple = tr(Sigma) / |G|^2 (deepnorm.training.noise_scale): the
estimators on a linear regression whose gradient covariance is known in closed form, and the
train step's ``gns_*`` metrics against per-example gradients from ``jax.vmap(jax.grad)``."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from deepnorm import TransformerConfig, norm_probes
from deepnorm.training import noise_scale, optim, steps
from deepnorm.training.state import TrainState
from test_norm_probes import _batch, _randomized_model, _vmapped_norm_grads  # tests/ on sys.path


def test_estimators_on_linear_regression_match_the_analytic_noise_scale():
    """Loss 0.5 (x.w - y)^2 with x ~ N(0, I_d), y = x.w* + eps, eps ~ N(0, s^2): the example
    gradient is g = x (x.delta - eps), delta = w - w*, so E g = delta and, from the Gaussian
    fourth moment E[x x^T A x x^T] = A + A^T + tr(A) I, Sigma = delta delta^T + (|delta|^2 +
    s^2) I: tr(Sigma) = (d + 1) |delta|^2 + d s^2, |G|^2 = |delta|^2."""
    d, b, num_batches, noise = 6, 8, 20000, 0.7
    rng = np.random.default_rng(0)
    w_true, w = rng.normal(size=d), rng.normal(size=d)
    x = rng.normal(size=(num_batches, b, d))
    y = x @ w_true + noise * rng.normal(size=(num_batches, b))

    def example_loss(w, x, y):
        return 0.5 * (x @ w - y) ** 2

    g = jax.vmap(jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0)), in_axes=(None, 0, 0))(
        jnp.asarray(w), jnp.asarray(x), jnp.asarray(y))  # [K, B, d]
    g = np.asarray(g, np.float64)
    example_sq = np.sum(g ** 2, axis=(1, 2))  # sum over the batch of |g_b|^2, per batch
    batch_sq = np.sum(g.mean(axis=1) ** 2, axis=1)
    grad_sq, trace = map(np.asarray, noise_scale.estimates(example_sq, batch_sq, b))

    delta_sq = np.sum((w - w_true) ** 2)
    want_trace = (d + 1) * delta_sq + d * noise ** 2
    # Unbiased: the means over batches agree with the truth within 4 standard errors.
    for est, want in ((grad_sq, delta_sq), (trace, want_trace)):
        stderr = est.std() / np.sqrt(num_batches)
        assert abs(est.mean() - want) < 4 * stderr, (est.mean(), want, stderr)
    ratio = trace.mean() / grad_sq.mean()
    np.testing.assert_allclose(ratio, want_trace / delta_sq, rtol=0.05)
    # The naive per-batch plug-ins are biased: mean |g_b|^2 over-counts |G|^2 by tr(Sigma).
    assert example_sq.mean() / b > 1.5 * delta_sq


def test_estimators_exact_cases():
    g = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0]])  # no noise at all
    grad_sq, trace = noise_scale.estimates(np.sum(g ** 2), np.sum(g.mean(0) ** 2), 3)
    np.testing.assert_allclose([grad_sq, trace], [5.0, 0.0], atol=1e-6)
    g = np.array([[1.0, -1.0], [-1.0, 1.0]])  # pure noise, mean 0
    grad_sq, trace = noise_scale.estimates(np.sum(g ** 2), 0.0, 2)
    # |G|^2 = (2 * 0 - 2) / 1 = -2: an unbiased estimate can be negative on one batch.
    np.testing.assert_allclose([grad_sq, trace], [-2.0, 4.0])
    # Shares of a mean loss (g_b / B) give the same as the per-example gradients.
    np.testing.assert_allclose(noise_scale.from_shares(np.sum((g / 2) ** 2), 0.0, 2),
                               (grad_sq, trace))
    with pytest.raises(ValueError, match="at least 2 examples"):
        noise_scale.estimates(1.0, 1.0, 1)


def _step_inputs(cfg):
    graphdef, params = _randomized_model(cfg)
    params = nnx.to_pure_dict(params)
    opt = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.0, warmup_steps=0,
        decay_start=0, schedule="constant", grad_clip_norm=0.0, label_smoothing=0.0))
    tx, _ = optim.make_optimizer(opt, 10)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0))
    return graphdef, tx, state


@pytest.mark.parametrize("k", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_train_step_noise_scale_equals_the_vmap_reference(k):
    """``gns_*`` of one train step, plain and with 3 micro-batches of one example each."""
    cfg = TransformerConfig(arch="decoder", num_layers=2, d_model=16, num_heads=2, d_ff=32,
                            vocab_size=40, max_len=16, residual="pre", remat_policy="none",
                            dropout_rate=0.0)
    graphdef, tx, state = _step_inputs(cfg)
    batch = _batch(cfg.arch, np.random.default_rng(0))  # 3 examples, padded
    b = batch["inputs"].shape[0]

    # The reference: each example's share of the mean loss's gradient by vmap(grad); with
    # dropout off both sides differentiate the same function.
    shares = _vmapped_norm_grads(graphdef, _state_params(graphdef, state.params), batch)
    share_layer, share_total = norm_probes.per_layer_sq_norms(shares, batch=True)
    batch_layer, batch_total = norm_probes.per_layer_sq_norms(
        norm_probes.summed_over_examples(shares))
    want = {}
    for suffix, s, bsq in (("", share_total.sum(-1), batch_total),
                           ("_per_layer", share_layer.sum(-1), batch_layer)):
        g_sq = (b * bsq - b * s) / (b - 1)  # mean_b |B share_b|^2 = B sum_b |share_b|^2
        tr = (b * s - bsq) * b / (b - 1)
        want.update({f"gns_grad_sq{suffix}": g_sq, f"gns_trace{suffix}": tr,
                     f"gns_b_simple{suffix}": tr / g_sq})

    step = steps.make_train_step(graphdef, tx, gns=True, grad_accum_steps=k)
    _, metrics = jax.jit(step)(state, batch)
    for key, value in want.items():
        assert metrics[key].shape == value.shape, key
        np.testing.assert_allclose(metrics[key], value, rtol=2e-3, err_msg=key)
    assert want["gns_b_simple_per_layer"].shape == (cfg.total_layers,)


def _state_params(graphdef, pure):
    """A pure-dict param tree as the nnx.State the reference helper expects."""
    return nnx.split(nnx.merge(graphdef, pure), nnx.Param)[1]


def test_a_training_run_logs_the_noise_scale_on_logged_steps(tmp_path):
    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import decoder_lm
    from deepnorm.training.loop import train_and_evaluate
    from deepnorm.training.metrics import read_metrics

    config = decoder_lm.get_config("quick")
    config.model.update(d_model=16, d_ff=32, num_layers=2)
    config.train.update(num_steps=3, batch_size=4, seq_len=16, log_every=2, eval_every=3,
                        checkpoint_every=3, progress_bar=False, gns=True,
                        diagnostics="log_steps")
    train_and_evaluate(config, str(tmp_path))
    rows = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert np.isfinite(row["gns_trace"]) and np.isfinite(row["gns_grad_sq"])
        np.testing.assert_allclose(row["gns_b_simple"], row["gns_trace"] / row["gns_grad_sq"],
                                   rtol=1e-5)
        assert len(row["gns_b_simple_per_layer"]) == 2
