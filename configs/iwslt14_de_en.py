"""IWSLT-14 German -> English in Xiong et al.'s setup ("On Layer Normalization in the
Transformer Architecture", ICML 2020).

Model 6-6, d=512, FFN 1024, 4 heads, dropout 0.3; Adam (0.9, 0.98), lr 5e-4, inverse-sqrt after
4,000 warmup steps, label smoothing 0.1; decoding with beam 5 and length penalty 1.2
(``decode.beam_size``, ``decode.length_penalty``). Post-LN by default, the paper's baseline.

The paper's figures (shared/REFERENCES.md): Post-LN with 4,000 warmup steps about 34 BLEU;
without warmup 8.45 (lr 5e-4 or 1e-3); 500 warmup steps 31.16 at 5e-4 and 2.77 at 1e-3. Pre-LN
without warmup (lr 5e-4) also about 34, in fewer epochs.

IWSLT-14 is not in the TFDS catalog (tensorflow-datasets 4.9.x carries ted_multi_translate, TED
talks in 60 languages with a variable-language feature this project does not read, and
ted_hrlr_translate, which has no de-en pair). Prepare it with fairseq's
``examples/translation/prepare-iwslt14.sh`` and point the config at the Moses-tokenized,
lowercased files it writes *before* its BPE step (``iwslt14.tokenized.de-en/tmp/{train,valid,
test}.{de,en}``); a joint SentencePiece BPE of 10,000 pieces stands in for its 10,000 BPE merges:

    python train.py --config=configs/iwslt14_de_en.py --workdir=runs/iwslt14_postln \\
        --config.data.source_file=$IWSLT/tmp/{split}.de \\
        --config.data.target_file=$IWSLT/tmp/{split}.en
    # the paper's Pre-LN claim: no warmup
    python train.py --config=configs/iwslt14_de_en.py --workdir=runs/iwslt14_preln \\
        --config.model.residual=pre --config.optimizer.warmup_steps=0 \\
        --config.data.source_file=$IWSLT/tmp/{split}.de \\
        --config.data.target_file=$IWSLT/tmp/{split}.en

Batches: the paper uses 4,096 tokens; 160 pairs padded to 128 pieces hold about that many real
target tokens. ``train.num_steps`` (50,000, ~50 epochs of the 160k pairs) and weight decay
(1e-4, fairseq's IWSLT example) are not given in the paper text we have.
"""

from configs import base
from configs.translation import set_decode

MODEL = dict(arch="encoder_decoder", num_encoder_layers=6, num_decoder_layers=6, d_model=512,
             num_heads=4, d_ff=1024, norm="layernorm", residual="post", dropout_rate=0.3,
             activation="relu")
OPTIMIZER = dict(learning_rate=5e-4, b1=0.9, b2=0.98, warmup_steps=4000, schedule="inverse_sqrt",
                 label_smoothing=0.1, weight_decay=1e-4)
TRAIN = dict(num_steps=50_000, batch_size=160, seq_len=128, log_every=100, eval_every=2000,
             eval_steps=16, checkpoint_every=2000)
DATA = dict(corpus="parallel_files", source_language="de", target_language="en",
            source_file="iwslt14.tokenized.de-en/tmp/{split}.de",
            target_file="iwslt14.tokenized.de-en/tmp/{split}.en",
            train_split="train", eval_split="valid",
            tokenizer="sentencepiece", vocab_size=10_000, spm_model_type="bpe")


def get_config(arg=None):
    config = base.get_config(MODEL, arg=arg, optimizer=OPTIMIZER, train=TRAIN)
    config.data.update(DATA)
    if arg == base.QUICK:
        config.data.vocab_size = 1000
    base.tie_vocab_size(config)
    set_decode(config, beam_size=5, length_penalty=1.2)
    return config
