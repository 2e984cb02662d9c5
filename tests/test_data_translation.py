"""Translation data: gettext catalogs, parallel files, TFDS pairs, SentencePiece, batch layout."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

from deepnorm import data
from deepnorm.data import gettext_corpus, parallel, pipeline, tasks, translation
from deepnorm.data import sentencepiece_tokenizer as spt

# ------------------------------------------------------------------------------ .mo writer

HEADER = (
    "Project-Id-Version: test\nContent-Type: text/plain; charset=UTF-8\n"
    "Plural-Forms: nplurals=2; plural=(n != 1);\n"
)


def write_mo(path, entries: dict[str, str]) -> None:
    """A GNU .mo file (format revision 0, no hash table) of ``entries`` (msgid -> msgstr).

    Keys and values are the raw .mo strings: "ctx\\x04id" for a context, "one\\x00many" /
    "form0\\x00form1" for plurals, "" for the header.
    """
    keys = sorted(entries)
    ids = [k.encode() for k in keys]
    strs = [entries[k].encode() for k in keys]
    count = len(keys)
    table_start = 28
    data_start = table_start + 16 * count
    offsets, blob = [], b""
    for item in ids + strs:
        offsets.append((len(item), data_start + len(blob)))
        blob += item + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, count, table_start, table_start + 8 * count, 0, 0)
    tables = b"".join(struct.pack("<2I", *entry) for entry in offsets)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as file:
        file.write(header + tables + blob)


CATALOG_A = {
    "": HEADER,
    "Open": "Öffnen",
    "menu\x04Quit": "Beenden",  # a context: the msgid "Quit" is kept
    "%d file\x00%d files": "%d Datei\x00%d Dateien",  # plural: form 0 with the singular msgid
    "Untranslated": "",  # empty translation: skipped
    "Same": "Same",  # msgstr == msgid: untranslated, skipped
    "Save": "Speichern",
}
CATALOG_B = {"": HEADER, "Open": "Öffnen", "Close": "Schließen"}  # "Open" duplicates A's
EXPECTED_PAIRS = sorted([
    ("%d file", "%d Datei"), ("Close", "Schließen"), ("Open", "Öffnen"), ("Quit", "Beenden"),
    ("Save", "Speichern"),
])


@pytest.fixture(scope="module")
def locale_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("locale")
    write_mo(str(root / "de" / "LC_MESSAGES" / "alpha.mo"), CATALOG_A)
    write_mo(str(root / "de" / "LC_MESSAGES" / "beta.mo"), CATALOG_B)
    write_mo(str(root / "fr" / "LC_MESSAGES" / "alpha.mo"), {"": HEADER, "Open": "Ouvrir"})
    return root


def _gettext_config(locale_dir, tmp_path, **overrides):
    config = data.default_data_config()
    config.update(corpus="gettext", gettext_roots=str(locale_dir), gettext_standard_roots=False,
                  data_dir=str(tmp_path / "tfds"), validation_fraction=0.2, test_fraction=0.2)
    config.update(**overrides)
    return config


# ------------------------------------------------------------------------------ gettext


def test_catalog_pairs_follow_the_entry_rules(locale_dir):
    pairs = gettext_corpus.catalog_pairs(str(locale_dir / "de" / "LC_MESSAGES" / "alpha.mo"))
    assert sorted(pairs) == [
        ("%d file", "%d Datei"), ("Open", "Öffnen"), ("Quit", "Beenden"), ("Save", "Speichern"),
    ]


def test_gettext_builder_records_what_went_in(locale_dir, tmp_path):
    config = _gettext_config(locale_dir, tmp_path)
    builder = translation.gettext_builder(config)
    meta = builder.info.metadata
    assert [c["domain"] for c in meta["catalogs"]] == ["alpha", "beta"]
    assert meta["num_pairs"] == len(EXPECTED_PAIRS) == sum(meta["split_pairs"].values())
    assert meta["fingerprint"] == gettext_corpus.pairs_fingerprint(EXPECTED_PAIRS)
    got = []
    for split in parallel.SPLITS:
        if not meta["split_pairs"][split]:  # five pairs: a split may be empty
            with pytest.raises(ValueError, match=f"no pairs in split '{split}'"):
                translation.load_pairs(config, split)
            continue
        source = translation.load_pairs(config, split)
        assert len(source) == meta["split_pairs"][split]
        got += [(source[i]["source"].decode(), source[i]["target"].decode())
                for i in range(len(source))]
    assert sorted(got) == EXPECTED_PAIRS  # deduplicated across catalogs, every pair once
    # Reloaded from disk (a second process), the metadata is still there.
    reloaded = gettext_corpus.DeepnormGettext(data_dir=str(tmp_path / "tfds"),
                                              config=builder.builder_config)
    assert reloaded.info.metadata["fingerprint"] == meta["fingerprint"]
    line = translation.describe(config)
    assert "gettext en->de: 2 catalogs" in line and "5 pairs" in line and "\n" not in line


def test_gettext_reverse_direction_swaps_sides(locale_dir, tmp_path):
    forward = _gettext_config(locale_dir, tmp_path)
    reverse = _gettext_config(locale_dir, tmp_path, source_language="de", target_language="en")
    a, b = translation.load_pairs(forward, "train"), translation.load_pairs(reverse, "train")
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        assert (a[i]["source"], a[i]["target"]) == (b[i]["target"], b[i]["source"])


def test_gettext_other_language_and_skipped_catalog(locale_dir, tmp_path):
    config = _gettext_config(locale_dir, tmp_path, target_language="fr", validation_fraction=0.01,
                             test_fraction=0.01)
    assert translation.gettext_builder(config).info.metadata["num_pairs"] == 1
    broken = tmp_path / "broken" / "de" / "LC_MESSAGES" / "bad.mo"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a catalog")
    found = gettext_corpus.harvest([str(broken)])
    assert found.pairs == () and found.read == () and "bad.mo" in found.skipped[0]


def test_no_catalogs_is_one_line_naming_roots_languages_and_alternatives(locale_dir, tmp_path):
    config = _gettext_config(locale_dir, tmp_path, target_language="xx")
    with pytest.raises(ValueError) as err:
        translation.load_pairs(config, "train")
    message = str(err.value)
    assert "\n" not in message and "'xx'" in message and str(locale_dir) in message
    assert "de, fr" in message and "parallel_files" in message and "tfds" in message


def test_gettext_needs_english_on_one_side(locale_dir, tmp_path):
    config = _gettext_config(locale_dir, tmp_path, source_language="de", target_language="fr")
    with pytest.raises(ValueError, match="'de'->'fr'"):
        translation.load_pairs(config, "train")


# ------------------------------------------------------------------------------ hash split


def test_assign_splits_keeps_every_string_in_one_split():
    rng = np.random.default_rng(0)
    pairs = [(f"s{rng.integers(300)}", f"t{rng.integers(300)}") for _ in range(2000)]
    splits = parallel.assign_splits(pairs, 0.1, 0.1)
    assert splits == parallel.assign_splits(list(pairs), 0.1, 0.1)  # deterministic
    for side in (0, 1):
        seen: dict[str, str] = {}
        for pair, split in zip(pairs, splits):
            assert seen.setdefault(pair[side], split) == split
    # Pairs that share nothing spread over the splits by the given fractions.
    free = [(f"source {i}", f"target {i}") for i in range(4000)]
    counts = {s: parallel.assign_splits(free, 0.1, 0.2).count(s) for s in parallel.SPLITS}
    assert abs(counts["validation"] - 400) < 80 and abs(counts["test"] - 800) < 110


def test_split_unit_is_sha256():
    import hashlib

    digest = hashlib.sha256(b"Open").digest()
    assert parallel.split_unit("Open") == int.from_bytes(digest[:8], "big") / 2**64


# ------------------------------------------------------------------------------ parallel files


def _parallel_config(**overrides):
    config = data.default_data_config()
    config.update(corpus="parallel_files", validation_fraction=0.2, test_fraction=0.2)
    config.update(**overrides)
    return config


LINES = [(f"hello number {i}", f"hallo Nummer {i}") for i in range(30)]


def test_tsv_and_two_files_give_the_same_pairs(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in LINES) + "\n", encoding="utf-8")
    (tmp_path / "src.txt").write_text("".join(s + "\n" for s, _ in LINES), encoding="utf-8")
    (tmp_path / "tgt.txt").write_text("".join(t + "\n" for _, t in LINES), encoding="utf-8")
    from_tsv = _parallel_config(parallel_tsv=str(tsv))
    from_two = _parallel_config(source_file=str(tmp_path / "src.txt"),
                                target_file=str(tmp_path / "tgt.txt"))
    everything = []
    for split in parallel.SPLITS:
        a, b = translation.load_pairs(from_tsv, split), translation.load_pairs(from_two, split)
        assert a == b
        everything += [(x["source"].decode(), x["target"].decode()) for x in a]
    assert sorted(everything) == sorted(LINES)


def test_split_placeholder_reads_each_split_file(tmp_path):
    for split, count in (("train", 5), ("valid", 2)):
        (tmp_path / f"{split}.en").write_text("".join(f"e{split}{i}\n" for i in range(count)))
        (tmp_path / f"{split}.de").write_text("".join(f"d{split}{i}\n" for i in range(count)))
    config = _parallel_config(source_file=str(tmp_path / "{split}.en"),
                              target_file=str(tmp_path / "{split}.de"))
    valid = translation.load_pairs(config, "valid")
    assert [x["source"] for x in valid] == [b"evalid0", b"evalid1"]
    assert len(translation.load_pairs(config, "train")) == 5


def test_mismatched_files_and_bad_tsv_are_one_line(tmp_path):
    (tmp_path / "a").write_text("one\ntwo\nthree\n")
    (tmp_path / "b").write_text("eins\nzwei\n")
    config = _parallel_config(source_file=str(tmp_path / "a"), target_file=str(tmp_path / "b"))
    with pytest.raises(ValueError, match="has 3 lines but .* has 2") as err:
        translation.load_pairs(config, "train")
    assert "\n" not in str(err.value)
    (tmp_path / "bad.tsv").write_text("a\tb\nc\td\te\n")
    with pytest.raises(ValueError, match="line 2 has 3 tab-separated columns"):
        translation.load_pairs(_parallel_config(parallel_tsv=str(tmp_path / "bad.tsv")), "train")
    with pytest.raises(ValueError, match="does not exist"):
        translation.load_pairs(_parallel_config(parallel_tsv=str(tmp_path / "nope.tsv")), "train")
    with pytest.raises(ValueError, match="needs data.parallel_tsv"):
        translation.load_pairs(_parallel_config(source_file=str(tmp_path / "a")), "train")


# ------------------------------------------------------------------------------ TFDS pairs


@pytest.mark.parametrize("name", ["wmt17_translate/de-en", "wmt14_translate/de-en"])
def test_mocked_wmt_maps_language_keys(tmp_path, name):
    config = data.default_data_config()
    config.update(corpus="tfds", tfds_name=name, tfds_text_key="", data_dir=str(tmp_path),
                  source_language="en", target_language="de")
    with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
        builder = data.corpus.tfds_builder(config)
        raw = builder.as_data_source("train")
        pairs = translation.load_pairs(config, "train")
        batch = next(pipeline.make_iterator(config, task="translation", split="train",
                                            batch_size=8, seq_len=16, seed=0, num_epochs=1))
    assert translation.is_translation(config)
    for i in range(len(raw)):
        assert pairs[i]["source"] == data.tokenizer.as_bytes(raw[i]["en"])
        assert pairs[i]["target"] == data.tokenizer.as_bytes(raw[i]["de"])
    assert batch["decoder_inputs"].shape == batch["targets"].shape == (8, 16)


# ------------------------------------------------------------------------------ SentencePiece

WORDS = ("alpha beta gamma delta epsilon zeta theta iota kappa lambda sigma omega "
         "Haus Baum Wasser Feuer Erde Luft Licht Nacht Tag Jahr").split()


def _spm_corpus(tmp_path):
    rng = np.random.default_rng(1)
    lines = [(" ".join(rng.choice(WORDS, 6)), " ".join(rng.choice(WORDS, 6))) for _ in range(300)]
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in lines), encoding="utf-8")
    return _parallel_config(parallel_tsv=str(tsv), tokenizer="sentencepiece", vocab_size=60,
                            spm_cache_dir=str(tmp_path / "cache"))


def test_sentencepiece_trains_caches_and_restores_the_same_ids(tmp_path, monkeypatch):
    config = _spm_corpus(tmp_path)
    tokenizer = translation.make_tokenizer(config)
    assert tokenizer.vocab_size == 60 and os.path.dirname(tokenizer.origin) == str(
        tmp_path / "cache")
    text = "alpha Haus omega Nacht"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.min() > spt.UNK_ID and tokenizer.decode(ids) == text
    assert tokenizer.decode(np.concatenate([[spt.BOS_ID], ids, [spt.EOS_ID, 0, 0]])) == text
    # Cached: the same inputs load the model instead of training.
    monkeypatch.setattr(spt, "train", lambda *a, **k: pytest.fail("retrained despite cache"))
    cached = translation.make_tokenizer(config)
    assert np.array_equal(cached.encode(text), ids)
    # Copied into a workdir, the run's copy is used even after the cache is gone.
    workdir = str(tmp_path / "run")
    spt.save_to_workdir(tokenizer, workdir, {"corpus": "parallel_files"})
    for name in os.listdir(tmp_path / "cache"):
        os.remove(tmp_path / "cache" / name)
    restored = translation.make_tokenizer(config, workdir)
    assert restored.origin == os.path.join(workdir, spt.WORKDIR_MODEL)
    assert np.array_equal(restored.encode(text), ids)
    assert np.array_equal(spt.load_from_workdir(workdir).encode(text), ids)
    config.vocab_size = 61
    with pytest.raises(ValueError, match="has 60 pieces but data.vocab_size=61"):
        translation.make_tokenizer(config, workdir)


def test_unigram_and_vocab_too_large(tmp_path):
    config = _spm_corpus(tmp_path)
    config.update(spm_model_type="unigram", vocab_size=40)
    assert translation.make_tokenizer(config).describe() == "sentencepiece unigram 40 pieces"
    config.vocab_size = 5000
    with pytest.raises(ValueError, match=r"data.vocab_size=5000 is more than .*at most \d+") as e:
        translation.make_tokenizer(config)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (dict(tokenizer="wordpiece"), "data.tokenizer must be one of"),
    (dict(spm_model_type="char"), "data.spm_model_type must be one of"),
    (dict(vocab_size=2), "data.vocab_size must be an integer >= 8"),
])
def test_bad_tokenizer_settings(tmp_path, overrides, message):
    config = _spm_corpus(tmp_path)
    config.update(**overrides)
    with pytest.raises(ValueError, match=message):
        translation.make_tokenizer(config)


def test_sentencepiece_on_plain_text_corpus_is_refused():
    config = data.default_data_config()
    config.tokenizer = "sentencepiece"
    with pytest.raises(ValueError, match="corpus='stdlib' uses data.tokenizer='bytes'"):
        translation.make_tokenizer(config)


# ------------------------------------------------------------------------------ batch layout


def test_translation_task_layout_by_hand():
    example = {"source": b"ab", "target": b"xyz"}
    out = tasks.translation(example, seq_len=6, encode_text=data.encode, bos_id=7, eos_id=1)
    x, y, z = (ord(c) + 4 for c in "xyz")
    np.testing.assert_array_equal(out["inputs"], [ord("a") + 4, ord("b") + 4, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["decoder_inputs"], [7, x, y, z, 0, 0])
    np.testing.assert_array_equal(out["targets"], [x, y, z, 1, 0, 0])
    np.testing.assert_array_equal(out["weights"], [1, 1, 1, 1, 0, 0])
    assert all(v.dtype == (np.float32 if k == "weights" else np.int32) for k, v in out.items())
    # A target too long for seq_len keeps its EOS; decoder_inputs stay targets shifted right.
    long = tasks.translation({"source": b"abcdefgh", "target": b"uvwxyz"}, seq_len=4)
    np.testing.assert_array_equal(long["targets"], [ord("u") + 4, ord("v") + 4, ord("w") + 4, 1])
    np.testing.assert_array_equal(long["decoder_inputs"][1:], long["targets"][:-1])
    assert long["decoder_inputs"][0] == data.EOS_ID and long["weights"].sum() == 4


def test_pipeline_batches_use_the_sentencepiece_ids(tmp_path):
    config = _spm_corpus(tmp_path)
    tokenizer = translation.make_tokenizer(config)
    pairs = translation.load_pairs(config, "train")
    by_source = {tuple(tokenizer.encode(p["source"])): p["target"] for p in pairs}
    batch = next(pipeline.make_iterator(config, task="translation", split="train", batch_size=4,
                                        seq_len=40, seed=0, tokenizer=tokenizer))
    for inputs, dec, targets, weights in zip(batch["inputs"], batch["decoder_inputs"],
                                             batch["targets"], batch["weights"]):
        body = tokenizer.encode(by_source[tuple(inputs[inputs != 0])])
        np.testing.assert_array_equal(targets[: len(body) + 1], np.append(body, spt.EOS_ID))
        np.testing.assert_array_equal(dec[: len(body) + 1], np.append(spt.BOS_ID, body))
        assert weights.sum() == len(body) + 1 and not targets[len(body) + 1:].any()
    shapes = data.batch_shapes(config, task="translation", batch_size=4, seq_len=40)
    assert {k: v[0] for k, v in shapes.items()} == {k: v.shape for k, v in batch.items()}


# ------------------------------------------------------------------------------ DataSource


def _run_config(data_overrides, tie=True, **model):
    from configs import base

    config = base.get_config(dict(arch="encoder_decoder", num_encoder_layers=1,
                                  num_decoder_layers=1, d_model=16, num_heads=2, d_ff=32,
                                  **model), train=dict(batch_size=4, seq_len=24))
    config.data.update(data_overrides)
    if tie:
        base.tie_vocab_size(config)
    return config


def _data_source(config, workdir=None):
    from deepnorm.config import TransformerConfig
    from deepnorm.training import mesh as mesh_lib
    from deepnorm.training.data import DataSource

    model_cfg = TransformerConfig.from_mapping(config.model)
    return DataSource(config, model_cfg, mesh_lib.make_mesh(config.mesh), workdir=workdir)


def test_data_source_translates_with_the_run_vocabulary(tmp_path):
    spm_data = _spm_corpus(tmp_path)
    config = _run_config(dict(spm_data))
    assert config.model.vocab_size == 60  # tied to data.vocab_size
    source = _data_source(config)
    assert source.task == "translation" and source.vocab_size == 60
    line = source.describe()
    assert line.startswith("data: parallel_files en->de: ") and "sentencepiece bpe 60" in line
    batch = next(source.iterator("train"))
    assert batch["decoder_inputs"][:, 0].tolist() == [spt.BOS_ID] * 4
    workdir = str(tmp_path / "run")
    path = source.save_vocab(workdir)
    assert path == os.path.join(workdir, spt.WORKDIR_MODEL) and os.path.exists(path)
    again = _data_source(config, workdir=workdir)
    assert again.tokenizer.origin == path


def test_data_source_bad_inputs_are_one_config_error_line(tmp_path):
    from deepnorm.config import ConfigError

    spm_data = _spm_corpus(tmp_path)
    small = _run_config(dict(spm_data), tie=False)
    small.model.vocab_size = 50  # untied: data.vocab_size stays 60
    with pytest.raises(ConfigError, match="model.vocab_size=50 is smaller than the tokenizer's 60"):
        _data_source(small)
    too_large = _run_config(dict(spm_data))
    too_large.data.vocab_size = 5000
    with pytest.raises(ConfigError, match="^data: data.vocab_size=5000 is more than") as err:
        _data_source(too_large)
    assert "\n" not in str(err.value)
    (tmp_path / "a").write_text("x\ny\n")
    (tmp_path / "b").write_text("x\n")
    mismatched = _run_config(dict(corpus="parallel_files", source_file=str(tmp_path / "a"),
                                  target_file=str(tmp_path / "b")))
    with pytest.raises(ConfigError, match="has 2 lines but"):
        _data_source(mismatched).iterator("train")
    decoder_only = _run_config(dict(spm_data))
    decoder_only.model.update(arch="decoder", num_layers=1, num_encoder_layers=0,
                              num_decoder_layers=0)
    with pytest.raises(ConfigError, match="need model.arch='encoder_decoder'"):
        _data_source(decoder_only)


def test_train_and_evaluate_without_catalogs_fails_in_one_line_creating_nothing(tmp_path):
    from configs import translation as translation_config
    from deepnorm.config import ConfigError
    from deepnorm.training.loop import train_and_evaluate

    config = translation_config.get_config("quick")
    config.data.update(gettext_roots=str(tmp_path / "empty_locale"), gettext_standard_roots=False,
                       target_language="xx", data_dir=str(tmp_path / "tfds"))
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match="^data: data.corpus='gettext' found no catalogs") as err:
        train_and_evaluate(config, str(workdir))
    assert "\n" not in str(err.value) and not workdir.exists()


def test_translation_configs_tie_model_vocab_to_data_vocab():
    from configs import iwslt14_de_en, translation as translation_config, wmt17_en_de

    for module in (translation_config, iwslt14_de_en, wmt17_en_de):
        config = module.get_config()
        config.data.vocab_size = 500  # what --config.data.vocab_size=500 does
        assert config.model.vocab_size == 500, module.__name__
        assert config.decode.beam_size >= 1
    assert wmt17_en_de.get_config("18").model.num_encoder_layers == 18
    assert iwslt14_de_en.get_config().decode.length_penalty == 1.2
