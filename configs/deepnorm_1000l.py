"""A 1,000-layer DeepNorm encoder-decoder (500 + 500, the depth of the DeepNet paper's
1,000-layer model), made narrow enough to train on a CPU. Depth is a scanned array axis, so
compile time is that of one layer; with remat (auto: save_dots on CPU in float32, full in
bfloat16 and on accelerators) each layer's element-wise work is recomputed on the backward pass.

    python train.py --config=configs/deepnorm_1000l.py --config.train.num_steps=5 --workdir=runs/dn1000

Expect (measured on a 2-core Intel Xeon (AMX) CPU): exit 0 in ~13 s for 2.8 M parameters and
1,000 layers, compile included; encoder alpha 5.65,
beta 0.125; decoder alpha 6.22, beta 0.114; loss 6.98 at step 1 -> 5.05 at step 5, eval loss
5.25; a checkpoint at step 5.
"""

from configs import base

MODEL = dict(arch="encoder_decoder", num_encoder_layers=500, num_decoder_layers=500,
             d_model=16, num_heads=2, d_ff=32, norm="layernorm", residual="deepnorm")


def get_config(arg=None):
    return base.get_config(
        MODEL, arg=arg,
        optimizer=dict(learning_rate=5e-4, warmup_steps=0, schedule="constant"),
        train=dict(num_steps=20, batch_size=4, seq_len=32, log_every=1, eval_every=10,
                   eval_steps=2, checkpoint_every=10))
