"""Bad input anywhere: one line naming the problem and the fix, exit code 2, nothing written.

One test per row. Most rows call ``train_and_evaluate`` in this process (what ``train.py``
runs once the flags parse; it turns the ``ConfigError`` into ``train.py: error: <line>`` and
exit code 2, checked by the subprocess rows below and in test_train_cli.py). Every row also
checks that the workdir was not created: a failed start must leave nothing a later run could
mistake for a run to resume.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for `configs`
from configs import decoder_lm  # noqa: E402

from deepnorm.config import ConfigError  # noqa: E402
from deepnorm.training.loop import train_and_evaluate  # noqa: E402


def tiny_config():
    config = decoder_lm.get_config("quick")
    config.model.update(d_model=16, d_ff=32)
    config.train.update(num_steps=2, batch_size=4, seq_len=16, progress_bar=False)
    return config


# (id, {dotted key: value}, text the one-line error must contain)
BAD_VALUES = [
    ("zero_steps", {"train.num_steps": 0}, "train.num_steps=0 must be a positive integer"),
    ("negative_batch", {"train.batch_size": -4}, "train.batch_size=-4 must be a positive"),
    ("keep_no_checkpoints", {"train.keep_checkpoints": 0}, "train.keep_checkpoints=0"),
    ("unknown_policy", {"train.on_nonfinite": "ignore"}, "is not one of stop, skip"),
    ("gns_one_example", {"train.gns": True, "train.batch_size": 1},
     "train.gns=True needs train.batch_size >= 2 (got 1)"),
    ("gns_without_norms", {"train.gns": True, "model.residual": "rezero", "model.norm": "none"},
     "train.gns=True needs norm parameters, and model.norm='none' with model.residual='rezero'"),
    ("zero_learning_rate", {"optimizer.learning_rate": 0.0}, "optimizer.learning_rate=0.0"),
    ("beta2_of_one", {"optimizer.b2": 1.0}, "optimizer.b2=1.0 must be in [0, 1)"),
    ("negative_warmup", {"optimizer.warmup_steps": -1}, "optimizer.warmup_steps=-1"),
    ("unknown_schedule", {"optimizer.schedule": "linear"}, "optimizer.schedule='linear'"),
    ("heads_do_not_divide_width", {"model.num_heads": 3}, "num_heads"),
    ("vocab_too_small", {"model.vocab_size": 100}, "model.vocab_size=100"),
    ("fixup_with_a_norm", {"model.residual": "fixup"},
     "model.residual='fixup' uses no normalization but model.norm='layernorm'"),
    ("skip_lambda_negative", {"model.residual": "rescaled", "model.skip_lambda": -1.0},
     "model.skip_lambda=-1.0 must be positive"),
    ("mesh_needs_more_devices", {"mesh.data": 2}, "needs 2 devices but 1 are available"),
    ("two_fill_mesh_axes", {"mesh.fsdp": -1}, "at most one may be -1"),
    ("unknown_sharding_axis", {"mesh.rules.mlp": "pipeline"}, "mesh.rules.mlp='pipeline'"),
    ("unknown_corpus", {"data.corpus": "wikipedia"}, "data.corpus must be one of"),
    ("empty_corpus_glob", {"data.corpus": "text_files", "data.text_files": ""},
     "data.text_files glob '' matches no files"),
    ("missing_corpus_files", {"data.corpus": "text_files",
                              "data.text_files": "/nonexistent/corpus/*.txt"},
     "glob '/nonexistent/corpus/*.txt' matches no files; give a glob of text files"),
    ("tfds_without_a_name", {"data.corpus": "tfds", "data.tfds_name": ""},
     "needs data.tfds_name"),
    ("unknown_tfds_name", {"data.corpus": "tfds", "data.tfds_name": "no_such_dataset_xyz"},
     "data.tfds_name 'no_such_dataset_xyz' is not a known TFDS dataset"),
    ("impossible_mask_rate", {"data.mask_rate": 1.5}, "data.mask_rate must lie in (0, 1)"),
    ("sequence_too_short", {"train.seq_len": 1}, "seq_len"),
    ("unknown_diagnostic_group", {"train.diagnostic_groups": "norms,attn"},
     "train.diagnostic_groups='norms,attn': attn not known; use all, none or a comma list of "
     "norms, attention"),
    ("negative_z_loss", {"optimizer.z_loss": -1e-4},
     "optimizer.z_loss=-0.0001 must be a number >= 0"),
    ("unknown_spike_policy", {"train.on_spike": "ignore"},
     "train.on_spike='ignore' is not one of stop, continue, rewind"),
    ("spike_factor_of_one", {"train.spike_factor": 1.0},
     "train.spike_factor=1.0 must be a number > 1"),
    ("empty_spike_window", {"train.spike_window": 0},
     "train.spike_window=0 must be a positive integer"),
    ("negative_forensics_steps", {"train.forensics_steps": -1},
     "train.forensics_steps=-1 must be a positive integer"),
    ("rewind_skipping_nothing", {"train.rewind_skip_batches": 0},
     "train.rewind_skip_batches=0 must be a positive integer"),
    ("negative_max_rewinds", {"train.max_rewinds": -1},
     "train.max_rewinds=-1 must be an integer >= 0"),
]


def apply(config, overrides):
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def assert_one_line(err: ConfigError, expected: str):
    message = str(err)
    assert "\n" not in message and expected in message, message


@pytest.mark.parametrize("name,overrides,expected", BAD_VALUES, ids=[r[0] for r in BAD_VALUES])
def test_bad_value_is_one_line_and_creates_nothing(name, overrides, expected, tmp_path):
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        train_and_evaluate(apply(tiny_config(), overrides), str(workdir))
    assert_one_line(err.value, expected)
    assert not workdir.exists()


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "run"
    path.write_text("not a directory")
    with pytest.raises(ConfigError) as err:
        train_and_evaluate(tiny_config(), str(path))
    assert_one_line(err.value, f"--workdir={path} is a file, not a directory")
    assert path.read_text() == "not a directory"


def test_workdir_below_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError) as err:
        train_and_evaluate(tiny_config(), str(blocker / "run"))
    assert_one_line(err.value, f"cannot be created: {blocker} is a file, not a directory")
    assert os.listdir(tmp_path) == ["file"]


def test_unwritable_workdir(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere permissions say it may not
        parent = "/proc"  # a file system nobody can create directories in
    else:
        parent = tmp_path / "read_only"
        parent.mkdir()
        parent.chmod(0o500)
    with pytest.raises(ConfigError) as err:
        train_and_evaluate(tiny_config(), os.path.join(parent, "deepnorm_run"))
    assert_one_line(err.value, "is not writable")
    assert not os.path.exists(os.path.join(parent, "deepnorm_run"))


def train_py(*args, env=None):
    return subprocess.run([sys.executable, "train.py", "--config=configs/decoder_lm.py:quick",
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=None if env is None else {**os.environ, **env})


def assert_exit_2(result, expected):
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: ") and expected in last, last
    assert "Traceback" not in result.stderr


def test_cli_batch_the_mesh_cannot_split(tmp_path):
    """6 examples over 8 simulated data-parallel devices."""
    result = train_py("--config.train.batch_size=6", f"--workdir={tmp_path / 'run'}",
                      env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert_exit_2(result, "train.batch_size=6 does not split over the 8 data x fsdp devices; "
                          "use a multiple of 8")
    assert not (tmp_path / "run").exists()


def test_cli_missing_corpus_exits_2(tmp_path):
    result = train_py("--config.data.corpus=text_files",
                      f"--config.data.text_files={tmp_path}/none/*.txt",
                      f"--workdir={tmp_path / 'run'}")
    assert_exit_2(result, "matches no files")
    assert not (tmp_path / "run").exists()


def test_analysis_cli_bad_value_exits_2(tmp_path):
    """The analysis CLI reads configs as train.py does and fails the same way."""
    out = tmp_path / "analysis"
    result = subprocess.run(
        [sys.executable, "-m", "deepnorm.analysis", "grad-norms", f"--config.analysis.out={out}",
         "--config.analysis.depths=6,0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "python -m deepnorm.analysis: error: analysis.depths='6,0': every value must be a "
        "positive integer")
    assert "Traceback" not in result.stderr
    assert not out.exists()
