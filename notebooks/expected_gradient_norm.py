# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The expected gradient norm per layer at initialization (Xiong et al. 2020, Fig. 3)
#
# **The claim.** Xiong et al. ("On Layer Normalization in the Transformer Architecture",
# ICML 2020) explain why Post-LN Transformers need learning-rate warmup. Their Theorem 1: at
# initialization the gradient of the last layer's FFN output weight $W^{2,L}$ is
# $O(d\sqrt{\ln d})$ for Post-LN, *independent of depth* $L$, but $O(d\sqrt{\ln d / L})$ for
# Pre-LN. Their Fig. 3 shows it on a 6-6 encoder-decoder: (a, b) the norm per layer of the
# *expected* gradient (average the gradient over many mini-batches, then take the Frobenius
# norm) grows toward the top for Post-LN and is flat for Pre-LN; (c, d) the last layer's
# $W^2$ gradient is constant in depth for Post-LN and falls for Pre-LN. Large gradients at the
# top with a large learning rate are what warmup protects against.
#
# **The code.** `deepnorm.analysis.grad_norms` measures exactly that definition. Seeds are a
# `jax.vmap` axis (the model's init vmapped over PRNG keys) and the batch mean a `lax.scan`, so
# one (scheme, depth) is one compiled program; per-layer norms are slices of the stacked
# parameters' gradient along the layer axis. Batches are real text from the data pipeline (the
# span-corruption task of the offline stdlib corpus). The same measurement is
# `python -m deepnorm.analysis grad-norms --config.analysis.out=DIR`.
#
# Set `DEEPNORM_QUICK=1` to run everything on tiny grids (the test suite does).

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

from deepnorm import TransformerConfig
from deepnorm.analysis import grad_norms, plotting, stacked_batches
from deepnorm.analysis import schemes as schemes_lib

QUICK = os.environ.get("DEEPNORM_QUICK") == "1"
FIGURES = "figures"


def save(fig, name):
    if not QUICK:  # quick runs must not overwrite the committed figures
        fig.savefig(f"{FIGURES}/{name}", dpi=110, bbox_inches="tight")
    display(fig)
    plt.close(fig)


# Xiong et al.'s 6-6 model is d=512, FFN 1024, 4 heads; we keep the shape at a quarter width.
WIDTH = dict(d_model=32, d_ff=64, num_heads=2) if QUICK else dict(d_model=128, d_ff=256,
                                                                   num_heads=4)
LAYERS = 2 if QUICK else 6
BASE = TransformerConfig(arch="encoder_decoder", num_encoder_layers=LAYERS,
                         num_decoder_layers=LAYERS, residual="post", remat_policy="none",
                         **WIDTH)
SEEDS = range(2 if QUICK else 5)
BATCHES = stacked_batches(None, arch=BASE.arch, num_batches=2 if QUICK else 16,
                          batch_size=4 if QUICK else 16, seq_len=16 if QUICK else 64)
print({k: v.shape for k, v in BATCHES.items()})

# %% [markdown]
# ## (a, b) Per layer, 6-6, Post-LN vs Pre-LN vs DeepNorm
#
# Layers 1-6 are the encoder, 7-12 the decoder. Lines are the mean over seeds, bands the
# min..max over seeds.

# %%
start = time.perf_counter()
records = grad_norms.run(BASE, schemes=["post", "pre", "deepnorm"], depths=[LAYERS],
                         seeds=SEEDS, batches=BATCHES)
print(f"{time.perf_counter() - start:.0f}s")
save(plotting.plot_grad_norms(records, params=("ffn_out", "ffn_in", "self_attn.out")),
     "grad_norms_per_layer.png")

# %%
for scheme in ["post", "pre", "deepnorm"]:
    table = grad_norms.by_layer(records, scheme, LAYERS).mean(0)
    enc, dec = table[:LAYERS], table[LAYERS:]
    print(f"{scheme:9s} W2 encoder top/bottom {enc[-1] / enc[0]:5.2f}   "
          f"decoder top/bottom {dec[-1] / dec[0]:5.2f}")

# %% [markdown]
# **What we see.** In the *decoder* Post-LN's expected gradient grows steadily toward the top
# layer, by a factor of about 6 over six layers, exactly the shape of Xiong et al.'s Fig. 3;
# Pre-LN's does not grow (it even falls by a factor of about 1.5-2 from the bottom to the top,
# because a lower layer's gradient collects the paths through every branch above it). In the
# *encoder*, Post-LN's profile is flat (top/bottom about 1.0). That agrees with Liu et al. 2020 ("Understanding the
# Difficulty of Training Transformers", Fig. 3), who found the gradient vanishing of Post-LN
# in the decoder, not the encoder: the decoder's three sublayers per layer put three
# LayerNorms between consecutive layers, and each LN divides the backward signal by the norm
# of its input. A decoder-only model (two sublayers per layer) behaves like the encoder here.
#
# DeepNorm's gradients are an order of magnitude smaller and flat in both stacks: its
# Xavier gain $\beta$ shrinks every branch, and its up-weighted residual $\alpha x$ makes each
# LN's Jacobian smaller ($\|J_{LN}(x)\| = O(\sqrt d / \|x\|)$, Xiong et al.'s lemma).

# %% [markdown]
# ## (c, d) The last layer's $W^2$ against depth
#
# Theorem 1: Post-LN constant, Pre-LN $\propto 1/\sqrt L$ (dashed line). A narrower model
# (d=64) keeps the sweep to a minute or two.

# %%
DEPTHS = [2, 3] if QUICK else [6, 8, 10, 12, 14]
narrow = TransformerConfig(**{**BASE.__dict__, "d_model": 32 if QUICK else 64,
                              "d_ff": 64 if QUICK else 128})
start = time.perf_counter()
depth_records = grad_norms.run(narrow, schemes=["post", "pre"], depths=DEPTHS, seeds=SEEDS,
                               batches=BATCHES)
print(f"{time.perf_counter() - start:.0f}s")
save(plotting.plot_grad_norms(depth_records, params=("ffn_out",)), "grad_norms_vs_depth.png")

# %%
finals = grad_norms.final_layer(depth_records)
for scheme in ["post", "pre"]:
    means = [finals[(scheme, d)].mean() for d in DEPTHS]
    print(scheme, " ".join(f"L={d}: {m:.3f}" for d, m in zip(DEPTHS, means)),
          f"| ratio L={DEPTHS[-1]}/L={DEPTHS[0]}: {means[-1] / means[0]:.2f} "
          f"(1/sqrt(L) predicts {np.sqrt(DEPTHS[0] / DEPTHS[-1]):.2f})")

# %% [markdown]
# **What we see.** Pre-LN's last-layer gradient falls with depth at the rate Theorem 1
# predicts, $1/\sqrt L$ (the measured ratio between 14 and 6 layers per stack is within a few
# percent of $\sqrt{6/14} = 0.65$), while Post-LN's stays constant. This agrees with the
# paper's Fig. 3 (c, d). The consequence for training: a Pre-LN model's top layers get smaller
# gradients the deeper it is, so the same learning rate is safe without warmup; a Post-LN
# model's top layers get gradients of the same size at any depth, on top of the growth toward
# the top seen above.

# %% [markdown]
# ## Every other scheme, 6-6
#
# The same measurement for the remaining residual placements and initializations (d=64, to
# keep the run short). Admin's residual weights $\omega$ are profiled on the first batch per
# seed before measuring, as Admin prescribes.

# %%
# Every declared scheme and analysis preset (deepnorm.analysis.schemes), so a new scheme joins
# the figure by being declared. SkipInit is ReZero's equation and init, so it is left out.
OTHERS = (["rezero", "hyper"] if QUICK else
          [s for s in schemes_lib.SCHEMES if s not in ("post", "pre", "deepnorm", "skipinit")])
start = time.perf_counter()
other_records = grad_norms.run(narrow, schemes=["post", "pre"] + OTHERS, depths=[LAYERS],
                               seeds=SEEDS, batches=BATCHES, log=lambda _: None)
print(f"{time.perf_counter() - start:.0f}s")
fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
for ax, (lo, hi, title) in zip(axes, [(1, LAYERS, "encoder"),
                                      (LAYERS + 1, 2 * LAYERS, "decoder")]):
    for scheme in ["post", "pre"] + OTHERS:
        table = grad_norms.by_layer(other_records, scheme, LAYERS)
        ax.plot(range(lo, hi + 1), table.mean(0)[lo - 1:hi], marker="o", ms=3,
                color=plotting.color(scheme), label=plotting.label(scheme))
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_title(f"FFN output W2, {title}")
axes[0].set_ylabel("||E[grad]||_F")
axes[1].legend(fontsize=6, ncol=3)
fig.tight_layout()
save(fig, "grad_norms_all_schemes.png")

# %%
for scheme in ["post", "pre"] + OTHERS:
    dec = grad_norms.by_layer(other_records, scheme, LAYERS).mean(0)[LAYERS:]
    print(f"{plotting.label(scheme):11s} decoder W2: bottom {dec[0]:.3g}  top {dec[-1]:.3g}  "
          f"top/bottom {dec[-1] / dec[0]:.2f}")

# %% [markdown]
# **What we see** (numbers above, decoder top/bottom ratio of the W2 gradient).
#
# * **Only Post-LN grows toward the top** (about 4x here), and ResiDual through its Post-LN
#   stream (below). Every other scheme either stays roughly flat (B2T 1.2, T-Fixup 0.9) or falls toward the top like Pre-LN (0.4-0.7).
# * **B2T** is Post-LN with an extra skip connection from the layer's input to its last LN; that
#   skip carries the gradient past the LNs and removes most of Post-LN's growth.
# * **DS-Init** keeps Post-LN's placement but draws layer $l$'s weights $1/\sqrt l$ smaller:
#   the top layers' branches are weaker, and the profile turns around (0.43).
# * **Admin** (Post-LN with the residual up-weighted by the profiled $\omega$) behaves like
#   Pre-LN here (0.53), the effect Liu et al. designed it for; DeepNorm (above) does the same
#   with a fixed $lpha$.
# * **Mix-LN** is Post-LN in its bottom quarter (layers 1-2 of 6) and Pre-LN above, and its
#   profile has exactly that shape: a bump at the Post-LN layers, then Pre-LN's decline.
# * **LayerNorm-Scaling** multiplies layer $l$'s LN output by $1/\sqrt l$, so its FFN input,
#   and with it the W2 gradient, shrinks toward the top the most (0.29).
# * **T-Fixup** has no LN at all and relies on its scaled init; its gradients are small and
#   flat in the decoder, and an order of magnitude smaller in the encoder, where T-Fixup's
#   0.67 N^(-1/4) init is applied.
# * **ReZero**'s branches are multiplied by a gate that is 0 at initialization, so the gradient
#   of every $W$ inside a branch is exactly zero at step 0 (the gate itself gets the gradient);
#   the log-scale figure cannot show it.
#
# * **R-Fixup** (no norm, zero-initialized last projections, scaled init) and **LayerScale**
#   (Pre-LN with a per-channel branch scale of 0.1 at init) are flat (0.94, 0.93); LayerScale's
#   gradients are about 10x smaller, by its branch scale.
# * **NormFormer** and **Res-Post-LN** (LN on the branch output) fall like Sandwich-LN (0.57,
#   0.56): with an LN on every branch output, the placements agree at initialization.
# * **DeepScaleLM**'s norm-preserving skip ($\lambda^2 + \beta^2 = 1$) and the **rescaled skip
#   with LN** rise slightly, like B2T (1.19, 1.18).
# * **ResiDual** grows toward the top (3.21): its Post-LN stream carries Post-LN's profile,
#   damped by the Pre-LN stream it adds at the output.
# * **Hyper-connections** at their initialization are Pre-LN exactly (0.61, the same numbers):
#   the mixing starts as the identity.
# * **DLCL** falls the most after LN-Scaling (0.42): the top layers' inputs are averages over
#   every earlier output with weights $1/(l+1)$, so each top branch gets a small share.
# * **nGPT** is perfectly flat (1.01) and 45-75x smaller than Pre-LN's: every layer's input
#   is a unit vector, each branch's output is normalized again, and its step size
#   $\alpha = 0.05$ scales every layer's gradient alike.
#
# On a 6-6 model at d=64 differences of less than about 1.5x are within the seed-to-seed
# spread (the bands in the first figure); the notebook does not claim more than that.
