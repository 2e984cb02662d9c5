"""``python -m deepnorm.analysis grad-norms``: the expected gradient norm per layer
(Xiong et al. 2020, Fig. 3), at initialization or after a few optimizer steps.

    python -m deepnorm.analysis grad-norms --config.analysis.out=runs/xiong
    python -m deepnorm.analysis grad-norms --config=configs/analysis/grad_norms.py:post_ln \
        --config.analysis.depths=6,12 --config.analysis.out=runs/post_ln_grads

Without an experiment (see configs/analysis/common.py) the model is Xiong et al.'s 6-6
encoder-decoder (d=512, FFN 1024, 4 heads) at a quarter width.
"""

import ml_collections

from configs.analysis import common

MODEL = dict(arch="encoder_decoder", num_encoder_layers=6, num_decoder_layers=6, d_model=128,
             d_ff=256, num_heads=4, remat_policy="none")
# Used only with analysis.train_steps > 0: Adam (DeepNet's betas), no decay, constant rate.
OPTIMIZER = dict(learning_rate=1e-3, weight_decay=0.0, warmup_steps=0, schedule="constant",
                 label_smoothing=0.0)


def analysis_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.out = ""  # output directory (required): grad-norms.json, .png, .meta.json
    c.residuals = "post,pre,deepnorm"  # comma-separated schemes (deepnorm.analysis.SCHEMES)
    c.depths = "6"  # comma-separated layers per stack (L means L-L for encoder_decoder)
    c.seeds = 3  # initializations 0..seeds-1, vmapped
    c.batches = 16  # mini-batches averaged into the expected gradient
    c.batch_size = 16  # examples per mini-batch
    c.seq_len = 64  # tokens per example
    # Optimizer steps (the optimizer block, the training package's train step) before
    # measuring, on batches held out from the measured ones; 0 = at initialization.
    c.train_steps = 0
    # Comma-separated parameter groups drawn per layer in the figure (the records hold all):
    # ffn_in, ffn_out, {self,cross}_attn.{query,key,value,out}.
    c.plot_params = "ffn_out,ffn_in,self_attn.out"
    return c


def get_config(arg=None):
    return common.get_config(arg=arg, model=MODEL, optimizer=OPTIMIZER,
                             analysis=analysis_config())
