"""Aligned (source, target) text: the user's own files, and the split rule every pair corpus uses.

``data.corpus="parallel_files"`` reads either

* ``data.parallel_tsv``: one pair per line, ``source<TAB>target`` (exactly two columns), or
* ``data.source_file`` + ``data.target_file``: two line-aligned files, line i of one
  translating line i of the other (their line counts must match).

Without ``{split}`` in the path, the one file set is split into train / validation / test by
:func:`assign_splits`. With ``{split}`` (``"iwslt14/{split}.de"``), each split name the trainer
asks for (``data.train_split``, ``data.eval_split``) is substituted and read as is, which is
how already-split corpora (fairseq's ``train``/``valid``/``test`` files) keep their own splits.
Lines are UTF-8; a trailing newline is removed and nothing else (the text is the user's).
Pairs with an empty side are dropped (nothing to learn or translate); duplicates are kept, as
the user wrote them.

**Split rule** (:func:`assign_splits`): pairs that share a source *or* a target string are
joined into one group (union-find over both sides), and each group goes to one split by a
SHA-256 of its smallest source string. So no source string, and no target string, appears in
two splits, whichever direction the corpus is read in; the assignment is the same on every
machine (unlike Python's salted ``hash()``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

SPLITS = ("train", "validation", "test")
SPLIT_PLACEHOLDER = "{split}"


def split_unit(text: str) -> float:
    """A number in [0, 1) fixed by ``text``: the first 8 bytes of its SHA-256 over 2**64."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_for_unit(unit: float, validation_fraction: float, test_fraction: float) -> str:
    """``validation`` below the first fraction, ``test`` in the next, else ``train``."""
    if unit < validation_fraction:
        return "validation"
    if unit < validation_fraction + test_fraction:
        return "test"
    return "train"


def assign_splits(
    pairs: Sequence[tuple[str, str]], validation_fraction: float, test_fraction: float
) -> list[str]:
    """The split of each pair; pairs sharing a source or a target string share a split."""
    parent: dict[tuple[int, str], tuple[int, str]] = {}

    def find(node):
        root = node
        while parent.setdefault(root, root) != root:
            root = parent[root]
        while parent[node] != root:  # path compression keeps later finds short
            parent[node], node = root, parent[node]
        return root

    for source, target in pairs:
        a, b = find((0, source)), find((1, target))
        if a != b:
            parent[max(a, b)] = min(a, b)  # the smaller node, so (0, min source) ends up root
    # The root of a group with any source is (0, smallest source): sources sort before targets.
    return [
        split_for_unit(split_unit(find((0, source))[1]), validation_fraction, test_fraction)
        for source, _ in pairs
    ]


def _read_lines(path: str, what: str) -> list[str]:
    """The lines of a UTF-8 file without their newline; one clear error if it cannot be read."""
    path = os.path.expanduser(path)
    try:
        with open(path, encoding="utf-8", newline="\n") as file:
            return [line.rstrip("\r\n") for line in file]
    except FileNotFoundError:
        raise ValueError(f"{what}={path!r} does not exist; give an existing UTF-8 text file")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what}={path!r} is not UTF-8 text (byte {err.start}: {err.reason})")
    except OSError as err:
        raise ValueError(f"{what}={path!r} cannot be read: {err.strerror}")


def _paths(data_config) -> tuple[str, str, str]:
    """(tsv, source file, target file) from the config; exactly one form must be given."""
    tsv = getattr(data_config, "parallel_tsv", "") or ""
    source = getattr(data_config, "source_file", "") or ""
    target = getattr(data_config, "target_file", "") or ""
    if tsv and (source or target):
        raise ValueError(
            "data.parallel_tsv and data.source_file/target_file are two ways to give the same "
            "pairs; set one of them"
        )
    if not tsv and not (source and target):
        raise ValueError(
            "data.corpus='parallel_files' needs data.parallel_tsv (source<TAB>target lines) or "
            f"both data.source_file and data.target_file, got source_file={source!r}, "
            f"target_file={target!r}"
        )
    return tsv, source, target


def has_own_splits(data_config) -> bool:
    """True when the paths contain ``{split}``: each split is its own file set."""
    return any(SPLIT_PLACEHOLDER in path for path in _paths(data_config))


def read_pairs(data_config, split: str | None = None) -> list[tuple[str, str]]:
    """All (source, target) lines of the configured files (``split`` fills ``{split}``)."""
    tsv, source_path, target_path = (
        path.replace(SPLIT_PLACEHOLDER, split or "") for path in _paths(data_config)
    )
    if tsv:
        pairs = []
        for number, line in enumerate(_read_lines(tsv, "data.parallel_tsv"), start=1):
            if not line.strip():
                continue
            columns = line.split("\t")
            if len(columns) != 2:
                raise ValueError(
                    f"data.parallel_tsv={tsv!r} line {number} has {len(columns)} tab-separated"
                    " columns; each line must be source<TAB>target"
                )
            pairs.append((columns[0], columns[1]))
    else:
        sources = _read_lines(source_path, "data.source_file")
        targets = _read_lines(target_path, "data.target_file")
        if len(sources) != len(targets):
            raise ValueError(
                f"data.source_file={source_path!r} has {len(sources)} lines but "
                f"data.target_file={target_path!r} has {len(targets)}; line-aligned files must"
                " have equal line counts"
            )
        pairs = list(zip(sources, targets))
    return [(s, t) for s, t in pairs if s.strip() and t.strip()]


def fingerprint_files(data_config, splits: Sequence[str]) -> str:
    """A SHA-256 over the configured files' bytes (each split's when ``{split}`` is used)."""
    digest = hashlib.sha256()
    names = splits if has_own_splits(data_config) else ("",)
    for name in names:
        for path in _paths(data_config):
            if path:
                path = os.path.expanduser(path.replace(SPLIT_PLACEHOLDER, name))
                digest.update(path.encode() + b"\0")
                try:
                    with open(path, "rb") as file:
                        digest.update(file.read())
                except OSError:
                    digest.update(b"<missing>")
    return digest.hexdigest()


def split_pairs(
    data_config, split: str, validation_fraction: float, test_fraction: float
) -> list[dict[str, bytes]]:
    """The ``split``'s examples as ``{"source": bytes, "target": bytes}``, in file order."""
    if has_own_splits(data_config):
        pairs = read_pairs(data_config, split)
    else:
        if split not in SPLITS:
            raise ValueError(
                f"split for data.corpus='parallel_files' must be one of {SPLITS} (or put "
                f"{SPLIT_PLACEHOLDER} in the file names), got {split!r}"
            )
        everything = read_pairs(data_config)
        assigned = assign_splits(everything, validation_fraction, test_fraction)
        pairs = [pair for pair, name in zip(everything, assigned) if name == split]
    if not pairs:
        raise ValueError(
            f"data.corpus='parallel_files' has no pairs in split {split!r}; give more lines or"
            " raise data.validation_fraction / data.test_fraction"
        )
    return [{"source": s.encode("utf-8"), "target": t.encode("utf-8")} for s, t in pairs]
