"""``python -m deepnorm.translate``: translate text with a run's newest checkpoint.

    python -m deepnorm.translate --workdir=runs/dn < sources.txt > hyps.txt
    python -m deepnorm.translate --workdir=runs/dn --input=src.txt --beam=5 --lenpen=1.0
    python -m deepnorm.translate --workdir=runs/dn --input=src.txt --references=ref.txt --bleu
    python -m deepnorm.translate --workdir=runs/dn --split=test --bleu

One translation per input line, in order. The model comes from ``W/config.json``, the
parameters from the newest step in ``W/checkpoints`` (restored with orbax as the training loop
saved them), the vocabulary from ``W/vocab/`` (a SentencePiece model) or, when the run has none,
the byte tokenizer. The sentences of a batch are split over the data-parallel axes
(``data``, ``fsdp``) of the run's mesh (``W/config.json``'s ``mesh.*`` on the devices here;
where those sizes do not fit these devices, all of them on ``data``): each device decodes its
share (``deepnorm.decoding.sharded``). ``--bleu`` prints sacreBLEU's BLEU and chrF of the
translations against ``--references`` (one line per input line) or, with ``--split``, against
the targets of that split of the run's own pair corpus (gettext, parallel files, TFDS).
Exit 2 with one line on stderr for bad input (beam < 1, an empty input, no such workdir, no
checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags, logging

from deepnorm.data import sentencepiece_tokenizer as spt

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_INPUT = flags.DEFINE_string("input", None, "Source sentences, one per line (default stdin).")
_BEAM = flags.DEFINE_integer("beam", 5, "Beam size; 1 is greedy search.")
_LENPEN = flags.DEFINE_float("lenpen", 1.0, "Length penalty: score / length ** lenpen.")
_MAX_LEN_A = flags.DEFINE_float("max_len_a", 1.2, "Maximum output length a * src_len + b: a.")
_MAX_LEN_B = flags.DEFINE_integer("max_len_b", 10, "Maximum output length a * src_len + b: b.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Sentences translated at once.")
_SPLIT = flags.DEFINE_string("split", None, "Translate this split of the run's data instead.")
_REFERENCES = flags.DEFINE_string("references", None, "Reference translations for --bleu.")
_BLEU = flags.DEFINE_bool("bleu", False, "Print BLEU and chrF against the references.")
_LIMIT = flags.DEFINE_integer("limit", 0, "With --split: the first this many pairs (0: all).")
EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """One line for the user: exit 2."""


def load_vocabulary(workdir: str):
    """The run's own vocabulary: its SentencePiece model in ``W/vocab/``, else the bytes."""
    if os.path.exists(os.path.join(workdir, spt.WORKDIR_MODEL)):
        return spt.load_from_workdir(workdir)
    return spt.ByteTokenizer()


def decode_mesh(config):
    """The run's mesh (``config.mesh``) on this machine's devices, or, where its sizes do not
    fit them (trained on 8 devices, decoding on 1), every device on the ``data`` axis."""
    import ml_collections

    from deepnorm.config import ConfigError
    from deepnorm.training import mesh as mesh_lib
    try:
        return mesh_lib.make_mesh(config.mesh)
    except ConfigError as err:
        logging.warning("%s; decoding with every device on the data axis", err)
        fallback = ml_collections.ConfigDict(dict(config.mesh.to_dict(), data=-1, fsdp=1,
                                                  tensor=1))
        return mesh_lib.make_mesh(fallback)


def load_run(workdir: str, mesh=None):
    """``(config ConfigDict, TransformerConfig, graphdef, params, step, mesh)`` of the newest
    checkpoint in ``workdir``, the parameters placed on ``mesh`` (default ``decode_mesh``) as
    the run's ``mesh.rules`` shard them. A model with batch-statistics norms (BatchNorm /
    PowerNorm) gives ``params`` as the pair ``(params, batch_stats)``, which ``Translator``
    takes as it is."""
    if not os.path.isdir(workdir):
        raise BadInput(f"--workdir={workdir} does not exist")
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        raise BadInput(f"--workdir={workdir} has no config.json (not a training run)")
    import ml_collections
    import orbax.checkpoint as ocp

    from deepnorm.config import ConfigError, TransformerConfig
    from deepnorm.training import mesh as mesh_lib
    from deepnorm.training.checkpoint import abstract_like
    from deepnorm.training.optim import make_optimizer
    from deepnorm.training.state import abstract_params, abstract_train_state

    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    try:
        model_cfg = TransformerConfig.from_mapping(config.model.to_dict())
    except ConfigError as err:
        raise BadInput(f"{config_path}: {err}") from err
    if model_cfg.arch != "encoder_decoder":
        raise BadInput(f"{config_path} has model.arch={model_cfg.arch!r}; translation needs "
                       "an encoder_decoder run")
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) if os.path.isdir(
        directory) else []
    if not steps:
        raise BadInput(f"no checkpoint in {directory}")
    tx, _ = make_optimizer(config.optimizer, config.train.num_steps)
    try:
        mesh = decode_mesh(config) if mesh is None else mesh
        rules = mesh_lib.sharding_rules(config.mesh)
    except ConfigError as err:
        raise BadInput(f"{config_path}: {err}") from err
    graphdef, param_state = abstract_params(model_cfg, config.train.seed)
    abstract_state = abstract_train_state(model_cfg, tx, config.train.seed)
    abstract = abstract_like(abstract_state, mesh_lib.state_shardings(
        mesh, tx, param_state, rules, batch_stats=abstract_state.batch_stats))
    manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
    try:
        restored = manager.restore(steps[-1], args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: one line
        raise BadInput(f"cannot read checkpoint {directory}/{steps[-1]}: "
                       f"{str(err).splitlines()[0][:200]}") from err
    finally:
        manager.close()
    params = restored.state.params
    if restored.state.batch_stats is not None:
        params = (params, restored.state.batch_stats)
    return config, model_cfg, graphdef, params, steps[-1], mesh


class Translator:
    """Batches of strings in, strings out; one compiled search per (batch, length) bucket,
    each batch split over the data-parallel axes of ``mesh`` (default: one device)."""

    def __init__(self, graphdef, vocab, *, src_len: int, beam: int, lenpen: float,
                 max_len_a: float, max_len_b: int, mesh=None):
        import jax

        from deepnorm.decoding import incremental
        from deepnorm.decoding.sharded import DataParallelDecoder
        from deepnorm.training.mesh import BATCH_AXES, MESH_AXES
        self.vocab, self.src_len = vocab, src_len
        self.max_len_a, self.max_len_b = max_len_a, max_len_b

        def run(params, inputs, max_steps):
            # load_run's (params, batch_stats) pair for a model with batch-statistics norms
            params, batch_stats = params if isinstance(params, tuple) else (params, None)
            return incremental.translate_batch(
                graphdef, params, inputs, beam_size=beam, lenpen=lenpen, max_len_a=max_len_a,
                max_len_b=max_len_b, max_steps=max_steps, bos_id=vocab.bos_id,
                eos_id=vocab.eos_id, pad_id=vocab.pad_id, banned_ids=vocab.banned_ids,
                batch_stats=batch_stats)

        if mesh is None:
            mesh = jax.make_mesh((1,) * len(MESH_AXES), MESH_AXES, devices=jax.devices()[:1],
                                 axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
        self.decoder = DataParallelDecoder(run, mesh, BATCH_AXES)

    def encode(self, sentences: list[str]):
        """``(source tokens [B, width] right-padded, max_steps)``: widths in buckets of 16."""
        import numpy as np

        from deepnorm.training.bleu import pad_batch
        rows = [np.asarray(self.vocab.encode(s))[: self.src_len] for s in sentences]
        longest = max(len(r) for r in rows) or 1
        width = 16 * math.ceil(longest / 16)  # length buckets: few recompilations
        max_steps = 16 * math.ceil((self.max_len_a * width + self.max_len_b) / 16)
        return pad_batch(rows, width, self.vocab.pad_id), max_steps

    def __call__(self, params, sentences: list[str]) -> list[str]:
        inputs, max_steps = self.encode(sentences)
        out = []
        for row in self.decoder(params, inputs, max_steps):
            row = list(row)
            row = row[: row.index(self.vocab.eos_id)] if self.vocab.eos_id in row else row
            out.append(self.vocab.decode(row))
        return out


def translate_lines(workdir: str, sentences: list[str], *, beam: int = 5, lenpen: float = 1.0,
                    max_len_a: float = 1.2, max_len_b: int = 10, batch_size: int = 16,
                    mesh=None) -> list[str]:
    """The CLI's translations of ``sentences`` with ``workdir``'s newest checkpoint and own
    vocabulary, decoded over ``mesh`` (default ``decode_mesh`` of the run)."""
    config, _, graphdef, params, _, mesh = load_run(workdir, mesh)
    translator = Translator(graphdef, load_vocabulary(workdir),
                            src_len=int(config.train.seq_len), beam=beam, lenpen=lenpen,
                            max_len_a=max_len_a, max_len_b=max_len_b, mesh=mesh)
    out = []
    for start in range(0, len(sentences), batch_size):
        out.extend(translator(params, sentences[start:start + batch_size]))
    return out


def _read_lines(path: str | None) -> list[str]:
    if path is None:
        lines = sys.stdin.read().splitlines()
        where = "stdin"
    else:
        if not os.path.isfile(path):
            raise BadInput(f"--input={path} does not exist")
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        where = f"--input={path}"
    if not lines:
        raise BadInput(f"{where} is empty; give one source sentence per line")
    return lines


def split_pairs(config, split: str, limit: int) -> tuple[list[str], list[str]]:
    """(sources, references) of ``split`` of the run's own pair corpus (gettext, parallel
    files or a TFDS source,target pair), read as training reads it."""
    from deepnorm.data import corpus, load_pairs
    if config.data.corpus == "tfds" and len(corpus.text_keys(config.data)) != 2:
        raise BadInput("--split needs a run trained on translation pairs: a TFDS source,target "
                       "pair (data.tfds_text_key like 'de,en'), data.corpus='gettext' or "
                       "'parallel_files'; use --input and --references")
    try:
        source = load_pairs(config.data, split)
    except (ValueError, FileNotFoundError) as err:
        raise BadInput(f"--split={split}: {str(err).splitlines()[0]}") from err
    n = len(source) if not limit else min(limit, len(source))
    text = lambda x: x.decode("utf-8") if isinstance(x, bytes) else str(x)  # noqa: E731
    pairs = [source[i] for i in range(n)]
    return [text(p["source"]) for p in pairs], [text(p["target"]) for p in pairs]


def translate_main() -> None:
    if _BEAM.value < 1:
        raise BadInput(f"--beam={_BEAM.value} must be at least 1 (1 is greedy search)")
    if _BATCH.value < 1:
        raise BadInput(f"--batch_size={_BATCH.value} must be at least 1")
    if not _MAX_LEN_A.value >= 0 or _MAX_LEN_B.value < 1:
        raise BadInput(f"--max_len_a={_MAX_LEN_A.value} must be >= 0 and --max_len_b="
                       f"{_MAX_LEN_B.value} >= 1")
    if not _WORKDIR.value:
        raise BadInput("--workdir=<training run directory> is required")
    if _BLEU.value and not (_SPLIT.value or _REFERENCES.value):
        raise BadInput("--bleu needs --references=FILE or --split=NAME")
    sources = references = None
    if not _SPLIT.value:  # read and check the input before anything slow
        sources = _read_lines(_INPUT.value)
        if _REFERENCES.value:
            references = _read_lines(_REFERENCES.value)
            if len(references) != len(sources):
                raise BadInput(f"--references has {len(references)} lines for "
                               f"{len(sources)} input lines")
    config, _, graphdef, params, _, mesh = load_run(_WORKDIR.value)
    if _SPLIT.value:
        sources, references = split_pairs(config, _SPLIT.value, _LIMIT.value)
        if not sources:
            raise BadInput(f"--split={_SPLIT.value} holds no pairs")
    translator = Translator(graphdef, load_vocabulary(_WORKDIR.value),
                            src_len=int(config.train.seq_len), beam=_BEAM.value,
                            lenpen=_LENPEN.value, max_len_a=_MAX_LEN_A.value,
                            max_len_b=_MAX_LEN_B.value, mesh=mesh)
    hypotheses = []
    for start in range(0, len(sources), _BATCH.value):
        for line in translator(params, sources[start:start + _BATCH.value]):
            hypotheses.append(line)
            print(line, flush=True)
    if _BLEU.value:
        from deepnorm.training.bleu import corpus_scores
        scores = corpus_scores(hypotheses, references)
        print(f"BLEU {scores['bleu']:.2f} chrF {scores['chrf']:.2f} ({len(sources)} "
              f"sentences, beam {_BEAM.value}, lenpen {_LENPEN.value:g})", file=sys.stderr)


def _fail(message: str) -> None:
    print(f"deepnorm.translate: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _parse(argv):
    try:
        return flags.FLAGS(argv)
    except Exception as err:  # noqa: BLE001 - absl raises several kinds for a bad flag
        _fail(" ".join(str(err).split()) or type(err).__name__)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; input goes in --input=FILE or on stdin")
    logging.set_verbosity(logging.WARNING)  # stdout is the translations; stderr stays short
    try:
        translate_main()
    except BadInput as err:
        _fail(str(err))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
