"""Block, the scanned Stack, and the Transformer for all three architectures.

Depth is an array axis: a stack's L blocks are created at once (``nnx.vmap`` over split RNGs,
so every parameter has a leading layer axis) and run with one ``jax.lax.scan`` wrapped in
``jax.checkpoint``; compile time does not grow with depth. What depends on the layer index
(DeepNorm's alpha, Mix-LN's switch, LayerNorm-Scaling's 1/sqrt(l)) is an array scanned with
the weights. Every block also returns residual-stream statistics, so the analysis code needs
no second model.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepnorm import residual as residual_lib
from deepnorm.config import TransformerConfig
from deepnorm.initializers import block_constants, layer_constants, layer_gain, role_gains
from deepnorm.layers import Attention, Dense, FeedForward
from deepnorm.batch_norms import BatchContext, apply_norm, bind
from deepnorm.norms import config_norm
from deepnorm.ops import matmul
from deepnorm.residual import ATTN, FFN, sublayer_kind

PAD_ID = 0  # the token id that marks padding in encoder inputs (deepnorm.data.tokenizer)

REMAT_POLICIES = {
    "full": None,  # save nothing inside a layer: recompute it all on the backward pass
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# What the model runs for remat_policy="auto" when nobody resolved it: the model does not know
# the platform, so this is a fixed choice, the one that needs the least memory. Training
# resolves "auto" per platform and dtype before building the model
# (deepnorm.training.platform.resolve_remat_policy) and prints the result in its start line.
UNRESOLVED_AUTO_REMAT = "full"


def model_remat_policy(name: str) -> str:
    """The policy the stack applies for ``model.remat_policy=name`` ("auto": ``full``)."""
    return UNRESOLVED_AUTO_REMAT if name == "auto" else name


# Per-sublayer statistics every block returns, each a mean over the real (non-padding) tokens
# of the batch: padding positions carry a stream too, but no data, and would bias the means by
# the share of padding in the batch (Admin's omegas are set from branch_var).
STAT_NAMES = ("stream_in_norm", "branch_norm", "branch_var", "stream_out_norm")


def sublayer_names(arch: str, stack: str) -> tuple[str, ...]:
    """The sublayers of a ``stack`` ("encoder" / "decoder") block, in the order of the [S] axis
    of its statistics: a decoder of encoder_decoder also has cross-attention."""
    if stack == "decoder" and arch == "encoder_decoder":
        return ("self_attn", "cross_attn", "ffn")
    return ("self_attn", "ffn")


def _token_weights(x_BxTxD: jax.Array, token_mask_BxT: jax.Array | None) -> jax.Array:
    """[B, T] float32 weights summing to 1 over the real tokens (uniform with no mask)."""
    if token_mask_BxT is None:
        b, t = x_BxTxD.shape[-3:-1]
        return jnp.full((b, t), 1.0 / (b * t), jnp.float32)
    m = token_mask_BxT.astype(jnp.float32)
    return m / jnp.maximum(jnp.sum(m), 1.0)  # an all-padding batch gives 0, not NaN


def _token_norm(x: jax.Array, w_BxT: jax.Array) -> jax.Array:
    """Mean over the real tokens of the L2 norm over d_model, in float32."""
    return jnp.sum(w_BxT * jnp.linalg.norm(x.astype(jnp.float32), axis=-1))


def token_var(x_BxTxD: jax.Array, token_mask_BxT: jax.Array | None = None) -> jax.Array:
    """Variance of every element of the real tokens' vectors (over tokens and d_model), in
    float32; with no mask, ``jnp.var(x)``."""
    w = _token_weights(x_BxTxD, token_mask_BxT)[..., None] / x_BxTxD.shape[-1]
    x = x_BxTxD.astype(jnp.float32)
    mean = jnp.sum(w * x)
    return jnp.sum(w * jnp.square(x - mean))


def _default_stack(cfg: TransformerConfig) -> str:
    """The stack a block belongs to when not told: the encoder of an encoder-only model, else
    the decoder."""
    return "encoder" if cfg.arch == "encoder" else "decoder"


# Statistics a block adds on request (``extra_stats``; training diagnostics), each computed
# only when asked for:
# "activations": per sublayer [S], over the real tokens' elements, of the branch output and of
#   the residual stream after the sublayer joins it: Pearson kurtosis E[(x-m)^4] / var^2 (3 for
#   a Gaussian; heavy tails, i.e. outlier features, push it up) and the largest |x|.
# "attention": per head [H], for each attention sublayer: the max logit and the mean entropy
#   (deepnorm.ops.logit_statistics), keys "<sublayer>_logit_max", "<sublayer>_entropy".
EXTRA_STATS = ("activations", "attention")
ACTIVATION_STAT_NAMES = ("branch_kurtosis", "branch_max_abs", "stream_kurtosis",
                         "stream_max_abs")


def check_extra_stats(extra_stats) -> frozenset:
    unknown = sorted(set(extra_stats) - set(EXTRA_STATS))
    if unknown:
        raise ValueError(f"extra_stats {', '.join(unknown)} not known; allowed: "
                         f"{', '.join(EXTRA_STATS)}")
    return frozenset(extra_stats)


def token_kurtosis(x_NxBxTxD: jax.Array, token_mask_BxT: jax.Array | None = None) -> jax.Array:
    """Pearson kurtosis E[(x - m)^4] / var^2 of every element of the real tokens' vectors,
    in float32 (``scipy.stats.kurtosis(fisher=False)`` of those elements); 0 for a constant
    tensor (a variance below float32 rounding of the mean square), whose kurtosis is
    undefined. Leading axes before [B, T, D] are kept: [N, B, T, D] gives [N]. No gradient
    flows through it."""
    w = _token_weights(x_NxBxTxD, token_mask_BxT)[..., None] / x_NxBxTxD.shape[-1]
    axes = tuple(range(x_NxBxTxD.ndim - 3, x_NxBxTxD.ndim))
    x = jax.lax.stop_gradient(x_NxBxTxD).astype(jnp.float32)
    mean = jnp.sum(w * x, axis=axes, keepdims=True)
    sq = jnp.square(x - mean)
    var = jnp.sum(w * sq, axis=axes)
    fourth = jnp.sum(w * jnp.square(sq), axis=axes)
    spread = var > 1e-10 * jnp.sum(w * jnp.square(x), axis=axes)
    return jnp.where(spread, fourth / jnp.where(spread, var, 1.0) ** 2, 0.0)


def token_max_abs(x_NxBxTxD: jax.Array, token_mask_BxT: jax.Array | None = None) -> jax.Array:
    """The largest |x| over the real tokens' elements, in float32 (0 for an empty mask);
    leading axes before [B, T, D] are kept."""
    x = jnp.abs(jax.lax.stop_gradient(x_NxBxTxD).astype(jnp.float32))
    if token_mask_BxT is not None:
        x = jnp.where(token_mask_BxT[..., None], x, 0.0)
    return jnp.max(x, axis=tuple(range(x.ndim - 3, x.ndim)))


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Block(nnx.Module):
    """One layer: self-attention, cross-attention (decoder of encoder_decoder), feed-forward.

    Each sublayer joins the residual stream by ``cfg.residual``, and the block builds what
    that scheme declares (``deepnorm.residual.Scheme``): its norms, its parameters, its
    inner norms. A ``Stack`` builds its layers with ``gains`` and a traced ``layer_index`` and
    passes each layer's constants; ``Block.standalone`` builds one layer for use on its own.
    """

    def __init__(self, cfg: TransformerConfig, *, cross: bool = False, gains: dict | None = None,
                 layer_index: jax.Array | int = 1, stack: str | None = None,
                 rngs: nnx.Rngs):
        scheme = cfg.scheme
        stack = stack or _default_stack(cfg)
        self.residual, self.dropout_rate = cfg.residual, cfg.dropout_rate
        self.consts = None  # a standalone block's own constants (Block.standalone)
        gains = role_gains(cfg, stack) if gains is None else gains
        scaled = {role: g * layer_gain(cfg, layer_index) for role, g in gains.items()}
        self.sublayer_names = ("self_attn", "cross_attn", "ffn") if cross else ("self_attn", "ffn")
        attn = dict(inner_norm=ATTN in scheme.inner_norm, head_scale=scheme.head_scale,
                    sphere_qk=scheme.sphere_qk)
        self.self_attn = Attention(cfg, scaled, **attn, rngs=rngs)
        self.cross_attn = Attention(cfg, scaled, **attn, rngs=rngs) if cross else None
        self.ffn = FeedForward(cfg, scaled, inner_norm=FFN in scheme.inner_norm,
                               scale=scheme.ffn_scale, rngs=rngs)
        num_layers = cfg.encoder_layers if stack == "encoder" else cfg.decoder_layers
        norm = lambda: config_norm(cfg, cfg.d_model)  # noqa: E731
        count = len(self.sublayer_names)
        for i, name in enumerate(self.sublayer_names):
            kind = sublayer_kind(name)
            setattr(self, f"{name}_norm", norm() if kind in scheme.norm else None)
            setattr(self, f"{name}_norm_out", norm() if kind in scheme.norm_out else None)
            for p in scheme.params:
                if kind in p.kinds:
                    # the sublayer's place in the stack, or the layer's index (Param.per_layer)
                    position = layer_index if p.per_layer else (layer_index - 1) * count + i
                    value, axes = p.value(cfg, num_layers, position)
                    setattr(self, f"{name}_{p.name}", nnx.Param(value, axes=axes))

    @classmethod
    def standalone(cls, cfg: TransformerConfig, layer_index: int = 1, *,
                   stack: str | None = None, cross: bool = False, rngs: nnx.Rngs) -> "Block":
        """Layer ``layer_index`` (1-based) of ``cfg``'s ``stack`` as a module of its own: the
        init gains of that layer and its constants (DeepNorm's alpha, ...) built in, so
        ``block(x)`` needs no constants. ``stack`` defaults to the one ``cfg.arch`` has."""
        stack = stack or _default_stack(cfg)
        consts = block_constants(cfg, stack, layer_index)
        block = cls(cfg, cross=cross, layer_index=layer_index, stack=stack, rngs=rngs)
        block.consts = consts
        return block

    def _consts(self, consts):
        if consts is not None:
            return consts
        if self.consts is None:
            raise ValueError("this Block has no constants of its own: pass its layer's "
                             "(deepnorm.initializers.layer_constants) or build it with "
                             "Block.standalone")
        return self.consts

    def _sublayers(self, context, self_mask, cross_mask, causal, dropout_key, records,
                   branches=None, attn_stats=None, token_w=None, norm_ctx=None):
        def stats_kw(name):  # attention statistics land in attn_stats[name] when requested
            if attn_stats is None:
                return {}
            return dict(stats_out=attn_stats.setdefault(name, {}), query_weights_BxT=token_w)

        branches = branches or {
            "self_attn": lambda h: self.self_attn(h, mask_Bx1xTxS=self_mask, causal=causal,
                                                  norm_ctx=norm_ctx, **stats_kw("self_attn")),
            "cross_attn": lambda h: self.cross_attn(h, context, mask_Bx1xTxS=cross_mask,
                                                    norm_ctx=norm_ctx, **stats_kw("cross_attn")),
            "ffn": lambda h: self.ffn(h, norm_ctx),
        }
        scheme = residual_lib.get(self.residual)
        out = []
        for i, name in enumerate(self.sublayer_names):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)

            def f(h, branch=branches[name], key=key):
                y = _dropout(branch(h), self.dropout_rate, key)
                records.append(y)
                return y

            kind = sublayer_kind(name)
            norm = getattr(self, f"{name}_norm")
            params = {p.name: getattr(self, f"{name}_{p.name}")[...]
                      for p in scheme.params if kind in p.kinds}
            out.append(residual_lib.Sublayer(
                f=f, ln=(lambda h: h) if norm is None else bind(norm, norm_ctx),
                ln_out=bind(getattr(self, f"{name}_norm_out"), norm_ctx), kind=kind,
                params=params))
        return scheme, out

    def __call__(self, x_BxTxD, consts=None, *, context_BxSxD=None, self_mask=None, cross_mask=None,
                 causal=False, dropout_key=None, token_mask_BxT=None,
                 extra_stats: frozenset = frozenset(), train_norms: bool = False):
        """Returns the new residual stream and a dict of per-sublayer statistics, each [S],
        each a mean over the tokens ``token_mask_BxT`` marks real (all tokens if None), plus
        the ``extra_stats`` groups asked for (``EXTRA_STATS``).

        ``train_norms``: batch-statistics norms (deepnorm.batch_norms) normalize by the
        statistics of the real tokens and update their running statistics in place; else
        they use the running ones. Other norms ignore it.

        For a scheme with several streams (``Scheme.streams`` n > 1, e.g. ResiDual) the stream
        is the stacked [n, B, T, D] (``Scheme.enter`` makes it from [B, T, D]); for DLCL the
        [L + 2, B, T, D] stream and layer history (``Scheme.carry``)."""
        branch_outputs: list[jax.Array] = []
        scheme = residual_lib.get(self.residual)
        w = _token_weights(scheme.observed(x_BxTxD), token_mask_BxT)
        attn_stats = {} if "attention" in extra_stats else None
        scheme, sublayers = self._sublayers(
            context_BxSxD, self_mask, cross_mask, causal, dropout_key, branch_outputs,
            attn_stats=attn_stats, token_w=w,
            norm_ctx=BatchContext(token_mask_BxT, train_norms))
        states = scheme.apply(x_BxTxD, sublayers, self._consts(consts))
        # A multi-stream scheme's statistics are those of its first stream.
        inputs = [scheme.observed(s) for s in [x_BxTxD] + states[:-1]]
        states_seen = [scheme.observed(s) for s in states]
        stats = {
            "stream_in_norm": jnp.stack([_token_norm(s, w) for s in inputs]),
            "branch_norm": jnp.stack([_token_norm(y, w) for y in branch_outputs]),
            "branch_var": jnp.stack([token_var(y, token_mask_BxT) for y in branch_outputs]),
            "stream_out_norm": jnp.stack([_token_norm(s, w) for s in states_seen]),
        }
        if "activations" in extra_stats:
            # All 2S tensors in one stack: one set of reductions instead of 2S (each op inside
            # the layer scan is a kernel launch per layer, which is what these cost on a CPU).
            both = jnp.stack(branch_outputs + states_seen)
            kurtosis = token_kurtosis(both, token_mask_BxT)
            max_abs = token_max_abs(both, token_mask_BxT)
            n = len(branch_outputs)
            stats.update(branch_kurtosis=kurtosis[:n], stream_kurtosis=kurtosis[n:],
                         branch_max_abs=max_abs[:n], stream_max_abs=max_abs[n:])
        for name, values in (attn_stats or {}).items():
            stats.update({f"{name}_{stat}": value for stat, value in values.items()})
        return states[-1], stats


    def decode(self, x_BxTxD, consts, cache: dict, *, index, cross_mask=None):
        """The block on T new positions with cached self-attention keys and values.

        ``cache`` holds this layer's ``k``, ``v`` [B, T_max, H, K] (positions before ``index``)
        and, in a decoder of encoder_decoder, ``cross_k``, ``cross_v`` [B, S, H, K]. Every other
        operation is position-wise, so the same residual scheme and sublayers give the full
        pass's outputs at these positions. Returns the stream and the new ``k``, ``v``.
        """
        new = {}

        def self_attn(h):
            y, new["k"], new["v"] = self.self_attn.cached_self_attention(
                h, cache["k"], cache["v"], index)
            return y

        branches = {"self_attn": self_attn, "ffn": self.ffn,
                    "cross_attn": lambda h: self.cross_attn.attend_kv(
                        h, cache["cross_k"], cache["cross_v"], cross_mask)}
        scheme, sublayers = self._sublayers(None, None, None, False, None, [],
                                            branches=branches)
        states = scheme.apply(x_BxTxD, sublayers, self._consts(consts))
        return states[-1], new


class Stack(nnx.Module):
    """L identical blocks with stacked parameters, run by one scan (``scan_layers=False``: a
    Python loop over the same stacked arrays, for compile-time anchors and shallow CPU runs)."""

    def __init__(self, cfg: TransformerConfig, name: str, *, rngs: nnx.Rngs):
        self.config, self.name = cfg, name
        self.num_layers = cfg.encoder_layers if name == "encoder" else cfg.decoder_layers
        cross = name == "decoder" and cfg.arch == "encoder_decoder"
        gains = role_gains(cfg, name)

        @nnx.split_rngs(splits=self.num_layers)
        @nnx.vmap(in_axes=(0, 0), out_axes=0)
        def make_layers(rngs, layer_index):
            return Block(cfg, cross=cross, gains=gains, layer_index=layer_index, stack=name,
                         rngs=rngs)

        self.layers = make_layers(rngs, jnp.arange(1, self.num_layers + 1, dtype=jnp.float32))
        norm = lambda: config_norm(cfg, cfg.d_model)  # noqa: E731
        self.input_norm = norm() if cfg.scheme.input_norm else None
        self.final_norm = norm() if cfg.scheme.final_norm else None

    def __call__(self, x_BxTxD, *, context_BxSxD=None, self_mask=None, cross_mask=None,
                 causal=False, dropout_key=None, token_mask_BxT=None,
                 extra_stats: frozenset = frozenset(), train_norms: bool = False):
        """Returns the stack's output and statistics with a leading layer axis, each [L, S]
        (the attention statistics of ``extra_stats``: [L, H]).

        ``token_mask_BxT`` (True at real tokens; None: all) selects the tokens the statistics
        average over; with per-token norms it changes nothing in the computation itself, and
        batch-statistics norms take their statistics over those tokens only.
        ``train_norms``: see ``Block``; the layers' updated running statistics [L, ...] come
        out of the scan and are written back into ``self.layers``.
        """
        cfg = self.config
        norm_ctx = BatchContext(token_mask_BxT, train_norms)
        x_BxTxD = apply_norm(self.input_norm, x_BxTxD, norm_ctx)
        updates = train_norms and cfg.batch_stats
        graphdef, layer_state = nnx.split(self.layers)
        consts = layer_constants(cfg, self.name, self.num_layers)
        scheme = cfg.scheme
        keys = (None if dropout_key is None
                else jax.random.split(dropout_key, self.num_layers))

        def body(x, xs):
            state, c, key = xs
            block = nnx.merge(graphdef, state)
            x, stats = block(x, c, context_BxSxD=context_BxSxD, self_mask=self_mask,
                             cross_mask=cross_mask, causal=causal, dropout_key=key,
                             token_mask_BxT=token_mask_BxT, extra_stats=extra_stats,
                             train_norms=train_norms)
            # The layer's running statistics after its update, stacked [L, ...] by the scan.
            return x, (stats, nnx.state(block, nnx.BatchStat) if updates else None)

        policy = model_remat_policy(cfg.remat_policy)
        if policy != "none":
            # prevent_cse=False: inside a scan the loop boundary already stops XLA from merging
            # the recomputation back into the forward pass, and CSE barriers cost speed. The
            # unrolled stack has no loop boundary; on XLA:CPU its gradient needs the same temp
            # memory under every policy, none included, with prevent_cse True as with False
            # (docs/backends.md): there remat saves no memory, and barriers would not help.
            body = jax.checkpoint(body, policy=REMAT_POLICIES[policy],
                                  prevent_cse=False)
        x, (stats, batch_stats) = run_layers(body, scheme.enter(x_BxTxD, self.num_layers),
                                             (layer_state, consts, keys), cfg)
        if updates:
            nnx.update(self.layers, batch_stats)
        return scheme.leave(x, bind(self.final_norm, norm_ctx)), stats


    def cross_kv(self, context_BxSxD):
        """Every layer's cross-attention keys and values of the encoder output, stacked:
        ``(k, v)``, each [L, B, S, H, K], computed once per decoded batch."""
        graphdef, layer_state = nnx.split(self.layers)

        def one(state):
            return nnx.merge(graphdef, state).cross_attn.context_kv(context_BxSxD)

        return jax.lax.map(one, layer_state)

    def decode(self, x_BxTxD, cache: dict, *, index, cross_mask=None):
        """The stack on T new positions from a cache of stacked per-layer arrays (``k``, ``v``
        [L, B, T_max, H, K], ``cross_k``, ``cross_v`` [L, B, S, H, K]): one scan over the
        layers (a Python loop for ``scan_layers=False``). Returns the output and the cache."""
        if self.input_norm is not None:
            x_BxTxD = self.input_norm(x_BxTxD)
        graphdef, layer_state = nnx.split(self.layers)
        consts = layer_constants(self.config, self.name, self.num_layers)

        def body(x, xs):
            state, c, layer_cache = xs
            return nnx.merge(graphdef, state).decode(x, c, layer_cache, index=index,
                                                     cross_mask=cross_mask)

        scheme = self.config.scheme
        x, kv = run_layers(body, scheme.enter(x_BxTxD, self.num_layers),
                           (layer_state, consts, cache), self.config,
                           unroll=1)
        return scheme.leave(x, self.final_norm), dict(cache, **kv)  # the cross-attention keys and values pass through


def run_layers(body, x, xs, cfg, unroll: int | None = None):
    """``body(x, layer_xs) -> (x, y)`` over the layers: one scan (``cfg.scan_layers``) or a
    Python loop over the unstacked arrays; returns the last x and the ys stacked [L, ...]."""
    if cfg.scan_layers:
        return jax.lax.scan(body, x, xs, unroll=cfg.scan_unroll if unroll is None else unroll)
    per_layer = []
    for layer_xs in unstack_layers(xs):
        x, y = body(x, layer_xs)
        per_layer.append(y)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *per_layer)


def unstack_layers(tree) -> list:
    """A tree of [L, ...] arrays as L trees of [...] arrays, for the unrolled stack.

    ``jnp.unstack``, not ``a[i]`` per layer: the gradient of one unstack is one stack per
    parameter, while L separate index ops make L zero-padded gradients that XLA adds up, O(L^2)
    memory traffic (d=512 x 12 float32 on CPU: 1,320 ms per step with indexing, 762 with
    unstack; docs/performance.md, "Depth").
    """
    leaves, treedef = jax.tree.flatten(tree)
    columns = [jnp.unstack(leaf) for leaf in leaves]
    return [treedef.unflatten(list(row)) for row in zip(*columns)]


def sinusoidal_positions(length: int, dim: int) -> np.ndarray:
    """The fixed sin/cos position encoding of Vaswani et al. 2017, [length, dim]."""
    pos = np.arange(length)[:, None]
    inv = np.exp(-math.log(10000.0) * np.arange(0, dim, 2) / dim)
    table = np.zeros((length, dim), np.float32)
    table[:, 0::2] = np.sin(pos * inv)
    table[:, 1::2] = np.cos(pos * inv)[:, : dim // 2]
    return table


class Transformer(nnx.Module):
    """Encoder-only (masked LM), decoder-only (causal LM) or encoder-decoder (seq2seq).

    ``model(inputs)`` for encoder / decoder, ``model(inputs, decoder_inputs)`` for
    encoder_decoder. Returns ``(logits, aux)``: float32 logits [B, T, vocab] and
    ``aux[stack][stat]`` with per-layer, per-sublayer statistics [L, S] plus
    ``aux[stack]["input_var"]``, the variance of the stream entering the stack. Every
    statistic averages over the stack's real tokens: the positions whose input id (``inputs``
    for the encoder and the decoder-only model, ``decoder_inputs`` for the decoder of
    encoder_decoder) is not ``PAD_ID``. That is the encoder's attention padding mask; for a
    decoder it counts the position after the last real target too (its input is a real token,
    its target padding), the stream a causal model computes from real tokens only.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d = cfg.d_model
        # N(0, 1/d) scaled by sqrt(d) on lookup: unit-variance inputs whatever the width.
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (cfg.vocab_size, d)) * d ** -0.5,
                               axes=("vocab", "embed"))
        self.pos_embed = (nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.max_len, d)),
                                    axes=(None, "embed"))
                          if cfg.positions == "learned" else None)
        self.encoder = Stack(cfg, "encoder", rngs=rngs) if cfg.encoder_layers else None
        self.decoder = Stack(cfg, "decoder", rngs=rngs) if cfg.decoder_layers else None
        self.head = (None if cfg.tie_embeddings else
                     Dense(d, cfg.vocab_size, gain=1.0, axes=("embed", "vocab"), use_bias=False,
                           precision=cfg.matmul_precision,
                           dtype=jnp.dtype(cfg.dtype), rngs=rngs))
        # nGPT's s_z per vocabulary entry: stored 1/sqrt(d), used times sqrt(d) (1 at init).
        self.logit_scale = (nnx.Param(jnp.full((cfg.vocab_size,), residual_lib.ngpt_scale(d),
                                               jnp.float32), axes=("vocab",))
                            if cfg.scheme.logit_scale else None)
        if cfg.scheme.project is not None:  # the scheme's weight constraint holds from step 0
            state = nnx.state(self, nnx.Param)
            nnx.replace_by_pure_dict(state, cfg.scheme.project(nnx.to_pure_dict(state)))
            nnx.update(self, state)

    def _embed(self, tokens_BxT, key, *, offset=None, table_len=None):
        """Token plus position embeddings; ``offset`` (a traced index) and ``table_len`` (the
        cache length, static) place T decoded tokens at positions offset .. offset + T - 1."""
        cfg = self.config
        t = tokens_BxT.shape[1]
        if cfg.positions == "learned" and max(t, table_len or 0) > cfg.max_len:
            raise ValueError(f"sequence length {max(t, table_len or 0)} exceeds "
                             f"model.max_len={cfg.max_len}")
        x = jnp.take(self.embed[...], tokens_BxT, axis=0) * math.sqrt(cfg.d_model)
        if offset is None:
            pos = (self.pos_embed[:t] if self.pos_embed is not None
                   else sinusoidal_positions(t, cfg.d_model))
        else:
            table = (self.pos_embed[...] if self.pos_embed is not None
                     else jnp.asarray(sinusoidal_positions(table_len, cfg.d_model)))
            pos = jax.lax.dynamic_slice_in_dim(table, offset, t, axis=0)
        x = x + pos[None]
        # The residual stream stays float32 even with dtype=bfloat16: only matmul inputs are
        # cast (deepnorm.layers.Dense), so a 1,000-term sum of branch outputs keeps its precision.
        return _dropout(x, cfg.dropout_rate, key).astype(jnp.float32)

    def _logits(self, x_BxTxD):
        if self.head is not None:
            logits = self.head(x_BxTxD).astype(jnp.float32)
        else:
            # Tied head: the embedding's transpose, in the compute dtype like every other matmul.
            logits = matmul(x_BxTxD, self.embed[...], jnp.dtype(self.config.dtype),
                            kernel_axis=1, precision=self.config.matmul_precision)
        if self.logit_scale is not None:
            logits = logits * (self.logit_scale[...] / residual_lib.ngpt_scale(x_BxTxD.shape[-1]))
        return logits

    def __call__(self, inputs_BxT, decoder_inputs_BxT=None, *, deterministic: bool = True,
                 dropout_key: jax.Array | None = None, extra_stats=()):
        """``extra_stats``: the statistics groups of ``EXTRA_STATS`` to add to ``aux`` (training
        diagnostics); a static choice, so those not asked for are never computed.

        ``deterministic=False`` is the training forward pass: dropout on, and the
        batch-statistics norms (``model.norm`` batchnorm / powernorm) normalize by the real
        tokens' statistics and update their running statistics in the model (read them with
        ``nnx.state(model, nnx.BatchStat)``); ``deterministic=True`` uses the running ones."""
        cfg = self.config
        train_norms = not deterministic
        extra_stats = check_extra_stats(extra_stats)
        if (decoder_inputs_BxT is None) != (cfg.arch != "encoder_decoder"):
            raise ValueError(
                f"arch={cfg.arch!r} takes {'inputs and decoder_inputs' if cfg.arch == 'encoder_decoder' else 'inputs only'}")
        if not deterministic and cfg.dropout_rate > 0 and dropout_key is None:
            raise ValueError("deterministic=False with dropout_rate > 0 needs a dropout_key")
        keys = (jax.random.split(dropout_key, 4) if (not deterministic and dropout_key is not None)
                else [None] * 4)
        aux = {}
        if cfg.arch == "decoder":
            real_BxT = inputs_BxT != PAD_ID
            x = self._embed(inputs_BxT, keys[0])
            aux_in = token_var(x, real_BxT)
            x, aux["decoder"] = self.decoder(x, causal=True, dropout_key=keys[1],
                                             token_mask_BxT=real_BxT, extra_stats=extra_stats,
                                             train_norms=train_norms)
            aux["decoder"]["input_var"] = aux_in
            return self._logits(x), aux
        real_BxS = inputs_BxT != PAD_ID
        pad_mask_Bx1x1xS = real_BxS[:, None, None, :]
        x = self._embed(inputs_BxT, keys[0])
        aux_in = token_var(x, real_BxS)
        enc, aux["encoder"] = self.encoder(x, self_mask=pad_mask_Bx1x1xS, dropout_key=keys[1],
                                           token_mask_BxT=real_BxS, extra_stats=extra_stats,
                                           train_norms=train_norms)
        aux["encoder"]["input_var"] = aux_in
        if cfg.arch == "encoder":
            return self._logits(enc), aux
        real_BxT = decoder_inputs_BxT != PAD_ID
        y = self._embed(decoder_inputs_BxT, keys[2])
        aux_in = token_var(y, real_BxT)
        y, aux["decoder"] = self.decoder(y, context_BxSxD=enc, cross_mask=pad_mask_Bx1x1xS,
                                         causal=True, dropout_key=keys[3],
                                         token_mask_BxT=real_BxT, extra_stats=extra_stats,
                                         train_norms=train_norms)
        aux["decoder"]["input_var"] = aux_in
        return self._logits(y), aux

    # Incremental decoding (deepnorm.decoding.incremental) --------------------------------------

    def encode(self, inputs_BxS):
        """The encoder output and its padding mask [B, 1, 1, S] (encoder_decoder)."""
        pad_mask_Bx1x1xS = (inputs_BxS != PAD_ID)[:, None, None, :]
        enc, _ = self.encoder(self._embed(inputs_BxS, None), self_mask=pad_mask_Bx1x1xS)
        return enc, pad_mask_Bx1x1xS

    def init_decode_cache(self, batch_size: int, max_len: int, inputs_BxS=None) -> dict:
        """An empty decoder cache for ``max_len`` positions: per-layer self-attention keys and
        values stacked as [L, B, max_len, H, K] (the layout ``ops.attention`` reads), and for
        encoder_decoder the encoder's cross-attention keys and values, computed here once."""
        cfg = self.config
        shape = (cfg.decoder_layers, batch_size, max_len, cfg.num_heads, cfg.head_dim)
        layers = {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)}
        cache = {"index": jnp.zeros((), jnp.int32), "layers": layers}
        if cfg.arch == "encoder_decoder":
            if inputs_BxS is None:
                raise ValueError("an encoder_decoder cache needs the source inputs_BxS")
            enc, cache["cross_mask"] = self.encode(inputs_BxS)
            layers["cross_k"], layers["cross_v"] = self.decoder.cross_kv(enc)
        return cache

    def decode_step(self, tokens_BxT, cache: dict):
        """Logits [B, T, vocab] of T new decoder tokens at positions ``cache["index"]`` on,
        and the cache with them added: the full pass's logits at those positions."""
        index = cache["index"]
        table_len = cache["layers"]["k"].shape[2]
        y = self._embed(tokens_BxT, None, offset=index, table_len=table_len)
        y, layers = self.decoder.decode(y, cache["layers"], index=index,
                                        cross_mask=cache.get("cross_mask"))
        new = dict(cache, layers=layers, index=index + tokens_BxT.shape[1])
        return self._logits(y), new
