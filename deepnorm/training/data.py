"""The training loop's view of ``deepnorm.data``: per-process iterators and global batches.

Each process reads its own disjoint shard of the corpus (``process_index`` of
``process_count``) with ``batch_size / process_count`` examples per batch; ``to_global`` joins
the processes' slices into one ``jax.Array`` sharded over the mesh's (data, fsdp) axes.
"""

from __future__ import annotations

import jax

from deepnorm.config import ConfigError, TransformerConfig
from deepnorm.data.pipeline import make_iterator
from deepnorm.data.tasks import task_for_arch
from deepnorm.data.tokenizer import VOCAB_SIZE
from deepnorm.training import mesh as mesh_lib


class DataSource:
    """Builds the train / validation iterators of a config for this process."""

    def __init__(self, config, model_cfg: TransformerConfig, mesh):
        if model_cfg.vocab_size < VOCAB_SIZE:
            raise ConfigError(
                f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                f"{VOCAB_SIZE} ids; use model.vocab_size >= {VOCAB_SIZE}")
        self.config = config
        self.task = task_for_arch(model_cfg.arch)
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
                process_index=jax.process_index(), process_count=jax.process_count())
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"data ({split} split): {str(err).splitlines()[0]}") from err

    def first_batch(self) -> dict:
        """The first training batch, as global arrays, without advancing the train iterator."""
        return self.to_global(next(self.iterator("train")))

    def to_global(self, local_batch: dict) -> dict:
        return mesh_lib.global_batch(local_batch, self.sharding)
