"""Subword vocabulary for translation: a SentencePiece model trained on the training split.

``data.tokenizer="sentencepiece"`` trains one joint model on the source and target sides of the
training pairs (``data.vocab_size`` pieces, ``data.spm_model_type`` bpe | unigram,
``data.spm_character_coverage``; at most ``data.spm_max_sentences`` sentences, an evenly
strided sample when the split is larger) with the ``sentencepiece`` package. Ids::

        PAD_ID=0  padding (the models' mask is ids != 0)
        EOS_ID=1  end of sentence (as in the byte tokenizer)
        BOS_ID=2  decoder start token
        UNK_ID=3  unknown piece

Trained models are cached under ``<cache dir>/<key>.model``, the key a SHA-256 of the corpus
fingerprint and every trainer setting, so a second run with the same inputs loads instead of
training. A run copies its model into ``<workdir>/vocab/sentencepiece.model`` (with a JSON of
its settings); a run whose workdir already has one uses that file, so a resumed or decoding run
sees exactly its vocabulary even if the cache was deleted.

``data.tokenizer="bytes"`` is :class:`ByteTokenizer`, the 260-id byte vocabulary of
:mod:`deepnorm.data.tokenizer`, whose decoder start token is its EOS id.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from deepnorm.data import tokenizer as byte_tokenizer

TOKENIZERS = ("bytes", "sentencepiece")
MODEL_TYPES = ("bpe", "unigram")
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
WORKDIR_MODEL = os.path.join("vocab", "sentencepiece.model")
WORKDIR_SETTINGS = os.path.join("vocab", "sentencepiece.json")


class ByteTokenizer:
    """The byte vocabulary behind the common tokenizer interface (encode / decode / ids)."""

    kind = "bytes"
    pad_id, eos_id, bos_id = byte_tokenizer.PAD_ID, byte_tokenizer.EOS_ID, byte_tokenizer.EOS_ID
    vocab_size = byte_tokenizer.VOCAB_SIZE
    # Ids a translation never emits: padding and the masked-LM / span-corruption markers.
    banned_ids = (byte_tokenizer.PAD_ID, byte_tokenizer.MASK_ID, byte_tokenizer.SENTINEL_ID)

    def encode(self, text: str | bytes) -> np.ndarray:
        return byte_tokenizer.encode(text)

    def decode(self, ids) -> str:
        """Text of ``ids`` up to the first EOS (special ids dropped)."""
        ids = np.asarray(ids)
        ends = np.flatnonzero(ids == self.eos_id)
        return byte_tokenizer.decode(ids[: ends[0]] if ends.size else ids)

    def describe(self) -> str:
        return f"bytes ({self.vocab_size} ids)"


class SentencePieceTokenizer:
    """A trained SentencePiece model: text <-> int32 ids with the ids of the module docstring."""

    kind = "sentencepiece"
    pad_id, eos_id, bos_id, unk_id = PAD_ID, EOS_ID, BOS_ID, UNK_ID
    banned_ids = (PAD_ID, BOS_ID)  # ids a decoder never emits (BOS only starts the target)

    def __init__(self, model_proto: bytes, origin: str = ""):
        self.model_proto = model_proto
        self.origin = origin
        self._processor = spm.SentencePieceProcessor(model_proto=model_proto)
        if (self._processor.pad_id(), self._processor.eos_id(), self._processor.bos_id()) != (
            PAD_ID, EOS_ID, BOS_ID,
        ):
            raise ValueError(
                f"SentencePiece model {origin or ''} has pad/eos/bos ids "
                f"{self._processor.pad_id()}/{self._processor.eos_id()}/"
                f"{self._processor.bos_id()}, expected {PAD_ID}/{EOS_ID}/{BOS_ID}"
            )

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def model_type(self) -> str:
        from sentencepiece import sentencepiece_model_pb2  # protobuf: only when asked

        proto = sentencepiece_model_pb2.ModelProto.FromString(self.model_proto)
        return sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, (bytes, bytearray, memoryview)):
            text = bytes(text).decode("utf-8", errors="replace")
        return np.asarray(self._processor.encode(text), dtype=np.int32)

    def decode(self, ids) -> str:
        """Text of ``ids`` up to the first EOS; PAD and BOS are dropped (detokenized for BLEU)."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return self._processor.decode([i for i in ids if i not in (PAD_ID, BOS_ID)])

    def describe(self) -> str:
        return f"sentencepiece {self.model_type.lower()} {self.vocab_size} pieces"


def check_settings(data_config) -> None:
    """One line for an unknown tokenizer or model type, or an unusable vocabulary size."""
    kind = getattr(data_config, "tokenizer", "bytes")
    if kind not in TOKENIZERS:
        raise ValueError(f"data.tokenizer must be one of {TOKENIZERS}, got {kind!r}")
    if kind == "bytes":
        return
    model_type = getattr(data_config, "spm_model_type", "bpe")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"data.spm_model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    size = data_config.vocab_size
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"data.vocab_size must be an integer >= 8 for sentencepiece, got {size!r}")
    coverage = float(getattr(data_config, "spm_character_coverage", 1.0))
    if not 0.9 <= coverage <= 1.0:
        raise ValueError(f"data.spm_character_coverage must lie in [0.9, 1], got {coverage}")


def _trainer_settings(data_config) -> dict:
    return {
        "vocab_size": int(data_config.vocab_size),
        "model_type": data_config.spm_model_type,
        "character_coverage": float(getattr(data_config, "spm_character_coverage", 1.0)),
        "max_sentences": int(getattr(data_config, "spm_max_sentences", 1_000_000)),
    }


def cache_key(corpus_fingerprint: str, settings: dict) -> str:
    """SHA-256 of everything that decides the trained model (corpus, settings, library)."""
    material = json.dumps(
        {"corpus": corpus_fingerprint, "settings": settings, "spm": spm.__version__,
         "ids": [PAD_ID, EOS_ID, BOS_ID, UNK_ID]},
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def train(sentences: Iterable[str], settings: dict) -> bytes:
    """Trains a model on ``sentences``; a vocabulary the text cannot fill is one line."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            vocab_size=settings["vocab_size"],
            model_type=settings["model_type"],
            character_coverage=settings["character_coverage"],
            pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
            input_sentence_size=settings["max_sentences"],
            shuffle_input_sentence=True,
            num_threads=max(1, min(8, os.cpu_count() or 1)),
            minloglevel=2,  # its per-iteration INFO lines would bury the run's own log
        )
    except RuntimeError as err:
        message = str(err)
        limit = re.search(r"value <= (\d+)", message)
        if limit:
            raise ValueError(
                f"data.vocab_size={settings['vocab_size']} is more than the training text allows"
                f" for a {settings['model_type']} model (at most {limit.group(1)}); lower"
                f" data.vocab_size"
            ) from err
        raise ValueError(
            f"SentencePiece training failed for data.vocab_size={settings['vocab_size']}, "
            f"data.spm_model_type={settings['model_type']!r}: {message.splitlines()[-1]}"
        ) from err
    return model.getvalue()


def _strided_sample(count: int, limit: int) -> Sequence[int]:
    """``limit`` indices spread evenly over ``range(count)`` (all of them if it fits)."""
    if count <= limit:
        return range(count)
    return np.linspace(0, count - 1, limit).round().astype(np.int64)


def training_sentences(pairs: Sequence[dict], limit: int) -> Iterable[str]:
    """Source and target of each sampled pair (joint vocabulary), as str."""
    for index in _strided_sample(len(pairs), max(1, limit // 2)):
        example = pairs[int(index)]
        for side in ("source", "target"):
            text = example[side]
            yield text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


def _write_atomically(path: str, payload: bytes) -> None:
    """Writes via a temporary file and a rename, so a reader never sees half a model."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as file:
        file.write(payload)
    os.replace(tmp, path)


def load_or_train(
    data_config, corpus_fingerprint: str, train_pairs, cache_dir: str, workdir: str | None = None
) -> SentencePieceTokenizer:
    """The workdir's model if it has one, else the cached one for these inputs, else a new one.

    ``train_pairs`` is called (no arguments) only when training is needed.
    """
    settings = _trainer_settings(data_config)
    if workdir and os.path.exists(os.path.join(workdir, WORKDIR_MODEL)):
        path = os.path.join(workdir, WORKDIR_MODEL)
        with open(path, "rb") as file:
            tokenizer = SentencePieceTokenizer(file.read(), origin=path)
        if tokenizer.vocab_size != settings["vocab_size"]:
            raise ValueError(
                f"{path} has {tokenizer.vocab_size} pieces but data.vocab_size="
                f"{settings['vocab_size']}; a run keeps its vocabulary: use data.vocab_size="
                f"{tokenizer.vocab_size} or a new workdir"
            )
        return tokenizer
    key = cache_key(corpus_fingerprint, settings)
    path = os.path.join(cache_dir, f"{key}.model")
    if os.path.exists(path):
        with open(path, "rb") as file:
            return SentencePieceTokenizer(file.read(), origin=path)
    proto = train(training_sentences(train_pairs(), settings["max_sentences"]), settings)
    _write_atomically(path, proto)
    _write_atomically(
        os.path.join(cache_dir, f"{key}.json"),
        json.dumps({"corpus": corpus_fingerprint, **settings}, indent=1).encode(),
    )
    return SentencePieceTokenizer(proto, origin=path)


def save_to_workdir(tokenizer: SentencePieceTokenizer, workdir: str, details: dict) -> str:
    """Copies the model into ``<workdir>/vocab/`` (once) and returns its path."""
    path = os.path.join(workdir, WORKDIR_MODEL)
    if not os.path.exists(path):
        _write_atomically(path, tokenizer.model_proto)
        _write_atomically(
            os.path.join(workdir, WORKDIR_SETTINGS),
            json.dumps({"origin": tokenizer.origin, "vocab_size": tokenizer.vocab_size,
                        **details}, indent=1).encode(),
        )
    return path


def load_from_workdir(workdir: str) -> SentencePieceTokenizer:
    """The run's own vocabulary (for decoding a finished run)."""
    path = os.path.join(workdir, WORKDIR_MODEL)
    if not os.path.exists(path):
        raise ValueError(f"{workdir} has no {WORKDIR_MODEL}; was it trained with "
                         "data.tokenizer='sentencepiece'?")
    with open(path, "rb") as file:
        return SentencePieceTokenizer(file.read(), origin=path)

