"""Model update norms in early training (Wang et al. 2022, DeepNet, Fig. 4-5).

DeepNet measures how far the model's output moves from its initial value after t updates on a
fixed input x: ||dF|| = ||F(x, theta_t) - F(x, theta_0)||. Its Fig. 5 trains tiny 64-128-2
encoder-decoders (d_model-d_ff-heads) from 6L-6L to 100L-100L with Adam: Post-LN's update
grows with depth and explodes early in training, DeepNorm's stays nearly constant, which is
the instability Theorem 4.2 bounds by a sum over sublayers divided by alpha.

Here F is the model's output, the logits [B, T, V]; ||dF|| is the L2 norm over the vocabulary
of each position's change, averaged over the batch's positions (so it does not grow with B or
T). Seeds are vmapped; the steps are one ``lax.scan`` of the training package's train step
that evaluates F after every update.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import nnx

from deepnorm.analysis import schemes as schemes_lib
from deepnorm.analysis.batches import first
from deepnorm.analysis.params import init_params
from deepnorm.analysis.train_steps import scan_steps, seed_states
from deepnorm.training.loss import model_forward
from deepnorm.training.optim import make_optimizer
from deepnorm.training.steps import make_train_step


def output_change(logits_a, logits_b, weights=None):
    """Mean over positions of ||logits_a - logits_b||_2 over the vocabulary."""
    per_position = jnp.linalg.norm(logits_a - logits_b, axis=-1)
    if weights is None:
        return jnp.mean(per_position)
    return jnp.sum(per_position * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def measure(cfg, *, seeds, batches, probe, num_steps: int, opt_config,
            scheme: str | None = None) -> list[dict]:
    """Records {residual, num_layers, seed, step, update_norm} for steps 0..num_steps.

    Each seed trains with the training package's train step and ``opt_config``'s optimizer on
    the stacked ``batches`` (cycled); ``probe`` is the fixed input x (one batch, kept out of
    training). Step 0 is the initialization (update norm 0). A diverged run shows as NaN / inf.
    """
    seeds = list(seeds)
    graphdef, params = init_params(cfg, seeds, first(batches))
    probe = jax.tree.map(jnp.asarray, probe)
    tx, _ = make_optimizer(opt_config, num_steps)
    train_step = make_train_step(graphdef, tx, diagnostics=False,
                                 label_smoothing=float(opt_config.label_smoothing),
                                 z_loss=float(opt_config.get("z_loss", 0.0)))

    def output(p):
        logits, _ = model_forward(nnx.merge(graphdef, p), probe)
        return logits

    def one_seed(state, b):
        out0 = output(state.params)
        # For the decoder of a causal or seq2seq model every target position is an output.
        record = lambda p: output_change(output(p), out0)  # noqa: E731
        return scan_steps(train_step, state, b, num_steps, record=record)[1]

    norms_SxT = jax.device_get(jax.jit(jax.vmap(one_seed, in_axes=(0, None)))(
        seed_states(params, seeds, tx), jax.tree.map(jnp.asarray, batches)))
    name = scheme or cfg.residual
    depth = schemes_lib.depth_of(cfg)
    records = []
    for s, seed in enumerate(seeds):
        records.append({"residual": name, "num_layers": depth, "seed": seed, "step": 0,
                        "update_norm": 0.0})
        for t in range(num_steps):
            records.append({"residual": name, "num_layers": depth, "seed": seed,
                            "step": t + 1, "update_norm": float(norms_SxT[s, t])})
    return records


def run(base_cfg, *, schemes, depths, seeds, batches, probe, num_steps, opt_config,
        log=print) -> list[dict]:
    """``measure`` for every scheme x depth."""
    records = []
    for scheme in schemes:
        for depth in depths:
            cfg = schemes_lib.scheme_config(base_cfg, scheme, depth)
            start = time.perf_counter()
            records += measure(cfg, seeds=seeds, batches=batches, probe=probe,
                               num_steps=num_steps, opt_config=opt_config,
                               scheme=scheme)
            log(f"update-norms {scheme} L={depth}: {time.perf_counter() - start:.1f}s")
    return records
