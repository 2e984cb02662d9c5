"""``python -m deepnorm.analysis signal-prop``: per layer at initialization, the mean cosine
similarity between token representations (rank collapse, Noci et al. 2022), the residual
stream's norm growth and the branch-to-skip norm ratio, for every scheme.

    python -m deepnorm.analysis signal-prop --config.analysis.out=runs/signal_prop
    python -m deepnorm.analysis signal-prop --config.analysis.depths=12,1000 \
        --config.analysis.residuals=post,pre,deepnorm --config.analysis.out=runs/sp

Without an experiment (see configs/analysis/common.py) the model is a small bidirectional
encoder (d=64, FFN 256, 4 heads): the scan over the layers makes 1,000 layers a few seconds.
"""

import ml_collections

from configs.analysis import common
from deepnorm.analysis.schemes import SCHEMES

MODEL = dict(arch="encoder", num_layers=12, d_model=64, d_ff=256, num_heads=4,
             remat_policy="none")
OPTIMIZER = {}  # nothing trains: the optimizer block is unused


def analysis_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.out = ""  # output directory (required): signal-prop.json, .png, .meta.json
    c.residuals = ",".join(SCHEMES)  # comma-separated schemes (deepnorm.analysis.SCHEMES)
    c.depths = "12,100,1000"  # comma-separated layers per stack (L means L-L)
    c.seeds = 2  # initializations 0..seeds-1, vmapped
    c.batch_size = 8  # examples in the one measured batch (real text, the train split)
    c.seq_len = 32  # tokens per example
    return c


def get_config(arg=None):
    return common.get_config(arg=arg, model=MODEL, optimizer=OPTIMIZER,
                             analysis=analysis_config())
