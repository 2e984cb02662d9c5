"""DeepNorm encoder-decoder (Wang et al. 2022, "DeepNet"), span-corruption on the stdlib corpus.

x <- LN(alpha * x + G(x)) with the paper's encoder-decoder constants (encoder alpha =
0.81 (N^4 M)^(1/16), beta = 0.87 (N^4 M)^(-1/16); decoder alpha = (3M)^(1/4),
beta = (12M)^(-1/4)), Post-LN placement, AdamW b2 = 0.98, inverse-sqrt schedule, label
smoothing 0.1 as in the paper; small enough for a CPU.

    python train.py --config=configs/deepnorm.py --config.train.num_steps=50 --workdir=runs/dn

Expect (measured on a 2-core CPU): exit 0 after 57 s (compile included); loss 8.00
at step 1 -> 3.49 at step 50, eval loss 3.16 (perplexity 23.5); a checkpoint at step 50;
summary.json status "completed". Step 1 sits above ln 260 = 5.56 because DeepNorm's alpha
keeps each token's own embedding dominant, so the tied output head first predicts the input
byte (argmax == input for 100% of positions at init, vs 0.2% for Post-LN).
"""

from configs import base

MODEL = dict(arch="encoder_decoder", num_encoder_layers=6, num_decoder_layers=6, d_model=128,
             num_heads=4, d_ff=512, norm="layernorm", residual="deepnorm")


# Shared with post_ln.py and pre_ln.py, so the comparisons change one thing.
OPTIMIZER = dict(learning_rate=1e-3, warmup_steps=20)
TRAIN = dict(num_steps=2000, batch_size=16, seq_len=128, log_every=10, eval_every=50,
             checkpoint_every=50)


def get_config(arg=None):
    return base.get_config(MODEL, arg=arg, optimizer=OPTIMIZER, train=TRAIN)
