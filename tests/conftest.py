"""Settings for the whole test session."""

import os
import tempfile

import pytest


@pytest.fixture(autouse=True, scope="session")
def temporary_files_under_pytest_root(tmp_path_factory):
    """Points ``tempfile`` (and, through TMPDIR, every subprocess) at pytest's own temp root.

    TFDS leaves one empty ``mkdtemp("tfds")`` directory behind each time a builder is made for
    a dataset that is not prepared yet (``DatasetInfo.initialize_from_bucket``): ~20 per run of
    the data tests. Under pytest's root they are pruned with it instead of piling up in /tmp.
    """
    root = str(tmp_path_factory.mktemp("tempfile"))
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = root, root
    yield
    tempfile.tempdir = saved_tempdir
    if saved_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved_env
