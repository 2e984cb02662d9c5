"""Does the norm layers' gradient noise scale predict the whole model's? (Gray et al. 2024)

Gray et al. ("Normalization Layer Per-Example Gradients are Sufficient to Predict Gradient
Noise Scale in Transformers", 2024) find that the simple noise scale B_simple = tr(Sigma) /
|G|^2 (McCandlish et al. 2018) measured on the LayerNorm parameters alone tracks that of the
whole model through training, so the per-example gradients the LayerNorm backward pass has for
free are enough to monitor it. Here both sides are measured on this codebase's models:

* **full**: per-example gradients of *every* parameter by ``jax.vmap(jax.grad)`` over the
  examples (exact, affordable on a small model);
* **norms**: the norm parameters' per-example gradients from the probes the training step uses
  (``deepnorm.norm_probes``), i.e. what ``train.gns=True`` logs.

Each side's |G|^2 and tr(Sigma) come from the unbiased estimators of
``deepnorm.training.noise_scale`` per measured batch, averaged over the batches, then divided
(a ratio of means; a per-batch ratio would be biased and noisy). Example b's gradient is
B times its share of the mean-over-tokens loss's gradient (the definition the training step
uses), so the batch gradient is the mean of the per-example ones.

The models train with the training package's step (``make_train_step`` with
``make_optimizer``'s optimizer) and are measured at a few checkpoints along the run, for each
residual scheme.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deepnorm import norm_probes
from deepnorm.analysis import schemes as schemes_lib
from deepnorm.analysis.batches import first
from deepnorm.analysis.params import init_params
from deepnorm.analysis.train_steps import seed_states
from deepnorm.training import noise_scale
from deepnorm.training.loss import cross_entropy, model_forward
from deepnorm.training.optim import make_optimizer
from deepnorm.training.steps import make_train_step


def batch_sums(graphdef, params, batch) -> dict[str, jax.Array]:
    """For one batch: sum_b |dL_b|^2 (``*_share_sq``) and |G_B|^2 (``*_batch_sq``) over all
    parameters (``full_*``, by vmap over examples) and over the norm parameters (``norms_*``,
    by the probes), dL_b being example b's share of the mean loss's gradient; and ``loss``."""
    denom = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)

    def share_loss(p, example):
        one = jax.tree.map(lambda x: x[None], example)
        logits, _ = model_forward(nnx.merge(graphdef, p), one)
        return cross_entropy(logits, one["targets"], one["weights"])[0] / denom

    shares = jax.vmap(jax.grad(share_loss), in_axes=(None, 0))(params, batch)
    full_share_sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(shares))
    full_batch_sq = optax.tree.norm(jax.tree.map(lambda g: jnp.sum(g, axis=0), shares),
                                    squared=True)

    def probed_loss(probes):
        model = nnx.merge(graphdef, params)
        norm_probes.attach_probes(model, probes)
        logits, _ = model_forward(model, batch)
        return cross_entropy(logits, batch["targets"], batch["weights"])[0] / denom

    size = batch["inputs"].shape[0]
    loss, probe_grads = jax.value_and_grad(probed_loss)(
        norm_probes.zero_probes(nnx.merge(graphdef, params), size))
    _, norms_share_sq = norm_probes.example_sq_norm_sums(probe_grads)
    _, norms_batch_sq = norm_probes.per_layer_sq_norms(
        norm_probes.summed_over_examples(probe_grads))
    return {"full_share_sq": full_share_sq, "full_batch_sq": full_batch_sq,
            "norms_share_sq": norms_share_sq, "norms_batch_sq": norms_batch_sq, "loss": loss}


def summarize(sums: dict, batch_size: int) -> dict[str, float]:
    """``batch_sums`` of K batches ([K] arrays) -> |G|^2, tr(Sigma) (means over the batches)
    and B_simple (their ratio) for ``full`` and ``norms``, and the mean loss."""
    out = {"loss": float(np.mean(sums["loss"]))}
    for side in ("full", "norms"):
        grad_sq, trace = noise_scale.from_shares(sums[f"{side}_share_sq"],
                                                 sums[f"{side}_batch_sq"], batch_size)
        grad_sq, trace = float(jnp.mean(grad_sq)), float(jnp.mean(trace))
        out.update({f"grad_sq_{side}": grad_sq, f"trace_{side}": trace,
                    f"b_simple_{side}": trace / grad_sq})
    return out


def measure(cfg, *, seeds, batches, train_batches, num_steps: int, checkpoints,
            opt_config, scheme: str | None = None) -> list[dict]:
    """Records {residual, num_layers, seed, step, loss, b_simple_full, b_simple_norms,
    grad_sq_*, trace_*} at each step in ``checkpoints`` (0 = initialization) of a
    ``num_steps`` run on the stacked ``train_batches`` (cycled); ``batches`` (stacked, [K, B,
    ...]) are the measured ones, kept out of training."""
    seeds = list(seeds)
    graphdef, params = init_params(cfg, seeds, first(train_batches))
    tx, _ = make_optimizer(opt_config, num_steps)
    train_step = make_train_step(graphdef, tx, diagnostics=False,
                                 label_smoothing=float(opt_config.label_smoothing))
    batches = jax.tree.map(jnp.asarray, batches)
    train_batches = jax.tree.map(jnp.asarray, train_batches)
    num_train = jax.tree.leaves(train_batches)[0].shape[0]
    batch_size = jax.tree.leaves(batches)[0].shape[1]

    @jax.jit
    def sums_of(params_S):
        per_seed = lambda p: jax.lax.map(lambda b: batch_sums(graphdef, p, b), batches)  # noqa: E731
        return jax.vmap(per_seed)(params_S)

    @jax.jit
    def train(state_S, start, stop):
        """Steps start .. stop - 1 of every seed; traced bounds (a while loop), so one
        compilation serves every segment between checkpoints."""
        def step(t, s):
            return train_step(s, jax.tree.map(lambda x: x[t % num_train], train_batches))[0]

        return jax.vmap(lambda s: jax.lax.fori_loop(start, stop, step, s))(state_S)

    state = seed_states(params, seeds, tx)
    name, depth = scheme or cfg.residual, schemes_lib.depth_of(cfg)
    records, done = [], 0
    for step in sorted(set(checkpoints)):
        if step > done:
            state = train(state, jnp.asarray(done), jnp.asarray(step))
            done = step
        sums = jax.device_get(sums_of(state.params))
        for i, seed in enumerate(seeds):
            row = summarize({k: v[i] for k, v in sums.items()}, batch_size)
            records.append({"residual": name, "num_layers": depth, "seed": seed, "step": step,
                            **row})
    return records


def run(base_cfg, *, schemes, depths, seeds, batches, train_batches, num_steps, checkpoints,
        opt_config, log=print) -> list[dict]:
    """``measure`` for every scheme x depth."""
    records = []
    for scheme in schemes:
        for depth in depths:
            cfg = schemes_lib.scheme_config(base_cfg, scheme, depth)
            start = time.perf_counter()
            records += measure(cfg, seeds=seeds, batches=batches, train_batches=train_batches,
                               num_steps=num_steps, checkpoints=checkpoints,
                               opt_config=opt_config, scheme=scheme)
            log(f"gns {scheme} L={depth}: {time.perf_counter() - start:.1f}s")
    return records
