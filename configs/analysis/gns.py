"""``python -m deepnorm.analysis gns``: the norm layers' gradient noise scale against the
whole model's (Gray et al. 2024), across residual schemes and along a short training run.

    python -m deepnorm.analysis gns --config.analysis.out=runs/gns
    python -m deepnorm.analysis gns --config.analysis.residuals=post,pre,deepnorm,sandwich \
        --config.analysis.checkpoints=0,50,100,200 --config.analysis.out=runs/gns

Without an experiment (see configs/analysis/common.py) the model is a small decoder-only LM
(4 layers, d=64), small enough that the exact per-example gradients of every parameter
(``jax.vmap(jax.grad)``) fit next to the batch on a CPU.
"""

import ml_collections

from configs.analysis import common

MODEL = dict(arch="decoder", num_layers=4, d_model=64, d_ff=128, num_heads=2,
             remat_policy="none", dropout_rate=0.0)
# Adam with DeepNet's betas (0.9, 0.98), no weight decay, a short warmup, then constant.
OPTIMIZER = dict(learning_rate=1e-3, weight_decay=0.0, warmup_steps=10, schedule="constant",
                 label_smoothing=0.0)


def analysis_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.out = ""  # output directory (required): gns.json, .png, .meta.json
    c.residuals = "post,pre,deepnorm,sandwich"  # comma-separated schemes with norm layers
    c.depths = "4"  # comma-separated layers per stack (L means L-L for encoder_decoder)
    c.seeds = 1  # initializations 0..seeds-1, vmapped
    c.batches = 8  # measured batches per checkpoint (never trained on)
    c.batch_size = 16  # examples per batch: B of the per-example (1) vs batch (B) estimators
    c.seq_len = 32  # tokens per example
    c.train_batches = 64  # distinct training batches, cycled through the steps
    c.steps = 200  # optimizer steps of the run (the learning-rate schedule's length)
    c.checkpoints = "0,25,100,200"  # steps at which both noise scales are measured (0: init)
    return c


def get_config(arg=None):
    return common.get_config(arg=arg, model=MODEL, optimizer=OPTIMIZER,
                             analysis=analysis_config())
