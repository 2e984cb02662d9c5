"""Per-layer reductions over stacked parameter trees.

Because a stack's parameters carry a leading layer axis, a per-layer statistic of any tree with
the model's structure (gradients, updates, parameters) is one reduction over every axis but the
first. This is how train.py logs ``grad_norm_per_layer`` at the cost of a few reductions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

STACKS = ("encoder", "decoder")


def path_names(path) -> list[str]:
    """The keys of a pytree path (dict keys, attribute names, sequence indices) as strings."""
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            names.append(str(entry))
    return names


def stack_of(path) -> str | None:
    """``"encoder"``/``"decoder"`` if the leaf at ``path`` is a stacked layer parameter."""
    names = path_names(path)
    if len(names) >= 2 and names[0] in STACKS and names[1] == "layers":
        return names[0]
    return None


def per_layer_sq_norm(tree) -> dict[str, jax.Array]:
    """Sum of squares per layer for each stack present: ``{"encoder": [N], "decoder": [M]}``."""
    totals: dict[str, jax.Array] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        stack = stack_of(path)
        if stack is None:
            continue
        leaf = jnp.asarray(leaf, jnp.float32)
        sq = jnp.sum(jnp.square(leaf).reshape(leaf.shape[0], -1), axis=1)
        totals[stack] = totals.get(stack, 0.0) + sq
    return {s: totals[s] for s in STACKS if s in totals}


def per_layer_norm(tree) -> jax.Array:
    """L2 norm of each layer's slice of ``tree``, encoder layers then decoder layers: [N + M]."""
    sq = per_layer_sq_norm(tree)
    return jnp.sqrt(jnp.concatenate([sq[s] for s in STACKS if s in sq]))


def global_norm(tree) -> jax.Array:
    """L2 norm of the whole tree (all parameters, stacked or not)."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves))


# Parameter groups of the training diagnostics (update / parameter ratios, Adam's second
# moments): each attention projection and each feed-forward matrix with its bias, every norm's
# gains and biases, the embedding tables, the untied output head, and the residual schemes'
# own parameters (every ``Param`` a scheme declares: ReZero's gates, Admin's omegas,
# hyper-connections' mixing, ...; NormFormer's head scales).
PROJECTIONS = ("query", "key", "value", "out", "ffn_in", "ffn_out")
PARAM_GROUPS = PROJECTIONS + ("norms", "embeddings", "head", "residual", "other")


def _scheme_param_suffixes() -> tuple[str, ...]:
    from deepnorm import residual  # the registry, read when asked: schemes may be added late
    return tuple(sorted({f"_{p.name}" for scheme in residual.SCHEMES.values()
                         for p in scheme.params}))


def param_group(path) -> str:
    """The ``PARAM_GROUPS`` entry of a parameter leaf (a path into the pure parameter dict).

    Self- and cross-attention projections share a group (``query`` holds both queries); a
    parameter none of the rules knows is ``other``.
    """
    names = path_names(path)
    if any("norm" in name for name in names):
        return "norms"
    if names[-1] in ("embed", "pos_embed"):
        return "embeddings"
    if names[0] == "head":
        return "head"
    for name in reversed(names[:-1]):
        if name in PROJECTIONS:
            return name
    if names[-1] == "head_scale" or names[-1].endswith(_scheme_param_suffixes()):
        return "residual"
    return "other"
