"""DeepNorm encoder-decoder translating English UI strings to German, offline, on a CPU.

The corpus is the machine's own gettext catalogs (``data.corpus=gettext``: msgid -> German
msgstr of /usr/share/locale/de/LC_MESSAGES/*.mo; docs/translation.md), with a joint
SentencePiece BPE vocabulary trained once on its train split and cached. UI strings are short
(SentencePiece 4k: median 9-10 pieces a side, 95% under 30), so sequences are 32 pieces and a
batch is 64 pairs (~1,300 real target tokens). ``model.vocab_size`` follows ``data.vocab_size``
(a field reference: ``--config.data.vocab_size=8000`` resizes the embedding too).

    python train.py --config=configs/translation.py --workdir=runs/gettext_en_de
    python train.py --config=configs/translation.py:quick --workdir=/tmp/tr_quick   # smoke test

Measured on a 2-core CPU (``--config.train.bleu_every=500``, then ``python -m deepnorm.translate
--workdir=W --split=test --bleu --beam=4``): eval loss 5.76 at step 250, 4.64 at 500, 3.64 at
1,000, 3.14 at 1,500 (ln 4000 = 8.29); greedy BLEU / chrF on 64 validation pairs 8.0 / 13.5 at
step 500, 12.9 / 26.0 at 1,000, 19.8 / 35.1 at 1,500; on the 879-pair test split, beam 4, length penalty 1: BLEU
20.2, chrF 33.6. The 1,500 steps took 40 min (1.1-2.2 s a step; the slower ones while a second
training shared the cores). The SentencePiece model trains in about 30 s on an idle machine,
then comes from the cache.

There is no paper figure for this corpus; it exists to run the translation path end to end
without a download. Decoding: beam 4, length penalty 0.6 (the Flax WMT example's).
German -> English: ``--config.data.source_language=de
--config.data.target_language=en``; another language: ``--config.data.target_language=fr``.
"""

import ml_collections

from configs import base

MODEL = dict(arch="encoder_decoder", num_encoder_layers=4, num_decoder_layers=4, d_model=128,
             num_heads=4, d_ff=512, norm="layernorm", residual="deepnorm", dropout_rate=0.1)
OPTIMIZER = dict(learning_rate=1e-3, warmup_steps=200)
TRAIN = dict(num_steps=1500, batch_size=64, seq_len=32, log_every=20, eval_every=250,
             eval_steps=8, checkpoint_every=250)
DATA = dict(corpus="gettext", source_language="en", target_language="de",
            tokenizer="sentencepiece", vocab_size=4000, spm_model_type="bpe")


def get_config(arg=None):
    config = base.get_config(MODEL, arg=arg, optimizer=OPTIMIZER, train=TRAIN)
    config.data.update(DATA)
    if arg == base.QUICK:
        # A smaller vocabulary trains in seconds; quick keeps seq_len 32 from shrink().
        config.data.vocab_size = 1000
        config.train.batch_size = 16
    base.tie_vocab_size(config)
    set_decode(config, beam_size=4, length_penalty=0.6)
    return config


def set_decode(config: ml_collections.ConfigDict, **values) -> None:
    """Sets the ``decode.*`` keys that decoding (beam search, BLEU) reads. The section is the
    one ``configs/base.py`` defines where it has one; otherwise it is made here, locked."""
    if "decode" not in config:
        with config.unlocked():
            config.decode = ml_collections.ConfigDict(values)
        config.decode.lock()
        return
    for key, value in values.items():
        config.decode[key] = value  # a typo fails here: the section is locked
