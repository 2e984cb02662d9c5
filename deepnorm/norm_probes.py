"""Per-example gradients of the norm layers' parameters from the ordinary backward pass.

Gray et al. 2024 ("Normalization Layer Per-Example Gradients are Sufficient to Predict Gradient
Noise Scale in Transformers") estimate the gradient noise scale from the per-example gradients
of the LayerNorm gains and biases alone, which the LayerNorm backward pass has in hand before
it sums them over the batch. Here the same numbers come out of ``jax.grad`` through a *probe*:
every norm parameter p of shape S gets a zero array ``[B, *S]`` (``[L, B, *S]`` for the L
stacked layers of a stack, scanned with the layer's weights) that the norm adds to p, row b
for every token of example b (``deepnorm.norms._param``). The forward pass is unchanged, and
because example b's outputs depend on p only through p + probe_b,

    dL/dprobe_b = sum over example b's tokens of dL/dy * dy/dp = example b's share of dL/dp,

exactly, for any loss L, any residual scheme, with remat (the probes are ordinary inputs of the
checkpointed layer) and the scanned or unrolled stack. The B rows sum to dL/dp. The extra work
is one [B, d] reduction per norm parameter per layer; no per-example gradient of a weight
matrix is ever formed.

Probes are keyed by the norm's path in the model (``"decoder/layers/ffn_norm"``) and the
parameter's name (``"scale"``, ``"bias"``, DyT's ``"alpha"``). They live only inside the traced
function that attaches them to a freshly merged model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepnorm.layerwise import STACKS
from deepnorm.norms import NORM_CLASSES, PROBE_SUFFIX, NormProbe

NORM_TYPES = tuple(cls for name, cls in NORM_CLASSES.items() if name != "none")


def norm_modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """Every norm with parameters in ``model``, by path: ``{"encoder/layers/ffn_norm": ...}``."""
    return {"/".join(map(str, path)): node for path, node in nnx.iter_graph(model)
            if isinstance(node, NORM_TYPES)}


def stack_of(name: str) -> str | None:
    """``"encoder"`` / ``"decoder"`` for a norm inside a stack's scanned layers, else None
    (the stack's input and final norms, which have no layer axis)."""
    parts = name.split("/")
    return parts[0] if len(parts) > 2 and parts[0] in STACKS and parts[1] == "layers" else None


def _params(norm: nnx.Module) -> dict[str, jax.Array]:
    return {k: v[...] for k, v in vars(norm).items() if isinstance(v, nnx.Param)}


def zero_probes(model: nnx.Module, batch_size: int) -> dict[str, dict[str, jax.Array]]:
    """Zero probes for every norm parameter of ``model``: [B, *S], or [L, B, *S] in a stack."""
    probes = {}
    for name, norm in norm_modules(model).items():
        stacked = stack_of(name) is not None
        probes[name] = {
            pname: jnp.zeros((p.shape[0], batch_size) + p.shape[1:] if stacked
                             else (batch_size,) + p.shape, jnp.float32)
            for pname, p in _params(norm).items()}
    return probes


def attach_probes(model: nnx.Module, probes: dict) -> None:
    """Attaches ``probes`` (from ``zero_probes``, possibly traced) to ``model``'s norms."""
    for name, norm in norm_modules(model).items():
        for pname, value in probes[name].items():
            setattr(norm, pname + PROBE_SUFFIX, NormProbe(value))


def _batch_axis(name: str) -> int:
    return 1 if stack_of(name) is not None else 0


def summed_over_examples(probe_grads: dict) -> dict:
    """The batch gradient of every norm parameter: the probe gradients summed over examples."""
    return {name: {p: jnp.sum(g, axis=_batch_axis(name)) for p, g in grads.items()}
            for name, grads in probe_grads.items()}


def _sq_by_layer(tree: dict, batch: bool) -> tuple[dict[str, jax.Array], jax.Array]:
    """Sums of squares over the parameter axes: ({stack: [L] or [L, B]}, model [] or [B])."""
    per_stack: dict[str, jax.Array] = {}
    total = 0.0
    for name, grads in tree.items():
        stack = stack_of(name)
        lead = (1 if stack else 0) + (1 if batch else 0)  # [L,] [B,] then the parameter's axes
        for g in grads.values():
            g = g.astype(jnp.float32)
            sq = jnp.sum(jnp.square(g).reshape(g.shape[:lead] + (-1,)), axis=-1)
            if stack:
                per_stack[stack] = per_stack.get(stack, 0.0) + sq
                sq = jnp.sum(sq, axis=0)
            total = total + sq
    return per_stack, jnp.asarray(total, jnp.float32)


def per_layer_sq_norms(tree: dict, *, batch: bool = False) -> tuple[jax.Array, jax.Array]:
    """Squared L2 norms of a probe-shaped tree: (per layer, encoder then decoder, [N + M], and
    all norms together, []); with ``batch``, one per example: [N + M, B] and [B].

    A stack whose layers have no norm (ReZero) has no entries; the model total also counts the
    stacks' input and final norms, which belong to no layer.
    """
    per_stack, total = _sq_by_layer(tree, batch)
    stacks = [per_stack[s] for s in STACKS if s in per_stack]
    per_layer = (jnp.concatenate(stacks) if stacks
                 else jnp.zeros((0,) + total.shape, jnp.float32))
    return per_layer, total


def example_sq_norm_sums(probe_grads: dict) -> tuple[jax.Array, jax.Array]:
    """sum_b |dL/dprobe_b|^2 per layer [N + M] and for all norms []: what adds up exactly
    over the micro-batches of one batch."""
    per_layer, total = per_layer_sq_norms(probe_grads, batch=True)
    return jnp.sum(per_layer, axis=-1), jnp.sum(total, axis=-1)
