"""An offline parallel corpus: the (English msgid, translated msgstr) pairs of installed gettext
catalogs, as a TFDS ``array_record`` dataset.

Most Linux machines carry translations of their programs' messages as compiled catalogs,
``<locale dir>/<lang>/LC_MESSAGES/<domain>.mo``. ``data.corpus="gettext"`` reads those of one
language with Python's own ``gettext.GNUTranslations`` (its ``_catalog`` dict) from the standard
locale dirs (``/usr/share/locale``, ``/usr/local/share/locale``; off with
``data.gettext_standard_roots=False``) plus each directory in ``data.gettext_roots``
(``os.pathsep``-separated). The language is whichever of ``data.source_language`` /
``data.target_language`` is not ``en`` (msgids are English), so ``en->de`` and ``de->en`` read
the same dataset in opposite directions.

What becomes a pair, entry by entry of each catalog:

* the header (empty msgid) is skipped: it is metadata, not a message;
* a context (``msgctxt``, stored as ``"context\\x04msgid"``) is removed; the msgid is kept;
* plural entries (keys ``(msgid, n)``): only form 0 is kept, paired with the singular msgid
  (``_catalog`` does not keep ``msgid_plural``); form 0 is the singular in de/fr/es/...;
* untranslated entries (msgstr empty, whitespace only, or equal to the msgid) are skipped;
* accelerator markers (``_File``, ``&Open``) are kept as written, on both sides: they are part
  of the strings, and mostly move consistently between languages;
* identical (msgid, msgstr) pairs from several catalogs are kept once.

A catalog ``gettext`` cannot parse (e.g. a non-UTF-8 byte in a header it decodes before reading
the charset) is skipped and named in the metadata. Pairs are split by
:func:`deepnorm.data.parallel.assign_splits` (no string in two splits). The dataset's metadata
(``builder.info.metadata``) records the catalogs read and skipped, the pair counts, and a
SHA-256 fingerprint of the sorted pair list; :func:`describe` makes it one line.

The builder config's name carries a hash of the catalog list (paths, sizes, mtimes) and the
split fractions, so installing a package (a new catalog) builds a new dataset.
"""

from __future__ import annotations

import dataclasses
import gettext
import hashlib
import os
import re
from typing import Iterator, Sequence

import tensorflow_datasets as tfds

from deepnorm.data import parallel

STANDARD_LOCALE_DIRS = ("/usr/share/locale", "/usr/local/share/locale")
ENGLISH = "en"
_CONTEXT_SEPARATOR = "\x04"


@dataclasses.dataclass(frozen=True)
class Catalogs:
    """The ``.mo`` files of one language found under the searched locale dirs."""

    language: str
    roots: tuple[str, ...]
    files: tuple[str, ...]


def locale_roots(data_config) -> tuple[str, ...]:
    """The locale dirs searched: the standard ones (unless switched off) + data.gettext_roots."""
    roots = []
    if getattr(data_config, "gettext_standard_roots", True):
        roots.extend(STANDARD_LOCALE_DIRS)
    extra = getattr(data_config, "gettext_roots", "") or ""
    roots.extend(os.path.abspath(os.path.expanduser(r)) for r in extra.split(os.pathsep) if r)
    return tuple(dict.fromkeys(roots))


def languages_with_catalogs(roots: Sequence[str]) -> list[str]:
    """Every ``<lang>`` with at least one ``.mo`` file under any of ``roots``."""
    found = set()
    for root in roots:
        if not os.path.isdir(root):
            continue
        for lang in os.listdir(root):
            directory = os.path.join(root, lang, "LC_MESSAGES")
            if os.path.isdir(directory) and any(n.endswith(".mo") for n in os.listdir(directory)):
                found.add(lang)
    return sorted(found)


def catalog_language(data_config) -> str:
    """The non-English side of the configured direction; one line if neither side is English."""
    source = getattr(data_config, "source_language", ENGLISH)
    target = getattr(data_config, "target_language", "de")
    if (source == ENGLISH) == (target == ENGLISH):
        raise ValueError(
            f"data.corpus='gettext' pairs English msgids with one language's msgstrs, so exactly"
            f" one of data.source_language / data.target_language must be 'en'; got"
            f" {source!r}->{target!r}"
        )
    return target if source == ENGLISH else source


def find_catalogs(data_config) -> Catalogs:
    """The language's ``.mo`` files; one line naming roots, found languages and alternatives."""
    language = catalog_language(data_config)
    roots = locale_roots(data_config)
    files = []
    for root in roots:
        directory = os.path.join(root, language, "LC_MESSAGES")
        if os.path.isdir(directory):
            files.extend(
                os.path.join(directory, name)
                for name in sorted(os.listdir(directory))
                if name.endswith(".mo") and os.path.isfile(os.path.join(directory, name))
            )
    if not files:
        found = languages_with_catalogs(roots)
        raise ValueError(
            f"data.corpus='gettext' found no catalogs for language {language!r} under "
            f"{', '.join(roots) or '(no roots)'}; languages with catalogs there: "
            f"{', '.join(found) or 'none'}; add a locale dir with data.gettext_roots, or use "
            f"data.corpus='parallel_files' (your own aligned text) or data.corpus='tfds' "
            f"(e.g. data.tfds_name='wmt17_translate/de-en')"
        )
    return Catalogs(language, roots, tuple(files))


def catalog_pairs(path: str) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of one ``.mo`` file by the rules of the module docstring."""
    with open(path, "rb") as file:
        catalog = gettext.GNUTranslations(file)._catalog  # noqa: SLF001 - the parsed entries
    pairs = []
    for key, msgstr in catalog.items():
        if isinstance(key, tuple):  # plural: (singular msgid, form index)
            msgid, form = key
            if form != 0:
                continue
        else:
            msgid = key
        msgid = msgid.split(_CONTEXT_SEPARATOR, 1)[-1]
        if not msgid.strip() or not msgstr.strip() or msgstr == msgid:
            continue  # header, empty, or untranslated
        pairs.append((msgid, msgstr))
    return pairs


@dataclasses.dataclass(frozen=True)
class Harvest:
    """The deduplicated, sorted pairs of a catalog set and what went into them."""

    pairs: tuple[tuple[str, str], ...]
    read: tuple[str, ...]
    skipped: tuple[str, ...]  # "path: reason"

    @property
    def fingerprint(self) -> str:
        return pairs_fingerprint(self.pairs)


def pairs_fingerprint(pairs: Sequence[tuple[str, str]]) -> str:
    """SHA-256 of the sorted pairs, each side NUL-terminated (so no two lists collide)."""
    digest = hashlib.sha256()
    for msgid, msgstr in sorted(pairs):
        digest.update(msgid.encode("utf-8") + b"\0" + msgstr.encode("utf-8") + b"\0")
    return digest.hexdigest()


def harvest(files: Sequence[str]) -> Harvest:
    """Reads every catalog; unparsable ones are skipped and named."""
    pairs: set[tuple[str, str]] = set()
    read, skipped = [], []
    for path in files:
        try:
            pairs.update(catalog_pairs(path))
        except (OSError, UnicodeDecodeError, ValueError, KeyError) as err:
            skipped.append(f"{path}: {type(err).__name__}: {str(err)[:80]}")
            continue
        read.append(path)
    return Harvest(tuple(sorted(pairs)), tuple(read), tuple(skipped))


@dataclasses.dataclass(eq=False)
class GettextConfig(tfds.core.BuilderConfig):
    """One language's catalog list and the split fractions."""

    # Left out of repr: TFDS logs the config, and 86 paths would fill a screen.
    files: tuple[str, ...] = dataclasses.field(default=(), repr=False)
    validation_fraction: float = 0.02
    test_fraction: float = 0.02


def _domain(path: str) -> str:
    """``/usr/share/locale/de/LC_MESSAGES/coreutils.mo`` -> ``coreutils`` (the text domain)."""
    return os.path.basename(path)[: -len(".mo")]


class DeepnormGettext(tfds.core.GeneratorBasedBuilder):
    """(msgid, msgstr) pairs of installed gettext catalogs; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {"msgid": tfds.features.Text(), "msgstr": tfds.features.Text()}
        )
        return self.dataset_info_from_configs(
            features=features, disable_shuffling=True, metadata=tfds.core.MetadataDict()
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator[tuple[str, dict]]]:
        """Harvests once, assigns splits, and records what went in as the dataset's metadata."""
        del dl_manager  # nothing to download
        config = self.builder_config
        found = harvest(config.files)
        assigned = parallel.assign_splits(
            found.pairs, config.validation_fraction, config.test_fraction
        )
        by_split = {split: [] for split in parallel.SPLITS}
        for pair, split in zip(found.pairs, assigned):
            by_split[split].append(pair)
        self.info.metadata.update({
            "catalogs": [{"path": p, "domain": _domain(p)} for p in found.read],
            "skipped_catalogs": list(found.skipped),
            "num_pairs": len(found.pairs),
            "split_pairs": {split: len(pairs) for split, pairs in by_split.items()},
            "fingerprint": found.fingerprint,
        })
        # TFDS cannot write an empty split; a tiny catalog set may leave one empty.
        return {
            split: self._generate_examples(pairs) for split, pairs in by_split.items() if pairs
        }

    def _generate_examples(self, pairs) -> Iterator[tuple[int, dict]]:
        for index, (msgid, msgstr) in enumerate(pairs):
            yield index, {"msgid": msgid, "msgstr": msgstr}


def _config_name(language: str, files: Sequence[str], fractions: tuple[float, float]) -> str:
    """``de_<hash>``: changes with any catalog's path, size or mtime, or the fractions."""
    digest = hashlib.sha256(repr(fractions).encode())
    for path in files:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return f"{re.sub(r'[^A-Za-z0-9]', '_', language)}_{digest.hexdigest()[:10]}"


def builder_config(data_config, fractions: tuple[float, float]) -> GettextConfig:
    """The config for the configured language; fails early if it has no catalogs."""
    catalogs = find_catalogs(data_config)
    return GettextConfig(
        name=_config_name(catalogs.language, catalogs.files, fractions),
        description=f"gettext catalogs of {catalogs.language!r} under {', '.join(catalogs.roots)}",
        files=catalogs.files,
        validation_fraction=fractions[0],
        test_fraction=fractions[1],
    )


def describe(builder: DeepnormGettext, direction: str) -> str:
    """One line: language pair, catalogs, pair counts per split, fingerprint."""
    meta = builder.info.metadata
    counts = meta["split_pairs"]
    skipped = len(meta["skipped_catalogs"])
    return (
        f"gettext {direction}: {len(meta['catalogs'])} catalogs"
        f"{f' ({skipped} unreadable, skipped)' if skipped else ''}"
        f" [{builder.builder_config.description.split(' under ')[-1]}], {meta['num_pairs']} pairs"
        f" (train {counts['train']}, validation {counts['validation']}, test {counts['test']}),"
        f" fingerprint {meta['fingerprint'][:12]}"
    )
