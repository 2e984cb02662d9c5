"""grain pipelines: corpus -> packed windows -> task arrays -> per-process batches.

Three routes, one batch format (see :mod:`deepnorm.data.tasks`):

* Embedded corpora (``stdlib``, ``text_files``, tens of MB): every document of the split is
  tokenized once into one flat array (EOS after each document) and cut into fixed windows; the
  ``MapDataset`` indexes windows. Shuffling is over windows, so a batch mixes many files, and the
  iterator state is a single index, so resuming is exact and free. Re-tokenizing the stdlib on
  every call takes well under a second, so nothing is cached on disk. The tail that does not fill
  a window is dropped.
* A TFDS dataset by name, one text feature (e.g. lm1b): too large to hold in memory, so documents
  are shuffled, tokenized lazily and packed in a stream by grain's
  ``ConcatThenSplitIterDataset``; its state records the partial window, so resuming stays exact.
  Shuffling is over documents (windows of one long document stay adjacent).
* Translation pairs (``gettext``, ``parallel_files``, or a TFDS "source,target" pair such as
  wmt17_translate/de-en; see :mod:`deepnorm.data.translation`): one example per pair, no
  packing, tokenized by the run's tokenizer (bytes or SentencePiece), the encoder-decoder
  batch format of :func:`deepnorm.data.tasks.translation`.

Determinism: the order depends only on ``seed`` and the process's shard; random corruption is
seeded by (seed, process_index) and the element's index, so ``set_state`` replays the same bytes.
"""

from __future__ import annotations

import functools
import operator
from typing import Sequence

import grain
import numpy as np
from absl import flags

from deepnorm.data import corpus, tasks, translation
from deepnorm.data.sentencepiece_tokenizer import ByteTokenizer
from deepnorm.data.tokenizer import EOS_ID, NUM_SPECIAL, encode

# In-memory windows are cheap to make; extra reader threads only contend for the GIL.
_IN_MEMORY_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
# array_record reads touch the disk; a few threads hide that latency.
_FROM_DISK_READ = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)
_MAX_SEED = 2**32


def make_iterator(
    data_config,
    *,
    task: str,
    split: str,
    batch_size: int,
    seq_len: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    tokenizer=None,
) -> grain.DatasetIterator:
    """Batches of ``task`` arrays from this process's disjoint shard of ``split``.

    ``batch_size`` is per process (the global batch divided by ``process_count``);
    ``num_epochs=None`` repeats forever. The iterator is a ``grain.DatasetIterator``:
    ``get_state()`` returns a JSON-serializable dict and ``set_state`` resumes exactly; see
    :func:`iterator_checkpoint_args` for saving it with orbax. ``tokenizer`` (translation
    only; default bytes) is a :mod:`deepnorm.data.sentencepiece_tokenizer` tokenizer.
    """
    _check_arguments(task, batch_size, seq_len, seed, process_index, process_count, num_epochs)
    _check_data_config(data_config)
    shard = _Shard(process_index, process_count, seed, num_epochs)
    dataset = _task_dataset(data_config, task, split, seq_len, shard, batch_size,
                            tokenizer or ByteTokenizer())
    batched = dataset.batch(batch_size, drop_remainder=True)
    if isinstance(batched, grain.MapDataset):
        batched = batched.to_iter_dataset(_IN_MEMORY_READ)
    return iter(_with_workers(batched, int(getattr(data_config, "num_workers", 0) or 0)))


def batch_shapes(data_config, *, task: str, batch_size: int, seq_len: int) -> dict:
    """``{key: (shape, dtype)}`` of one batch, for building models and compiling steps early."""
    _check_arguments(task, batch_size, seq_len, 0, 0, 1, None)
    decoder_len = _decoder_length(data_config, task, seq_len)
    shapes = {"inputs": ((batch_size, seq_len), np.int32)}
    if task in ("span_corruption", tasks.TRANSLATION):
        shapes["decoder_inputs"] = ((batch_size, decoder_len), np.int32)
    shapes["targets"] = ((batch_size, decoder_len), np.int32)
    shapes["weights"] = ((batch_size, decoder_len), np.float32)
    return shapes


def _decoder_length(data_config, task: str, seq_len: int) -> int:
    """``targets`` length: T, except span corruption on a corpus (see span_target_length)."""
    if task != "span_corruption" or _is_paired(data_config):
        return seq_len
    return tasks.span_target_length(
        seq_len, _mask_rate(data_config), _mean_span_length(data_config)
    )


def iterator_checkpoint_args(iterator: grain.DatasetIterator):
    """orbax args that save ``iterator``'s state (one JSON file per process) in a checkpoint.

    Use it as one item of a ``CheckpointManager`` composite::

        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(train_state),
            data=iterator_checkpoint_args(train_iter)))
    """
    return grain.checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: grain.DatasetIterator):
    """orbax args that restore a saved state into ``iterator`` (a freshly made one) in place."""
    return grain.checkpoint.CheckpointRestore(iterator)


class _Shard:
    """Which slice of the data this process reads, in which order, for how many epochs."""

    def __init__(self, process_index, process_count, seed, num_epochs):
        self.index = process_index
        self.count = process_count
        self.seed = seed
        self.num_epochs = num_epochs
        # Corruption differs between processes even at equal element indices.
        self.random_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])

    def apply(self, dataset: grain.MapDataset, min_size: int, what: str) -> grain.MapDataset:
        """Takes this process's equal-sized block, then shuffles and repeats it.

        ``min_size`` is what one pass must hold (a batch of windows, or one document to
        pack), so a too-small shard fails here instead of silently yielding nothing.
        """
        per_process = len(dataset) // self.count
        if per_process < min_size:
            raise ValueError(
                f"{len(dataset)} {what} over process_count={self.count} leave {per_process}"
                f" per process, fewer than {min_size}; lower batch_size or seq_len, or use a"
                " larger corpus"
            )
        start = self.index * per_process
        block = dataset[start : start + per_process]
        return block.shuffle(seed=self.seed).repeat(self.num_epochs)


def _task_dataset(data_config, task, split, seq_len, shard: _Shard, batch_size: int, tokenizer):
    """Picks the route (in-memory windows, streamed packing, or pairs) and applies ``task``."""
    if _is_paired(data_config):
        return _pair_dataset(data_config, task, split, seq_len, shard, batch_size, tokenizer)
    if task == tasks.TRANSLATION:
        raise ValueError(
            f"task='translation' needs (source, target) pairs: data.corpus='gettext' or"
            f" 'parallel_files', or 'tfds' with a language pair; data.corpus="
            f"{data_config.corpus!r} is plain text"
        )
    length = tasks.window_length(task, seq_len)
    if data_config.corpus == "tfds":
        windows = _streamed_windows(data_config, split, length, shard)
    else:
        all_windows = grain.MapDataset.source(_corpus_windows(data_config, split, length))
        windows = shard.apply(all_windows, batch_size, f"{split!r} windows of {length} tokens")
    return _apply_task(windows, task, data_config, shard.random_seed)


def _apply_task(windows, task: str, data_config, random_seed: int):
    """Maps windows to task arrays; the random tasks draw from grain's per-element RNG."""
    if task == "causal_lm":
        return windows.map(tasks.causal_lm)
    if task == "masked_lm":
        transform = functools.partial(tasks.masked_lm, mask_rate=_mask_rate(data_config))
    else:
        transform = functools.partial(
            tasks.span_corruption,
            noise_rate=_mask_rate(data_config),
            mean_span_length=_mean_span_length(data_config),
        )
    return windows.random_map(transform, seed=random_seed)


class Windows:
    """Random access to consecutive fixed-length windows of one flat token array."""

    def __init__(self, tokens: np.ndarray, length: int):
        self._tokens = tokens
        self._length = length

    def __len__(self) -> int:
        return len(self._tokens) // self._length

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"window index {index} outside [0, {len(self)})")
        start = index * self._length
        return self._tokens[start : start + self._length]


def pack_documents(texts: Sequence[bytes]) -> np.ndarray:
    """Tokenizes documents into one uint16 array, EOS_ID after each (uint16 halves memory)."""
    lengths = np.fromiter((len(text) for text in texts), dtype=np.int64, count=len(texts))
    flat = np.frombuffer(b"".join(texts), dtype=np.uint8).astype(np.uint16) + NUM_SPECIAL
    return np.insert(flat, np.cumsum(lengths), EOS_ID)


def _corpus_windows(data_config, split: str, length: int) -> Windows:
    """The embedded corpus's ``split`` as windows of ``length`` tokens."""
    source = corpus.load_source(data_config, split)
    texts = [example["text"] for example in source.__getitems__(range(len(source)))]
    return Windows(pack_documents(texts), length)


def _document_tokens(example: dict) -> dict[str, np.ndarray]:
    """One document's ids with EOS appended, keyed for ConcatThenSplit."""
    return {"tokens": np.append(encode(example["text"]), EOS_ID).astype(np.int32)}


def _streamed_windows(data_config, split: str, length: int, shard: _Shard) -> grain.IterDataset:
    """A TFDS split's documents, shuffled, tokenized and packed into ``length``-token windows."""
    source = corpus.load_source(data_config, split)
    documents = shard.apply(grain.MapDataset.source(source), 1, f"{split!r} documents")
    token_stream = documents.map(_document_tokens).to_iter_dataset(_FROM_DISK_READ)
    packed = grain.experimental.ConcatThenSplitIterDataset(
        token_stream, length_struct={"tokens": length}
    )
    return packed.map(operator.itemgetter("tokens"))


def _pair_dataset(data_config, task, split, seq_len, shard: _Shard, batch_size: int, tokenizer):
    """Source -> target examples, for the encoder-decoder tasks only (span_corruption on a
    pair corpus means translation: there is no plain text to corrupt)."""
    if task not in ("span_corruption", tasks.TRANSLATION):
        raise ValueError(
            f"data.corpus={data_config.corpus!r} with data.tfds_text_key="
            f"{data_config.get('tfds_text_key', '')!r} gives source,target pairs, which only"
            f" task='translation' (encoder_decoder) uses; got task={task!r}"
        )
    source = corpus.load_source(data_config, split)
    pairs = shard.apply(grain.MapDataset.source(source), batch_size, f"{split!r} pairs")
    return pairs.map(functools.partial(
        tasks.translation, seq_len=seq_len, encode_text=tokenizer.encode,
        bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id))


def _with_workers(dataset: grain.IterDataset, num_workers: int) -> grain.IterDataset:
    """Moves the pipeline into ``num_workers`` processes; 0 keeps it in this one."""
    if num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
    if num_workers == 0:
        return dataset
    _use_default_flags_outside_absl_app()
    return dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))


def _use_default_flags_outside_absl_app() -> None:
    """grain's worker processes read absl flags; outside ``absl.app`` (pytest, notebooks) they
    were never parsed, so accept their defaults instead of failing on first access."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _is_paired(data_config) -> bool:
    """True for a corpus of (source, target) pairs (translation) rather than plain text."""
    return translation.is_translation(data_config)


def _mask_rate(data_config) -> float:
    """``data.mask_rate``: the corrupted share for masked LM and span corruption."""
    rate = float(getattr(data_config, "mask_rate", 0.15))
    if not 0.0 < rate < 1.0:
        raise ValueError(f"data.mask_rate must lie in (0, 1), got {rate}")
    return rate


def _mean_span_length(data_config) -> float:
    """``data.mean_span_length``: the mean corrupted span for span corruption."""
    mean = float(getattr(data_config, "mean_span_length", 3.0))
    if mean < 1.0:
        raise ValueError(f"data.mean_span_length must be >= 1, got {mean}")
    return mean


def _check_data_config(data_config) -> None:
    """Fails early, naming the field, on an unknown corpus or out-of-range rates."""
    corpus_name = getattr(data_config, "corpus", None)
    if corpus_name not in corpus.CORPORA:
        raise ValueError(f"data.corpus must be one of {corpus.CORPORA}, got {corpus_name!r}")
    _mask_rate(data_config)
    _mean_span_length(data_config)


def _check_arguments(task, batch_size, seq_len, seed, process_index, process_count, num_epochs):
    """One-line ValueErrors for arguments no pipeline can honour."""
    if task not in tasks.ALL_TASKS:
        raise ValueError(f"task must be one of {tasks.ALL_TASKS}, got {task!r}")
    _check_int("batch_size", batch_size, 1)
    _check_int("seq_len", seq_len, 2)
    _check_int("process_count", process_count, 1)
    _check_int("seed", seed, 0)
    if seed >= _MAX_SEED:
        raise ValueError(f"seed must lie in [0, 2**32), got {seed}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must lie in [0, {process_count}), got {process_index}")
    if num_epochs is not None:
        _check_int("num_epochs", num_epochs, 1)


def _check_int(name: str, value, minimum: int) -> None:
    """Requires an integer of at least ``minimum``."""
    if not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
