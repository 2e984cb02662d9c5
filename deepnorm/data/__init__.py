"""Data: byte tokens, an offline TFDS corpus (or any TFDS dataset), grain pipelines per task;
translation pairs (installed gettext catalogs, the user's files, TFDS) with a SentencePiece
vocabulary (``deepnorm.data.translation``).

    it = make_iterator(config.data, task=task_for_arch(config.model.arch), split="train",
                       batch_size=32, seq_len=128, seed=0)
    batch = next(it)  # dict of NumPy arrays; see deepnorm.data.tasks for the formats
"""

from __future__ import annotations

from ml_collections import config_dict

from deepnorm.data.corpus import load_source
from deepnorm.data.pipeline import (
    batch_shapes,
    iterator_checkpoint_args,
    iterator_restore_args,
    make_iterator,
)
from deepnorm.data.tasks import TASKS, TRANSLATION, task_for_arch
from deepnorm.data.tokenizer import (
    EOS_ID,
    MASK_ID,
    PAD_ID,
    SENTINEL_ID,
    VOCAB_SIZE,
    decode,
    encode,
)
from deepnorm.data.translation import load_pairs, make_tokenizer

__all__ = [
    "EOS_ID",
    "MASK_ID",
    "PAD_ID",
    "SENTINEL_ID",
    "TASKS",
    "TRANSLATION",
    "VOCAB_SIZE",
    "batch_shapes",
    "decode",
    "default_data_config",
    "encode",
    "iterator_checkpoint_args",
    "iterator_restore_args",
    "load_pairs",
    "load_source",
    "make_tokenizer",
    "make_iterator",
    "task_for_arch",
]


def default_data_config() -> config_dict.ConfigDict:
    """The ``data.*`` config block: the offline stdlib corpus and the standard corruption rates."""
    config = config_dict.ConfigDict()
    # Where text comes from: "stdlib" (this Python's standard library sources, offline),
    # "text_files" (the files matching data.text_files) or "tfds" (data.tfds_name); for
    # translation "gettext" (installed .mo catalogs, offline) or "parallel_files" (your own
    # aligned text), or "tfds" with a language pair (docs/translation.md).
    config.corpus = "stdlib"
    # Glob of the user's text files for corpus="text_files"; "**" recurses, "~" expands.
    config.text_files = ""
    # TFDS dataset for corpus="tfds", e.g. "lm1b" or "ted_hrlr_translate/pt_to_en"; needs a network
    # on first use (or a copy already prepared as array_record in data.data_dir).
    config.tfds_name = ""
    # The TFDS feature holding the text ("text" for lm1b), or "source,target" (e.g. "pt,en"),
    # which makes the encoder-decoder task translate instead of denoise; "" means the pair
    # data.source_language,data.target_language (translation datasets name features by language).
    config.tfds_text_key = "text"
    # Translation direction (gettext: one side must be "en", the other a language with catalogs).
    config.source_language = "en"
    config.target_language = "de"
    # gettext: extra locale dirs (holding <lang>/LC_MESSAGES/*.mo), os.pathsep-separated, searched
    # after /usr/share/locale and /usr/local/share/locale (False: only these extra dirs).
    config.gettext_roots = ""
    config.gettext_standard_roots = True
    # parallel_files: a TSV of source<TAB>target lines, or two line-aligned files; "{split}" in a
    # path is replaced by the split name (train_split / eval_split), e.g. "iwslt14/{split}.de".
    config.parallel_tsv = ""
    config.source_file = ""
    config.target_file = ""
    # Vocabulary: "bytes" (260 ids, nothing to train) or "sentencepiece" (translation corpora:
    # trained on the train split, both sides jointly; cached; copied to <workdir>/vocab/).
    config.tokenizer = "bytes"
    config.vocab_size = 8000  # SentencePiece pieces (PAD 0, EOS 1, BOS 2, UNK 3 included)
    config.spm_model_type = "bpe"  # bpe | unigram
    config.spm_character_coverage = 1.0  # 0.9995 suits scripts with many characters (zh, ja)
    config.spm_max_sentences = 1_000_000  # sentences sampled (evenly) to train the vocabulary
    # Where trained vocabularies are cached; None means
    # <data_dir or ~/tensorflow_datasets>/deepnorm_sentencepiece.
    config.spm_cache_dir = config_dict.placeholder(str)
    # Where TFDS datasets are built and cached; None means TFDS's default (~/tensorflow_datasets).
    config.data_dir = config_dict.placeholder(str)
    # Split names passed to make_iterator by the trainer; lm1b, for example, has no
    # "validation" (use eval_split="test").
    config.train_split = "train"
    config.eval_split = "validation"
    # Share of the embedded corpus's files held out for validation, chosen by path hash
    # (translation corpora split by a hash of the source string; test_fraction goes to "test").
    config.validation_fraction = 0.02
    config.test_fraction = 0.02
    # Corrupted share of tokens for masked LM (BERT) and span corruption (T5).
    config.mask_rate = 0.15
    # Mean length of a corrupted span for span corruption.
    config.mean_span_length = 3.0
    # grain worker processes; 0 runs the pipeline in the training process (fine on a CPU).
    config.num_workers = 0
    return config
