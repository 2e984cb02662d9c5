"""Where text comes from: an embedded TFDS corpus that needs no network, or any TFDS dataset.

The default corpus is a TFDS builder in this project, ``deepnorm_corpus``, that turns text
already on the machine into an ``array_record`` dataset, so every run, test and notebook works
offline and reads it with random access (``builder.as_data_source``). Two kinds of config:

* ``stdlib`` (default): the ``.py`` sources of the running Python's standard library
  (``sysconfig.get_paths()["stdlib"]``). ``site-packages``/``dist-packages`` are skipped (they
  are installed packages, not the stdlib), and so are test directories (``test``, ``tests``,
  ``idle_test``): they are ~60% of the bytes, hold deliberately malformed and generated
  sources, and would make the build ~2.5x slower. Empty files are skipped (no text to learn).
  The content depends on the Python version that builds it; the version is recorded in the
  config's description. Delete the directory to rebuild after changing Python.
* ``files_<hash>``: the user's own files matching ``data.text_files`` (a glob, ``**`` allowed),
  created at run time; the hash covers the glob and the validation fraction, and the
  description records both. The glob is expanded when the corpus is first built; files added
  later are not picked up until that directory is deleted.

One example per file, ``{"text": Text, "path": Text}`` (both read back as bytes), written in
sorted relative-path order. Each file goes to ``validation`` when a SHA-256 of its relative path
falls below ``data.validation_fraction``, otherwise to ``train``: stable across machines and
runs, unlike Python's salted ``hash()``. A non-default fraction gets its own config name.

``data.corpus="tfds"`` loads ``data.tfds_name`` with ``tfds.builder``; it must be downloadable
(or already prepared in ``data.data_dir``) and is prepared as ``array_record`` (the tfrecord
writer needs TensorFlow, which this project does not install). When it is not prepared and
none of its download hosts answers, ``TFDSOfflineError`` says so within seconds
(``deepnorm.data.reachability``) instead of after TFDS's ~3.5 minutes of retries.
"""

from __future__ import annotations

import dataclasses
import fcntl
import glob as globlib
import hashlib
import os
import pathlib
import sys
import sysconfig
from typing import Any, Callable, Iterator, Sequence

import tensorflow_datasets as tfds

from deepnorm.data import reachability
from deepnorm.data.tokenizer import as_bytes

CORPORA = ("stdlib", "text_files", "tfds", "gettext", "parallel_files")
# Corpora of (source, target) pairs, handled by deepnorm.data.translation.
PAIR_CORPORA = ("gettext", "parallel_files")
SPLITS = ("train", "validation")
DEFAULT_VALIDATION_FRACTION = 0.02
_SKIPPED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
_FILE_FORMAT = "array_record"


@dataclasses.dataclass(eq=False)
class CorpusConfig(tfds.core.BuilderConfig):
    """Which local files make the corpus (``glob=""``: the stdlib) and the validation share."""

    glob: str = ""
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION


def _stdlib_description() -> str:
    """Says which interpreter's sources a stdlib build holds (they differ between versions)."""
    version = ".".join(map(str, sys.version_info[:3]))
    return f"Python {version} standard library .py sources (no tests, no site-packages)"


class DeepnormCorpus(tfds.core.GeneratorBasedBuilder):
    """Byte-level text corpus built from local files; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [CorpusConfig(name="stdlib", description=_stdlib_description())]

    def _info(self) -> tfds.core.DatasetInfo:
        """Declares the two text features; disables shuffling so files keep sorted order."""
        features = tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "path": tfds.features.Text()}
        )
        return self.dataset_info_from_configs(features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager) -> dict[str, Iterator[tuple[str, dict]]]:
        """Lists the files once and hands each split the same sorted list to filter."""
        del dl_manager  # nothing to download
        root, rel_paths = list_corpus_files(self.builder_config.glob)
        fraction = self.builder_config.validation_fraction
        return {
            split: self._generate_examples(root, rel_paths, fraction, split) for split in SPLITS
        }

    def _generate_examples(
        self, root: pathlib.Path, rel_paths: Sequence[str], fraction: float, split: str
    ) -> Iterator[tuple[str, dict]]:
        """Yields ``(relative path, example)`` for the non-empty files that belong to ``split``."""
        for rel_path in rel_paths:
            if split_of(rel_path, fraction) != split:
                continue
            text = (root / rel_path).read_bytes()
            if text:
                yield rel_path, {"text": text, "path": rel_path}


def split_of(rel_path: str, validation_fraction: float) -> str:
    """Assigns a file to a split by a SHA-256 of its relative path (same on every machine)."""
    digest = hashlib.sha256(rel_path.encode("utf-8")).digest()
    unit = int.from_bytes(digest[:8], "big") / 2.0**64
    return "validation" if unit < validation_fraction else "train"


def list_corpus_files(pattern: str) -> tuple[pathlib.Path, list[str]]:
    """Returns a root and the sorted relative paths under it: the stdlib's, or ``pattern``'s."""
    if not pattern:
        return _stdlib_files()
    return _glob_files(pattern)


def _stdlib_files() -> tuple[pathlib.Path, list[str]]:
    """Lists the standard library's ``.py`` files, minus tests and installed packages."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    rel_paths = [
        path.relative_to(root).as_posix()
        for path in root.rglob("*.py")
        if not _SKIPPED_STDLIB_DIRS.intersection(path.relative_to(root).parts[:-1])
        and path.is_file()
    ]
    return root, sorted(rel_paths)


def _glob_files(pattern: str) -> tuple[pathlib.Path, list[str]]:
    """Expands a user glob to regular files, relative to their deepest common directory."""
    matches = globlib.glob(os.path.expanduser(pattern), recursive=True)
    files = sorted(os.path.abspath(path) for path in matches if os.path.isfile(path))
    if not files:
        raise ValueError(
            f"data.text_files glob {pattern!r} matches no files; give a glob of text files,"
            " e.g. 'corpus/**/*.txt'"
        )
    root = pathlib.Path(os.path.commonpath([os.path.dirname(path) for path in files]))
    return root, sorted(pathlib.Path(path).relative_to(root).as_posix() for path in files)


def _short_hash(*parts: Any) -> str:
    """A 10-hex-digit name suffix that changes whenever any of ``parts`` changes."""
    return hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()[:10]


def corpus_config(data_config) -> CorpusConfig | str:
    """The builder config for ``data.corpus`` in {stdlib, text_files}; checks the glob early."""
    fraction = _validation_fraction(data_config)
    if data_config.corpus == "stdlib":
        if fraction == DEFAULT_VALIDATION_FRACTION:
            return "stdlib"
        return CorpusConfig(
            name=f"stdlib_{_short_hash(fraction)}",
            description=f"{_stdlib_description()}; validation fraction {fraction}",
            validation_fraction=fraction,
        )
    pattern = data_config.text_files or ""
    _glob_files(pattern)  # fail here, with the glob named, rather than inside a TFDS build
    return CorpusConfig(
        name=f"files_{_short_hash(pattern, fraction)}",
        description=f"files matching {pattern!r}; validation fraction {fraction}",
        glob=pattern,
        validation_fraction=fraction,
    )


def _validation_fraction(data_config) -> float:
    """Reads ``data.validation_fraction`` and checks it leaves both splits possible."""
    fraction = float(getattr(data_config, "validation_fraction", DEFAULT_VALIDATION_FRACTION))
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.validation_fraction must lie in (0, 1), got {fraction}")
    return fraction


class TFDSOfflineError(ValueError):
    """A TFDS dataset that is not prepared here and cannot be downloaded: no host answers.

    A ValueError, like the other data-config problems, so the trainer reports it as one
    ``ConfigError`` line (exit code 2): the fix is in the config or the data dir, not the code.
    """


def _data_dir(data_config) -> str | None:
    """``data.data_dir`` with ``~`` expanded; None lets TFDS pick its default directory."""
    data_dir = getattr(data_config, "data_dir", None)
    return os.path.expanduser(data_dir) if data_dir else None


def _prepare(builder: tfds.core.DatasetBuilder) -> None:
    """Builds as array_record without polling GCS; TFDS reuses an existing build."""
    try:
        builder.download_and_prepare(
            file_format=_FILE_FORMAT,
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    except ModuleNotFoundError as err:
        if err.name != "importlib_resources":
            raise
        # tensorflow-datasets 4.9.x imports it when building but declares it only for Python<3.9.
        raise ModuleNotFoundError(
            "building a TFDS dataset needs the 'importlib_resources' package, which"
            " tensorflow-datasets uses without declaring it: pip install importlib_resources",
            name=err.name,
        ) from err


def prepared(make_builder: Callable[[], tfds.core.DatasetBuilder]) -> tfds.core.DatasetBuilder:
    """``make_builder()``'s dataset, built once even when several processes ask at once.

    Two runs (or two test workers) started together on a fresh machine would both build into
    the same directory and the second rename fails. The build runs under an exclusive file
    lock beside the dataset's directory; a process that waited makes its builder again, since a
    builder made before the data existed does not read the finished build's info (TFDS's
    "reuse" path returns without loading it).
    """
    builder = make_builder()
    if builder.data_path.exists():
        return builder
    lock_path = pathlib.Path(f"{builder.data_dir}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = make_builder()
        _prepare(builder)
    return builder


def corpus_builder(data_config) -> DeepnormCorpus:
    """Returns the embedded corpus's builder, built into ``data.data_dir`` if needed."""
    return prepared(lambda: DeepnormCorpus(
        data_dir=_data_dir(data_config),
        config=corpus_config(data_config),
        file_format=_FILE_FORMAT,
    ))


def text_keys(data_config) -> tuple[str, ...]:
    """Parses ``data.tfds_text_key``: one feature name, or "source,target" for translation.

    Empty means the language pair ``data.source_language,data.target_language``: translation
    datasets (wmt17_translate/de-en, ...) name their features by language code.
    """
    raw = getattr(data_config, "tfds_text_key", None)
    if not raw:
        raw = f"{data_config.source_language},{data_config.target_language}"
    keys = tuple(key.strip() for key in raw.split(","))
    if len(keys) > 2 or not all(keys):
        raise ValueError(
            f"data.tfds_text_key must be one feature name or a 'source,target' pair, got {raw!r}"
        )
    return keys


def _named_builder(name: str, data_config) -> tfds.core.DatasetBuilder:
    """``tfds.builder(name)``; the WMT builders register only once ``tensorflow_datasets.translate``
    is imported (``import tensorflow_datasets`` leaves it out), so a miss retries after that."""
    def make():
        return tfds.builder(name, data_dir=_data_dir(data_config), file_format=_FILE_FORMAT)

    try:
        return make()
    except tfds.core.registered.DatasetNotFoundError:
        import tensorflow_datasets.translate  # noqa: F401 - registers wmt*_translate

        return make()


def tfds_builder(data_config) -> tfds.core.DatasetBuilder:
    """Returns ``data.tfds_name``'s builder, downloaded and prepared as array_record if needed.

    Raises ``TFDSOfflineError`` within seconds when it would have to download and none of its
    download hosts accepts a connection (TFDS itself would retry for ~3.5 minutes first).
    """
    name = getattr(data_config, "tfds_name", None) or ""
    if not name:
        raise ValueError("data.corpus='tfds' needs data.tfds_name, e.g. 'lm1b', got ''")
    try:
        builder = _named_builder(name, data_config)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise ValueError(f"data.tfds_name {name!r} is not a known TFDS dataset") from err
    reason = reachability.offline_reason(builder)
    if reason:
        raise TFDSOfflineError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir_root} and cannot be"
            f" downloaded: {reason} (no network?); run once on a machine with network and copy"
            f" its TFDS data dir here, or point data.data_dir (or TFDS_DATA_DIR) at a prepared"
            f" copy; offline, data.corpus='stdlib' or 'text_files' need no network"
        )
    try:
        _prepare(builder)
    except ModuleNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - any download failure gets the same advice
        raise RuntimeError(
            f"could not download and prepare TFDS dataset {name!r} ({type(err).__name__}: "
            f"{err}); offline, use data.corpus='stdlib' or 'text_files', which need no network"
        ) from err
    return builder


class TextSource:
    """Random access to a TFDS split as ``{"text": bytes}`` or ``{"source", "target"}`` dicts.

    It renames the dataset's own feature names (``data.tfds_text_key``) to the ones the
    pipeline reads, and turns str into bytes (TFDS mocks yield str where real data is bytes).
    """

    def __init__(self, source: Sequence[dict], keys: tuple[str, ...]):
        self._source = source
        self._keys = keys

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, bytes]:
        example = self._source[index]
        names = ("text",) if len(self._keys) == 1 else ("source", "target")
        return {name: as_bytes(example[key]) for name, key in zip(names, self._keys)}


def _check_text_keys(builder: tfds.core.DatasetBuilder, keys: tuple[str, ...]) -> None:
    """Fails with the dataset's feature names when ``data.tfds_text_key`` names another."""
    available = sorted(builder.info.features.keys())
    for key in keys:
        if key not in available:
            raise ValueError(
                f"data.tfds_text_key {key!r} is not a feature of {builder.name}; "
                f"its features are {available}"
            )


def load_source(data_config, split: str) -> Sequence[dict[str, bytes]]:
    """Random-access examples of ``split``, building or downloading the corpus first if needed.

    Embedded corpora give ``{"text": bytes, "path": bytes}``; ``tfds`` gives ``{"text": bytes}``
    or, for a "source,target" key pair, ``{"source": bytes, "target": bytes}``.
    """
    corpus = getattr(data_config, "corpus", "stdlib")
    if corpus not in CORPORA:
        raise ValueError(f"data.corpus must be one of {CORPORA}, got {corpus!r}")
    if corpus in PAIR_CORPORA:
        from deepnorm.data import translation  # it builds on this module

        return translation.load_pairs(data_config, split)
    if corpus == "tfds":
        keys = text_keys(data_config)
        builder = tfds_builder(data_config)
        _check_text_keys(builder, keys)
        return TextSource(builder.as_data_source(split), keys)
    if split.split("[")[0] not in SPLITS:
        raise ValueError(f"split for data.corpus={corpus!r} must be one of {SPLITS}, got {split!r}")
    return corpus_builder(data_config).as_data_source(split)
