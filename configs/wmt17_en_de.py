"""WMT-17 English -> German in DeepNet's base setup (Wang et al. 2022, arXiv 2203.00555), depth
by the config argument: ``configs/wmt17_en_de.py:18`` is 18L-18L, ``:100`` is 100L-100L.

DeepNorm (x <- LN(alpha x + G(x)), the paper's enc-dec alpha/beta), base width: d=512, 8 heads,
FFN 2048. The paper's figures (shared/REFERENCES.md): Post-LN diverges from 50L-50L, Pre-LN
models stay 0.5-1.0 BLEU below converged Post-LN, DeepNet 100L-100L reaches 28.9 BLEU.

    python train.py --config=configs/wmt17_en_de.py:100 --workdir=runs/wmt17_dn100
    python train.py --config=configs/wmt17_en_de.py:18 --config.model.residual=post \\
        --workdir=runs/wmt17_post18      # the Post-LN baseline at the same depth

The data is TFDS ``wmt17_translate/de-en`` read en -> de by its language features
(``data.tfds_text_key=""``); it needs a network on first use (about 5.9M pairs; or a copy
prepared in ``data.data_dir``). Validation is newstest2016 (TFDS ``validation``), test
newstest2017. The vocabulary is a joint SentencePiece BPE of 32,000 pieces trained on an even
sample of 1M sentences (the size of the Flax WMT example's; the paper's is not in our
references). The optimizer is fairseq's transformer-base recipe (lr 5e-4, Adam 0.9/0.98,
inverse-sqrt after 4,000 warmup steps, label smoothing 0.1, dropout 0.1), not values read
from the DeepNet appendix: check them before comparing BLEU with the paper. Decoding: beam 4,
length penalty 0.6 (the Flax WMT example's).
"""

from configs import base
from configs.translation import set_decode

MODEL = dict(arch="encoder_decoder", num_encoder_layers=6, num_decoder_layers=6, d_model=512,
             num_heads=8, d_ff=2048, norm="layernorm", residual="deepnorm", dropout_rate=0.1,
             activation="relu")
OPTIMIZER = dict(learning_rate=5e-4, b1=0.9, b2=0.98, warmup_steps=4000, schedule="inverse_sqrt",
                 label_smoothing=0.1, weight_decay=0.0)
TRAIN = dict(num_steps=100_000, batch_size=256, seq_len=128, log_every=100, eval_every=5000,
             eval_steps=16, checkpoint_every=5000)
DATA = dict(corpus="tfds", tfds_name="wmt17_translate/de-en", tfds_text_key="",
            source_language="en", target_language="de", train_split="train",
            eval_split="validation", tokenizer="sentencepiece", vocab_size=32_000,
            spm_model_type="bpe", spm_max_sentences=1_000_000)


def get_config(arg=None):
    depth = None
    if arg and arg.isdigit():
        depth, arg = int(arg), None
        if depth < 1:
            raise ValueError(f"config argument {depth} must be a depth >= 1, e.g. ':18'")
    model = dict(MODEL)
    if depth:
        model.update(num_encoder_layers=depth, num_decoder_layers=depth)
    config = base.get_config(model, arg=arg, optimizer=OPTIMIZER, train=TRAIN)
    config.data.update(DATA)
    if arg == base.QUICK:
        config.data.vocab_size = 1000
    base.tie_vocab_size(config)
    set_decode(config, beam_size=4, length_penalty=0.6)
    return config
