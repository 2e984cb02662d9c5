"""deepnorm.data: tokens, the offline TFDS corpus, mocked TFDS datasets, grain pipelines."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import tensorflow_datasets as tfds

from deepnorm import data
from deepnorm.data import corpus, pipeline, tasks, tokenizer

ROOT = str(pathlib.Path(__file__).resolve().parents[1])

SEQ_LEN = 64
BATCH = 4


# ------------------------------------------------------------------------------ fixtures


def _document(index: int) -> str:
    """A few KB of varied, deterministic text, different for every file."""
    rng = np.random.default_rng(index)
    words = ["alpha", "beta", "gamma", "délta", "epsilon", "zeta", "eta", "thêta", "iota"]
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(40)]
    return f"# document {index}\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> pathlib.Path:
    """Twelve files in two subdirectories plus one empty file (which the corpus skips)."""
    root = tmp_path_factory.mktemp("texts")
    for index in range(12):
        path = root / f"sub{index % 2}" / f"doc_{index:02d}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(_document(index), encoding="utf-8")
    (root / "sub0" / "empty.txt").write_text("")
    return root


@pytest.fixture(scope="module")
def text_config(text_dir, tmp_path_factory):
    """A text_files corpus over ``text_dir``, built once into a temporary data_dir."""
    config = data.default_data_config()
    config.corpus = "text_files"
    config.text_files = str(text_dir / "**" / "*.txt")
    config.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.validation_fraction = 0.25
    return config


@pytest.fixture(scope="module")
def corpus_tokens(text_config) -> np.ndarray:
    """The train split packed into one token array, the reference the batches must come from."""
    source = data.load_source(text_config, "train")
    return pipeline.pack_documents([source[i]["text"] for i in range(len(source))])


def _iterator(config, task, **overrides):
    kwargs = dict(task=task, split="train", batch_size=BATCH, seq_len=SEQ_LEN, seed=0)
    kwargs.update(overrides)
    return data.make_iterator(config, **kwargs)


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(left: list[dict], right: list[dict]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def _windows_of(tokens: np.ndarray, length: int) -> set[bytes]:
    return {w.astype(np.int32).tobytes() for w in pipeline.Windows(tokens, length)}


def _assert_shapes(batch: dict, config, task: str, batch_size=BATCH, seq_len=SEQ_LEN) -> None:
    expected = data.batch_shapes(config, task=task, batch_size=batch_size, seq_len=seq_len)
    assert set(batch) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert batch[key].shape == shape, key
        assert batch[key].dtype == dtype, key


# ------------------------------------------------------------------------------ tokens


def test_tokenizer_round_trips_text_and_bytes():
    text = "def f(x):\n    return x ** 2  # ünïcode ✓\n"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32
    assert ids.min() >= tokenizer.NUM_SPECIAL and ids.max() < tokenizer.VOCAB_SIZE
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode(text.encode("utf-8"))) == text
    assert data.VOCAB_SIZE == 260
    assert tokenizer.encode(b"\x00\xff").tolist() == [4, 259]


def test_decode_drops_special_ids_and_rejects_out_of_range():
    ids = [tokenizer.EOS_ID, *tokenizer.encode("ab"), tokenizer.PAD_ID, tokenizer.MASK_ID,
           tokenizer.SENTINEL_ID]
    assert tokenizer.decode(ids) == "ab"
    assert tokenizer.decode(tokenizer.encode(b"\xff")) == "\ufffd"
    with pytest.raises(ValueError, match="260"):
        tokenizer.decode([5, 260])


# ------------------------------------------------------------------------------ corpus


def test_split_is_a_stable_hash_of_the_path():
    digest = hashlib.sha256(b"os.py").digest()
    expected = "validation" if int.from_bytes(digest[:8], "big") / 2**64 < 0.5 else "train"
    assert corpus.split_of("os.py", 0.5) == expected
    paths = [f"pkg{i}/mod{i}.py" for i in range(20000)]
    share = np.mean([corpus.split_of(p, 0.02) == "validation" for p in paths])
    assert 0.015 < share < 0.025


def test_text_files_corpus_splits_files_by_path_hash(text_config, text_dir):
    train = data.load_source(text_config, "train")
    validation = data.load_source(text_config, "validation")
    train_paths = [train[i]["path"].decode() for i in range(len(train))]
    validation_paths = [validation[i]["path"].decode() for i in range(len(validation))]
    assert train_paths == sorted(train_paths)
    assert all(corpus.split_of(p, 0.25) == "train" for p in train_paths)
    assert all(corpus.split_of(p, 0.25) == "validation" for p in validation_paths)
    assert sorted(train_paths + validation_paths) == [
        f"sub{i % 2}/doc_{i:02d}.txt" for i in sorted(range(12), key=lambda i: (i % 2, i))]
    assert validation_paths and train_paths
    first = train[0]
    assert isinstance(first["text"], bytes)
    assert first["text"] == (text_dir / first["path"].decode()).read_bytes()


def test_text_files_config_name_hashes_the_glob(text_config):
    config = corpus.corpus_config(text_config)
    assert config.name.startswith("files_") and text_config.text_files in config.description
    other = text_config.copy_and_resolve_references()
    other.text_files = text_config.text_files.replace("*.txt", "doc_0*.txt")
    assert corpus.corpus_config(other).name != config.name


def test_stdlib_corpus_builds_offline(tmp_path):
    config = data.default_data_config()
    config.data_dir = str(tmp_path)
    source = data.load_source(config, "train")
    paths = [source[i]["path"].decode() for i in range(len(source))]
    assert len(paths) > 300 and "os.py" in paths
    assert not any(part in {"test", "tests", "site-packages"}
                   for p in paths for part in p.split("/")[:-1])
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    assert source[paths.index("os.py")]["text"] == (root / "os.py").read_bytes()
    batch = next(_iterator(config, "causal_lm"))
    _assert_shapes(batch, config, "causal_lm")


_BUILD_AND_COUNT = """
import sys
from deepnorm import data
config = data.default_data_config()
config.update(corpus="text_files", text_files=sys.argv[1], data_dir=sys.argv[2],
              validation_fraction=0.25)
print(len(data.load_source(config, "train")))
"""


def test_two_processes_building_one_corpus_at_once_both_get_it(text_dir, tmp_path):
    # Without the build lock the second process's rename onto the finished build fails, or it
    # reads a builder made before the data existed and finds no splits.
    args = [sys.executable, "-c", _BUILD_AND_COUNT, str(text_dir / "**" / "*.txt"),
            str(tmp_path / "tfds")]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    counts = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(counts) == 1 and int(counts.pop()) > 0


# ------------------------------------------------------------------------------ tasks


def test_causal_lm_targets_are_inputs_shifted_by_one(text_config, corpus_tokens):
    batch = next(_iterator(text_config, "causal_lm"))
    _assert_shapes(batch, text_config, "causal_lm")
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    windows = _windows_of(corpus_tokens, SEQ_LEN + 1)
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
        assert np.append(inputs, targets[-1]).astype(np.int32).tobytes() in windows
    np.testing.assert_array_equal(batch["weights"], 1.0)  # full windows: no padding


def test_causal_lm_weights_are_zero_on_padding():
    window = np.array([10, 11, tokenizer.EOS_ID, 0, 0])
    out = tasks.causal_lm(window)
    np.testing.assert_array_equal(out["weights"], [1, 1, 0, 0])


def test_masked_lm_corrupts_fifteen_percent_bert_style(text_config, corpus_tokens):
    batches = _take(_iterator(text_config, "masked_lm", batch_size=16), 8)
    _assert_shapes(batches[0], text_config, "masked_lm", batch_size=16)
    windows = _windows_of(corpus_tokens, SEQ_LEN)
    chosen_total, masked, unchanged = 0, 0, 0
    for batch in batches:
        chosen = batch["weights"] == 1.0
        assert set(np.unique(batch["weights"])) <= {0.0, 1.0}
        np.testing.assert_array_equal(chosen.sum(axis=1), round(0.15 * SEQ_LEN))
        changed = batch["inputs"] != batch["targets"]
        assert not (changed & ~chosen).any()  # nothing outside the chosen positions moves
        assert all(t.tobytes() in windows for t in batch["targets"])  # targets: the original
        chosen_total += chosen.sum()
        masked += (batch["inputs"][chosen] == tokenizer.MASK_ID).sum()
        unchanged += (~changed & chosen).sum()
    assert 0.7 < masked / chosen_total < 0.9
    assert 0.04 < unchanged / chosen_total < 0.2  # 10% kept + random draws of the same byte


def _reconstruct(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Undoes span corruption: the n-th sentinel in inputs takes the n-th span of targets."""
    targets = targets[targets != tokenizer.PAD_ID]
    assert targets[-1] == tokenizer.EOS_ID  # the closing EOS (spans may hold document EOSs)
    targets = targets[:-1]
    span_starts = np.flatnonzero(targets == tokenizer.SENTINEL_ID)
    spans = np.split(targets, span_starts)[1:]
    out, span = [], iter(spans)
    for token in inputs[inputs != tokenizer.PAD_ID]:
        out.extend(next(span)[1:] if token == tokenizer.SENTINEL_ID else [token])
    assert next(span, None) is None
    return np.array(out, np.int32)


def test_span_corruption_reconstructs_the_original_window(text_config, corpus_tokens):
    batches = _take(_iterator(text_config, "span_corruption"), 4)
    _assert_shapes(batches[0], text_config, "span_corruption")
    windows = _windows_of(corpus_tokens, SEQ_LEN)
    num_noise, num_spans = tasks.span_counts(SEQ_LEN, 0.15, 3.0)
    for batch in batches:
        np.testing.assert_array_equal(batch["decoder_inputs"][:, 0], tokenizer.EOS_ID)
        np.testing.assert_array_equal(batch["decoder_inputs"][:, 1:], batch["targets"][:, :-1])
        np.testing.assert_array_equal(batch["weights"], batch["targets"] != tokenizer.PAD_ID)
        for inputs, targets in zip(batch["inputs"], batch["targets"]):
            assert _reconstruct(inputs, targets).tobytes() in windows
            assert (targets == tokenizer.SENTINEL_ID).sum() == num_spans
            assert (targets != tokenizer.PAD_ID).sum() == num_noise + num_spans + 1


def test_span_corruption_target_length_is_exact_for_short_and_padded_windows():
    assert tasks.span_target_length(128, 0.15, 3.0) == 19 + 6 + 1
    rng = np.random.default_rng(0)
    for real in (0, 1, 2, 3, 17, 40):
        window = np.zeros(40, np.int32)
        window[:real] = rng.integers(4, 260, size=real)
        out = tasks.span_corruption(window, rng, 0.15, 3.0)
        assert out["targets"].shape == (tasks.span_target_length(40, 0.15, 3.0),)
        np.testing.assert_array_equal(_reconstruct(out["inputs"], out["targets"]), window[:real])


# ------------------------------------------------------------------------------ order and state


def test_processes_read_disjoint_shards(text_config):
    seen = []
    for process_index in range(2):
        iterator = _iterator(text_config, "causal_lm", process_index=process_index,
                             process_count=2, num_epochs=1)
        seen.append({row.tobytes() for batch in iterator for row in batch["inputs"]})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_seeded_shuffle_is_deterministic(text_config):
    first = _take(_iterator(text_config, "masked_lm", seed=7), 3)
    _assert_same_batches(first, _take(_iterator(text_config, "masked_lm", seed=7), 3))
    other = _take(_iterator(text_config, "masked_lm", seed=8), 3)
    assert not np.array_equal(first[0]["targets"], other[0]["targets"])


def test_finite_epochs_end(text_config):
    one = sum(1 for _ in _iterator(text_config, "causal_lm", num_epochs=1))
    two = sum(1 for _ in _iterator(text_config, "causal_lm", num_epochs=2))
    assert one > 0 and two in (2 * one, 2 * one + 1)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_restored_iterator_state_replays_the_same_batches(text_config, task):
    iterator = _iterator(text_config, task)
    _take(iterator, 5)
    state = json.loads(json.dumps(iterator.get_state()))  # the state is plain JSON
    expected = _take(iterator, 4)
    resumed = _iterator(text_config, task)
    resumed.set_state(state)
    _assert_same_batches(expected, _take(resumed, 4))


def test_orbax_checkpoint_restores_the_iterator(text_config, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("state", "data"))
    iterator = _iterator(text_config, "span_corruption")
    _take(iterator, 3)
    manager.save(3, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"step": np.int32(3)}),
        data=data.iterator_checkpoint_args(iterator)))
    expected = _take(iterator, 3)  # advance before the async save finishes: it must not matter
    manager.wait_until_finished()
    resumed = _iterator(text_config, "span_corruption")
    manager.restore(3, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), data=data.iterator_restore_args(resumed)))
    _assert_same_batches(expected, _take(resumed, 3))
    manager.close()


def test_worker_processes_give_the_same_batches(text_config):
    config = text_config.copy_and_resolve_references()
    config.num_workers = 1
    iterator = _iterator(config, "masked_lm")
    try:
        got = _take(iterator, 3)
        json.dumps(iterator.get_state())
    finally:
        iterator.close()
    _assert_same_batches(_take(_iterator(text_config, "masked_lm"), 3), got)


# ------------------------------------------------------------------------------ TFDS by name


def _tfds_config(tmp_path, name: str, key: str):
    config = data.default_data_config()
    config.corpus = "tfds"
    config.tfds_name = name
    config.tfds_text_key = key
    config.data_dir = str(tmp_path)
    return config


@pytest.mark.parametrize("task", tasks.TASKS)
def test_mocked_lm1b_flows_through_every_task(tmp_path, task):
    config = _tfds_config(tmp_path, "lm1b", "text")
    with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
        iterator = _iterator(config, task, seq_len=16)
        _take(iterator, 2)
        state = json.loads(json.dumps(iterator.get_state()))
        expected = _take(iterator, 3)
        resumed = _iterator(config, task, seq_len=16)
        resumed.set_state(state)
        _assert_same_batches(expected, _take(resumed, 3))
    assert expected[0]["inputs"].shape == (BATCH, 16)


def test_mocked_lm1b_packs_every_token_once(tmp_path):
    config = _tfds_config(tmp_path, "lm1b", "text")
    with tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE):
        source = data.load_source(config, "train")
        total = sum(len(source[i]["text"]) + 1 for i in range(len(source)))
        batches = list(_iterator(config, "causal_lm", batch_size=1, seq_len=8, num_epochs=1))
    windows = [np.append(b["inputs"][0], b["targets"][0, -1]) for b in batches]
    assert sum(int((w != tokenizer.PAD_ID).sum()) for w in windows) == total


def test_mocked_translation_pair_maps_source_to_target(tmp_path):
    config = _tfds_config(tmp_path, "ted_hrlr_translate/pt_to_en", "pt,en")
    with tfds.testing.mock_data(num_examples=16, policy=tfds.testing.MockPolicy.USE_CODE):
        source = data.load_source(config, "train")
        batch = next(_iterator(config, "span_corruption", batch_size=16, num_epochs=1))
        with pytest.raises(ValueError, match="pt,en"):
            _iterator(config, "causal_lm")
    _assert_shapes(batch, config, "span_corruption", batch_size=16)
    pairs = {source[i]["source"]: source[i]["target"] for i in range(len(source))}
    for inputs, targets in zip(batch["inputs"], batch["targets"]):
        target = pairs[tokenizer.decode(inputs).encode()]
        assert tokenizer.decode(targets).encode() == target
        assert targets[len(target)] == tokenizer.EOS_ID


def test_tfds_download_failure_names_the_dataset(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
    config = _tfds_config(tmp_path, "tiny_shakespeare", "text")
    with pytest.raises(RuntimeError, match="'tiny_shakespeare'.*stdlib"):
        data.load_source(config, "train")


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("corpus", "wikipedia", "'wikipedia'"),
        ("mask_rate", 1.5, "1.5"),
        ("mean_span_length", 0.5, "0.5"),
        ("validation_fraction", 0.0, "0.0"),
    ],
)
def test_bad_data_config_values_are_named(text_config, field, value, message):
    config = text_config.copy_and_resolve_references()
    config[field] = value
    with pytest.raises(ValueError, match=message):
        _iterator(config, "masked_lm")


def test_empty_glob_is_named(text_config, tmp_path):
    config = text_config.copy_and_resolve_references()
    config.text_files = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(ValueError, match="nothing"):
        data.load_source(config, "train")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(task="translation"), "'translation'"),
        (dict(seq_len=1), "seq_len"),
        (dict(batch_size=0), "batch_size"),
        (dict(process_index=2, process_count=2), "process_index"),
        (dict(seed=-1), "-1"),
        (dict(num_epochs=0), "num_epochs"),
        (dict(split="test"), "'test'"),
        (dict(batch_size=10**6), "batch_size"),
    ],
)
def test_bad_arguments_are_named(text_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        _iterator(text_config, **{"task": "causal_lm", **overrides})


def test_task_for_arch():
    assert data.task_for_arch("decoder") == "causal_lm"
    assert data.task_for_arch("encoder") == "masked_lm"
    assert data.task_for_arch("encoder_decoder") == "span_corruption"
    with pytest.raises(ValueError, match="'decoder_only'"):
        data.task_for_arch("decoder_only")


def test_unknown_tfds_name_and_key_are_named(tmp_path):
    with pytest.raises(ValueError, match="'no_such_dataset'"):
        data.load_source(_tfds_config(tmp_path, "no_such_dataset", "text"), "train")
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        with pytest.raises(ValueError, match="'body'"):
            data.load_source(_tfds_config(tmp_path, "lm1b", "body"), "train")
