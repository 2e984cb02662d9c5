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
# **What we see.** (to be filled from the numbers above)
