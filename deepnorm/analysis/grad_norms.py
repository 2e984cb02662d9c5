"""Expected gradient norms per layer at initialization (Xiong et al. 2020, Fig. 3).

Xiong et al. ("On Layer Normalization in the Transformer Architecture", ICML 2020) record the
gradient over many mini-batches, average it element-wise, and take the Frobenius norm of the
average: the norm of the *expected* gradient. Their Theorem 1: at initialization the last
layer's FFN output weight W^{2,L} has a gradient of O(d sqrt(ln d)) under Post-LN, independent
of depth L, but O(d sqrt(ln d / L)) under Pre-LN. Their Fig. 3 (a, b) plots the norm per layer
for a 6-6 model (Post-LN grows toward the top, Pre-LN is flat); (c, d) plots the last layer's
W^2 norm against depth (Post-LN flat, Pre-LN falling).

Because the stacked layers share one parameter array with a leading layer axis, a layer's
gradient is that array's slice, and every per-layer norm is one reduction. Seeds are a vmapped
axis and the batch mean a ``lax.scan``, so one (scheme, depth) is one compiled program.
"""

from __future__ import annotations

import functools
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepnorm.analysis import schemes as schemes_lib
from deepnorm.analysis.batches import first
from deepnorm.analysis.params import init_params
from deepnorm.analysis.train_steps import train_seeds
from deepnorm.layerwise import STACKS, path_names
from deepnorm.training.loss import loss_fn


def group_name(names: list[str]) -> str | None:
    """Parameter group of a stacked leaf's path, e.g. ``ffn_out`` or ``self_attn.query``.

    Only projection kernels (the W matrices of the papers) form groups; norms, biases and
    gates return None.
    """
    if names and names[-1] == "value":  # the nnx.Variable's own attribute in the path
        names = names[:-1]
    if len(names) < 4 or names[0] not in STACKS or names[1] != "layers" or names[-1] != "kernel":
        return None
    inner = names[2:-1]
    if inner[0] == "ffn":  # ffn.ffn_out -> ffn_out, Xiong's W^2 (ffn_in is W^1)
        inner = inner[1:]
    return ".".join(inner)


def per_layer_group_norms(tree) -> dict[tuple[str, str], jax.Array]:
    """{(stack, group): [L]} Frobenius norm of each layer's slice of each projection kernel."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = path_names(path)
        group = group_name(names)
        if group is None:
            continue
        flat = jnp.asarray(leaf, jnp.float32).reshape(leaf.shape[0], -1)
        out[(names[0], group)] = jnp.sqrt(jnp.sum(jnp.square(flat), axis=1))
    return out


def expected_gradient(graphdef, params, batches):
    """The element-wise mean of the loss gradient over the K stacked ``batches``.

    One ``lax.scan`` over batches, accumulating the sum; the gradient is of the mean token
    cross-entropy of each batch (``deepnorm.training.loss.loss_fn``), as in training.
    """

    def grad_of(batch):
        return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch)[0])(params)

    def body(total, batch):
        return jax.tree.map(jnp.add, total, grad_of(batch)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, _ = jax.lax.scan(body, zeros, batches)
    num = jax.tree.leaves(batches)[0].shape[0]
    return jax.tree.map(lambda g: g / num, total)


@functools.partial(jax.jit, static_argnums=0)
def _expected_norms(graphdef, params_S, batches):
    """{(stack, group): [S, L]}: per-layer norms of each seed's expected gradient."""
    grads = jax.vmap(expected_gradient, in_axes=(None, 0, None))(graphdef, params_S, batches)
    # vmap puts the seed axis first; the per-layer reduction wants the layer axis first.
    return jax.vmap(per_layer_group_norms)(grads)


def measure(cfg, *, seeds: Iterable[int], batches, train_steps: int = 0, opt_config=None,
            train_batches=None, scheme: str | None = None) -> list[dict]:
    """Records of the expected gradient norm per (seed, layer, group) for one model config.

    ``batches`` is a stacked set {key: [K, B, ...]}; the same batches serve every seed, so the
    spread over seeds is the spread over initializations. With ``train_steps`` > 0 each seed
    first takes that many steps of the training package's train step with ``opt_config``'s
    optimizer on ``train_batches`` (cycled), which must be held out from ``batches``: training
    on the measured batches would shrink exactly the gradient being measured.
    """
    seeds = list(seeds)
    graphdef, params = init_params(cfg, seeds, first(batches))
    if train_steps:
        if train_batches is None or opt_config is None:
            raise ValueError("train_steps > 0 needs opt_config and train_batches (held out "
                             "from the measured batches)")
        params, _ = train_seeds(graphdef, params, seeds, train_batches, opt_config,
                                num_steps=train_steps)

    result = jax.device_get(
        _expected_norms(graphdef, params, jax.tree.map(jnp.asarray, batches)))
    name = scheme or cfg.residual
    records = []
    enc_dec = cfg.arch == "encoder_decoder"
    offsets = {"encoder": 0, "decoder": cfg.encoder_layers}
    for (stack, group), values_SxL in sorted(result.items()):
        for s, seed in enumerate(seeds):
            for layer in range(values_SxL.shape[1]):
                record = {"residual": name, "num_layers": schemes_lib.depth_of(cfg),
                          "seed": seed, "layer": offsets[stack] + layer + 1, "param": group,
                          "expected_grad_norm": float(values_SxL[s, layer])}
                if enc_dec:
                    record["stack"] = stack
                records.append(record)
    return records


def run(base_cfg, *, schemes, depths, seeds, batches, train_steps=0, opt_config=None,
        train_batches=None, log=print) -> list[dict]:
    """``measure`` for every scheme x depth; the records of all, in that order."""
    records = []
    for scheme in schemes:
        for depth in depths:
            cfg = schemes_lib.scheme_config(base_cfg, scheme, depth)
            start = time.perf_counter()
            records += measure(cfg, seeds=seeds, batches=batches, train_steps=train_steps,
                               opt_config=opt_config, train_batches=train_batches,
                               scheme=scheme)
            log(f"grad-norms {scheme} L={depth}: {time.perf_counter() - start:.1f}s")
    return records


def final_layer(records, param: str = "ffn_out") -> dict[tuple[str, int], np.ndarray]:
    """{(scheme, depth): [seeds]} the top layer's ``param`` norm (Xiong Fig. 3 c, d)."""
    top: dict[tuple[str, int], int] = {}
    for r in records:
        if r["param"] == param:
            key = (r["residual"], r["num_layers"])
            top[key] = max(top.get(key, 0), r["layer"])
    out: dict[tuple[str, int], list] = {}
    for r in records:
        key = (r["residual"], r["num_layers"])
        if r["param"] == param and r["layer"] == top[key]:
            out.setdefault(key, []).append(r["expected_grad_norm"])
    return {k: np.asarray(v) for k, v in out.items()}


def by_layer(records, scheme: str, depth: int, param: str = "ffn_out") -> np.ndarray:
    """[seeds, layers] norms of one scheme and depth, layers in order (encoder then decoder)."""
    rows = [r for r in records
            if r["residual"] == scheme and r["num_layers"] == depth and r["param"] == param]
    seeds = sorted({r["seed"] for r in rows})
    layers = sorted({r["layer"] for r in rows})
    table = np.full((len(seeds), len(layers)), np.nan)
    for r in rows:
        table[seeds.index(r["seed"]), layers.index(r["layer"])] = r["expected_grad_norm"]
    return table
