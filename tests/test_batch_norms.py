"""BatchNorm and PowerNorm (deepnorm.batch_norms) against NumPy references of their equations.

BatchNorm (Ioffe & Szegedy 2015): per-feature mean and variance over the batch's real tokens,
running statistics by momentum. PowerNorm (Shen et al. 2020, Algorithm 1): normalization by the
running quadratic mean psi_{t-1}^2 (no mean subtraction), psi_t^2 = psi_{t-1}^2 +
(1 - alpha)(psi_B^2 - psi_{t-1}^2), and the approximate backward g' = g - nu x_hat,
dL/dx = g' / psi_{t-1}, nu_t = nu_{t-1} + (1 - alpha) mean(x_hat g').
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepnorm.batch_norms import BatchContext, BatchNorm, PowerNorm, add_backward_updates

B, T, D = 3, 5, 8
EPS = 1e-5
ALPHA = 0.9


def _batch(seed, mask_seed=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, (B, T, D)).astype(np.float32)
    lengths = rng.integers(1, T + 1, B) if mask_seed is None else np.array([T, 3, 1])
    mask = np.arange(T)[None, :] < lengths[:, None]
    return x, mask


def _set_affine(norm, seed=7):
    rng = np.random.default_rng(seed)
    norm.scale[...] = jnp.asarray(rng.normal(1.0, 0.3, D), jnp.float32)
    norm.bias[...] = jnp.asarray(rng.normal(0.0, 0.3, D), jnp.float32)
    return np.asarray(norm.scale[...]), np.asarray(norm.bias[...])


def test_batchnorm_train_forward_and_running_update_match_numpy():
    norm = BatchNorm(D, eps=EPS, momentum=ALPHA)
    g, b = _set_affine(norm)
    mean_run, var_run = np.zeros(D), np.ones(D)
    for step in range(3):
        x, mask = _batch(step)
        y = np.asarray(norm(jnp.asarray(x), BatchContext(jnp.asarray(mask), train=True)))
        real = x[mask]  # [n, D]: the real tokens only
        mu, var = real.mean(0), real.var(0)
        np.testing.assert_allclose(y, g * (x - mu) / np.sqrt(var + EPS) + b, rtol=1e-5, atol=1e-5)
        n = real.shape[0]
        mean_run = ALPHA * mean_run + (1 - ALPHA) * mu
        var_run = ALPHA * var_run + (1 - ALPHA) * var * n / (n - 1)  # unbiased, as torch
        np.testing.assert_allclose(norm.mean[...], mean_run, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(norm.var[...], var_run, rtol=1e-5, atol=1e-6)


def test_batchnorm_eval_uses_running_statistics():
    norm = BatchNorm(D, eps=EPS)
    g, b = _set_affine(norm)
    rng = np.random.default_rng(3)
    mean, var = rng.normal(0, 1, D), rng.uniform(0.5, 2.0, D)
    norm.mean[...], norm.var[...] = jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32)
    x, mask = _batch(0)
    want = g * (x - mean) / np.sqrt(var + EPS) + b
    for ctx in (None, BatchContext(jnp.asarray(mask), train=False)):
        np.testing.assert_allclose(norm(jnp.asarray(x), ctx), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.mean[...], mean, rtol=1e-6)  # eval updates nothing


def _psi2_reference(batches, warmup):
    """psi^2 used by each step's forward pass, and after the last step."""
    psi2, used = np.ones(D), []
    for t, (x, mask) in enumerate(batches):
        batch = (x[mask] ** 2).mean(0)
        if t < warmup:  # warmup: normalize by the batch; running = average of batches so far
            used.append(batch)
            psi2 = psi2 + (batch - psi2) / (t + 1)
        else:
            used.append(psi2)
            psi2 = psi2 + (1 - ALPHA) * (batch - psi2)
    return used, psi2


@pytest.mark.parametrize("warmup", [0, 2])
def test_powernorm_forward_and_running_update_match_numpy(warmup):
    norm = PowerNorm(D, eps=EPS, momentum=ALPHA, warmup=warmup)
    g, b = _set_affine(norm)
    batches = [_batch(s) for s in range(4)]
    used, _ = _psi2_reference(batches, warmup)
    for t, (x, mask) in enumerate(batches):
        y = norm(jnp.asarray(x), BatchContext(jnp.asarray(mask), train=True))
        np.testing.assert_allclose(y, g * x / np.sqrt(used[t] + EPS) + b, rtol=1e-5, atol=1e-5)
        _, after = _psi2_reference(batches[:t + 1], warmup)
        np.testing.assert_allclose(norm.psi2[...], after, rtol=1e-5)
        assert float(norm.count[...]) == t + 1
    # Eval: the running quadratic mean.
    x, _ = batches[0]
    np.testing.assert_allclose(norm(jnp.asarray(x)), g * x / np.sqrt(after + EPS) + b,
                               rtol=1e-5, atol=1e-5)


def _grads(norm, x, mask, cot):
    """Gradients of sum(cot * norm(x)) w.r.t. x, the params and the batch statistics."""
    graphdef, params, stats = nnx.split(norm, nnx.Param, nnx.BatchStat)

    def loss(x, params, stats):
        m = nnx.merge(graphdef, params, stats)
        return jnp.sum(cot * m(x, BatchContext(mask, train=True)))

    return jax.grad(loss, argnums=(0, 1, 2))(x, params, stats)


def test_powernorm_backward_is_the_papers_approximate_gradient():
    norm = PowerNorm(D, eps=EPS, momentum=ALPHA)
    g, _ = _set_affine(norm)
    rng = np.random.default_rng(11)
    psi2, nu = rng.uniform(0.5, 3.0, D), rng.normal(0.0, 0.5, D)
    norm.psi2[...], norm.nu[...] = jnp.asarray(psi2, jnp.float32), jnp.asarray(nu, jnp.float32)
    x, mask = _batch(5, mask_seed=1)
    cot = rng.normal(0, 1, (B, T, D)).astype(np.float32)
    dx, dparams, dstats = _grads(norm, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(cot))
    # By hand (Algorithm 1), at real tokens; padding gets the plain g / psi (no correction).
    m = mask[..., None].astype(np.float32)
    x_hat = x / np.sqrt(psi2 + EPS)
    grad_xhat = cot * g
    grad_prime = grad_xhat - m * nu * x_hat
    np.testing.assert_allclose(dx, grad_prime / np.sqrt(psi2 + EPS), rtol=1e-5, atol=1e-6)
    gamma = (m * x_hat * grad_prime).sum((0, 1)) / m.sum()
    np.testing.assert_allclose(dstats["nu"], (1 - ALPHA) * gamma, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dstats["psi2"], 0.0)
    np.testing.assert_allclose(dparams["scale"], (cot * x_hat).sum((0, 1)), rtol=1e-5)
    np.testing.assert_allclose(dparams["bias"], cot.sum((0, 1)), rtol=1e-5)
    # The step's new nu: the forward pass leaves it, the backward adds (1 - alpha) Gamma.
    new = add_backward_updates(nnx.to_pure_dict(nnx.state(norm, nnx.BatchStat)),
                               nnx.to_pure_dict(dstats))
    np.testing.assert_allclose(new["nu"], nu + (1 - ALPHA) * gamma, rtol=1e-5, atol=1e-6)
    # ...and differs from the exact gradient of x / psi (a constant psi): the correction acts.
    assert np.abs(np.asarray(dx) - grad_xhat / np.sqrt(psi2 + EPS)).max() > 1e-2


def test_batchnorm_backward_is_the_exact_gradient_and_stats_get_none():
    norm = BatchNorm(D, eps=EPS)
    x, mask = _batch(2, mask_seed=1)
    # No loss at padding (as in the model): padding outputs also depend on the statistics.
    cot = np.random.default_rng(1).normal(0, 1, (B, T, D)).astype(np.float32) * mask[..., None]
    dx, _, dstats = _grads(norm, jnp.asarray(x), jnp.asarray(mask), jnp.asarray(cot))
    # Standard BN backward over the n real tokens: (g - mean(g) - x_hat mean(g x_hat)) / sigma.
    real, c = x[mask], (cot * np.asarray(norm.scale[...]))[mask]
    mu, var = real.mean(0), real.var(0)
    x_hat = (real - mu) / np.sqrt(var + EPS)
    want = (c - c.mean(0) - x_hat * (c * x_hat).mean(0)) / np.sqrt(var + EPS)
    np.testing.assert_allclose(np.asarray(dx)[mask], want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx)[~mask], 0.0, atol=1e-7)
    for leaf in jax.tree.leaves(dstats):
        np.testing.assert_allclose(leaf, 0.0)


@pytest.mark.parametrize("cls", [BatchNorm, PowerNorm])
def test_padding_changes_neither_statistics_nor_real_outputs(cls):
    x, mask = _batch(4, mask_seed=1)
    cot = np.random.default_rng(2).normal(0, 1, (B, T, D)).astype(np.float32) * mask[..., None]
    # The same batch with 3 more padding positions of garbage, and garbage at its own padding.
    garbage = np.random.default_rng(9).normal(5.0, 10.0, (B, T + 3, D)).astype(np.float32)
    mask_p = np.concatenate([mask, np.zeros((B, 3), bool)], axis=1)
    x_p = np.where(mask_p[..., None], np.pad(x, ((0, 0), (0, 3), (0, 0))), garbage)
    cot_p = np.where(mask_p[..., None], np.pad(cot, ((0, 0), (0, 3), (0, 0))), 0.0)
    outs = []
    for xs, ms, cs in ((x, mask, cot), (x_p, mask_p, cot_p)):
        norm = cls(D, eps=EPS)
        if cls is PowerNorm:
            norm.nu[...] = jnp.full((D,), 0.3)
        y = norm(jnp.asarray(xs), BatchContext(jnp.asarray(ms), train=True))
        dx, _, dstats = _grads(cls(D, eps=EPS), jnp.asarray(xs), jnp.asarray(ms),
                               jnp.asarray(cs))
        outs.append((np.asarray(y)[ms], nnx.to_pure_dict(nnx.state(norm, nnx.BatchStat)),
                     np.asarray(dx)[ms], nnx.to_pure_dict(dstats)))
    (y0, s0, dx0, ds0), (y1, s1, dx1, ds1) = outs
    np.testing.assert_allclose(y1, y0, rtol=1e-6)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s1, s0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8), ds1, ds0)
