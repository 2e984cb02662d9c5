"""How a sublayer joins the residual stream (``model.residual``): one declaration per scheme.

A :class:`Scheme` holds everything a placement needs, and is the only place that names it:

``step``       the paper's one-line equation ``(x, s, c) -> x`` on one sublayer, of the stream
               ``x``, a :class:`Sublayer` ``s`` (its branch ``s.f``, its norms and the scheme's
               parameters) and the layer's scanned constants ``c``; or ``layer`` for an
               equation over a whole layer (B2T)
``norm`` ...   which norms it needs: around each branch (``norm``; before it for Pre-LN, after
               the add for Post-LN), on the branch output (``norm_out``), inside the branch
               (``inner_norm``: before the attention output projection, after the FFN
               activation), on the embedding (``input_norm``), after the stack (``final_norm``)
``params``     its extra learned parameters per sublayer and their init (gate, omega, ...)
``constants``  its layer-index constants, arrays scanned with the weights
``init``       what ``model.init="auto"`` means for it
``sphere_qk`` ...  pieces outside the block (nGPT): per-head unit q and k with a learned
               scale (``sphere_qk``), a learned scale on the FFN's pre-activation
               (``ffn_scale``), on the logits (``logit_scale``), a map of the embedding output
               before the first layer (``embed_map``), and ``project(params) -> params``, which
               the training step applies after every optimizer update (and the model once at
               init)
``norm_feeds`` what the output of ``norm`` feeds, for folding it away (deepnorm.export):
               ``"branch"`` (only the branch's first projections), ``"stream"`` (it is the
               residual stream), ``"mixed"`` (by layer); ``centerable`` whether LayerNorm's
               centering can be folded into the stream's writers exactly

``Block`` and ``Stack`` (deepnorm.transformer) build from the declaration; the config validates
against it; the analysis lists it. Each sublayer is of kind ``attn`` (self- or
cross-attention) or ``ffn``; the norm and parameter fields say which kinds they apply to.
Adding a scheme is one ``register(Scheme(...))`` here, its test and its README row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ATTN, FFN = "attn", "ffn"
BOTH = frozenset({ATTN, FFN})
NONE = frozenset()


def sublayer_kind(name: str) -> str:
    """``self_attn`` / ``cross_attn`` -> ``attn``; ``ffn`` -> ``ffn``."""
    return FFN if name == "ffn" else ATTN


@dataclasses.dataclass
class Sublayer:
    """One branch F (attention or FFN) and what its scheme needs around it.

    The scheme's own parameters are attributes too: ``s.gate`` is ``s.params["gate"]``.
    """

    f: Callable[[Array], Array]  # the branch, dropout included
    ln: Callable[[Array], Array]  # its norm (identity for the norm-free schemes)
    ln_out: Callable[[Array], Array] | None = None  # norm on the branch output
    kind: str = ATTN
    params: Mapping[str, Array] = dataclasses.field(default_factory=dict)

    def __getattr__(self, name):
        try:
            return self.__dict__["params"][name]
        except KeyError:
            raise AttributeError(f"this scheme's sublayer has no parameter {name!r}") from None


@dataclasses.dataclass(frozen=True)
class Param:
    """An extra learned parameter of every sublayer of ``kinds``, named ``{sublayer}_{name}``
    in the block (``self_attn_gate``, ``ffn_omega``).

    ``init`` is a number or ``init(cfg, num_layers, position) -> number or array``
    (``num_layers``: the stack's; ``position``: the sublayer's 0-based place in the stack, or
    with ``per_layer`` the layer's 1-based index; traced while the stacked layers are built);
    ``shape`` is ``"scalar"``, ``"d_model"`` (one value per feature), ``"history"`` (one value
    per layer output of the stack, the embedding's included: ``num_layers + 1``) or a tuple
    of sizes.
    """

    name: str
    init: float | Callable[..., Any]
    shape: str | tuple[int, ...] = "scalar"
    kinds: frozenset = BOTH
    per_layer: bool = False  # init's third argument is the 1-based layer index

    def value(self, cfg, num_layers: int, position=0) -> tuple[Array, tuple]:
        """The initial array and its logical axes."""
        v = self.init(cfg, num_layers, position) if callable(self.init) else self.init
        if self.shape == "scalar":
            shape, axes = (), ()
        elif self.shape == "d_model":
            shape, axes = (cfg.d_model,), ("norm",)
        elif self.shape == "history":
            shape, axes = (num_layers + 1,), (None,)
        else:
            shape, axes = tuple(self.shape), (None,) * len(self.shape)
        return jnp.broadcast_to(jnp.asarray(v, jnp.float32), shape), axes


def _no_constants(cfg, stack: str, index_L: np.ndarray) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One residual scheme, declared once (see the module docstring for the fields)."""

    name: str
    label: str  # for figures
    color: str  # one fixed colour per scheme in every figure
    step: Callable | None = None  # (x, Sublayer, consts) -> x, applied per sublayer
    layer: Callable | None = None  # (x, [Sublayer], consts) -> [x after each sublayer]
    norm: frozenset = BOTH  # branch kinds with a norm `{sublayer}_norm`
    norm_out: frozenset = NONE  # kinds with a norm on the branch output `{sublayer}_norm_out`
    inner_norm: frozenset = NONE  # kinds with a norm inside the branch (`inner_norm`)
    head_scale: bool = False  # a learned scalar per attention head before the out-projection
    input_norm: bool = False
    final_norm: bool = False
    # A scheme with a norm that still works with model.norm="none" (Post-LN: x + F(x), as
    # T-Fixup runs it). A scheme without any norm requires model.norm="none".
    norm_optional: bool = False
    params: tuple[Param, ...] = ()
    # constants(cfg, stack, index_L) -> {name: [L] array}; index_L the 1-based layer indices.
    constants: Callable = _no_constants
    init: str = "xavier"  # model.init="auto"
    profiled: bool = False  # needs a forward pass at init to set its parameters (Admin)
    # Residual streams carried from layer to layer: n > 1 makes the stack's carry [n, B, T, D]
    # (every stream starts as the embedding output) and ``merge(streams, final_norm)`` the
    # stack's output.
    streams: int = 1
    merge: Callable | None = None
    # A carry other than n copies of the embedding output: ``carry(x_BxTxD, num_layers)`` makes
    # the stack's carry, whose [0] is the stream the layer reads (DLCL: the stream and the
    # history of every layer's output, [L + 2, B, T, D]).
    carry: Callable | None = None
    # What the output of `norm` feeds: "branch" (only the branch's first projections, so its
    # gain and bias fold into them), "stream" (the norm's output is the stream, carried on the
    # skip path too: the affine stays) or "mixed" (by layer); None: not declared, left
    # unfolded. `norm_scale` names a constant the norm's output is multiplied by first.
    norm_feeds: str | None = None
    norm_scale: str | None = None
    # Every write into the stream is a scalar-weighted sum of the writing projections' outputs
    # and every read goes through a norm: removing the projections' d_model mean keeps the
    # stream at zero mean, so LayerNorm's centering folds away exactly.
    centerable: bool = False
    # The stack's output is its final norm's output (so the norm's affine folds into the head
    # or the cross-attention); False where `merge` adds another stream to it (ResiDual).
    final_norm_is_output: bool = True
    # nGPT's pieces outside the block (deepnorm.layers, deepnorm.transformer):
    # q and k of every head L2-normalized and scaled by a learned s_qk, softmax scale sqrt(K);
    sphere_qk: bool = False
    # the FFN's pre-activation multiplied by a learned s_v [d_ff] times sqrt(d_model);
    ffn_scale: bool = False
    # the logits multiplied by a learned s_z [vocab];
    logit_scale: bool = False
    # embed_map(x_BxTxD): the stream entering the first layer from the embedding output;
    embed_map: Callable | None = None
    # project(params) -> params on the pure-dict parameter tree, applied after every optimizer
    # update by the training step (deepnorm.training.steps) and once by the model at init.
    project: Callable | None = None

    @property
    def uses_norm(self) -> bool:
        return bool(self.norm | self.norm_out | self.inner_norm) or self.input_norm

    @property
    def multi_stream(self) -> bool:
        """Whether the stack's carry is more than the stream [B, T, D]."""
        return self.streams > 1 or self.carry is not None

    def enter(self, x_BxTxD: Array, num_layers: int) -> Array:
        """The stream(s) entering the first of the stack's ``num_layers`` layers."""
        if self.embed_map is not None:
            x_BxTxD = self.embed_map(x_BxTxD)
        if self.carry is not None:
            return self.carry(x_BxTxD, num_layers)
        if self.streams == 1:
            return x_BxTxD
        return jnp.broadcast_to(x_BxTxD, (self.streams,) + x_BxTxD.shape)

    def leave(self, x: Array, final_norm: Callable | None) -> Array:
        """The stack's output from the stream(s) leaving its last layer."""
        if self.merge is not None:
            return self.merge(x, final_norm)
        return x if final_norm is None else final_norm(x)

    def observed(self, x: Array) -> Array:
        """The stream the per-layer statistics describe: the first one of several."""
        return x[0] if self.multi_stream else x

    def apply(self, x: Array, sublayers: Sequence[Sublayer], c) -> list[Array]:
        """Runs one layer's sublayers; returns the stream after each sublayer (the carry
        after the last; before it, a carry or just its ``observed`` stream [None])."""
        if self.layer is not None:
            return self.layer(x, sublayers, c)
        states = []
        for s in sublayers:
            x = self.step(x, s, c)
            states.append(x)
        return states


SCHEMES: dict[str, Scheme] = {}


def register(scheme: Scheme) -> Scheme:
    """Adds a scheme to ``model.residual``'s values (and so to train.py and the analysis)."""
    if scheme.name in SCHEMES:
        raise ValueError(f"residual scheme {scheme.name!r} is already registered")
    if (scheme.step is None) == (scheme.layer is None):
        raise ValueError(f"scheme {scheme.name!r} needs exactly one of step and layer")
    if scheme.norm_feeds not in (None, "branch", "stream", "mixed"):
        raise ValueError(f"scheme {scheme.name!r}: norm_feeds={scheme.norm_feeds!r}, allowed: "
                         "None, 'branch', 'stream', 'mixed'")
    SCHEMES[scheme.name] = scheme
    return scheme


def get(name: str) -> Scheme:
    return SCHEMES[name]


# The schemes ------------------------------------------------------------------------------


def post(x, s, c):
    """Post-LN (Vaswani et al. 2017): x <- LN(x + F(x))."""
    return s.ln(x + s.f(x))


register(Scheme("post", "Post-LN", "#d62728", post, norm_optional=True, norm_feeds="stream"))


def pre(x, s, c):
    """Pre-LN (Wang et al. 2019; Xiong et al. 2020): x <- x + F(LN(x)); final LN after the stack."""
    return x + s.f(s.ln(x))


register(Scheme("pre", "Pre-LN", "#1f77b4", pre, final_norm=True, norm_feeds="branch",
                centerable=True))


def sandwich(x, s, c):
    """Sandwich-LN (Ding et al. 2021, CogView): x <- x + LN(F(LN(x)))."""
    return x + s.ln_out(s.f(s.ln(x)))


register(Scheme("sandwich", "Sandwich-LN", "#9467bd", sandwich, norm_out=BOTH, final_norm=True,
                norm_feeds="branch"))


def peri(x, s, c):
    """Peri-LN (Kim et al. 2025): x <- x + LN_out(F(LN_in(x))).

    Per sublayer the same equation as Sandwich-LN; Peri-LN also normalizes the embedding output
    before the first layer (``input_norm``).
    """
    return x + s.ln_out(s.f(s.ln(x)))


register(Scheme("peri", "Peri-LN", "#8c564b", peri, norm_out=BOTH, input_norm=True,
                final_norm=True, norm_feeds="branch"))


def deepnorm(x, s, c):
    """DeepNorm (Wang et al. 2022, DeepNet): x <- LN(alpha * x + F(x))."""
    return s.ln(c["alpha"] * x + s.f(x))


def _deepnorm_constants(cfg, stack, index_L):
    # initializers imports config, which imports this module: import at call time.
    from deepnorm.initializers import deepnorm_coefficients
    alpha = deepnorm_coefficients(cfg.arch, cfg.encoder_layers, cfg.decoder_layers)[stack][0]
    return {"alpha": np.full(index_L.shape, alpha, np.float32)}


register(Scheme("deepnorm", "DeepNorm", "#2ca02c", deepnorm, constants=_deepnorm_constants,
                init="deepnorm", norm_feeds="stream"))


def subln(x, s, c):
    """SubLN / Magneto (Wang et al. 2022): x <- x + F(LN(x)), F carrying an extra inner LN
    (before the attention output projection, after the FFN activation)."""
    return x + s.f(s.ln(x))


register(Scheme("subln", "SubLN", "#e377c2", subln, inner_norm=BOTH, final_norm=True,
                init="subln", norm_feeds="branch", centerable=True))


def b2t(x, sublayers: Sequence[Sublayer], c) -> list[Array]:
    """B2T (Takase et al. 2022): Post-LN whose last norm also adds the layer's input x_l.

    h = LN(x + Attn(x)) [, h = LN(h + CrossAttn(h))]; x <- LN(h + FFN(h) + x_l).
    Works on a whole layer, so it returns the stream after each sublayer.
    """
    states, h = [], x
    for s in sublayers[:-1]:
        h = post(h, s, c)
        states.append(h)
    last = sublayers[-1]
    states.append(last.ln(h + last.f(h) + x))
    return states


register(Scheme("b2t", "B2T", "#7f7f7f", layer=b2t, norm_feeds="stream"))


def rezero(x, s, c):
    """ReZero (Bachlechner et al. 2020): x <- x + a * F(x), a = 0 at init, no norm."""
    return x + s.gate * s.f(x)


register(Scheme("rezero", "ReZero", "#bcbd22", rezero, norm=NONE, params=(Param("gate", 0.0),)))


def admin(x, s, c):
    """Admin (Liu et al. 2020): x <- LN(omega * x + F(x)), omega from a profiling pass."""
    return s.ln(s.omega * x + s.f(x))


register(Scheme("admin", "Admin", "#17becf", admin, profiled=True, norm_feeds="stream",
                params=(Param("omega", 1.0, shape="d_model"),)))


def mixln(x, s, c):
    """Mix-LN (Li et al. 2025): Post-LN in the first layers (c["is_post"]), Pre-LN after.

    Written as a select on the scanned flag rather than a Python branch, so every layer has one
    shape and the stack stays one scan; the unused norm costs one element-wise pass.
    """
    h = jnp.where(c["is_post"], x, s.ln(x))
    y = x + s.f(h)
    return jnp.where(c["is_post"], s.ln(y), y)


def _mixln_constants(cfg, stack, index_L):
    num_post = round(cfg.mixln_fraction * len(index_L))
    return {"is_post": index_L <= num_post}


register(Scheme("mixln", "Mix-LN", "#ff7f0e", mixln, final_norm=True,
                constants=_mixln_constants, norm_feeds="mixed"))


def lnscale(x, s, c):
    """LayerNorm-Scaling (Sun et al. 2025): x <- x + F(LN(x) / sqrt(l)), l the 1-based layer."""
    return x + s.f(s.ln(x) * c["lnscale"])


register(Scheme("lnscale", "LN-Scaling", "#393b79", lnscale, final_norm=True,
                norm_feeds="branch", norm_scale="lnscale", centerable=True,
                constants=lambda cfg, stack, index_L: {"lnscale": 1.0 / np.sqrt(index_L)}))


def fixup(x, s, c):
    """R-Fixup / Fixup (Zhang, Dauphin & Ma 2019): x <- x + m * F(x + b_in) + b_out, no norm.

    Scalars per branch: multiplier m = 1 and biases b_in = b_out = 0 at init; the init
    (``model.init="fixup"``) zeroes the last projection of each branch and scales the other by
    L^(-1/2). Fixup's scalar biases before the inner linear layer and the activation are
    subsumed by the projections' own bias vectors (``model.use_bias``).
    """
    return x + s.multiplier * s.f(x + s.bias_in) + s.bias_out


register(Scheme("fixup", "R-Fixup", "#ad494a", fixup, norm=NONE, init="fixup",
                params=(Param("multiplier", 1.0), Param("bias_in", 0.0),
                        Param("bias_out", 0.0))))


def normformer(x, s, c):
    """NormFormer (Shleifer, Weston & Ott 2021): Pre-LN plus three operations.

    attention: x <- x + LN_out(Attn(LN(x))), the heads scaled by learned gamma_h before the
    output projection; FFN: x <- lambda * x + W2 LN_in(act(W1 LN(x))), lambda learned per
    feature (the paper's optional residual scaling, 1 at init); final LN.
    """
    y = s.f(s.ln(x))
    if s.kind == ATTN:
        return x + s.ln_out(y)
    return s.resid_scale * x + y


register(Scheme("normformer", "NormFormer", "#e7969c", normformer, norm_out=frozenset({ATTN}),
                inner_norm=frozenset({FFN}), head_scale=True, final_norm=True, norm_feeds="branch",
                params=(Param("resid_scale", 1.0, shape="d_model", kinds=frozenset({FFN})),)))


def layerscale(x, s, c):
    """LayerScale (Touvron et al. 2021, CaiT): x <- x + diag(g) F(LN(x)); final LN.

    g per feature, initialized by CaiT's depth rule (``layerscale_init``).
    """
    return x + s.layerscale * s.f(s.ln(x))


def layerscale_init(cfg, num_layers: int, position=None) -> float:
    """CaiT's epsilon: 0.1 up to 18 layers, 1e-5 up to 24, 1e-6 deeper."""
    return 0.1 if num_layers <= 18 else 1e-5 if num_layers <= 24 else 1e-6


register(Scheme("layerscale", "LayerScale", "#6b6ecf", layerscale, final_norm=True,
                norm_feeds="branch",
                params=(Param("layerscale", layerscale_init, shape="d_model"),)))


def deepscale(x, s, c):
    """DeepScaleLM's norm-preserving skip (Kedia et al. 2024): x <- lambda x + beta F(LN(x)),
    lambda^2 + beta^2 = 1; final LN.

    beta^2 = 1/B with B the stack's branches (2 per layer, 3 with cross-attention): with
    unit-variance branch outputs the stream keeps its variance, and the embedding's share of
    it after the stack is (1 - 1/B)^B ~ 1/e, whatever the depth.
    """
    return c["alpha"] * x + c["beta"] * s.f(s.ln(x))


def _deepscale_constants(cfg, stack, index_L):
    per_layer = 3 if (stack == "decoder" and cfg.arch == "encoder_decoder") else 2
    beta = math.sqrt(1.0 / (per_layer * len(index_L)))
    return {"alpha": np.full(index_L.shape, math.sqrt(1.0 - beta ** 2), np.float32),
            "beta": np.full(index_L.shape, beta, np.float32)}


register(Scheme("deepscale", "DeepScaleLM", "#8ca252", deepscale, final_norm=True,
                constants=_deepscale_constants, norm_feeds="branch", centerable=True))


def rescaled(x, s, c):
    """Rescaled skip with LN (Liu et al. 2021, "Rethinking Skip Connection with Layer
    Normalization"): x <- LN(lambda x + F(x)), lambda = ``model.skip_lambda``."""
    return s.ln(c["alpha"] * x + s.f(x))


register(Scheme("rescaled", "Rescaled-LN", "#bd9e39", rescaled, norm_feeds="stream",
                constants=lambda cfg, stack, index_L: {
                    "alpha": np.full(index_L.shape, cfg.skip_lambda, np.float32)}))


def respost(x, s, c):
    """Res-Post-LN (Liu et al. 2022, Swin Transformer V2; OLMo 2): x <- x + LN(F(x)), the
    norm on the branch output only; final LN."""
    return x + s.ln_out(s.f(x))


register(Scheme("respost", "Res-Post-LN", "#5254a3", respost, norm=NONE, norm_out=BOTH,
                final_norm=True))


def resi_dual(x, s, c):
    """ResiDual (Xie et al. 2023): a Post-LN stream x_a and a Pre-LN-like dual stream x_d.

    x_a <- LN(x_a + F(x_a)); x_d <- x_d + F(x_a) (the same branch output); both start as the
    embedding output; the stack's output is x_a + LN_final(x_d). ``x`` is [2, B, T, D].
    """
    y = s.f(x[0])
    return jnp.stack([s.ln(x[0] + y), x[1] + y])


register(Scheme("resi_dual", "ResiDual", "#9c9ede", resi_dual, final_norm=True, streams=2,
                norm_feeds="stream", final_norm_is_output=False,
                merge=lambda x, final_norm: x[0] + final_norm(x[1])))


HYPER_STREAMS = 4  # n, the expansion rate: 4 residual streams


def hyper(x, s, c):
    """Hyper-connections (Zhu et al. 2024), static: n streams H [n, B, T, D] per position.

    h = sum_i a_i H_i; y = F(LN(h)); H_j <- sum_i A_ij H_i + b_j y. At init a is the one-hot
    e_(k mod n) of the sublayer's place k in the stack, A = I, b = 1 (Pre-LN while the streams
    are equal); every stream starts as the embedding output; the stack's output is
    LN_final(sum_i H_i).
    """
    h = jnp.einsum("n,nbtd->btd", s.width, x)
    y = s.f(s.ln(h))
    return jnp.einsum("nm,nbtd->mbtd", s.mix, x) + s.depth[:, None, None, None] * y


register(Scheme(
    "hyper", "Hyper-connections", "#cedb9c", hyper, final_norm=True, streams=HYPER_STREAMS,
    norm_feeds="branch", centerable=True,
    merge=lambda x, final_norm: final_norm(jnp.sum(x, axis=0)),
    params=(Param("width", lambda cfg, layers, k: jax.nn.one_hot(
                jnp.asarray(k).astype(jnp.int32) % HYPER_STREAMS, HYPER_STREAMS), shape=(HYPER_STREAMS,)),
            Param("mix", tuple(map(tuple, np.eye(HYPER_STREAMS))),
                  shape=(HYPER_STREAMS, HYPER_STREAMS)),
            Param("depth", 1.0, shape=(HYPER_STREAMS,)))))


def dlcl(x, sublayers: Sequence[Sublayer], c) -> list[Array]:
    """Pre-norm DLCL (Wang et al. 2019, "Learning Deep Transformer Models for Machine
    Translation", Sec. 3): each layer's input a learned combination of every earlier layer's
    normalized output, x_{l+1} = sum_{k=0..l} W_{l+1,k} LN_k(y_k).

    y_0 is the embedding output, with no norm (LN_0 = identity); y_l = the Pre-LN layer on x_l
    (x + F(LN(x)) per sublayer); LN_l its own norm per layer (``ffn_norm_out``: the FFN is each
    layer's last sublayer, so its output norm is the layer's); W lower-triangular scalars,
    initialized to the average, W_{l+1,k} = 1/(l+1) (wangqiangneu/dlcl's default
    ``init_value='avg'``); the stack's output LN_final(x_{L+1}). Layer l holds row l+1 of W
    (``ffn_dlcl``, [L + 1], entries k > l unused); x_1 = y_0 (W_{1,0} = 1, fixed here; the
    reference also learns this one scalar, which only scales the first layer's skip input).

    The carry is ``x`` = [x_l, LN_0(y_0), ..., LN_L(y_L)], [L + 2, B, T, D], the slots after
    l still zero: O(L) layer outputs per layer, so the scan's backward pass keeps O(L^2)
    (``benchmarks/stream_memory.py``); cached decoding carries it at the new positions only.
    A ``Block.standalone`` DLCL layer takes that carry, not [B, T, D].
    """
    h = x[0]
    states = []
    for s in sublayers:
        h = h + s.f(s.ln(h))
        states.append(h[None])  # the statistics read only the stream
    last = sublayers[-1]
    slot = jnp.asarray(c["layer"]).astype(jnp.int32)  # 1-based l: history slot l
    history = jax.lax.dynamic_update_index_in_dim(x[1:], last.ln_out(h), slot, axis=0)
    used = jnp.arange(history.shape[0]) <= slot
    w = jnp.where(used, last.dlcl, 0.0).astype(history.dtype)
    # Elementwise, not a matmul: a backend's default matmul precision (bf16 passes on TPU,
    # TF32 on GPU) would round the stream.
    x_next = jnp.sum(w[:, None, None, None] * history, axis=0)
    states[-1] = jnp.concatenate([x_next[None], history])
    return states


def _dlcl_carry(x_BxTxD, num_layers: int) -> Array:
    """[x_1 = y_0, y_0, 0, ..., 0]: the stream entering layer 1 and the history."""
    zeros = jnp.zeros((num_layers,) + x_BxTxD.shape, x_BxTxD.dtype)
    return jnp.concatenate([x_BxTxD[None], x_BxTxD[None], zeros])


def dlcl_init(cfg, num_layers: int, layer) -> Array:
    """Row l+1 of W for layer l: 1/(l+1) on the l+1 outputs y_0 .. y_l, 0 after."""
    k = jnp.arange(num_layers + 1)
    return jnp.where(k <= layer, 1.0 / (layer + 1.0), 0.0)


register(Scheme("dlcl", "DLCL", "#e7ba52", layer=dlcl, norm_out=frozenset({FFN}),
                final_norm=True, carry=_dlcl_carry, norm_feeds="branch",
                merge=lambda x, final_norm: final_norm(x[0]),
                params=(Param("dlcl", dlcl_init, shape="history", kinds=frozenset({FFN}),
                              per_layer=True),)))


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / ||x||_2 over the last axis, computed in float32 (nGPT's Norm; eps only keeps an
    all-zero vector finite)."""
    h = x.astype(jnp.float32)
    return (h * jax.lax.rsqrt(jnp.maximum(jnp.sum(h * h, axis=-1, keepdims=True), eps))
            ).astype(x.dtype)


# nGPT's reparameterization of a learned vector s (Loshchilov et al. 2024, Sec. 2.6): stored
# as s_scale at init and used as s * (s_init / s_scale), so that Adam's step on it has the
# size it has on the unit-norm weights. alpha: s_init 0.05, s_scale 1/sqrt(d_model).
NGPT_ALPHA_INIT = 0.05


def ngpt_scale(d_model: int) -> float:
    """s_scale = 1/sqrt(d_model), the stored init of alpha, s_qk and s_z."""
    return d_model ** -0.5


def ngpt(x, s, c):
    """nGPT (Loshchilov et al. 2024, arXiv 2410.01131, eqs. 10-11): h on the unit sphere;
    h <- Norm(h + alpha (Norm(F(h)) - h)), Norm(x) = x / ||x||, alpha learned per feature.

    alpha = stored * (alpha_init / alpha_scale), alpha_init 0.05, alpha_scale 1/sqrt(d_model),
    the paper's reading (the reference code also takes |alpha|; here alpha is used as is).
    The rest of nGPT is declared in the other fields: the embedding output is L2-normalized
    (``embed_map``; with this codebase's additive sin/cos or learned positions, not RoPE: the
    token row times sqrt(d) plus the position vector, then Norm), q and k per head (``sphere_qk``:
    s_qk Norm(q), s_qk Norm(k), s_qk [H, K] with init 1 / scale 1/sqrt(d_model), softmax scale
    sqrt(K)), the FFN (``ffn_scale``: s_v [d_ff] with init 1 / scale 1, times sqrt(d_model), on
    the pre-activation), the logits (``logit_scale``: s_z [vocab], init 1 / scale
    1/sqrt(d_model)), and every weight matrix and the embedding normalized along d_model after
    each optimizer step (``project``: ``ngpt_project``). No norm layers (model.norm="none").

    Left out: the paper's FFN is SwiGLU with scales s_u on the gate-free half u and s_v on the
    SiLU input; this codebase's FFN is act(x W1) W2 (GELU / ReLU), which has no u, so only s_v
    (on act's input) exists and s_u has nowhere to go. Biases (model.use_bias) are kept if the
    config has them (nGPT has none; set model.use_bias=False for the paper's model). Weight
    decay and warmup are the optimizer config's (the paper uses neither).
    """
    alpha = s.alpha * (NGPT_ALPHA_INIT / ngpt_scale(x.shape[-1]))
    return l2_normalize(x + alpha * (l2_normalize(s.f(x)) - x))


# The matrices nGPT keeps unit-norm along d_model, by the last two names on their path in the
# parameter tree and the axis of d_model there (kernels are [fan_in, fan_out], stacked
# layers add a leading axis): the projections reading the stream (embed on fan_in, axis -2),
# those writing to it (embed on fan_out, axis -1), the embedding [vocab, d] and the head.
NGPT_UNIT_AXES = {("query", "kernel"): -2, ("key", "kernel"): -2, ("value", "kernel"): -2,
                  ("ffn_in", "kernel"): -2, ("out", "kernel"): -1, ("ffn_out", "kernel"): -1,
                  ("head", "kernel"): -2}


def _path_names(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)


def ngpt_project(params):
    """Every weight matrix of ``NGPT_UNIT_AXES`` and the embedding ``embed`` [vocab, d]
    L2-normalized along d_model (the reference's ``normalize_matrices``); other leaves as they
    are."""
    def one(path, w):
        names = _path_names(path)
        if names == ("embed",):
            return l2_normalize(w)
        axis = NGPT_UNIT_AXES.get(names[-2:])
        if axis is None:
            return w
        return jnp.moveaxis(l2_normalize(jnp.moveaxis(w, axis, -1)), -1, axis)
    return jax.tree_util.tree_map_with_path(one, params)


register(Scheme("ngpt", "nGPT", "#31a354", ngpt, norm=NONE, sphere_qk=True, ffn_scale=True,
                logit_scale=True, embed_map=l2_normalize, project=ngpt_project,
                params=(Param("alpha", lambda cfg, layers, k: ngpt_scale(cfg.d_model),
                              shape="d_model"),)))
