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


def loss_fn(model: Transformer, batch, *, label_smoothing: float = 0.0, deterministic=True,
            dropout_key=None):
    """Mean weighted cross-entropy of ``model`` on ``batch``; returns (loss, aux).

    ``aux`` is the model's statistics plus ``"num_tokens"`` (the weight sum) and ``"nll"`` (the
    unsmoothed loss, what eval perplexity is computed from).
    """
    logits, aux = model_forward(model, batch, deterministic=deterministic,
                                dropout_key=dropout_key)
    total, count = cross_entropy(logits, batch["targets"], batch["weights"], label_smoothing)
    denom = jnp.maximum(count, 1.0)
    aux = dict(aux, num_tokens=count)
    if label_smoothing:
        nll, _ = cross_entropy(logits, batch["targets"], batch["weights"])
        aux["nll"] = nll / denom
    else:
        aux["nll"] = total / denom
    return total / denom, aux
