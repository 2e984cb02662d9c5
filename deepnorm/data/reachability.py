"""Tells, in seconds, that a TFDS download cannot start because none of its hosts answer.

Why this exists: TFDS's downloader (tensorflow-datasets 4.9.x, ``core/download/downloader.py``)
opens every URL through a ``requests`` session with ``Retry(total=10, backoff_factor=0.2)``,
so on a machine without network ``download_and_prepare`` gives up only after the backoff
sleeps add up, about 3.5 minutes. No ``DownloadConfig`` field or other public setting changes
that (the retry count is a private module constant), and lowering it would also make real
downloads less tolerant of a flaky server. So instead of touching TFDS, ``offline_reason``
tries one TCP connection to each host the dataset downloads from, all at once, before
``download_and_prepare`` runs, and reports a problem only when none of them answers.

It never blocks a download that could work:

* it is skipped when the dataset directory already exists (TFDS then reuses it and never
  downloads), when some of the dataset's files are already downloaded (in ``<data dir>/downloads``
  or its ``manual`` folder: TFDS may prepare from those offline), when ``download_and_prepare``
  is not TFDS's own (``tfds.testing.mock_data`` or a builder overriding it), and when TFDS does
  not list the dataset's URLs (no ``checksums.tsv`` next to its code);
* any one host answering is enough: ``checksums.tsv`` lists the URLs of every config of a
  dataset, so a dead host may well be one this config does not need;
* with ``http_proxy`` / ``https_proxy`` / ``ftp_proxy`` / ``all_proxy`` set (and the host not
  in ``no_proxy``), the proxy is probed instead of the host, since requests and urllib go
  through it. GCS needs no probe: ``tfds_builder`` passes ``try_download_gcs=False`` and TFDS
  4.9 keeps its GCS bucket disabled (``gcs_utils._is_gcs_disabled``).
"""

from __future__ import annotations

import inspect
import json
import queue
import socket
import threading
import time
import urllib.parse
import urllib.request
from typing import Iterable, Sequence

import tensorflow_datasets as tfds

# Connect timeout for each probe and the wait for all of them together: long enough for a
# slow but working route (a TCP handshake takes well under a second almost everywhere),
# short next to the ~3.5 minutes TFDS's retries take.
PROBE_TIMEOUT_S = 4.0

_DEFAULT_PORTS = {"http": 80, "https": 443, "ftp": 21}

# TFDS's own method, taken when this module is imported (before any test enters
# tfds.testing.mock_data): a builder whose download_and_prepare is something else does not
# run TFDS's downloader, so there is nothing to probe for. Looked up statically because
# TFDS wraps it in a logging descriptor that hands out a new object on every attribute access.
_TFDS_DOWNLOAD_AND_PREPARE = inspect.getattr_static(
    tfds.core.DatasetBuilder, "download_and_prepare")


def can_connect(host: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds.

    Module-level so tests can replace it to simulate a machine with or without network.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:  # DNS failure, refused, unreachable network, timeout
        return False


def any_reachable(targets: Sequence[tuple[str, int]], timeout: float) -> bool:
    """Probes every ``(host, port)`` at once; True as soon as one connects.

    Each probe runs in a daemon thread and the wait is capped at ``timeout`` overall, because
    name resolution inside ``socket.create_connection`` ignores the connect timeout and can
    hang on a machine whose resolver is unreachable.
    """
    results: queue.Queue[bool] = queue.Queue()

    def probe(host: str, port: int) -> None:
        try:
            results.put(can_connect(host, port, timeout))
        except Exception:  # noqa: BLE001 - a broken probe counts as "no answer", not a crash
            results.put(False)

    for host, port in targets:
        threading.Thread(target=probe, args=(host, port), daemon=True,
                         name=f"tfds-probe-{host}").start()
    deadline = time.monotonic() + timeout
    for _ in targets:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            if results.get(timeout=remaining):
                return True
        except queue.Empty:
            return False
    return False


def probe_targets(urls: Iterable[str]) -> list[tuple[str, int]]:
    """The distinct ``(host, port)`` pairs a download of ``urls`` connects to first.

    Only http(s) and ftp URLs: anything else (``gs://``, a local path) is copied by TFDS
    through its file-system layer, which this probe cannot speak for.
    """
    proxies = urllib.request.getproxies()  # the same environment variables requests reads
    targets: dict[tuple[str, int], None] = {}
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            continue
        proxy = proxies.get(parts.scheme) or proxies.get("all")
        if proxy and not urllib.request.proxy_bypass(parts.hostname):
            proxy_parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            if proxy_parts.hostname:
                port = proxy_parts.port or _DEFAULT_PORTS.get(proxy_parts.scheme, 80)
                targets[(proxy_parts.hostname, port)] = None
                continue
        targets[(parts.hostname, parts.port or _DEFAULT_PORTS[parts.scheme])] = None
    return list(targets)


def _url_infos(builder: tfds.core.DatasetBuilder) -> dict:
    """The dataset's ``{url: UrlInfo}`` from its ``checksums.tsv``; empty when TFDS has none."""
    try:
        return dict(type(builder).url_infos or {})
    except Exception:  # noqa: BLE001 - unknown URLs mean "do not probe", never a failure
        return {}


def _has_cached_download(builder: tfds.core.DatasetBuilder, url_infos: dict) -> bool:
    """Whether any of the dataset's files already lies where TFDS's DownloadManager looks.

    TFDS downloads into ``<data dir root>/downloads`` (``downloads/<dataset>/`` since 4.x,
    directly in ``downloads/`` before), writing a ``<file>.INFO`` JSON with the ``urls`` it
    came from next to each file, and takes ``downloads/manual/<filename>`` instead of a
    download when it exists.
    """
    downloads = builder.data_dir_root / "downloads"
    try:
        if not downloads.exists():
            return False
        manual = downloads / "manual"
        for info in url_infos.values():
            if getattr(info, "filename", None) and (manual / info.filename).exists():
                return True
        wanted = set(url_infos)
        for info_file in [*downloads.glob("*.INFO"), *downloads.glob("*/*.INFO")]:
            try:
                listed = json.loads(info_file.read_text()).get("urls", [])
            except (OSError, ValueError, AttributeError):
                continue
            if wanted.intersection(listed):
                return True
    except OSError:  # an unreadable cache: let TFDS decide what it can use
        return True
    return False


def offline_reason(builder: tfds.core.DatasetBuilder,
                   timeout: float | None = None) -> str | None:
    """Why ``builder.download_and_prepare`` cannot download now, or None if it may go ahead.

    A string only when TFDS would download (not prepared, nothing cached, its own downloader)
    and no host of the dataset's URLs, or the proxy in front of them, accepts a connection.
    """
    timeout = PROBE_TIMEOUT_S if timeout is None else timeout
    method = inspect.getattr_static(type(builder), "download_and_prepare", None)
    if method is not _TFDS_DOWNLOAD_AND_PREPARE:
        return None
    if builder.data_path.exists():  # download_and_prepare's own test for "reuse, no download"
        return None
    url_infos = _url_infos(builder)
    targets = probe_targets(url_infos)
    if not targets or _has_cached_download(builder, url_infos):
        return None
    if any_reachable(targets, timeout):
        return None
    hosts = ", ".join(f"{host}:{port}" for host, port in targets[:3])
    more = f" and {len(targets) - 3} more" if len(targets) > 3 else ""
    noun = "host" if len(targets) == 1 else "hosts"
    return f"its download {noun} {hosts}{more} accepted no connection within {timeout:g} s"
