"""Encoder-only masked language model with DeepNorm (alpha = (2N)^(1/4), beta = (8N)^(-1/4)):
15% of the bytes corrupted BERT-style, loss on those positions only.

    python train.py --config=configs/encoder_mlm.py --config.train.num_steps=50 --workdir=runs/mlm

Expect (measured on a 2-core CPU): exit 0 in ~85 s on 2 CPU cores; loss 7.78 at step
1 -> 3.16 at step 50, eval loss 3.07 (perplexity 21.5) on the masked positions.
"""

from configs import base

MODEL = dict(arch="encoder", num_layers=12, d_model=128, num_heads=4, d_ff=512,
             norm="layernorm", residual="deepnorm")


def get_config(arg=None):
    return base.get_config(
        MODEL, arg=arg,
        optimizer=dict(learning_rate=1e-3, warmup_steps=20, label_smoothing=0.0),
        train=dict(num_steps=2000, batch_size=16, seq_len=128, log_every=10, eval_every=50,
                   checkpoint_every=50))
