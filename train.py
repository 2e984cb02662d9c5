"""Trains a deepnorm Transformer from a config file; all logic is in train_and_evaluate.

    python train.py --config=configs/deepnorm.py --workdir=runs/dn
    python train.py --config=configs/deepnorm.py --config.model.num_encoder_layers=100 \
        --config.optimizer.learning_rate=5e-4 --workdir=runs/dn100
    python train.py --config=configs/deepnorm.py:quick --workdir=/tmp/smoke   # seconds

Running the same command again resumes from the workdir's last checkpoint.
Exit codes: 0 completed, or preempted (SIGTERM / SIGINT) after writing a checkpoint;
2 bad flag, config value, workdir or corpus, or no usable checkpoint (one line on
stderr); 3 diverged. See README, "When things go wrong".
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py), optionally with ':quick'.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, summary.")
EXIT_BAD_INPUT, EXIT_DIVERGED = 2, 3


def _fail(message: str) -> None:
    print(f"train.py: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _parse(argv):
    """absl's parser, but a bad flag is one line and exit code 2 (not a traceback or usage)."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as err:  # config_flags: a key the config does not have
        while err.args and isinstance(err.args[0], BaseException):
            err = err.args[0]
        lines = str(err.args[0] if err.args else err).splitlines()
        text = ". ".join(line.strip() for line in lines if line.strip())
        _fail(f"unknown config key {text} (all keys: configs/base.py)")
    except Exception as err:  # noqa: BLE001 - flags and config_flags raise several kinds
        _fail(" ".join(str(err).split()) or type(err).__name__)


class _QuietLibraries:
    """Drops orbax's per-save INFO chatter (a dozen lines per checkpoint); warnings still pass."""

    def filter(self, record) -> bool:  # levelno is Python's scale (WARNING = 30), not absl's
        return record.levelno >= 30 or "/orbax/" not in record.pathname


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; flags look like --config.train.num_steps=5")
    try:
        config = _CONFIG.value  # a lazy proxy: the file is loaded on first attribute access
        if config is not None:
            config = config.lock()
    except Exception as err:  # noqa: BLE001 - a missing file, a syntax or import error in it
        detail = str(err).strip().splitlines()[-1].strip()
        _fail(f"cannot load the --config file: {detail}")
    if config is None or not _WORKDIR.value:
        _fail("both --config=configs/<experiment>.py and --workdir=<dir> are required")
    from deepnorm.config import ConfigError  # after flag parsing: keeps --help fast
    from deepnorm.training.loop import train_and_evaluate

    logging.set_verbosity(logging.INFO)
    logging.get_absl_logger().addFilter(_QuietLibraries())
    try:
        summary = train_and_evaluate(config, _WORKDIR.value)
    except ConfigError as err:
        _fail(str(err))
    if summary["status"] == "diverged":
        sys.exit(EXIT_DIVERGED)
    if summary["status"] == "preempted":  # checkpointed: exit 0 so a scheduler requeues it
        print(f"train.py: {summary['preempted']}", flush=True)


if __name__ == "__main__":
    # Huge-page malloc (deepnorm/training/hugepages.py) removes XLA:CPU's per-step page faults;
    # glibc reads it only at process start, so DEEPNORM_HUGEPAGES=1 re-executes once (same PID).
    # Off by default: a debugger, srun or an IDE sees the process it started.
    from deepnorm.config import ConfigError
    from deepnorm.training.hugepages import reexec_with_hugepages
    try:
        reexec_with_hugepages()
    except ConfigError as err:
        _fail(str(err))
    app.run(main, flags_parser=_parse)
