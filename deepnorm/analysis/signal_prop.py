"""Signal propagation at initialization: what each layer does to the residual stream.

Per layer of a freshly initialized model, on real text:

* ``cosine``: the mean cosine similarity between the representations of distinct real tokens
  of a sequence, pooled over the batch's pairs (self-pairs and padding excluded). Rank
  collapse (Noci et al. 2022, "Signal propagation in transformers") is this going to 1: every
  token carries the same vector, the attention's gradients vanish, and training stalls. Entry
  0 is the embeddings (the stream entering layer 1), entry l the stream leaving layer l.
* ``stream_norm``: the mean token L2 norm of the stream leaving each layer (entry 0: entering
  layer 1), and ``stream_growth`` = that over entry 0. Pre-LN's un-normalized stream grows
  like sqrt(l); Post-LN and DeepNorm renormalize it every sublayer.
* ``branch_to_skip``: per sublayer, the mean token norm of the branch output F(...) over that
  of the stream entering the sublayer, as the blocks record them (before a scheme's own
  scalar on either side: DeepNorm's skip is alpha x, so its effective ratio is this over alpha;
  ReZero's branch is multiplied by a gate that starts at 0). ``branch_to_skip_mean`` is the
  mean over a layer's sublayers.

The norms are the statistics every block already returns (``deepnorm.transformer.STAT_NAMES``).
The cosine similarity is not one of them: it needs the token-by-token Gram matrix, which no
training step should pay for, so ``cosine_hook`` adds it for the duration of one trace by
wrapping ``Block.__call__``; the model, its scan over the layers and every training step are
unchanged. Seeds are a ``jax.vmap`` axis over the stacked parameters (``deepnorm.analysis.params``).
"""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepnorm import layerwise
from deepnorm import residual as residual_lib
from deepnorm import transformer as transformer_lib
from deepnorm.analysis import schemes as schemes_lib
from deepnorm.analysis.params import init_params
from deepnorm.training.loss import model_forward


def mean_cosine_similarity(x_BxTxD: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
    """Mean of cos(x_bt, x_bs) over the pairs t != s of real tokens in each sequence b, pooled
    over the batch (every pair weighs the same); NaN when no sequence has two real tokens."""
    x = x_BxTxD.astype(jnp.float32)
    unit = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-30)
    gram_BxTxT = jnp.einsum("btd,bsd->bts", unit, unit)
    b, t = x.shape[:2]
    real = jnp.ones((b, t), jnp.float32) if mask_BxT is None else mask_BxT.astype(jnp.float32)
    pairs = real[:, :, None] * real[:, None, :] * (1.0 - jnp.eye(t, dtype=jnp.float32))
    count = jnp.sum(pairs)
    return jnp.where(count > 0, jnp.sum(gram_BxTxT * pairs) / jnp.maximum(count, 1.0), jnp.nan)


@contextlib.contextmanager
def cosine_hook():
    """While active, every block's statistics also hold ``cosine_in`` and ``cosine_out``: the
    mean token cosine similarity of the stream entering and leaving it. Trace (jit) inside."""
    original = transformer_lib.Block.__call__

    def with_cosine(self, x_BxTxD, consts, **kwargs):
        y, stats = original(self, x_BxTxD, consts, **kwargs)
        mask = kwargs.get("token_mask_BxT")
        seen = residual_lib.get(self.residual).observed  # several streams: the first
        return y, dict(stats, cosine_in=mean_cosine_similarity(seen(x_BxTxD), mask),
                       cosine_out=mean_cosine_similarity(seen(y), mask))

    transformer_lib.Block.__call__ = with_cosine
    try:
        yield
    finally:
        transformer_lib.Block.__call__ = original


def layer_profile(stats: dict) -> dict[str, np.ndarray]:
    """One stack's per-layer curves from its statistics (leading layer axis, hook active)."""
    stream_in = np.asarray(stats["stream_in_norm"], np.float64)  # [L, S]
    stream_out = np.asarray(stats["stream_out_norm"], np.float64)
    branch = np.asarray(stats["branch_norm"], np.float64)
    stream_norm = np.concatenate([stream_in[:1, 0], stream_out[:, -1]])
    ratio = branch / stream_in
    return {
        "cosine": np.concatenate([np.asarray(stats["cosine_in"])[:1],
                                  np.asarray(stats["cosine_out"])]),
        "stream_norm": stream_norm,
        "stream_growth": stream_norm / stream_norm[0],
        "branch_to_skip": ratio,
        "branch_to_skip_mean": ratio.mean(axis=1),
    }


def measure(cfg, *, seeds, batch, scheme: str | None = None) -> list[dict]:
    """Records, one per (stack, seed): ``residual``, ``num_layers``, ``stack``, ``seed``,
    ``sublayers`` and the per-layer lists of the module docstring, for ``cfg`` at init on
    ``batch`` (one batch of its architecture's task)."""
    seeds = list(seeds)
    graphdef, params = init_params(cfg, seeds, batch)
    batch = jax.tree.map(jnp.asarray, batch)

    def statistics(p):
        _, aux = model_forward(nnx.merge(graphdef, p), batch)
        return aux

    with cosine_hook():
        aux = jax.jit(jax.vmap(statistics))(params)  # a fresh function: traced in the hook
    aux = jax.device_get(aux)
    records = []
    for stack in layerwise.STACKS:
        if stack not in aux:
            continue
        sublayers = (["self_attn", "cross_attn", "ffn"] if stack == "decoder"
                     and cfg.arch == "encoder_decoder" else ["self_attn", "ffn"])
        for i, seed in enumerate(seeds):
            curves = layer_profile(jax.tree.map(lambda a: a[i], aux[stack]))
            records.append({"residual": scheme or cfg.residual,
                            "num_layers": schemes_lib.depth_of(cfg), "stack": stack,
                            "seed": seed, "sublayers": sublayers,
                            **{k: v.tolist() for k, v in curves.items()}})
    return records


def run(base, *, schemes, depths, seeds, batch, log=print) -> list[dict]:
    """``measure`` for every scheme x depth (``deepnorm.analysis.schemes`` presets)."""
    records = []
    for depth in depths:
        for scheme in schemes:
            start = time.perf_counter()
            cfg = schemes_lib.scheme_config(base, scheme, depth)
            new = measure(cfg, seeds=seeds, batch=batch, scheme=scheme)
            records += new
            last = new[-1]
            log(f"signal-prop {scheme:9s} L={depth:<5d} last-layer cosine "
                f"{last['cosine'][-1]:.3f}, stream growth {last['stream_growth'][-1]:.3g}, "
                f"branch/skip {last['branch_to_skip_mean'][-1]:.3g} "
                f"({time.perf_counter() - start:.1f}s)")
    return records
