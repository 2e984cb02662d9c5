"""The pure train and eval steps: ``train_step(state, batch) -> (state, metrics)``.

Both are plain functions of pytrees (jit them with shardings in the loop, or call them eagerly
in a test). The diagnostics are cheap because depth is an array axis: a per-layer norm of the
gradients or the updates is one reduction over every axis but the leading layer axis
(``deepnorm.layerwise``), and the activation norms come out of the model's scan for free.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from deepnorm import layerwise
from deepnorm.training.loss import cross_entropy, loss_fn, model_forward
from deepnorm.training.state import TrainState


def activation_norm_per_layer(aux) -> jax.Array:
    """Mean token L2 norm of the residual stream leaving each layer, encoder then decoder: [N+M].

    ``stream_out_norm[:, -1]`` is the stream after a layer's last sublayer, i.e. the layer's
    output (for Post-LN / DeepNorm that is after the norm; for Pre-LN the raw growing stream).
    """
    return jnp.concatenate([aux[s]["stream_out_norm"][:, -1]
                            for s in layerwise.STACKS if s in aux])


def make_train_step(graphdef, tx, *, label_smoothing: float = 0.0, diagnostics: bool = True,
                    skip_nonfinite: bool = False):
    """Returns ``train_step(state, batch) -> (new_state, metrics)``.

    ``metrics`` (all scalars unless noted): ``loss`` (the optimized, label-smoothed loss),
    ``nll`` (unsmoothed), ``grad_norm`` (before clipping), ``update_norm``, ``param_norm``,
    ``num_tokens``, ``finite`` (1 if loss and gradients are finite) and, with ``diagnostics``,
    ``grad_norm_per_layer``, ``update_norm_per_layer``, ``activation_norm_per_layer`` [N+M].

    ``skip_nonfinite``: when the loss or the gradient is not finite, return the old params and
    optimizer state unchanged (the step counter still advances, as the data did); the caller
    counts ``finite == 0`` steps. Without it the non-finite update is applied and the caller
    stops the run.
    """

    def train_step(state: TrainState, batch):
        dropout_key = jax.random.fold_in(state.rng, state.step)

        def objective(params):
            model = nnx.merge(graphdef, params)
            return loss_fn(model, batch, label_smoothing=label_smoothing, deterministic=False,
                           dropout_key=dropout_key)

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(  # noqa: E731
                lambda n, o: jnp.where(finite, n, o), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        metrics = {
            "loss": loss,
            "nll": aux["nll"],
            "grad_norm": grad_norm,
            "update_norm": optax.tree.norm(updates),
            "param_norm": optax.tree.norm(params),
            "num_tokens": aux["num_tokens"],
            "finite": finite.astype(jnp.int32),
        }
        if diagnostics:
            metrics["grad_norm_per_layer"] = layerwise.per_layer_norm(grads)
            metrics["update_norm_per_layer"] = layerwise.per_layer_norm(updates)
            metrics["activation_norm_per_layer"] = activation_norm_per_layer(aux)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(graphdef):
    """Returns ``eval_step(params, batch) -> metrics`` with the unsmoothed token cross-entropy:
    ``nll_sum`` and ``num_tokens`` (sums, so batches combine exactly) and their ratio ``loss``."""

    def eval_step(params, batch):
        model = nnx.merge(graphdef, params)
        logits, _ = model_forward(model, batch, deterministic=True)
        total, count = cross_entropy(logits, batch["targets"], batch["weights"])
        return {"nll_sum": total, "num_tokens": count, "loss": total / jnp.maximum(count, 1.0)}

    return eval_step
