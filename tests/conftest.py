"""Settings for the whole test session."""

import os
import tempfile

import pytest

# The suite's programs are tiny and each is compiled once, so XLA:CPU's LLVM optimization of
# the generated code costs far more than it saves: at level 0 the suite spends about half the
# CPU time (tests/test_transformer.py, tests/test_training_loop.py: 185 -> 109 and 143 -> 70
# user seconds). It changes how the kernels are compiled, not the HLO or its float semantics
# any test compares. Subprocesses (train.py, workers) inherit it. DEEPNORM_TEST_XLA_OPT=1
# keeps XLA's default.
if os.environ.get("DEEPNORM_TEST_XLA_OPT") != "1":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in _flags:
        os.environ["XLA_FLAGS"] = (_flags + " --xla_backend_optimization_level=0").strip()


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
