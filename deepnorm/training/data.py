"""The training loop's view of ``deepnorm.data``: per-process iterators and global batches.

Each process reads its own disjoint shard of the corpus (``process_index`` of
``process_count``) with ``batch_size / process_count`` examples per batch; ``to_global`` joins
the processes' slices into one ``jax.Array`` sharded over the mesh's (data, fsdp) axes.

A translation corpus (``data.corpus`` gettext / parallel_files / a TFDS language pair) makes
the encoder-decoder task ``translation``, tokenized by the run's tokenizer: bytes, or a
SentencePiece model (trained or loaded when the ``DataSource`` is made; a workdir that already
holds ``vocab/sentencepiece.model`` supplies it). The trainer wires three things:
``DataSource(config, model_cfg, mesh, workdir=workdir)``, ``data.save_vocab(workdir)`` once
the workdir exists, and ``data.describe()`` in its start line. ``DataSource.vocab_size`` is
the tokenizer's size, the least ``model.vocab_size`` that fits (the translation configs tie
``model.vocab_size`` to ``data.vocab_size``, which SentencePiece meets exactly).
"""

from __future__ import annotations

import jax

from deepnorm.config import ConfigError, TransformerConfig
from deepnorm.data import translation
from deepnorm.data.pipeline import make_iterator
from deepnorm.data.tasks import TRANSLATION, task_for_arch
from deepnorm.data.sentencepiece_tokenizer import save_to_workdir
from deepnorm.training import mesh as mesh_lib


class DataSource:
    """Builds the train / validation iterators of a config for this process."""

    def __init__(self, config, model_cfg: TransformerConfig, mesh, workdir: str | None = None):
        data = config.data
        try:
            self.is_translation = translation.is_translation(data)
            self.tokenizer = translation.make_tokenizer(data, workdir)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data: {str(err).splitlines()[0]}") from err
        if self.is_translation and model_cfg.arch != "encoder_decoder":
            raise ConfigError(
                f"data.corpus={data.corpus!r} gives translation pairs, which need "
                f"model.arch='encoder_decoder', got {model_cfg.arch!r}")
        if model_cfg.vocab_size < self.tokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size} ids ({self.tokenizer.describe()}); use "
                f"model.vocab_size >= {self.tokenizer.vocab_size}")
        self.config = config
        self.task = TRANSLATION if self.is_translation else task_for_arch(model_cfg.arch)
        self.sharding = mesh_lib.batch_sharding(mesh)
        self.local_batch_size = config.train.batch_size // jax.process_count()

    def iterator(self, which: str):
        """A fresh iterator over ``data.train_split`` (``which="train"``) or
        ``data.eval_split`` (``"eval"``); a data problem becomes one ``ConfigError`` line."""
        train, data = self.config.train, self.config.data
        split = data.get("train_split", "train") if which == "train" else data.get(
            "eval_split", "validation")
        try:
            return make_iterator(
                self.config.data, task=self.task, split=split,
                batch_size=self.local_batch_size, seq_len=train.seq_len,
                seed=train.seed + (0 if which == "train" else 1),
                process_index=jax.process_index(), process_count=jax.process_count(),
                tokenizer=self.tokenizer)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data ({split} split): {str(err).splitlines()[0]}") from err

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer produces: the least ``model.vocab_size`` that fits the data."""
        return self.tokenizer.vocab_size

    def describe(self) -> str:
        """One line for the start line: the corpus (what went in) and the vocabulary."""
        data = self.config.data
        try:
            corpus_line = (translation.describe(data) if self.is_translation
                           else f"{data.corpus}" + (f" {data.tfds_name}" if data.corpus == "tfds"
                                                    else ""))
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data: {str(err).splitlines()[0]}") from err
        return f"data: {corpus_line}; vocab {self.tokenizer.describe()}; task {self.task}"

    def save_vocab(self, workdir: str) -> str | None:
        """Copies a SentencePiece vocabulary into ``<workdir>/vocab/`` (kept if already there),
        so resuming and decoding use exactly this run's; returns its path (None for bytes)."""
        if self.tokenizer.kind != "sentencepiece":
            return None
        data = self.config.data
        return save_to_workdir(self.tokenizer, workdir, {
            "corpus": data.corpus, "direction": translation.direction(data),
            "model_type": data.spm_model_type})

    def first_batch(self) -> dict:
        """The first training batch, as global arrays, without advancing the train iterator."""
        return self.to_global(next(self.iterator("train")))

    def to_global(self, local_batch: dict) -> dict:
        return mesh_lib.global_batch(local_batch, self.sharding)
