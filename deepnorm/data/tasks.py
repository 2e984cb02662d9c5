"""Per-example training tasks: one packed token window in, one dict of model arrays out.

Each function is pure NumPy on one example (vectorized within it) and takes its randomness
from a ``np.random.Generator`` that grain seeds from (seed, element index), so an example's
corruption is the same wherever and whenever it is produced: resuming a run reproduces it.

Windows contain no padding except, on the streaming TFDS path, at the end of the last window
of a finite pass; padding is always trailing, so "real length" is the count of non-PAD ids.
"""

from __future__ import annotations

import numpy as np

from deepnorm.data.tokenizer import (
    EOS_ID,
    MASK_ID,
    NUM_SPECIAL,
    PAD_ID,
    SENTINEL_ID,
    VOCAB_SIZE,
    encode,
)

TASKS = ("causal_lm", "masked_lm", "span_corruption")
# Supervised: needs a corpus of (source, target) pairs, not plain text.
TRANSLATION = "translation"
ALL_TASKS = TASKS + (TRANSLATION,)
_ARCH_TASKS = {"decoder": "causal_lm", "encoder": "masked_lm", "encoder_decoder": "span_corruption"}


def task_for_arch(arch: str) -> str:
    """The pre-training task each ``model.arch`` trains on (one corpus serves all three)."""
    if arch not in _ARCH_TASKS:
        raise ValueError(f"model.arch must be one of {tuple(_ARCH_TASKS)}, got {arch!r}")
    return _ARCH_TASKS[arch]


def window_length(task: str, seq_len: int) -> int:
    """Tokens per packed window: causal LM needs one more than it feeds, to shift targets."""
    return seq_len + 1 if task == "causal_lm" else seq_len


def _weights(targets: np.ndarray) -> np.ndarray:
    """1.0 where a target is a real token, 0.0 on padding."""
    return (targets != PAD_ID).astype(np.float32)


def causal_lm(window: np.ndarray) -> dict[str, np.ndarray]:
    """Next-token prediction: ``targets`` are ``inputs`` shifted left by one."""
    window = window.astype(np.int32)
    targets = window[1:]
    return {"inputs": window[:-1], "targets": targets, "weights": _weights(targets)}


def masked_lm(window: np.ndarray, rng: np.random.Generator, mask_rate: float) -> dict:
    """BERT corruption of ``round(mask_rate * real length)`` positions (at least one).

    Of the chosen positions 80% become MASK_ID, 10% a random byte token, 10% stay as they
    are; ``weights`` is 1 exactly at the chosen positions, so the loss counts only those.
    """
    targets = window.astype(np.int32)
    real = np.flatnonzero(targets != PAD_ID)
    num_chosen = min(len(real), max(1, round(mask_rate * len(real))))
    chosen = rng.choice(real, size=num_chosen, replace=False)
    action = rng.random(num_chosen)
    random_tokens = rng.integers(NUM_SPECIAL, VOCAB_SIZE, size=num_chosen, dtype=np.int32)
    kept_or_random = np.where(action < 0.9, random_tokens, targets[chosen])
    replacement = np.where(action < 0.8, MASK_ID, kept_or_random)
    inputs = targets.copy()
    inputs[chosen] = replacement
    weights = np.zeros(targets.shape, np.float32)
    weights[chosen] = 1.0
    return {"inputs": inputs, "targets": targets, "weights": weights}


def span_counts(length: int, noise_rate: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of ``length`` real tokens, as in T5.

    Both are non-decreasing in ``length``, so the counts for the full window bound every
    shorter one and :func:`span_target_length` never truncates.
    """
    if length < 2:
        return 0, 0
    num_noise = min(max(round(length * noise_rate), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    return num_noise, min(num_spans, num_noise, length - num_noise)


def span_target_length(seq_len: int, noise_rate: float, mean_span_length: float) -> int:
    """Decoder length for span corruption: one sentinel per span, the span tokens, one EOS.

    With T=seq_len, noise = round(0.15 T) and spans = round(noise / 3), it is
    noise + spans + 1 (e.g. T=128 -> 19 + 6 + 1 = 26): exact, never truncating.
    """
    num_noise, num_spans = span_counts(seq_len, noise_rate, mean_span_length)
    return num_noise + num_spans + 1


def _random_segmentation(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """Splits ``total`` into ``parts`` positive integers, uniformly over compositions."""
    cuts = np.sort(rng.choice(total - 1, size=parts - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [total]]))


def _noise_mask(
    length: int, num_noise: int, num_spans: int, rng: np.random.Generator
) -> np.ndarray:
    """Boolean mask of ``num_spans`` noise spans, alternating with kept runs, kept run first."""
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)
    kept_lengths = _random_segmentation(length - num_noise, num_spans, rng)
    run_lengths = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
    is_noise_run = np.tile([False, True], num_spans)
    return np.repeat(is_noise_run, run_lengths)


def _pad_to(ids: np.ndarray, length: int) -> np.ndarray:
    """Right-pads an int32 id array with PAD_ID to ``length`` (callers guarantee it fits)."""
    out = np.full(length, PAD_ID, np.int32)
    out[: len(ids)] = ids
    return out


def _decoder_arrays(targets: np.ndarray) -> dict[str, np.ndarray]:
    """Teacher forcing: the decoder reads the targets shifted right, EOS_ID as start token."""
    decoder_inputs = np.concatenate([[EOS_ID], targets[:-1]]).astype(np.int32)
    return {"decoder_inputs": decoder_inputs, "targets": targets, "weights": _weights(targets)}


def span_corruption(
    window: np.ndarray, rng: np.random.Generator, noise_rate: float, mean_span_length: float
) -> dict[str, np.ndarray]:
    """T5 denoising: each noise span becomes one SENTINEL_ID in ``inputs``; ``targets`` lists
    SENTINEL_ID + span tokens for every span, in order, then EOS_ID.

    One sentinel id serves all spans (the n-th sentinel in ``inputs`` matches the n-th in
    ``targets``), which keeps the vocabulary at 260 and the original exactly recoverable.
    """
    tokens = window.astype(np.int32)
    seq_len = len(tokens)
    target_len = span_target_length(seq_len, noise_rate, mean_span_length)
    length = int(np.count_nonzero(tokens != PAD_ID))
    num_noise, num_spans = span_counts(length, noise_rate, mean_span_length)
    if num_spans == 0:
        return {"inputs": tokens, **_decoder_arrays(_pad_to(np.array([EOS_ID]), target_len))}
    noise = np.zeros(seq_len, bool)
    noise[:length] = _noise_mask(length, num_noise, num_spans, rng)
    span_start = noise & ~np.concatenate([[False], noise[:-1]])
    keep = ~noise | span_start
    inputs = np.where(span_start, SENTINEL_ID, tokens)[keep]
    span_offsets = np.flatnonzero(span_start[noise])
    targets = np.append(np.insert(tokens[noise], span_offsets, SENTINEL_ID), EOS_ID)
    return {"inputs": _pad_to(inputs, seq_len), **_decoder_arrays(_pad_to(targets, target_len))}


def translation(
    example: dict, seq_len: int, encode_text=encode, bos_id: int = EOS_ID, eos_id: int = EOS_ID
) -> dict[str, np.ndarray]:
    """A (source, target) pair in the encoder-decoder batch format, all of length ``seq_len``.

    ``inputs`` = source ids (truncated to ``seq_len``), ``targets`` = target ids + EOS,
    ``decoder_inputs`` = BOS + target ids (targets shifted right), ``weights`` 1 on every real
    target position (EOS included) and 0 on padding. A target longer than ``seq_len - 1`` ids
    is truncated before its EOS. ``encode_text`` is the run's tokenizer (bytes by default,
    whose BOS is its EOS id, as in span corruption).
    """
    source = np.asarray(encode_text(example["source"]), np.int32)[:seq_len]
    body = np.asarray(encode_text(example["target"]), np.int32)[: seq_len - 1]
    targets = _pad_to(np.append(body, eos_id), seq_len)
    decoder_inputs = _pad_to(np.append(bos_id, body), seq_len)
    return {
        "inputs": _pad_to(source, seq_len),
        "decoder_inputs": decoder_inputs,
        "targets": targets,
        "weights": _weights(targets),
    }
