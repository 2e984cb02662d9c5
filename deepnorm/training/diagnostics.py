"""The training step's diagnostics, in groups that ``train.diagnostic_groups`` turns on or off.

=============  ===============================================================================
group          metrics (``*_per_layer``: [N + M], encoder layers then decoder layers)
=============  ===============================================================================
norms          grad_norm_per_layer, update_norm_per_layer, activation_norm_per_layer
attention      <attn>_logit_max_per_layer, <attn>_entropy_per_layer,
               <attn>_entropy_min_head_per_layer (<attn>: self_attn; cross_attn [M])
activations    <sublayer>_{branch,stream}_{kurtosis,max_abs}_per_layer
logits         output_logit_norm, output_logit_max, output_log_z
updates        update_ratio_<group>, update_ratio_<group>_per_layer
adam           adam_nu_mean_<group>, adam_nu_max_<group>, adam_nu_max_per_layer
=============  ===============================================================================

Each group is a static choice made when the step is built: a group that is off adds nothing
to the traced program. ``attention`` and ``activations`` are computed inside the model's scan
(``deepnorm.transformer.EXTRA_STATS``), ``logits`` in the loss, ``updates`` and ``adam`` from
the update and the optimizer state after the backward pass. The meaning of every name is in
docs/training.md ("Diagnostics").
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import optax

from deepnorm.config import ConfigError
from deepnorm.layerwise import STACKS, PARAM_GROUPS, param_group, stack_of
from deepnorm.transformer import ACTIVATION_STAT_NAMES, sublayer_names

GROUPS = ("norms", "attention", "activations", "logits", "updates", "adam")
MODEL_GROUPS = frozenset({"attention", "activations"})  # computed by the model itself
ATTENTION_SUBLAYERS = ("self_attn", "cross_attn")
LOGIT_STAT_NAMES = ("output_logit_norm", "output_logit_max", "output_log_z")


def parse_groups(value, key: str = "train.diagnostic_groups") -> frozenset:
    """``train.diagnostic_groups`` (or the config ``key`` named): ``all``, ``none`` or a comma
    list of ``GROUPS``."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}={value!r} must be a string: all, none or "
                          f"a comma list of {', '.join(GROUPS)}")
    text = value.strip()
    if text == "all":
        return frozenset(GROUPS)
    if text in ("none", ""):
        return frozenset()
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in GROUPS]
    if unknown:
        raise ConfigError(f"{key}={value!r}: {', '.join(unknown)} not known; "
                          f"use all, none or a comma list of {', '.join(GROUPS)}")
    return frozenset(names)


def resolve_groups(diagnostics) -> frozenset:
    """``make_train_step``'s ``diagnostics``: True (the per-layer norms, as the step always
    had), False / None (nothing), a ``parse_groups`` string, or an iterable of group names."""
    if diagnostics is True:
        return frozenset({"norms"})
    if diagnostics is False or diagnostics is None:
        return frozenset()
    if isinstance(diagnostics, str):
        return parse_groups(diagnostics)
    return parse_groups(",".join(diagnostics)) if diagnostics else frozenset()


# --- computed in the loss ----------------------------------------------------------------------

def output_logit_stats(logits_BxTxV, log_z_BxT, weights_BxT) -> dict:
    """Over the tokens with a target weight: the mean L2 norm of the logit vector, the largest
    logit, the mean log-partition log Z = logsumexp(logits) (z-loss's quantity). No gradient."""
    logits = jax.lax.stop_gradient(logits_BxTxV).astype(jnp.float32)
    w = weights_BxT.astype(jnp.float32)
    share = w / jnp.maximum(jnp.sum(w), 1.0)
    return {
        "output_logit_norm": jnp.sum(share * jnp.linalg.norm(logits, axis=-1)),
        "output_logit_max": jnp.max(jnp.where((w > 0)[..., None], logits, -jnp.inf)),
        "output_log_z": jnp.sum(share * jax.lax.stop_gradient(log_z_BxT)),
    }


def combine_micro_batches(auxs):
    """Statistics of k micro-batches [k, ...] -> one: the max of maxima, the mean of the rest
    (means over equal-sized micro-batches, as the activation norms always were)."""
    def combine(path, x):
        name = str(getattr(path[-1], "key", path[-1]))
        return jnp.max(x, axis=0) if "max" in name else jnp.mean(x, axis=0)
    return jax.tree_util.tree_map_with_path(combine, auxs)


# --- per-layer vectors from the model's statistics ---------------------------------------------

def _over_stacks(aux, pick) -> jax.Array | None:
    """``pick(stack, stats) -> [L] or None`` concatenated over the stacks, encoder first."""
    parts = [pick(s, aux[s]) for s in STACKS if s in aux]
    parts = [p for p in parts if p is not None]
    return jnp.concatenate(parts) if parts else None


def attention_metrics(aux) -> dict:
    out = {}
    for sub in ATTENTION_SUBLAYERS:
        for metric, stat, reduce in (("logit_max", "logit_max", jnp.max),
                                     ("entropy", "entropy", jnp.mean),
                                     ("entropy_min_head", "entropy", jnp.min)):
            vector = _over_stacks(aux, lambda s, st: reduce(st[f"{sub}_{stat}"], axis=-1)
                                  if f"{sub}_{stat}" in st else None)
            if vector is not None:
                out[f"{sub}_{metric}_per_layer"] = vector
    return out


def activation_metrics(aux, arch: str) -> dict:
    out = {}
    for sub in ("self_attn", "cross_attn", "ffn"):
        for stat in ACTIVATION_STAT_NAMES:
            def pick(stack, stats, stat=stat, sub=sub):
                names = sublayer_names(arch, stack)
                return stats[stat][:, names.index(sub)] if sub in names else None
            vector = _over_stacks(aux, pick)
            if vector is not None:
                out[f"{sub}_{stat}_per_layer"] = vector
    return out


# --- from the parameters, the update and the optimizer state -----------------------------------

def _grouped(tree, per_row, combine):
    """{group: (list of whole-leaf values, {stack: list of [L] values})} over ``tree``:
    ``per_row`` reduces [rows, n] to [rows] (a stacked leaf's rows are its layers, any other
    leaf is one row) and ``combine`` reduces those to the leaf's value, so every leaf is read
    once (a whole-leaf reduction beside the per-layer one would read it twice)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        leaf = jnp.asarray(leaf, jnp.float32)
        whole, layers = out.setdefault(param_group(path), ([], {}))
        stack = stack_of(path)
        rows = per_row(leaf.reshape(leaf.shape[0] if stack is not None else 1, -1))
        whole.append(combine(rows))
        if stack is not None:
            layers.setdefault(stack, []).append(rows)
    return out


def _sq_norms(tree):
    """{group: (sum of squares, [N + M] per-layer sums of squares or None)}."""
    grouped = _grouped(tree, lambda x: jnp.sum(jnp.square(x), axis=1), jnp.sum)
    return {g: (sum(whole), jnp.concatenate([sum(layers[s]) for s in STACKS if s in layers])
                if layers else None)
            for g, (whole, layers) in grouped.items()}


def _ratio(numerator, denominator):
    """numerator / denominator; for a zero denominator inf (0 when the numerator is 0 too)."""
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, numerator / safe, jnp.where(numerator > 0, jnp.inf, 0.0))


def update_ratios(updates, params) -> dict:
    """``update_ratio_<group>`` = ||update|| / ||parameters|| over a ``PARAM_GROUPS`` group (the
    parameters before the update), and ``..._per_layer`` over each layer's slice of it."""
    upd, par = _sq_norms(updates), _sq_norms(params)
    out = {}
    for group in PARAM_GROUPS:
        if group not in par:
            continue
        (u, u_layers), (p, p_layers) = upd[group], par[group]
        out[f"update_ratio_{group}"] = _ratio(jnp.sqrt(u), jnp.sqrt(p))
        if p_layers is not None:
            out[f"update_ratio_{group}_per_layer"] = _ratio(jnp.sqrt(u_layers),
                                                            jnp.sqrt(p_layers))
    return out


def adam_second_moments(opt_state):
    """Adam's ``nu`` (the running mean of squared gradients) from an optax state."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "ScaleByAdamState")
    if not found:
        raise ValueError("diagnostics group 'adam' needs an Adam optimizer state "
                         "(optax ScaleByAdamState); drop 'adam' from train.diagnostic_groups")
    return found[0][1].nu


def adam_metrics(opt_state) -> dict:
    """``adam_nu_mean_<group>``, ``adam_nu_max_<group>`` and ``adam_nu_max_per_layer`` (the
    largest entry of nu among each layer's parameters)."""
    totals, counts, maxima, layer_maxima = {}, {}, {}, {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(adam_second_moments(opt_state)):
        group, leaf = param_group(path), jnp.asarray(leaf, jnp.float32)
        totals[group] = totals.get(group, 0.0) + jnp.sum(leaf)
        counts[group] = counts.get(group, 0) + leaf.size
        stack = stack_of(path)
        if stack is None:
            maxima.setdefault(group, []).append(jnp.max(leaf))
            continue
        rows = jnp.max(leaf.reshape(leaf.shape[0], -1), axis=1)  # one read: the whole max is
        maxima.setdefault(group, []).append(jnp.max(rows))       # the max of the layers' maxima
        layer_maxima.setdefault(stack, []).append(rows)
    out = {}
    for group in PARAM_GROUPS:
        if group in totals:
            out[f"adam_nu_mean_{group}"] = totals[group] / counts[group]
            out[f"adam_nu_max_{group}"] = jnp.max(jnp.stack(maxima[group]))
    if layer_maxima:
        out["adam_nu_max_per_layer"] = jnp.concatenate(
            [jnp.max(jnp.stack(layer_maxima[s]), axis=0) for s in STACKS if s in layer_maxima])
    return out


def step_metrics(groups: Iterable[str], *, arch: str, aux, updates, params,
                 opt_state) -> dict:
    """The metrics of every group in ``groups`` except ``norms`` (``make_train_step`` keeps
    those): ``params`` are the parameters before the update, ``opt_state`` the state after."""
    groups = frozenset(groups)
    out = {}
    if "attention" in groups:
        out.update(attention_metrics(aux))
    if "activations" in groups:
        out.update(activation_metrics(aux, arch))
    if "logits" in groups:
        out.update({name: aux[name] for name in LOGIT_STAT_NAMES})
    if "updates" in groups:
        out.update(update_ratios(updates, params))
    if "adam" in groups:
        out.update(adam_metrics(opt_state))
    return out
