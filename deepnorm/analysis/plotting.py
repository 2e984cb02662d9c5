"""Figures for the analysis: one fixed colour per residual scheme, shared by every figure.

Every function takes the JSON records its command writes, so a notebook can re-plot a saved
run without recomputing it.
"""

from __future__ import annotations

import math
from collections import defaultdict

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

from deepnorm.analysis.schemes import COLORS, LABELS, SCHEMES

# One colour per scheme, the same in every figure (declared with the scheme, deepnorm.residual):
# the three the papers compare get the strongest colours (Post-LN red, Pre-LN blue, DeepNorm
# green).
assert set(COLORS) == set(SCHEMES), "every scheme needs its colour"

PARAM_TITLES = {"ffn_out": "FFN output W2", "ffn_in": "FFN input W1",
                "self_attn.query": "self-attn query", "self_attn.key": "self-attn key",
                "self_attn.value": "self-attn value", "self_attn.out": "self-attn output"}


def color(scheme: str) -> str:
    return COLORS[scheme]


def label(scheme: str) -> str:
    return LABELS.get(scheme, scheme)


def _ordered(names):
    return sorted(set(names), key=lambda s: SCHEMES.index(s) if s in SCHEMES else len(SCHEMES))


def _mean_band(ax, x, table_SxN, scheme, **kw):
    """Mean over seeds as a line, min..max over seeds as a band."""
    mean = np.nanmean(table_SxN, axis=0)
    kw.setdefault("label", label(scheme))
    ax.plot(x, mean, color=color(scheme), marker="o", ms=3, **kw)
    if table_SxN.shape[0] > 1:
        ax.fill_between(x, np.nanmin(table_SxN, 0), np.nanmax(table_SxN, 0),
                        color=color(scheme), alpha=0.2, lw=0)


def _log_if_wide(ax, values, axis="y"):
    """Log scale when positive data spans more than a decade."""
    values = np.asarray([v for v in np.ravel(values) if np.isfinite(v) and v > 0])
    if values.size and values.max() / values.min() > 10:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")


def _table(records, scheme, depth, param, key):
    rows = [r for r in records if r["residual"] == scheme and r["num_layers"] == depth
            and r["param"] == param]
    seeds = sorted({r["seed"] for r in rows})
    layers = sorted({r["layer"] for r in rows})
    table = np.full((len(seeds), len(layers)), np.nan)
    for r in rows:
        table[seeds.index(r["seed"]), layers.index(r["layer"])] = r[key]
    return np.asarray(layers), table


def plot_grad_norms(records, path=None, params=("ffn_out", "ffn_in", "self_attn.out")):
    """Xiong et al. 2020 Fig. 3: expected gradient norm per layer (a, b, ...) for the
    shallowest depth and, when several depths were run, the last layer's W2 against depth."""
    schemes = _ordered(r["residual"] for r in records)
    depths = sorted({r["num_layers"] for r in records})
    params = [p for p in params if any(r["param"] == p for r in records)]
    panels = len(params) + (len(depths) > 1)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    axes = axes[0]
    depth = depths[0]
    enc_layers = max((r["layer"] for r in records
                      if r.get("stack") == "encoder" and r["num_layers"] == depth), default=0)
    for ax, param in zip(axes, params):
        values = []
        for scheme in schemes:
            layers, table = _table(records, scheme, depth, param, "expected_grad_norm")
            if not table.size:
                continue
            values.append(table)
            # Encoder and decoder are separate stacks: no line joins layer N to layer N+1.
            enc = layers <= enc_layers
            if enc.any():
                _mean_band(ax, layers[enc], table[:, enc], scheme)
            if (~enc).any():
                _mean_band(ax, layers[~enc], table[:, ~enc], scheme,
                           **({"label": None} if enc.any() else {}))
        if enc_layers:
            ax.axvline(enc_layers + 0.5, color="k", ls=":", lw=0.8)
            ax.text(enc_layers + 0.6, 1.0, "decoder", transform=ax.get_xaxis_transform(),
                    va="top", fontsize=8)
            ax.text(enc_layers + 0.4, 1.0, "encoder", transform=ax.get_xaxis_transform(),
                    va="top", ha="right", fontsize=8)
        _log_if_wide(ax, [v for t in values for v in t.ravel()])
        ax.set_xlabel("layer (encoder, then decoder)" if enc_layers else "layer")
        ax.set_ylabel("||E[grad]||_F")
        ax.set_title(f"{PARAM_TITLES.get(param, param)}, {_depth_name(records, depth)}")
    if len(depths) > 1:
        ax = axes[-1]
        from deepnorm.analysis.grad_norms import final_layer

        finals = final_layer(records)
        for scheme in schemes:
            ds = [d for d in depths if (scheme, d) in finals]
            table = np.stack([finals[(scheme, d)] for d in ds], axis=1)
            _mean_band(ax, ds, table, scheme)
        # Xiong's Theorem 1: Pre-LN's last-layer gradient scales like 1/sqrt(L).
        if "pre" in schemes:
            ref = np.mean(finals[("pre", depths[0])])
            ax.plot(depths, [ref * math.sqrt(depths[0] / d) for d in depths], "k--", lw=0.8,
                    label="1/sqrt(L)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.minorticks_off()
        ax.set_xlabel("layers per stack L")
        ax.set_ylabel("||E[grad W2]||_F, last layer")
        ax.set_title("last layer's FFN output vs depth")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _depth_name(records, depth):
    enc_dec = any("stack" in r for r in records)
    return f"{depth}L-{depth}L" if enc_dec else f"{depth} layers"


def plot_update_norms(records, path=None):
    """DeepNet Fig. 4-5: ||F(x, theta_t) - F(x, theta_0)|| against step, and against depth."""
    schemes = _ordered(r["residual"] for r in records)
    depths = sorted({r["num_layers"] for r in records})
    last_step = max(r["step"] for r in records)
    by = defaultdict(lambda: defaultdict(dict))
    for r in records:
        by[(r["residual"], r["num_layers"])][r["seed"]][r["step"]] = r["update_norm"]
    fig, (ax_t, ax_d) = plt.subplots(1, 2, figsize=(10, 3.8))
    widths = np.linspace(0.8, 2.4, len(depths))
    styles = ["-", "--", "-.", ":"]
    for scheme in schemes:
        for i, depth in enumerate(depths):
            seeds = by[(scheme, depth)]
            if not seeds:
                continue
            steps = sorted(next(iter(seeds.values())))[1:]
            table = np.array([[seeds[s][t] for t in steps] for s in sorted(seeds)])
            ax_t.plot(steps, np.nanmean(table, 0), color=color(scheme), lw=widths[i],
                      ls=styles[i % len(styles)],
                      label=f"{label(scheme)} L={depth}")
    ax_t.set_yscale("log")
    ax_t.set_xlabel("training step t")
    ax_t.set_ylabel("||F(x, θ_t) − F(x, θ_0)||")
    ax_t.set_title("model update during early training")
    ax_t.legend(fontsize=7, ncol=len(schemes))
    for scheme in schemes:
        for step, ls in ((1, "-"), (last_step, "--")):
            ds = [d for d in depths if by[(scheme, d)]]
            table = np.array([[by[(scheme, d)][s][step] for d in ds]
                              for s in sorted(by[(scheme, ds[0])])])
            _mean_band(ax_d, ds, table, scheme, ls=ls) if ls == "-" else ax_d.plot(
                ds, np.nanmean(table, 0), color=color(scheme), ls=ls, marker="s", ms=3)
    ax_d.set_xscale("log")
    ax_d.set_yscale("log")
    ax_d.set_xticks(depths, [str(d) for d in depths])
    ax_d.minorticks_off()
    ax_d.set_xlabel("layers per stack L (L-L for encoder-decoder)")
    ax_d.set_ylabel("||ΔF||")
    ax_d.set_title(f"after step 1 (solid) and step {last_step} (dashed)")
    ax_d.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_stability_map(cells, path=None):
    """A heatmap per warmup: rows scheme x depth, columns peak learning rate; each cell the
    final training loss, or a cross where the run diverged."""
    warmups = sorted({c["warmup_steps"] for c in cells})
    lrs = sorted({c["peak_lr"] for c in cells})
    rows = sorted({(c["residual"], c["num_layers"]) for c in cells},
                  key=lambda r: (SCHEMES.index(r[0]) if r[0] in SCHEMES else 99, r[1]))
    finite = [c["final_loss"] for c in cells if not c["diverged"]]
    vmin, vmax = (min(finite), max(finite)) if finite else (0.0, 1.0)
    fig, axes = plt.subplots(1, len(warmups), squeeze=False,
                             figsize=(2.5 + 0.9 * len(lrs) * len(warmups), 1.2 + 0.42 * len(rows)))
    image = None
    for ax, warmup in zip(axes[0], warmups):
        grid = np.full((len(rows), len(lrs)), np.nan)
        for c in cells:
            if c["warmup_steps"] != warmup:
                continue
            i, j = rows.index((c["residual"], c["num_layers"])), lrs.index(c["peak_lr"])
            if c["diverged"]:
                ax.text(j, i, "×", ha="center", va="center", color="k", fontsize=12)
            else:
                grid[i, j] = c["final_loss"]
                dark = (c["final_loss"] - vmin) > 0.5 * (vmax - vmin)  # viridis_r: high = dark
                ax.text(j, i, f"{c['final_loss']:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if dark else "k")
        image = ax.imshow(grid, cmap="viridis_r", vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(lrs)), [f"{lr:.0e}" for lr in lrs], rotation=45)
        if ax is axes[0][0]:
            ax.set_yticks(range(len(rows)), [f"{label(s)} L={d}" for s, d in rows])
            for tick, (scheme, _) in zip(ax.get_yticklabels(), rows):
                tick.set_color(color(scheme))
        else:
            ax.set_yticks(range(len(rows)), [""] * len(rows))
        ax.set_xlabel("peak learning rate (log grid)")
        ax.set_title(f"warmup {warmup} steps")
    fig.colorbar(image, ax=list(axes[0]), label="final validation loss (× = diverged)")
    return _save(fig, path)


SIGNAL_PANELS = (("cosine", "token cosine similarity"),
                 ("stream_growth", "stream norm / embedding norm"),
                 ("branch_to_skip_mean", "branch / skip norm (mean of sublayers)"))


def plot_signal_prop(records, path=None):
    """Per layer at initialization (rows: token cosine similarity, stream growth,
    branch-to-skip ratio), one column per depth, one line per scheme (mean over seeds).
    An encoder-decoder's panels show the decoder, which also reads the encoder."""
    stacks = {r["stack"] for r in records}
    stack = "decoder" if "decoder" in stacks else "encoder"
    records = [r for r in records if r["stack"] == stack]
    schemes = _ordered(r["residual"] for r in records)
    depths = sorted({r["num_layers"] for r in records})
    fig, axes = plt.subplots(len(SIGNAL_PANELS), len(depths), squeeze=False,
                             figsize=(3.6 * len(depths) + 1.5, 2.6 * len(SIGNAL_PANELS)))
    for col, depth in enumerate(depths):
        for row, (key, title) in enumerate(SIGNAL_PANELS):
            ax = axes[row][col]
            values = []
            for scheme in schemes:
                rows = [r[key] for r in records
                        if r["residual"] == scheme and r["num_layers"] == depth]
                if not rows:
                    continue
                mean = np.nanmean(np.asarray(rows, np.float64), axis=0)
                layers = np.arange(len(mean)) + (1 if key == "branch_to_skip_mean" else 0)
                ax.plot(layers, mean, color=color(scheme), lw=1.2, label=label(scheme))
                values.append(mean)
            if key == "cosine":
                ax.set_ylim(-0.05, 1.05)
            else:
                _log_if_wide(ax, values)
            if depth >= 100:  # linear up to layer 1 (the embeddings at 0), log beyond
                ax.set_xscale("symlog", linthresh=1)
                ax.set_xlim(0, depth)
            name = f"{depth}L-{depth}L" if len(stacks) == 2 else f"{depth} layers"
            ax.set_title(f"{title}, {name}", fontsize=9)
            if row == len(SIGNAL_PANELS) - 1:
                ax.set_xlabel("layer (0: embeddings)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_figwidth(), 1))
    return _save(fig, path)


def _save(fig, path):
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _two_five(value, _):
    """Minor log-axis labels at 2 and 5 times a power of ten only."""
    lead = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
    return f"{value:g}" if lead in (2, 5) else ""


def plot_gns(records, path=None):
    """Gray et al. 2024: the norm layers' B_simple against the whole model's (left, one point
    per scheme x depth x seed x checkpoint, larger later in training) and both along training
    (right: full solid, norms only dashed; mean over seeds)."""
    schemes = _ordered(r["residual"] for r in records)
    depths = sorted({r["num_layers"] for r in records})
    steps = sorted({r["step"] for r in records})
    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = dict(zip(steps, np.linspace(15, 70, len(steps))))
    markers = dict(zip(depths, "os^Dv<>"))
    values = []
    for r in records:
        full, norms = r["b_simple_full"], r["b_simple_norms"]
        if not (full > 0 and norms > 0):  # a negative |G|^2 estimate: not plottable on log axes
            continue
        values += [full, norms]
        ax_s.scatter(full, norms, s=sizes[r["step"]], color=color(r["residual"]),
                     marker=markers[r["num_layers"]], alpha=0.8, lw=0)
    if values:
        lo, hi = min(values) / 1.5, max(values) * 1.5
        ax_s.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls=":", label="norms = full")
        ax_s.set_xlim(lo, hi)
        ax_s.set_ylim(lo, hi)
    ax_s.set_xscale("log")
    ax_s.set_yscale("log")
    ax_s.set_xlabel("B_simple, all parameters (exact per-example)")
    ax_s.set_ylabel("B_simple, norm parameters only")
    ax_s.set_title("prediction from the norm layers (bigger = later)")
    for scheme in schemes:
        ax_s.scatter([], [], color=color(scheme), label=label(scheme))
    ax_s.legend(fontsize=7)
    styles = ["-", "--"]
    for scheme in schemes:
        for i, depth in enumerate(depths):
            rows = [r for r in records if r["residual"] == scheme and r["num_layers"] == depth]
            if not rows:
                continue
            for side, ls in zip(("full", "norms"), styles):
                # Ratio of the seed-mean estimates, as for the batches within a seed.
                curve = [np.mean([r[f"trace_{side}"] for r in rows if r["step"] == t])
                         / np.mean([r[f"grad_sq_{side}"] for r in rows if r["step"] == t])
                         for t in steps]
                ax_t.plot(steps, curve, color=color(scheme), ls=ls, marker=markers[depth],
                          ms=3, label=(f"{label(scheme)} L={depth}" if side == "full" else None))
    ax_t.set_yscale("log")
    ax_t.set_xlabel("training step")
    ax_t.set_ylabel("B_simple")
    ax_t.set_title("along training: all parameters (solid), norms only (dashed)")
    ax_t.legend(fontsize=7)
    for axis in (ax_s.xaxis, ax_s.yaxis, ax_t.yaxis):  # plain numbers on the log axes
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_two_five))
    fig.tight_layout()
    return _save(fig, path)


def plot_depth_sweep(cells, path=None):
    """Best final validation loss over the learning rates against depth, one line per scheme,
    one panel per precision; × where every lane of the row diverged (at the row's best loss
    level is meaningless, so it sits at the top of the panel)."""
    from deepnorm.analysis.depth_sweep import summary

    records = summary(cells)
    dtypes = [d for d in ("float32", "float16") if any(r["dtype"] == d for r in records)]
    schemes = _ordered(r["residual"] for r in records)
    losses = [r["best_loss"] for r in records if r["best_loss"] is not None]
    top = max(losses) + 0.2 if losses else 1.0
    fig, axes = plt.subplots(1, len(dtypes), squeeze=False, sharey=True,
                             figsize=(5.2 * len(dtypes) + 1.8, 4.0))
    for ax, dtype in zip(axes[0], dtypes):
        for scheme in schemes:
            rows = sorted((r for r in records if r["residual"] == scheme
                           and r["dtype"] == dtype), key=lambda r: r["num_layers"])
            if not rows:
                continue
            depths = [r["num_layers"] for r in rows]
            ys = [r["best_loss"] if r["best_loss"] is not None else np.nan for r in rows]
            ax.plot(depths, ys, "o-", color=color(scheme), label=label(scheme), ms=4)
            for r in rows:
                if r["best_loss"] is None:
                    ax.plot(r["num_layers"], top, "x", color=color(scheme), ms=8)
        ax.set_xscale("log")
        ax.set_xlabel("decoder layers")
        ax.set_title(f"{dtype}" + (" (dynamic loss scaling)" if dtype == "float16" else ""))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("final validation loss (best lr; × = all diverged)")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _save(fig, path)
