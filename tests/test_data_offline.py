"""An unprepared TFDS dataset on a machine without network fails in seconds, with one line.

Every test replaces ``reachability.can_connect`` (the one place that opens sockets), so the
same results hold on a machine with network: nothing here downloads lm1b's 1.8 GB.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import tensorflow_datasets as tfds

from deepnorm import data
from deepnorm.data import corpus, reachability
from test_data import _tfds_config  # pytest's default import mode puts tests/ on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LM1B_HOST = ("www.statmt.org", 80)  # lm1b's checksums.tsv: one http URL on this host
LM1B_URL = next(iter(tfds.builder_cls("lm1b").url_infos))


def _lm1b_config(tmp_path):
    return _tfds_config(tmp_path, "lm1b", "text")


@pytest.fixture
def no_proxy_env(monkeypatch):
    """No proxy variables from the machine running the tests."""
    for name in ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def probes(monkeypatch, no_proxy_env):
    """Replaces the socket probe; calling it returns the list of (host, port) probed."""
    calls = []

    def install(answer):
        def fake(host, port, timeout):
            calls.append((host, port))
            return answer(host, port, timeout) if callable(answer) else answer
        monkeypatch.setattr(reachability, "can_connect", fake)
        return calls

    return install


def test_offline_lm1b_fails_fast_with_one_line_naming_dataset_and_fix(tmp_path, probes):
    calls = probes(False)
    start = time.monotonic()
    with pytest.raises(corpus.TFDSOfflineError) as err:
        data.load_source(_lm1b_config(tmp_path), "train")
    elapsed = time.monotonic() - start
    message = str(err.value)
    assert elapsed < 10, elapsed
    assert isinstance(err.value, ValueError)  # the trainer's ConfigError path: exit code 2
    assert "\n" not in message, message
    for part in ("'lm1b'", "www.statmt.org:80", "machine with network", "data.data_dir",
                 str(tmp_path)):
        assert part in message, (part, message)
    assert calls == [LM1B_HOST]
    assert not (tmp_path / "lm1b").exists()  # TFDS's download_and_prepare never started


def test_a_probe_that_hangs_is_cut_at_the_timeout(tmp_path, probes, monkeypatch):
    """A resolver that never answers: socket's connect timeout does not cover DNS."""
    probes(lambda host, port, timeout: time.sleep(30))
    monkeypatch.setattr(reachability, "PROBE_TIMEOUT_S", 0.3)
    start = time.monotonic()
    with pytest.raises(corpus.TFDSOfflineError, match="accepted no connection within 0.3 s"):
        corpus.tfds_builder(_lm1b_config(tmp_path))
    assert time.monotonic() - start < 5


def test_reachable_host_lets_tfds_download(tmp_path, probes, monkeypatch):
    """Online: the probe says yes and tfds_builder goes on to TFDS's download, unchanged."""
    calls = probes(True)
    prepared = []
    monkeypatch.setattr(corpus, "_prepare", prepared.append)  # stands in for 1.8 GB
    builder = corpus.tfds_builder(_lm1b_config(tmp_path))
    assert calls == [LM1B_HOST] and prepared == [builder]


def test_one_answering_host_is_enough(probes):
    """checksums.tsv lists every config's URLs: a dead host may be one this config skips."""
    probes(lambda host, port, timeout: host == "up.example")
    assert reachability.any_reachable([("down.example", 80), ("up.example", 443)], 2.0)
    assert not reachability.any_reachable([("down.example", 80)], 2.0)


def test_mocked_dataset_is_not_probed(tmp_path, probes):
    calls = probes(False)  # a probe would find no network and fail the load
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        source = data.load_source(_lm1b_config(tmp_path), "train")
        assert len(source) == 4
    assert calls == []


def test_prepared_dataset_is_not_probed(tmp_path, probes):
    """The directory download_and_prepare checks to reuse a build instead of downloading."""
    calls = probes(False)
    builder = tfds.builder("lm1b", data_dir=str(tmp_path), file_format="array_record")
    builder.data_path.mkdir(parents=True)
    assert reachability.offline_reason(builder) is None
    assert calls == []


@pytest.mark.parametrize("where", ["downloads/lm1b", "downloads"])
def test_downloaded_but_unprepared_dataset_is_not_probed(tmp_path, probes, where):
    """TFDS prepares from its download cache without network (new and pre-4.x layouts)."""
    calls = probes(False)
    cache = tmp_path / where
    cache.mkdir(parents=True)
    (cache / "archive.tar.gz.INFO").write_text(json.dumps({"urls": [LM1B_URL]}))
    builder = tfds.builder("lm1b", data_dir=str(tmp_path), file_format="array_record")
    assert reachability.offline_reason(builder) is None
    assert calls == []


def test_manually_downloaded_file_is_not_probed(tmp_path, probes):
    calls = probes(False)
    filename = tfds.builder_cls("lm1b").url_infos[LM1B_URL].filename
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / filename).write_bytes(b"")
    builder = tfds.builder("lm1b", data_dir=str(tmp_path), file_format="array_record")
    assert reachability.offline_reason(builder) is None
    assert calls == []


def test_a_proxy_is_probed_instead_of_the_host(monkeypatch, no_proxy_env):
    """requests and urllib connect to the proxy, so the proxy is what must answer."""
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    monkeypatch.setenv("no_proxy", "local.example")
    urls = ["http://www.statmt.org/a.tgz", "http://local.example/b", "https://x.example/c",
            "gs://bucket/d", "ftp://files.example:2121/e", "http://www.statmt.org/f.tgz"]
    assert reachability.probe_targets(urls) == [
        ("proxy.example", 3128), ("local.example", 80), ("x.example", 443),
        ("files.example", 2121)]


def test_trainer_reports_offline_dataset_as_one_config_error_line(tmp_path, probes):
    """What train.py turns into `train.py: error: <line>` and exit code 2."""
    sys.path.insert(0, ROOT)  # for `configs`
    from configs import decoder_lm

    from deepnorm.config import ConfigError
    from deepnorm.training.loop import train_and_evaluate

    probes(False)
    config = decoder_lm.get_config("quick")
    config.model.update(d_model=16, d_ff=32)
    config.train.update(num_steps=2, batch_size=4, seq_len=16, progress_bar=False)
    config.data.update(corpus="tfds", tfds_name="lm1b", data_dir=str(tmp_path / "tfds"))
    workdir = tmp_path / "run"
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        train_and_evaluate(config, str(workdir))
    assert time.monotonic() - start < 30  # model setup included; the probe itself is instant
    message = str(err.value)
    assert "\n" not in message and message.startswith("data") and "dataset 'lm1b'" in message
    assert "machine with network" in message
    assert not workdir.exists()
