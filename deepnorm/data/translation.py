"""Translation data: which corpus gives the (source, target) pairs, and with which vocabulary.

Three sources of pairs, one example format ``{"source": bytes, "target": bytes}``:

* ``data.corpus="gettext"``: installed gettext catalogs (:mod:`deepnorm.data.gettext_corpus`),
  offline, en<->X for any X with catalogs;
* ``data.corpus="parallel_files"``: the user's aligned text (:mod:`deepnorm.data.parallel`);
* ``data.corpus="tfds"`` with a translation dataset (``wmt17_translate/de-en``,
  ``wmt14_translate/de-en``, ``ted_hrlr_translate/pt_to_en``, ...): its features are language
  codes, read as ``data.source_language`` -> ``data.target_language`` when
  ``data.tfds_text_key`` is empty, or as the explicit pair ``"de,en"``.

The vocabulary is ``data.tokenizer`` (:mod:`deepnorm.data.sentencepiece_tokenizer`); a
SentencePiece model is keyed by :func:`corpus_fingerprint`, which names the corpus content.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

from deepnorm.data import corpus, gettext_corpus, parallel
from deepnorm.data import sentencepiece_tokenizer as spt

PAIR_CORPORA = ("gettext", "parallel_files")
DEFAULT_TEST_FRACTION = 0.02


def is_translation(data_config) -> bool:
    """True when the configured corpus gives (source, target) pairs rather than plain text."""
    name = getattr(data_config, "corpus", "stdlib")
    if name in PAIR_CORPORA:
        return True
    return name == "tfds" and len(corpus.text_keys(data_config)) == 2


def direction(data_config) -> str:
    return f"{data_config.source_language}->{data_config.target_language}"


def fractions(data_config) -> tuple[float, float]:
    """(validation, test) shares of a corpus split by hash; both in (0, 1), sum below 1."""
    validation = float(getattr(data_config, "validation_fraction", 0.02))
    test = float(getattr(data_config, "test_fraction", DEFAULT_TEST_FRACTION))
    for name, value in (("validation_fraction", validation), ("test_fraction", test)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"data.{name} must lie in (0, 1), got {value}")
    if validation + test >= 1.0:
        raise ValueError(
            f"data.validation_fraction + data.test_fraction must be below 1 (train needs a"
            f" share), got {validation} + {test}"
        )
    return validation, test


class _GettextPairs:
    """A gettext split read as source -> target in the configured direction."""

    def __init__(self, records, english_is_source: bool):
        self._records = records
        self._keys = ("msgid", "msgstr") if english_is_source else ("msgstr", "msgid")

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict[str, bytes]:
        record = self._records[index]
        return {"source": record[self._keys[0]], "target": record[self._keys[1]]}


# Prepared builders by (data dir, config name): a run asks for the same one several times
# (tokenizer, train and eval iterators, description) and TFDS re-reads its info each time.
_GETTEXT_BUILDERS: dict[tuple, gettext_corpus.DeepnormGettext] = {}


def gettext_builder(data_config) -> gettext_corpus.DeepnormGettext:
    """The prepared gettext dataset of the configured language (built on first use)."""
    config = gettext_corpus.builder_config(data_config, fractions(data_config))
    data_dir = corpus._data_dir(data_config)  # noqa: SLF001
    key = (data_dir, config.name)
    if key not in _GETTEXT_BUILDERS:
        _GETTEXT_BUILDERS[key] = corpus.prepared(lambda: gettext_corpus.DeepnormGettext(
            data_dir=data_dir, config=config, file_format="array_record"))
    return _GETTEXT_BUILDERS[key]


def load_pairs(data_config, split: str) -> Sequence[dict[str, bytes]]:
    """Random-access ``{"source", "target"}`` examples of ``split``."""
    name = data_config.corpus
    if name == "gettext":
        if split.split("[")[0] not in parallel.SPLITS:
            raise ValueError(
                f"split for data.corpus='gettext' must be one of {parallel.SPLITS}, got {split!r}"
            )
        builder = gettext_builder(data_config)
        if split.split("[")[0] not in builder.info.splits:
            raise ValueError(
                f"data.corpus='gettext' has no pairs in split {split!r} "
                f"({builder.info.metadata['num_pairs']} pairs in all); raise "
                f"data.validation_fraction / data.test_fraction or add catalogs"
            )
        english_source = data_config.source_language == gettext_corpus.ENGLISH
        return _GettextPairs(builder.as_data_source(split), english_source)
    if name == "parallel_files":
        return parallel.split_pairs(data_config, split, *fractions(data_config))
    if name == "tfds":
        return corpus.load_source(data_config, split)
    raise ValueError(
        f"data.corpus={name!r} gives no translation pairs; use one of "
        f"{PAIR_CORPORA + ('tfds',)}"
    )


def corpus_fingerprint(data_config) -> str:
    """A name for the corpus content the vocabulary is trained on (the training split's)."""
    name = data_config.corpus
    if name == "gettext":
        meta = gettext_builder(data_config).info.metadata
        material = (meta["fingerprint"], fractions(data_config))
    elif name == "parallel_files":
        train_split = data_config.get("train_split", "train")
        material = (parallel.fingerprint_files(data_config, [train_split]),
                    fractions(data_config), train_split)
    else:
        builder = corpus.tfds_builder(data_config)
        material = (builder.info.full_name, corpus.text_keys(data_config),
                    data_config.get("train_split", "train"))
    return hashlib.sha256(repr((name, material)).encode()).hexdigest()


def cache_dir(data_config) -> str:
    """``data.spm_cache_dir``, else ``<TFDS data dir>/deepnorm_sentencepiece``."""
    explicit = getattr(data_config, "spm_cache_dir", None)
    if explicit:
        return os.path.expanduser(explicit)
    root = corpus._data_dir(data_config) or os.environ.get(  # noqa: SLF001
        "TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
    return os.path.join(root, "deepnorm_sentencepiece")


def make_tokenizer(data_config, workdir: str | None = None):
    """The run's tokenizer: bytes, or SentencePiece (workdir copy > cache > trained now)."""
    spt.check_settings(data_config)
    if data_config.tokenizer == "bytes":
        return spt.ByteTokenizer()
    if not is_translation(data_config):
        raise ValueError(
            f"data.tokenizer='sentencepiece' is for translation corpora "
            f"({', '.join(PAIR_CORPORA)}, or tfds with a language pair); data.corpus="
            f"{data_config.corpus!r} uses data.tokenizer='bytes'"
        )
    train_split = data_config.get("train_split", "train")
    return spt.load_or_train(
        data_config,
        corpus_fingerprint(data_config),
        lambda: load_pairs(data_config, train_split),
        cache_dir(data_config),
        workdir,
    )


def describe(data_config) -> str:
    """One line on where the pairs come from (for the run's start line)."""
    name = data_config.corpus
    if name == "gettext":
        return gettext_corpus.describe(gettext_builder(data_config), direction(data_config))
    if name == "parallel_files":
        tsv = data_config.get("parallel_tsv", "")
        files = tsv or f"{data_config.source_file} | {data_config.target_file}"
        train_split = data_config.get("train_split", "train")
        count = len(load_pairs(data_config, train_split))
        return f"parallel_files {direction(data_config)}: {files}, {count} train pairs"
    keys = corpus.text_keys(data_config)
    return f"tfds {data_config.tfds_name} {keys[0]}->{keys[1]}"
