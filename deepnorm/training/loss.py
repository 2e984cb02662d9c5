"""The training objective shared by train.py, the analysis code and the benchmarks.

Batches are dicts of arrays (see ``deepnorm.data``): ``inputs`` [B, T], ``targets`` [B, T'],
``weights`` [B, T'] and, for encoder_decoder, ``decoder_inputs`` [B, T'].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from deepnorm.training.diagnostics import output_logit_stats
from deepnorm.transformer import Transformer


def cross_entropy(logits_BxTxV, targets_BxT, weights_BxT, label_smoothing: float = 0.0):
    """Weighted token cross-entropy; returns (sum of losses, sum of weights).

    Sums rather than means, so that gradient accumulation and cross-device reduction stay
    exact; the caller divides.
    """
    vocab = logits_BxTxV.shape[-1]
    if label_smoothing:
        labels = optax.smooth_labels(jax.nn.one_hot(targets_BxT, vocab), label_smoothing)
        per_token = optax.softmax_cross_entropy(logits_BxTxV, labels)
    else:
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, targets_BxT)
    weights = weights_BxT.astype(jnp.float32)
    return jnp.sum(per_token * weights), jnp.sum(weights)


def model_forward(model: Transformer, batch, *, deterministic=True, dropout_key=None,
                  extra_stats=()):
    """Runs the model on a batch of any architecture: (logits, aux)."""
    return model(batch["inputs"], batch.get("decoder_inputs"), deterministic=deterministic,
                 dropout_key=dropout_key, extra_stats=extra_stats)


def z_loss_sum(log_z_BxT, weights_BxT, coefficient: float):
    """PaLM's auxiliary z-loss (Chowdhery et al. 2022), summed over the weighted tokens:
    ``coefficient * sum_t w_t * log(Z_t)^2`` with Z_t the softmax normalizer of token t's
    logits. It pulls log Z towards 0, so the logits cannot drift upwards together."""
    return coefficient * jnp.sum(weights_BxT.astype(jnp.float32) * jnp.square(log_z_BxT))


def loss_sums(model: Transformer, batch, *, label_smoothing: float = 0.0, deterministic=True,
              dropout_key=None, z_loss: float = 0.0, extra_stats=(),
              logit_stats: bool = False):
    """Summed weighted cross-entropy of ``model`` on ``batch``: (loss_sum, nll_sum, aux).

    Sums, so that micro-batches of one batch combine exactly (gradient accumulation divides
    by the whole batch's token count, which is known before any forward pass). ``nll_sum`` is
    the unsmoothed sum; ``aux`` is the model's statistics plus ``"num_tokens"``.
    ``z_loss`` > 0 adds ``z_loss_sum`` to ``loss_sum`` (not to ``nll_sum``) and reports it as
    ``aux["z_loss"]``; ``extra_stats`` goes to the model; ``logit_stats`` adds the
    ``output_logit_*`` statistics (``deepnorm.training.diagnostics.output_logit_stats``).
    """
    logits, aux = model_forward(model, batch, deterministic=deterministic,
                                dropout_key=dropout_key, extra_stats=extra_stats)
    total, count = cross_entropy(logits, batch["targets"], batch["weights"], label_smoothing)
    nll = cross_entropy(logits, batch["targets"], batch["weights"])[0] if label_smoothing else total
    aux = dict(aux, num_tokens=count)
    if z_loss or logit_stats:
        log_z = jax.nn.logsumexp(logits, axis=-1)
    if z_loss:
        aux["z_loss"] = z_loss_sum(log_z, batch["weights"], z_loss)
        total = total + aux["z_loss"]
    if logit_stats:
        aux.update(output_logit_stats(logits, log_z, batch["weights"]))
    return total, nll, aux


def loss_fn(model: Transformer, batch, *, label_smoothing: float = 0.0, deterministic=True,
            dropout_key=None):
    """Mean weighted cross-entropy of ``model`` on ``batch``; returns (loss, aux).

    ``aux`` is the model's statistics plus ``"num_tokens"`` (the weight sum) and ``"nll"`` (the
    unsmoothed loss, what eval perplexity is computed from).
    """
    total, nll, aux = loss_sums(model, batch, label_smoothing=label_smoothing,
                                deterministic=deterministic, dropout_key=dropout_key)
    denom = jnp.maximum(aux["num_tokens"], 1.0)
    aux["nll"] = nll / denom
    return total / denom, aux
