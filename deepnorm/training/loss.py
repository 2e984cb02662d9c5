"""The training objective shared by train.py, the analysis code and the benchmarks.

Batches are dicts of arrays (see ``deepnorm.data``): ``inputs`` [B, T], ``targets`` [B, T'],
``weights`` [B, T'] and, for encoder_decoder, ``decoder_inputs`` [B, T'].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

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


def model_forward(model: Transformer, batch, *, deterministic=True, dropout_key=None):
    """Runs the model on a batch of any architecture: (logits, aux)."""
    return model(batch["inputs"], batch.get("decoder_inputs"), deterministic=deterministic,
                 dropout_key=dropout_key)


def loss_sums(model: Transformer, batch, *, label_smoothing: float = 0.0, deterministic=True,
              dropout_key=None):
    """Summed weighted cross-entropy of ``model`` on ``batch``: (loss_sum, nll_sum, aux).

    Sums, so that micro-batches of one batch combine exactly (gradient accumulation divides
    by the whole batch's token count, which is known before any forward pass). ``nll_sum`` is
    the unsmoothed sum; ``aux`` is the model's statistics plus ``"num_tokens"``.
    """
    logits, aux = model_forward(model, batch, deterministic=deterministic,
                                dropout_key=dropout_key)
    total, count = cross_entropy(logits, batch["targets"], batch["weights"], label_smoothing)
    nll = cross_entropy(logits, batch["targets"], batch["weights"])[0] if label_smoothing else total
    return total, nll, dict(aux, num_tokens=count)


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
