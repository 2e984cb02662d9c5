"""The pure train and eval steps: ``train_step(state, batch) -> (state, metrics)``.

Both are plain functions of pytrees (jit them with shardings in the loop, or call them eagerly
in a test). The diagnostics are cheap because depth is an array axis: a per-layer norm of the
gradients or the updates is one reduction over every axis but the leading layer axis
(``deepnorm.layerwise``), and the activation norms come out of the model's scan for free.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jmp
import optax
from flax import nnx

from deepnorm import layerwise
from deepnorm import norm_probes
from deepnorm import variables
from deepnorm.batch_norms import add_backward_updates
from deepnorm.config import ConfigError
from deepnorm.training import diagnostics as diagnostics_lib
from deepnorm.training import loss_scale as loss_scale_lib
from deepnorm.training import noise_scale
from deepnorm.training.loss import cross_entropy, loss_sums, model_forward
from deepnorm.training.loss import loss_fn  # noqa: F401  (steps.loss_fn, as before)
from deepnorm.training.state import TrainState


def activation_norm_per_layer(aux) -> jax.Array:
    """Mean token L2 norm of the residual stream leaving each layer, encoder then decoder: [N+M].

    ``stream_out_norm[:, -1]`` is the stream after a layer's last sublayer, i.e. the layer's
    output (for Post-LN / DeepNorm that is after the norm; for Pre-LN the raw growing stream).
    """
    return jnp.concatenate([aux[s]["stream_out_norm"][:, -1]
                            for s in layerwise.STACKS if s in aux])


def check_grad_accum(batch_size: int, grad_accum_steps, replicas: int = 1) -> None:
    """One-line errors unless the batch splits into ``grad_accum_steps`` equal micro-batches,
    each spread evenly over the ``replicas`` data-parallel devices."""
    k = grad_accum_steps
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise ConfigError(f"train.grad_accum_steps={k!r} must be a positive integer")
    if batch_size % k:
        raise ConfigError(f"train.batch_size={batch_size} is not divisible by "
                          f"train.grad_accum_steps={k}")
    if batch_size % (k * replicas):
        raise ConfigError(
            f"train.batch_size={batch_size} in train.grad_accum_steps={k} micro-batches of "
            f"{batch_size // k} does not split over the {replicas} data x fsdp devices; use a "
            f"multiple of {k * replicas}")


def split_micro_batches(batch, num_micro: int):
    """[B, ...] -> [num_micro, B / num_micro, ...]; micro-batch i holds examples i, i + k, ...

    Strided rather than contiguous: with the batch sharded over devices along B, each device's
    rows split into the k micro-batches locally (no example moves between devices), provided
    every device holds a multiple of k rows (``check_grad_accum``).
    """
    def split(x):
        b = x.shape[0]
        return jnp.moveaxis(x.reshape((b // num_micro, num_micro) + x.shape[1:]), 1, 0)
    return jax.tree.map(split, batch)


def noise_scale_metrics(norm_grads, example_sq_sums, batch_size: int) -> dict:
    """``gns_*`` metrics from the norm parameters' batch gradients and the per-example
    squared-norm sums of their shares of the mean loss (``deepnorm.norm_probes``)."""
    batch_layer, batch_total = norm_probes.per_layer_sq_norms(norm_grads)
    share_layer, share_total = example_sq_sums
    metrics = {}
    for suffix, shares, batch_sq in (("", share_total, batch_total),
                                     ("_per_layer", share_layer, batch_layer)):
        grad_sq, trace = noise_scale.from_shares(shares, batch_sq, batch_size)
        metrics.update({f"gns_grad_sq{suffix}": grad_sq, f"gns_trace{suffix}": trace,
                        f"gns_b_simple{suffix}": noise_scale.b_simple(trace, grad_sq)})
    return metrics


def make_train_step(graphdef, tx, *, label_smoothing: float = 0.0, diagnostics=True,
                    skip_nonfinite: bool = False, grad_accum_steps: int = 1,
                    loss_scale_period: int | None = None, z_loss: float = 0.0,
                    gns: bool = False):
    """Returns ``train_step(state, batch) -> (new_state, metrics)``.

    ``metrics`` (all scalars unless noted): ``loss`` (the optimized, label-smoothed loss,
    z-loss included), ``nll`` (unsmoothed), ``grad_norm`` (before clipping), ``update_norm``,
    ``param_norm``, ``num_tokens``, ``finite`` (1 if loss and gradients are finite) and the
    diagnostics groups ``diagnostics`` names (``deepnorm.training.diagnostics``: True is the
    ``norms`` group, ``grad_norm_per_layer``, ``update_norm_per_layer``,
    ``activation_norm_per_layer`` [N+M]; False none; or ``"all"``, a comma list, a set).
    A group left out is not computed at all (a static choice).

    ``z_loss`` > 0: PaLM's z-loss, ``z_loss * mean over tokens of log(Z)^2``, is added to the
    loss (``deepnorm.training.loss.z_loss_sum``) and reported as the metric ``z_loss``.

    ``skip_nonfinite``: when the loss or the gradient is not finite, return the old params and
    optimizer state unchanged (the step counter still advances, as the data did); the caller
    counts ``finite == 0`` steps. Without it the non-finite update is applied and the caller
    stops the run.

    ``grad_accum_steps`` = k > 1: the batch is split into k micro-batches run one after the
    other in a ``lax.scan`` (activation memory of one micro-batch); their gradients, each of
    the micro-batch's summed loss over the *whole* batch's token count, add up to the
    big-batch gradient, and one optimizer update follows. Dropout draws an independent key
    per micro-batch; the activation norms are the mean over the (equal-sized) micro-batches.

    ``loss_scale_period`` (float16 runs, ``deepnorm.training.loss_scale``): the loss is
    multiplied by ``state.loss_scale["scale"]`` before differentiation and the gradients
    divided by it; non-finite gradients halve the scale and skip the update (``overflow`` = 1
    in the metrics while the scale is above its floor, so the caller does not take it for a
    divergence), ``loss_scale_period`` finite steps in a row double it. The metrics gain
    ``loss_scale`` (the scale this step used) and ``overflow``.

    ``gns``: the simple gradient noise scale of the norm layers (Gray et al. 2024) from this
    batch, with per-example gradients of every norm parameter taken in the same backward pass
    (``deepnorm.norm_probes``; estimators in ``deepnorm.training.noise_scale``): ``gns_grad_sq``
    (|G|^2), ``gns_trace`` (tr Sigma) and ``gns_b_simple`` (their ratio) over all norms, and the
    same per layer as ``gns_*_per_layer`` [N+M]. Needs a batch of at least 2 examples.

    Batch-statistics norms (``state.batch_stats`` not None): the forward pass trains them
    (batch statistics of the real tokens, running statistics updated) and the new state holds
    the updated running statistics: the forward pass's updates plus the backward pass's, which
    come out as the statistics' cotangents (``deepnorm.batch_norms``; PowerNorm's nu). A step
    dropped as non-finite keeps the old ones. ``grad_accum_steps`` > 1 is refused with them:
    each micro-batch would be a batch of its own for the statistics.
    """
    scaling = loss_scale_period is not None
    groups = diagnostics_lib.resolve_groups(diagnostics)
    extra_stats = groups & diagnostics_lib.MODEL_GROUPS

    def train_step(state: TrainState, batch):
        if state.batch_stats is not None and grad_accum_steps > 1:
            raise ConfigError(f"train.grad_accum_steps={grad_accum_steps} with batch-statistics "
                              "norms (model.norm batchnorm / powernorm) is not supported: use 1")
        dropout_key = jax.random.fold_in(state.rng, state.step)
        scaler = (loss_scale_lib.from_state(state.loss_scale, loss_scale_period) if scaling
                  else jmp.NoOpLossScale())
        # The whole batch's token count, known before the forward pass: every micro-batch's
        # summed loss is divided by it, so the micro-batch gradients simply add up.
        num_tokens = jnp.sum(batch["weights"].astype(jnp.float32))
        denom = jnp.maximum(num_tokens, 1.0)

        def objective(params, probes, batch_stats, micro_batch, key):
            model = variables.merge(graphdef, params, batch_stats)
            if probes is not None:
                norm_probes.attach_probes(model, probes)
            total, nll, aux = loss_sums(model, micro_batch, label_smoothing=label_smoothing,
                                        deterministic=False, dropout_key=key, z_loss=z_loss,
                                        extra_stats=extra_stats,
                                        logit_stats="logits" in groups)
            loss = total / denom
            z = aux.pop("z_loss", jnp.zeros(())) / denom
            new_stats = None if batch_stats is None else variables.batch_stats(model)
            return scaler.scale(loss), ((loss, nll / denom, z), aux, new_stats)

        # The batch statistics are differentiated only to collect the updates their backward
        # pass returns as cotangents; the loss does not depend on them otherwise.
        value_and_grads = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)
        micro_size = batch["inputs"].shape[0] // grad_accum_steps
        probes = (norm_probes.zero_probes(
            variables.merge(graphdef, state.params, state.batch_stats), micro_size)
                  if gns else None)

        def grad_fn(micro_batch, key):
            """((loss, nll, z), aux), grads and, with ``gns``, the norm statistics that add up
            over micro-batches: batch gradients of the norm parameters and the per-example
            squared-norm sums, unscaled like the gradients."""
            (_, (sums, aux, new_stats)), (grads, probe_grads, stat_cots) = value_and_grads(
                state.params, probes, state.batch_stats, micro_batch, key)
            if new_stats is not None:
                aux = dict(aux, batch_stats=add_backward_updates(
                    new_stats, scaler.unscale(stat_cots)))
            if not gns:
                return (sums, aux), grads, None
            probe_grads = scaler.unscale(probe_grads)
            return (sums, aux), grads, (norm_probes.summed_over_examples(probe_grads),
                                        norm_probes.example_sq_norm_sums(probe_grads))

        if grad_accum_steps == 1:
            ((loss, nll, z), aux), grads, norm_stats = grad_fn(batch, dropout_key)
        else:
            def accumulate(carry, xs):
                index, micro_batch = xs
                (sums, aux), grads, stats = grad_fn(
                    micro_batch, jax.random.fold_in(dropout_key, index))
                return jax.tree.map(jnp.add, carry, (sums, grads, stats)), aux

            # The norm statistics of zero probe gradients: zeros of the right shapes.
            zero_stats = (None if not gns else (norm_probes.summed_over_examples(probes),
                                                norm_probes.example_sq_norm_sums(probes)))
            zeros = ((jnp.zeros(()),) * 3, jax.tree.map(jnp.zeros_like, state.params),
                     zero_stats)
            ((loss, nll, z), grads, norm_stats), auxs = jax.lax.scan(
                accumulate, zeros,
                (jnp.arange(grad_accum_steps), split_micro_batches(batch, grad_accum_steps)))
            aux = diagnostics_lib.combine_micro_batches(auxs)
        grads = scaler.unscale(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A scheme's constraint on the weights (nGPT: unit-norm matrices) after every update.
        project = variables.merge(graphdef, state.params,
                                  state.batch_stats).config.scheme.project
        if project is not None:
            params = project(params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite or scaling:  # an overflowing float16 step is always dropped
            keep = lambda new, old: jax.tree.map(  # noqa: E731
                lambda n, o: jnp.where(finite, n, o), new, old)
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            if state.batch_stats is not None:
                aux["batch_stats"] = keep(aux["batch_stats"], state.batch_stats)
        metrics = {
            "loss": loss,
            "nll": nll,
            "grad_norm": grad_norm,
            "update_norm": optax.tree.norm(updates),
            "param_norm": optax.tree.norm(params),
            "num_tokens": num_tokens,
            "finite": finite.astype(jnp.int32),
        }
        if z_loss:
            metrics["z_loss"] = z
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  batch_stats=aux.pop("batch_stats", None))
        if scaling:
            grads_finite = jnp.isfinite(grad_norm)
            metrics["loss_scale"] = scaler.loss_scale
            # Fixable by a smaller scale only while the scale can still drop.
            metrics["overflow"] = (jnp.isfinite(loss) & ~grads_finite
                                   & (scaler.loss_scale > loss_scale_lib.MIN_SCALE)
                                   ).astype(jnp.int32)
            new_state = new_state.replace(
                loss_scale=loss_scale_lib.to_state(scaler.adjust(grads_finite)))
        if "norms" in groups:
            metrics["grad_norm_per_layer"] = layerwise.per_layer_norm(grads)
            metrics["update_norm_per_layer"] = layerwise.per_layer_norm(updates)
            metrics["activation_norm_per_layer"] = activation_norm_per_layer(aux)
        if groups - {"norms"}:
            arch = variables.merge(graphdef, state.params, state.batch_stats).config.arch
            metrics.update(diagnostics_lib.step_metrics(
                groups, arch=arch, aux=aux, updates=updates, params=state.params,
                opt_state=opt_state))
        if gns:
            metrics.update(noise_scale_metrics(*norm_stats, batch["inputs"].shape[0]))
        return new_state, metrics

    return train_step


def make_eval_step(graphdef):
    """Returns ``eval_step(params, batch, batch_stats=None) -> metrics`` with the unsmoothed
    token cross-entropy: ``nll_sum`` and ``num_tokens`` (sums, so batches combine exactly) and
    their ratio ``loss``. Batch-statistics norms use the running ``batch_stats``."""

    def eval_step(params, batch, batch_stats=None):
        model = variables.merge(graphdef, params, batch_stats)
        logits, _ = model_forward(model, batch, deterministic=True)
        total, count = cross_entropy(logits, batch["targets"], batch["weights"])
        return {"nll_sum": total, "num_tokens": count, "loss": total / jnp.maximum(count, 1.0)}

    return eval_step
