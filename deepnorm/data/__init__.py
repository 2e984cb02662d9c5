"""Data: byte tokens, an offline TFDS corpus (or any TFDS dataset), grain pipelines per task.

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
from deepnorm.data.tasks import TASKS, task_for_arch
from deepnorm.data.tokenizer import (
    EOS_ID,
    MASK_ID,
    PAD_ID,
    SENTINEL_ID,
    VOCAB_SIZE,
    decode,
    encode,
)

__all__ = [
    "EOS_ID",
    "MASK_ID",
    "PAD_ID",
    "SENTINEL_ID",
    "TASKS",
    "VOCAB_SIZE",
    "batch_shapes",
    "decode",
    "default_data_config",
    "encode",
    "iterator_checkpoint_args",
    "iterator_restore_args",
    "load_source",
    "make_iterator",
    "task_for_arch",
]


def default_data_config() -> config_dict.ConfigDict:
    """The ``data.*`` config block: the offline stdlib corpus and the standard corruption rates."""
    config = config_dict.ConfigDict()
    # Where text comes from: "stdlib" (this Python's standard library sources, offline),
    # "text_files" (the files matching data.text_files) or "tfds" (data.tfds_name).
    config.corpus = "stdlib"
    # Glob of the user's text files for corpus="text_files"; "**" recurses, "~" expands.
    config.text_files = ""
    # TFDS dataset for corpus="tfds", e.g. "lm1b" or "ted_hrlr_translate/pt_to_en"; needs a network
    # on first use (or a copy already prepared as array_record in data.data_dir).
    config.tfds_name = ""
    # The TFDS feature holding the text ("text" for lm1b), or "source,target" (e.g. "pt,en"),
    # which makes the encoder-decoder task translate instead of denoise.
    config.tfds_text_key = "text"
    # Where TFDS datasets are built and cached; None means TFDS's default (~/tensorflow_datasets).
    config.data_dir = config_dict.placeholder(str)
    # Split names passed to make_iterator by the trainer; lm1b, for example, has no
    # "validation" (use eval_split="test").
    config.train_split = "train"
    config.eval_split = "validation"
    # Share of the embedded corpus's files held out for validation, chosen by path hash.
    config.validation_fraction = 0.02
    # Corrupted share of tokens for masked LM (BERT) and span corruption (T5).
    config.mask_rate = 0.15
    # Mean length of a corrupted span for span corruption.
    config.mean_span_length = 3.0
    # grain worker processes; 0 runs the pipeline in the training process (fine on a CPU).
    config.num_workers = 0
    return config
