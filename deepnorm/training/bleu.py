"""BLEU and chrF with sacreBLEU, and ``bleu_eval``: translate validation sentences and score.

Scores are computed on detokenized text (the decoded strings, as a user would read them) with
sacreBLEU's defaults (13a tokenization for BLEU, chrF with character order 6, beta 2), so they
are comparable with published sacreBLEU figures on the same references.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import sacrebleu


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """``{"bleu": .., "chrf": ..}`` (0-100) of one hypothesis per reference line."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references; "
                         "there must be one per reference")
    refs = [list(references)]
    return {"bleu": float(sacrebleu.corpus_bleu(list(hypotheses), refs).score),
            "chrf": float(sacrebleu.corpus_chrf(list(hypotheses), refs).score)}


def bleu_eval(params, translate: Callable, sources: Sequence[str], references: Sequence[str],
              *, batch_size: int = 16) -> dict:
    """Translates ``sources`` with ``translate(params, list_of_str) -> list_of_str`` in batches
    and scores them against ``references``: ``{"bleu": .., "chrf": ..}`` for the progress
    line, metrics.jsonl, TensorBoard and summary.json."""
    if not sources:
        raise ValueError("bleu_eval needs at least one source sentence")
    hypotheses: list[str] = []
    for start in range(0, len(sources), batch_size):
        hypotheses.extend(translate(params, list(sources[start:start + batch_size])))
    return corpus_scores(hypotheses, references)


def pad_batch(rows: Sequence[np.ndarray], length: int, pad_id: int = 0) -> np.ndarray:
    """Token rows cut to ``length`` and right-padded into one int32 [B, length] array."""
    out = np.full((len(rows), length), pad_id, np.int32)
    for i, row in enumerate(rows):
        row = np.asarray(row)[:length]
        out[i, :len(row)] = row
    return out


def loop_bleu_eval(config, graphdef, data, mesh=None, *, beam_size: int = 1):
    """``(params, batch_stats=None) -> {"bleu", "chrf"}`` on the first ``train.bleu_examples`` validation pairs
    (the same ones every time), decoded with greedy search (``beam_size=1``: cheap enough to
    run during training; ``python -m deepnorm.translate`` uses a beam) and the run's own
    tokenizer (``data.tokenizer``: bytes or SentencePiece), detokenized for sacreBLEU. Each
    batch of ``train.batch_size`` sentences is split over the data-parallel axes of the
    training ``mesh`` (``deepnorm.decoding.sharded``; default: the first device)."""
    import jax

    from deepnorm.decoding.incremental import translate_batch
    from deepnorm.decoding.sharded import DataParallelDecoder
    from deepnorm.training.mesh import BATCH_AXES, MESH_AXES

    tok = data.tokenizer
    wanted = int(config.train.bleu_examples)
    if wanted <= 0:
        from deepnorm.config import ConfigError
        raise ConfigError(f"train.bleu_examples={wanted} must be a positive integer")
    iterator, inputs, references = data.iterator("eval"), [], []
    while len(inputs) < wanted:
        batch = next(iterator)
        inputs.extend(np.asarray(batch["inputs"]))
        references.extend(tok.decode(t) for t in np.asarray(batch["targets"]))
    inputs, references = np.stack(inputs[:wanted]), references[:wanted]
    if mesh is None:
        mesh = jax.make_mesh((1,) * len(MESH_AXES), MESH_AXES, devices=jax.devices()[:1],
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    # The decoder's "params" are the pair (params, batch_stats): both replicated to every shard.
    decoder = DataParallelDecoder(lambda both, x, max_steps: translate_batch(
        graphdef, both[0], x, beam_size=beam_size, max_steps=max_steps, bos_id=tok.bos_id,
        eos_id=tok.eos_id, pad_id=tok.pad_id, banned_ids=tok.banned_ids,
        batch_stats=both[1]), mesh, BATCH_AXES)
    batch_size, max_steps = int(config.train.batch_size), int(config.train.seq_len)

    def translate(params, rows):
        tokens = decoder(params, pad_batch(rows, inputs.shape[1], tok.pad_id), max_steps)
        return [tok.decode(t) for t in tokens]

    def evaluate(params, batch_stats=None) -> dict:
        return bleu_eval((params, batch_stats), translate, list(inputs), references,
                         batch_size=batch_size)

    return evaluate
