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
# # Signal propagation at initialization, every scheme, up to 1,000 layers
#
# **The question.** Before the first update, what does each residual scheme do to a batch of
# real text as it passes through L layers? Three curves per layer:
#
# * **Token cosine similarity**: the mean cosine similarity between the representations of
#   distinct real tokens of a sequence. Noci et al. (2022, "Signal propagation in
#   transformers: theoretical perspectives and the role of rank collapse") show that when it
#   goes to 1 (*rank collapse*: every token carries the same vector) the gradients of the
#   queries and keys vanish and training stalls; a well-conditioned stack keeps it away from 1.
# * **Stream growth**: the mean token norm of the residual stream leaving each layer over
#   that of the embeddings. Pre-LN adds every branch to an un-normalized stream, which grows
#   like $\sqrt{l}$; Post-LN-style schemes renormalize it after every sublayer.
# * **Branch / skip ratio**: the norm of a sublayer's branch output over the norm of the
#   stream entering it (mean of the layer's sublayers), as the blocks record them, before a
#   scheme's own scalar on either side: DeepNorm's skip is $\alpha x$ and ReZero's branch is
#   multiplied by a gate that starts at 0. It says how much one sublayer can change the stream.
#
# **The code.** `deepnorm.analysis.signal_prop` runs the model's own forward pass (the scan
# over the layers) on one batch of the stdlib corpus, seeds vmapped; the norms are the
# statistics every block already returns, and the cosine similarity is added by an
# analysis-side hook (`signal_prop.cosine_hook`) for the duration of one trace, so no training
# step pays for it. The same measurement is
# `python -m deepnorm.analysis signal-prop --config.analysis.out=DIR`.
#
# Set `DEEPNORM_QUICK=1` to run everything on tiny grids (the test suite does).

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display

from deepnorm import TransformerConfig
from deepnorm.analysis import SCHEMES, first, plotting, signal_prop, stacked_batches

QUICK = os.environ.get("DEEPNORM_QUICK") == "1"


def save(fig, name):
    if not QUICK:  # quick runs must not overwrite the committed figures
        fig.savefig(f"figures/{name}", dpi=110, bbox_inches="tight")
    display(fig)
    plt.close(fig)


WIDTH = dict(d_model=16, d_ff=32, num_heads=2) if QUICK else dict(d_model=64, d_ff=256,
                                                                  num_heads=4)
BASE = TransformerConfig(arch="encoder", num_layers=12, remat_policy="none", **WIDTH)
SCHEMES_RUN = ["post", "pre", "deepnorm"] if QUICK else list(SCHEMES)
DEPTHS = [3] if QUICK else [12, 100, 1000]
SEEDS = [0] if QUICK else [0, 1]
BATCH = first(stacked_batches(None, arch=BASE.arch, num_batches=1,
                              **(dict(batch_size=2, seq_len=8) if QUICK
                                 else dict(batch_size=8, seq_len=32))))

# %%
start = time.perf_counter()
records = signal_prop.run(BASE, schemes=SCHEMES_RUN, depths=DEPTHS, seeds=SEEDS, batch=BATCH,
                          log=lambda line: None)
print(f"{len(records)} records in {time.perf_counter() - start:.0f}s")
save(plotting.plot_signal_prop(records), "signal_propagation.png")


# %%
def curve(scheme, depth, key):
    return np.mean([r[key] for r in records if r["residual"] == scheme
                    and r["num_layers"] == depth], axis=0)


for depth in DEPTHS:
    print(f"L={depth}: cosine at layer 0 / L/2 / L | stream growth at L | branch/skip at "
          "layer 1 / L")
    for scheme in SCHEMES_RUN:
        cos, growth = curve(scheme, depth, "cosine"), curve(scheme, depth, "stream_growth")
        ratio = curve(scheme, depth, "branch_to_skip_mean")
        print(f"  {plotting.label(scheme):11s} {cos[0]:.2f} / {cos[depth // 2]:.2f} / "
              f"{cos[-1]:.2f} | {growth[-1]:8.3g} | {ratio[0]:.3g} / {ratio[-1]:.3g}")

# %% [markdown]
# **What we see** (the numbers above; one batch of 8 x 32 tokens, two seeds, d=64).
# The embeddings' tokens start at a cosine similarity of 0.30 (0.22 for Peri-LN, whose input
# norm centers them first). Three families appear, and depth mostly decides *when* a scheme
# reaches its end state, not which one.
#
# * **Post-LN** collapses: 0.93 by layer 6 and 1.00 at the last layer of every depth. Each
#   sublayer adds a branch of about 0.56-0.74 of the stream and renormalizes, so the stream
#   keeps a fixed norm (0.80 of the embeddings': sqrt(d) over the embedding norm) while the
#   tokens become one vector. This is the regime Noci et al. tie to vanishing query/key
#   gradients.
# * **B2T** (Post-LN plus a bypass of the input) delays it: 0.73 at the top of 12 layers,
#   but 1.00 at 100 and 1,000 layers; the bypass slows the collapse per layer without
#   changing where it ends.
# * **Admin** collapses too (0.75, 0.94, 0.99 at the top of 12, 100, 1,000 layers): its
#   omegas set the skip's weight from the profiled branch variance, and the ratio shown here
#   is before them, 0.56-0.70 per sublayer.
# * **Pre-LN** grows its stream like sqrt(L): 2.65x, 8.37x, 26.6x at the top of 12, 100,
#   1,000 layers (8.37 -> 26.6 is 3.18x for 10x the depth; sqrt(10) = 3.16). Each new branch
#   is a shrinking share of the stream (branch/skip 0.39 at layer 1, 0.021 at layer 1,000),
#   yet the tokens still become alike: cosine 0.80, 0.97, 1.00 at the top. The last layers
#   of a deep Pre-LN stack change neither the stream nor its tokens much.
# * **Sandwich-LN, Peri-LN** behave like Pre-LN with a faster-growing stream (34.6x and 43.5x
#   at 1,000 layers; their extra output norm makes each branch a unit-scale addition) and the
#   same near-collapse (0.97, 0.98).
# * **SubLN** grows the stream most (7.7x at 12, 111x at 1,000 layers): its extra norm
#   inside each branch makes the first branches larger than the stream (branch/skip 1.25-1.7
#   at layer 1); cosine 0.95 at 1,000 layers.
# * **Mix-LN** is Post-LN in its bottom quarter, Pre-LN above. At 100 and 1,000 layers the
#   cosine reaches 1.00 inside the Post-LN quarter, where the stream norm stays fixed, and the
#   Pre-LN part's growth starts at its top (the kink in the orange curve at a quarter of the
#   depth); at 12 layers its 3 Post-LN layers reach 0.90 and the top 0.96. Collapsed tokens
#   stay collapsed above: the Pre-LN layers add branches computed from identical inputs.
# * **LN-Scaling** (Pre-LN with the norm's output scaled by 1/sqrt(l)) keeps the stream
#   nearly flat (2.17x at 1,000 layers against Pre-LN's 26.6x) and is the least collapsed of
#   the normalized Pre-LN family: 0.55, 0.68, 0.77 at the top.
# * **DS-Init** (Post-LN, layer l initialized 1/sqrt(l) smaller) has a branch ratio falling
#   like 1/l (0.56 at layer 1, 0.0059 at layer 100, 0.00056 at layer 1,000): the bottom
#   layers raise the cosine to 0.57 and the layers above are nearly the identity, so it stays
#   0.57 at every depth.
# * **DeepNorm** starts every layer nearly as the identity: branch/skip 0.053, 0.018, 0.0058
#   at 12, 100, 1,000 layers (about L^-1/2, from beta; the skip is further multiplied by
#   alpha), the stream keeps its normalized norm, and the cosine drops to 0.22 at the first
#   LayerNorm (which centers the tokens) and stays there through 1,000 layers.
# * **T-Fixup** (no norm, scaled init): branch/skip 0.068 at 12 layers, 0.0073 at 1,000; the
#   stream grows only 4-9% and the cosine creeps from 0.30 to 0.32-0.37.
# * **ReZero** is exactly the identity at initialization (gates 0): stream growth 1 and the
#   embeddings' cosine 0.30 at every layer. Its branch/skip ratio (0.56-0.59) is the branch
#   *before* the gate: what the first updates of the gates will let in.
#
# **What it does and does not say.** This is initialization only. The schemes that train
# deep stacks stably in the literature (DeepNorm, T-Fixup, ReZero, DS-Init, LN-Scaling) are
# the ones whose layers start close to the identity, and the ones known to fail deep without
# warmup (Post-LN) start collapsed; but Pre-LN is known to train at depth although its top layers start
# collapsed too, so a low cosine at initialization is neither necessary nor sufficient for
# trainability. A stack that starts near the identity has to move away from it during
# training, which is what the update-norm notebook looks at.
