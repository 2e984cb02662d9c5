"""The simple gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018).

G is the true gradient and Sigma the covariance of one example's gradient. With per-example
gradients g_1..g_B of one batch whose mean is the batch gradient G_B,

    E |g_b|^2 = |G|^2 + tr(Sigma)        E |G_B|^2 = |G|^2 + tr(Sigma) / B,

so the two-batch-size estimators of McCandlish et al. (their appendix A, with B_small = 1 and
B_big = B) are unbiased for each quantity:

    |G|^2     ~  (B |G_B|^2 - mean_b |g_b|^2) / (B - 1)
    tr(Sigma) ~  (mean_b |g_b|^2 - |G_B|^2) * B / (B - 1).

Their ratio is not unbiased and is noisy from one batch; averages over steps or batches should
average the two estimates separately and then divide (Gray et al. 2024 take exponential moving
averages of each). Everything here works element-wise, so per-layer vectors go through as they
are.

What an *example* is: the training loss is the mean over the batch's real tokens, L = sum of
token losses / N. Example b's gradient is defined as g_b = B * dL_b, where dL_b is example b's
share of dL/dtheta (its tokens' summed loss gradients / N). Then mean_b g_b = dL/dtheta = G_B
exactly, with or without padding; with the same number of real tokens in every example g_b is
the gradient of the example's own mean token loss.
"""

from __future__ import annotations

import jax.numpy as jnp


def estimates(example_sq_sum, batch_sq, batch_size: int):
    """(|G|^2, tr(Sigma)) estimates from sum_b |g_b|^2 and |G_B|^2 of one batch of B examples
    (arrays of any shape, element-wise)."""
    b = batch_size
    if b < 2:
        raise ValueError(f"the noise scale needs at least 2 examples per batch, got {b}")
    small = jnp.asarray(example_sq_sum, jnp.float32) / b  # mean_b |g_b|^2: batch size 1
    big = jnp.asarray(batch_sq, jnp.float32)  # |G_B|^2: batch size B
    grad_sq = (b * big - small) / (b - 1)
    trace = (small - big) * b / (b - 1)
    return grad_sq, trace


def b_simple(trace, grad_sq):
    """tr(Sigma) / |G|^2: the batch size at which the gradient's noise equals its signal."""
    return jnp.asarray(trace) / jnp.asarray(grad_sq)


def from_shares(share_sq_sum, batch_sq, batch_size: int):
    """``estimates`` from the per-example *shares* dL_b of a mean loss (g_b = B dL_b):
    sum_b |dL_b|^2 and |G_B|^2 = |sum_b dL_b|^2."""
    return estimates(jnp.asarray(share_sq_sum, jnp.float32) * batch_size ** 2, batch_sq,
                     batch_size)
