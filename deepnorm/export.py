"""Norm gains and biases folded into the adjacent projections, for inference.

A norm ``N(x) = g * n(x) + b`` (``n``: the normalization alone; for DyT ``tanh(alpha x)``)
whose output feeds only linear projections ``y = N(x) W + c`` can be rewritten exactly as
``y = n(x) W' + c'`` with ``W' = diag(g) W`` and ``c' = b W + c``. The norm then needs no gain
and no bias (``make_norm(..., affine=False)``): the fold removes a multiply-add per element, it
does not just set g = 1. Where that holds depends on where the scheme puts the norm, which is
what the tables below say; everything else is read from the model by attribute name (a
Block's ``{sublayer}_norm`` and ``{sublayer}_norm_out``, the sublayers' Dense projections,
``inner_norm``, a Stack's ``input_norm`` and ``final_norm``, the Transformer's ``head``).

Centering (``center=True``): LayerNorm is blind to a per-token shift of its input, so if every
read of the residual stream goes through a LayerNorm, the mean over d_model of every write can
be removed from the writing weights (embedding rows, the attention output and FFN output
projections) without changing any output. The stream then has zero mean at every token, the
LayerNorm's mean subtraction is a no-op, and the norm becomes an RMS normalization, exactly.
That needs every write to be a parameter: learned positions (the sinusoidal table is fixed), an
untied head (centering the embedding rows would change a tied head's logits), and no norm that
writes into the stream (Sandwich-LN / Peri-LN's output norms, Peri-LN's input norm).

docs/export.md has the table of what folds per scheme and norm, and why.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from deepnorm.initializers import layer_constants
from deepnorm import residual as residual_lib
from deepnorm.layers import Dense
from deepnorm.norms import NORM_CLASSES, DyT, Identity, LayerNorm, RMSNorm, ScaleNorm, UnitNorm

# Where each scheme puts a Block's ``{sublayer}_norm`` is its declaration's ``norm_feeds``
# (deepnorm.residual): "branch" folds into the branch's first projections, "stream" and
# "mixed" stay, and an undeclared scheme is left unfolded and reported as such.

# The projections that read a sublayer's input norm (cross-attention's keys and values read the
# encoder output instead), and the projection that writes the sublayer into the stream.
BRANCH_READERS = {"self_attn": ("query", "key", "value"), "cross_attn": ("query",),
                  "ffn": ("ffn_in",)}
BRANCH_WRITER = {"self_attn": "out", "cross_attn": "out", "ffn": "ffn_out"}

# Norms whose gain (and bias) come after the normalization, so they fold; ScaleNorm's gain is a
# scalar, DyT's alpha is inside the tanh and stays, UnitNorm keeps its D^(k/2).
FOLDABLE_NORMS = (LayerNorm, RMSNorm, ScaleNorm, DyT, UnitNorm)

STREAM_REASON = ("the norm's output is the residual stream, which the next sublayer reads and "
                 "also carries on its skip path (scaled by alpha / omega in deepnorm / admin): "
                 "folding the gain into the readers would leave it on the skip path, so the "
                 "multiply-add stays")
MIXED_REASON = ("one stacked norm per sublayer serves the Post-LN layers (output = stream) "
                "and the Pre-LN layers (output = branch input); the scan runs the same modules "
                "in every layer, so the Pre-LN layers' affine cannot be dropped alone")
OUT_NORM_REASON = ("normalizes the branch output before it is added to the stream: the "
                   "normalization sits between the branch's last projection and the gain, and "
                   "the next norm normalizes the sum, so the gain has nowhere to go")
MERGED_REASON = ("the stack's output adds another residual stream to the final norm's output "
                 "(ResiDual: x_a + LN(x_d)), so its gain has no projection of its own to go to")
PERI_INPUT_REASON = "normalizes the embeddings into the stream itself (a stream norm)"
TIED_REASON = ("the head is the embedding table (tie_embeddings=True): folding the gain into it "
               "would change the input embeddings too; untie_head=True folds it into a "
               "separate head matrix (vocab x d_model more parameters)")


class FoldError(ValueError):
    """``fold_norms(..., strict=True)`` on a model with norms that do not fold."""


@dataclasses.dataclass
class FoldReport:
    """What ``fold_norms`` did: ``folded`` (site, into what), ``centered`` (the norms whose mean
    subtraction was removed), ``remaining`` (site, why its affine stays)."""

    folded: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    centered: list[str] = dataclasses.field(default_factory=list)
    not_centered: str | None = None  # why centering was not done (None: done or not asked)
    remaining: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def complete(self) -> bool:
        """True when no norm in the model kept a gain or bias."""
        return not self.remaining

    def __str__(self) -> str:
        lines = [f"folded   {site} -> {into}" for site, into in self.folded]
        lines += [f"centered {site} (now an RMS normalization)" for site in self.centered]
        if self.not_centered:
            lines.append(f"not centered: {self.not_centered}")
        lines += [f"remains  {site}: {why}" for site, why in self.remaining]
        return "\n".join(lines) or "nothing to fold"


def _norm_kind(norm: nnx.Module) -> str:
    return next(k for k, cls in NORM_CLASSES.items() if type(norm) is cls)


def _bare(norm: nnx.Module, kind: str | None = None) -> nnx.Module:
    """The same normalization without gain and bias (DyT keeps its alpha); ``kind`` replaces
    the norm type (centering: layernorm -> rmsnorm)."""
    cls = NORM_CLASSES[kind or _norm_kind(norm)]
    bare = cls(1, eps=getattr(norm, "eps", 0.0), affine=False)
    if isinstance(norm, DyT):
        bare.alpha = norm.alpha
    if isinstance(norm, UnitNorm) and isinstance(bare, UnitNorm):  # D^(k/2): D of the norm
        bare.factor = norm.factor
    return bare


def _gain_and_bias(norm: nnx.Module, dim: int):
    """The norm's gain [..., dim] (ScaleNorm's scalar broadcast) and bias [..., dim] or None."""
    g = norm.scale[...]
    if isinstance(norm, ScaleNorm):
        g = jnp.broadcast_to(g[..., None], g.shape + (dim,))
    bias = getattr(norm, "bias", None)
    return g, None if bias is None else bias[...]


def _fold_into(dense: Dense, g, b, scale=None) -> None:
    """``N(x) W + c`` -> ``n(x) W' + c'`` on one projection; g, b [..., d_in] broadcast against
    the kernel [..., d_in, d_out] (a stacked kernel has the layer axis in front)."""
    w = dense.kernel[...]
    dense.kernel.set_value(w * g[..., :, None])
    if b is None:
        return
    shift = jnp.matmul(b[..., None, :], w)[..., 0, :]
    if scale is not None:
        shift = shift * scale[..., None]
    if dense.bias is None:
        axes = dense.kernel.get_metadata().get("axes", (None, None))
        # nnx.data: the attribute held None, which nnx marks static until told otherwise.
        dense.bias = nnx.data(nnx.Param(shift, axes=tuple(axes[1:])))
    else:
        dense.bias.set_value(dense.bias[...] + shift)


def _fold_norm(owner, attr: str, readers: dict[str, Dense], site: str, report: FoldReport,
               scale=None) -> None:
    """Folds ``owner.<attr>`` into ``readers`` (by their names in the model) and replaces it by
    its bare form; a norm type without a gain after its normalization is reported instead."""
    norm = getattr(owner, attr)
    if norm is None or isinstance(norm, Identity):
        return
    if type(norm) not in FOLDABLE_NORMS:  # exact types: a subclass may compute otherwise
        report.remaining.append((site, f"{type(norm).__name__} has no fold rule "
                                       "(deepnorm.export.FOLDABLE_NORMS)"))
        return
    first = next(iter(readers.values()))
    g, b = _gain_and_bias(norm, first.kernel.shape[-2])
    for dense in readers.values():
        _fold_into(dense, g, b, scale)
    setattr(owner, attr, _bare(norm))
    note = " (alpha stays inside the tanh)" if isinstance(norm, DyT) else ""
    report.folded.append((site, ", ".join(readers) + note))


def _stacks(model):
    return [(name, getattr(model, name)) for name in ("encoder", "decoder")
            if getattr(model, name) is not None]


def _fold_blocks(model, stack_name: str, stack, report: FoldReport) -> None:
    cfg = model.config
    block = stack.layers
    scheme = residual_lib.get(cfg.residual)
    placement = scheme.norm_feeds
    scale = None
    if scheme.norm_scale is not None:
        scale = layer_constants(cfg, stack_name, stack.num_layers)[scheme.norm_scale]
    for name in block.sublayer_names:
        site = f"{stack_name}.layers.{name}_norm"
        branch = getattr(block, name)
        if getattr(block, f"{name}_norm", None) is not None:
            if placement == "branch" and name in BRANCH_READERS:
                readers = {f"{stack_name}.layers.{name}.{r}": getattr(branch, r)
                           for r in BRANCH_READERS[name]}
                _fold_norm(block, f"{name}_norm", readers, site, report, scale)
            elif placement == "stream":
                report.remaining.append((site, STREAM_REASON))
            elif placement == "mixed":
                report.remaining.append((site, MIXED_REASON))
            else:
                report.remaining.append((site, f"no fold rule for residual={cfg.residual!r} "
                                               f"and sublayer {name!r} (deepnorm.export)"))
        if getattr(block, f"{name}_norm_out", None) is not None:
            report.remaining.append((f"{site}_out", OUT_NORM_REASON))
        # SubLN's inner norms feed the branch's writing projection directly, in any scheme.
        writer = BRANCH_WRITER.get(name)
        if getattr(branch, "inner_norm", None) is not None and writer:
            _fold_norm(branch, "inner_norm",
                       {f"{stack_name}.layers.{name}.{writer}": getattr(branch, writer)},
                       f"{stack_name}.layers.{name}.inner_norm", report)
    if stack.input_norm is not None:
        report.remaining.append((f"{stack_name}.input_norm", PERI_INPUT_REASON))


def _untie(model) -> None:
    """A separate head holding the embedding's transpose (same logits, now foldable)."""
    cfg = model.config
    head = Dense(cfg.d_model, cfg.vocab_size, gain=1.0, axes=("embed", "vocab"),
                 use_bias=False, precision=cfg.matmul_precision, dtype=jnp.dtype(cfg.dtype),
                 rngs=nnx.Rngs(0))
    head.kernel.set_value(jnp.transpose(model.embed[...]))
    model.head = nnx.data(head)  # the attribute held None (static) in a tied model


def _fold_final_norms(model, report: FoldReport) -> None:
    stacks = _stacks(model)
    for stack_name, stack in stacks:
        if stack.final_norm is None:
            continue
        site = f"{stack_name}.final_norm"
        if not residual_lib.get(model.config.residual).final_norm_is_output:
            report.remaining.append((site, MERGED_REASON))
        elif stack_name == "encoder" and model.decoder is not None:
            # The encoder output is read only by every decoder layer's cross-attention keys
            # and values.
            cross = model.decoder.layers.cross_attn
            readers = {"decoder.layers.cross_attn.key": cross.key,
                       "decoder.layers.cross_attn.value": cross.value}
            _fold_norm(stack, "final_norm", readers, site, report)
        elif model.head is not None:
            _fold_norm(stack, "final_norm", {"head": model.head}, site, report)
        elif not isinstance(stack.final_norm, Identity):
            report.remaining.append((site, TIED_REASON))


def _centering_blocker(model) -> str | None:
    """Why centering would not be exact for this model (None: it is)."""
    cfg = model.config
    scheme = residual_lib.get(cfg.residual)
    if not scheme.centerable:
        return (f"residual={cfg.residual!r} writes into the stream other than as a scalar "
                "sum of its projections, or reads it other than through a norm")
    if not scheme.final_norm:
        return f"residual={cfg.residual!r} has no final norm: the head reads the stream itself"
    if cfg.norm != "layernorm":
        return f"norm={cfg.norm!r} does not subtract the mean (only layernorm does)"
    if model.head is None:
        return "the head is the embedding table: centering its rows would change the logits"
    if model.pos_embed is None:
        return "positions='sinusoidal' is a fixed table, no parameter to center"
    for stack_name, stack in _stacks(model):
        block = stack.layers
        if stack.input_norm is not None or any(
                getattr(block, f"{n}_norm_out", None) is not None for n in block.sublayer_names):
            return (f"residual={cfg.residual!r} writes normalized branch outputs into the stream "
                    "(their means are not parameters)")
        if any(n not in BRANCH_WRITER for n in block.sublayer_names):
            return f"{stack_name} has a sublayer with no known writing projection"
    return None


def _center(model, report: FoldReport) -> None:
    """Removes the d_model mean from every write into the stream, then turns the stream's (bare)
    LayerNorms into RMS normalizations."""

    def center_rows(param):
        v = param[...]
        param.set_value(v - jnp.mean(v, axis=-1, keepdims=True))

    center_rows(model.embed)
    center_rows(model.pos_embed)
    for stack_name, stack in _stacks(model):
        block = stack.layers
        for name in block.sublayer_names:
            dense = getattr(getattr(block, name), BRANCH_WRITER[name])
            center_rows(dense.kernel)  # [..., d_ff or d, d_model]: each row's output mean
            if dense.bias is not None:
                center_rows(dense.bias)
            attr = f"{name}_norm"
            setattr(block, attr, _bare(getattr(block, attr), "rmsnorm"))
            report.centered.append(f"{stack_name}.layers.{attr}")
        stack.final_norm = _bare(stack.final_norm, "rmsnorm")
        report.centered.append(f"{stack_name}.final_norm")


def fold_norms(model, *, center: bool = True, untie_head: bool = False,
               strict: bool = False):
    """A copy of ``model`` with every norm gain and bias that can be folded folded into the
    adjacent projections, and the report of what was folded and what remains (and why).

    The copy is the same ``Transformer`` class and computes the same outputs (up to float
    rounding), full pass and cached decoding; its folded norms have no parameters.
    ``center``: also remove LayerNorm's mean subtraction where that is exact (module
    docstring); when it is not, ``report.not_centered`` says why. ``untie_head``: give a tied
    model a separate head so its final norm folds. ``strict``: raise ``FoldError`` instead of
    returning a partly folded model. The original model is not changed.
    """
    if model.config.batch_stats:
        # In eval a batch-statistics norm is a fixed per-feature affine of x, which would fold
        # away entirely (into the readers, and the stream writers for Post-LN); that fold is
        # not implemented, and folding only the gain and bias around it would be wrong in
        # training, where the statistics come from each batch.
        raise FoldError(f"norm={model.config.norm!r} is not folded: fold_norms does not "
                        "implement folding batch-statistics norms (their eval form is a fixed "
                        "per-feature affine); export the model unfolded")
    model = nnx.clone(model)
    report = FoldReport()
    if untie_head and model.head is None:
        _untie(model)
    for stack_name, stack in _stacks(model):
        _fold_blocks(model, stack_name, stack, report)
    _fold_final_norms(model, report)
    if center:
        blocker = _centering_blocker(model)
        if blocker is None and report.remaining:
            blocker = "some norms keep their affine: " + ", ".join(s for s, _ in report.remaining)
        if blocker is None:
            _center(model, report)
        else:
            report.not_centered = blocker
    if strict and report.remaining:
        raise FoldError(f"residual={model.config.residual!r}, norm={model.config.norm!r} does "
                        "not fold fully:\n" + "\n".join(f"  {s}: {w}" for s, w in report.remaining))
    return model, report
