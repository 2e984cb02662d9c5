"""``python -m deepnorm.analysis update-norms``: how far the model's output moves in early
training, ||F(x, theta_t) - F(x, theta_0)|| (Wang et al. 2022, DeepNet, Fig. 4-5).

    python -m deepnorm.analysis update-norms --config.analysis.out=runs/deepnet
    python -m deepnorm.analysis update-norms --config.analysis.depths=6,12,24,48,100 \
        --config.analysis.out=runs/deepnet   # DeepNet Fig. 5's full range

Without an experiment (see configs/analysis/common.py) the models are DeepNet Fig. 5's tiny
64-128-2 encoder-decoders, trained with Adam at 5e-4 and no warmup.
"""

import ml_collections

from configs.analysis import common

MODEL = dict(arch="encoder_decoder", num_encoder_layers=6, num_decoder_layers=6, d_model=64,
             d_ff=128, num_heads=2, remat_policy="none")
# Adam with DeepNet's betas (0.9, 0.98), no weight decay, no warmup, a constant rate.
OPTIMIZER = dict(learning_rate=5e-4, weight_decay=0.0, warmup_steps=0, schedule="constant",
                 label_smoothing=0.0)


def analysis_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.out = ""  # output directory (required): update-norms.json, .png, .meta.json
    c.residuals = "post,pre,deepnorm"  # comma-separated schemes (deepnorm.analysis.SCHEMES)
    c.depths = "6,12,24,48"  # comma-separated layers per stack (L means L-L)
    c.seeds = 2  # initializations 0..seeds-1, vmapped
    c.batches = 4  # distinct training batches, cycled through the steps
    c.batch_size = 8  # examples per batch (the fixed input x is one validation batch)
    c.seq_len = 32  # tokens per example
    c.steps = 20  # optimizer steps; the update norm is recorded after each
    return c


def get_config(arg=None):
    return common.get_config(arg=arg, model=MODEL, optimizer=OPTIMIZER,
                             analysis=analysis_config())
