"""``python -m deepnorm.analysis stability-map``: final validation loss or divergence of short
training runs over residual scheme x depth x peak learning rate x warmup.

    python -m deepnorm.analysis stability-map --config.analysis.workers=2 \
        --config.analysis.out=runs/stability

Each cell runs the training package's optimizer and train step; ``optimizer.learning_rate``
and ``optimizer.warmup_steps`` are not in this config's optimizer block because every cell
sets its own (``analysis.lrs`` x ``analysis.warmups``). Without an experiment (see
configs/analysis/common.py) the model is a decoder-only 64-128-2 language model, the cheapest
whose divergence depends on depth.
"""

import ml_collections

from configs import base
from configs.analysis import common

MODEL = dict(arch="decoder", num_layers=6, d_model=64, d_ff=128, num_heads=2,
             remat_policy="none")
# AdamW as in DeepNet (betas 0.9, 0.98), no decay, linear warmup then a constant rate, so every
# step after warmup runs at the cell's peak learning rate.
OPTIMIZER = dict(weight_decay=0.0, schedule="constant", label_smoothing=0.0)
PER_CELL = ("learning_rate", "warmup_steps")


def analysis_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.out = ""  # output directory (required); finished cells are kept in OUT/cells/
    c.residuals = "post,pre,deepnorm"  # comma-separated schemes (deepnorm.analysis.SCHEMES)
    c.depths = "6,18"  # comma-separated layers per stack (L means L-L)
    c.lrs = "3e-4,1e-3,3e-3,1e-2"  # comma-separated peak learning rates, one vmapped row
    c.warmups = "0,50"  # comma-separated warmup steps (0 = the first update at the peak)
    c.steps = 150  # optimizer steps per cell
    c.seeds = 1  # initializations 0..seeds-1 per cell
    c.batch_size = 8  # examples per training batch
    c.seq_len = 32  # tokens per example
    c.max_loss = base.train_config().max_loss  # a finite loss above this counts as diverged
    c.workers = 1  # rows (scheme, depth, warmup) trained side by side, one process each
    return c


def get_config(arg=None):
    config = common.get_config(arg=arg, model=MODEL, optimizer=OPTIMIZER,
                               analysis=analysis_config())
    with config.unlocked():
        for name in PER_CELL:
            del config.optimizer[name]
    return config
