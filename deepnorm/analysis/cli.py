"""``python -m deepnorm.analysis COMMAND [--config=FILE[:EXPERIMENT]] [--config.KEY=VALUE ...]``.

Commands (each writes OUT/<command>.json, OUT/<command>.png and OUT/<command>.meta.json):

``grad-norms``     Xiong et al. 2020 Fig. 3: expected gradient norm per layer at init.
``update-norms``   DeepNet Fig. 4-5: ||F(x, theta_t) - F(x, theta_0)|| over early training.
``stability-map``  residual x depth x peak lr x warmup: final loss or divergence.
``depth-sweep``    scheme x depth x precision (float32 / float16 with loss scaling) on the
                   byte LM: final loss, divergence and its step (DeepNet Table 1, Fig. 1).
``signal-prop``    per layer at init: token cosine similarity (rank collapse), stream norm
                   growth, branch-to-skip ratio, every scheme, up to 1,000 layers.
``gns``            Gray et al. 2024: the norm layers' gradient noise scale against the whole
                   model's, across schemes and training time.

Configs are read as train.py reads them (absl + ``ml_collections.config_flags``): the default
``--config`` is configs/analysis/<command>.py, whose ``analysis`` block holds the command's
settings (output directory, schemes, depths, seeds, steps, ...; each commented there) next to
the ``model``, ``optimizer`` and ``data`` blocks of training. ``:EXPERIMENT`` measures a
training experiment's model instead (configs/analysis/common.py). For example

    python -m deepnorm.analysis grad-norms --config.analysis.out=runs/xiong \\
        --config.analysis.depths=6,12 --config.model.d_model=64

A bad flag or value exits with code 2 and one line naming it and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import platform
import sys
import time

from absl import flags
from ml_collections import config_flags

from deepnorm.analysis import schemes as schemes_lib
from deepnorm.analysis import settings as settings_lib
from deepnorm.config import ConfigError, TransformerConfig
from deepnorm.training.platform import resolve_model_config

COMMANDS = ("grad-norms", "update-norms", "stability-map", "depth-sweep", "signal-prop",
            "gns")
PROG = "python -m deepnorm.analysis"
REPO = pathlib.Path(__file__).resolve().parents[2]  # holds configs/ (an editable install)
EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """A flag, config file or value that cannot be used; the message is the one line shown."""


def default_config_path(command: str) -> pathlib.Path:
    return REPO / "configs" / "analysis" / f"{command.replace('-', '_')}.py"


def _one_line(err: BaseException) -> str:
    while err.args and isinstance(err.args[0], BaseException):  # config_flags wraps errors
        err = err.args[0]
    lines = [line.strip() for line in str(err.args[0] if err.args else err).splitlines()
             if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # an error inside get_config
        lines = lines[-1:]
    return ". ".join(lines) or type(err).__name__


def load(argv: list[str]):
    """(command, locked ConfigDict) from ``argv`` (without the program name); raises BadInput.

    Each call parses into its own ``FlagValues``, so it can run several times in one process.
    """
    positional = [a for a in argv if not a.startswith("-")]
    if not positional or positional[0] not in COMMANDS:
        got = f"{positional[0]!r} is not a command" if positional else "no command given"
        raise BadInput(f"{got}; COMMAND is one of {', '.join(COMMANDS)}")
    command = positional[0]
    if str(REPO) not in sys.path:  # configs/*.py import their base as ``from configs import``
        sys.path.insert(0, str(REPO))
    for arg in argv:
        if arg.startswith("--config="):
            file = arg[len("--config="):].split(":", 1)[0]
            if not pathlib.Path(file).is_file():
                raise BadInput(f"--config={file!r} is not a file")
    flag_values = flags.FlagValues()
    full_argv = [PROG, *argv]
    try:
        # The default file is parsed (its overrides applied) as the flag is defined.
        holder = config_flags.DEFINE_config_file(
            "config", str(default_config_path(command)),
            "analysis config (configs/analysis/*.py), optionally with ':EXPERIMENT'",
            flag_values=flag_values, lock_config=True, sys_argv=full_argv)
        rest = flag_values(full_argv)
    except (AttributeError, KeyError) as err:  # config_flags: a key the config does not have
        if _one_line(err).startswith("'analysis'"):
            raise BadInput(_no_analysis_block(argv, command)) from None
        raise BadInput(f"unknown config key {_one_line(err)} (all keys: "
                       f"{default_config_path(command).relative_to(REPO)})") from None
    except Exception as err:  # noqa: BLE001 - flags and config_flags raise several kinds
        hint = ""
        if isinstance(err, flags.UnrecognizedFlagError):
            hint = (f"; settings are --config.analysis.KEY=VALUE (all keys: "
                    f"{default_config_path(command).relative_to(REPO)})")
        raise BadInput(_one_line(err) + hint) from None
    if rest[1:] != [command]:
        raise BadInput(f"unexpected arguments {rest[2:]}; settings look like "
                       "--config.analysis.depths=6,12")
    try:
        config = holder.value
        usable = config is not None and "analysis" in config and "model" in config
    except Exception as err:  # noqa: BLE001 - a syntax or import error in the file
        raise BadInput(f"cannot load the --config file: {_one_line(err)}") from None
    if not usable:
        raise BadInput(_no_analysis_block(argv, command))
    return command, config


def _no_analysis_block(argv, command) -> str:
    given = next((a for a in argv if a.startswith("--config=")), "--config")
    return (f"{given} has no 'analysis' block; use "
            f"{default_config_path(command).relative_to(REPO)}[:EXPERIMENT] to measure a "
            "training experiment")


def check(command: str, config) -> tuple[dict, TransformerConfig]:
    """The checked ``analysis`` settings and the base model; every (scheme, depth) model is
    validated here, before anything compiles. Raises ConfigError."""
    values = settings_lib.parse(command, config.analysis)
    # As train.py runs it: the platform's choice for "auto" (deepnorm.training.platform).
    base = resolve_model_config(TransformerConfig.from_mapping(config.model.to_dict()))
    if base.batch_stats:
        # The measurements differentiate and train the params alone, and the stability map
        # vmaps its trainings over learning rates: running statistics would need threading
        # (per lane, in the map) through all of them, which they do not do.
        raise ConfigError(f"model.norm={base.norm!r} keeps running batch statistics, which "
                          f"the analysis commands do not carry; use a per-token norm "
                          f"(layernorm, rmsnorm, scalenorm, dyt) for {command}")
    for depth in values["depths"]:
        for scheme in values["residuals"]:
            schemes_lib.scheme_config(base, scheme, depth)
    if command == "depth-sweep" and base.dtype != "float32":
        raise ConfigError(f"model.dtype={base.dtype!r} is not used by depth-sweep; set the "
                          "precisions with --config.analysis.dtypes=float32,float16")
    _check_optimizer(command, values, config.optimizer)
    return values, base


def _check_optimizer(command: str, values: dict, opt_config) -> None:
    """Builds the optimizer each run will build, so a bad ``optimizer.*`` fails here."""
    from ml_collections import config_dict

    from deepnorm.training.optim import make_optimizer

    if command in ("stability-map", "depth-sweep"):  # every cell sets its own rate and warmup
        for warmup in values["warmups"]:
            make_optimizer(config_dict.ConfigDict(dict(
                opt_config.to_dict(), learning_rate=1.0, warmup_steps=warmup)), values["steps"])
    elif command in ("update-norms", "gns") or values.get("train_steps"):
        make_optimizer(opt_config, values.get("steps") or values["train_steps"])


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_BAD_INPUT)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    try:
        command, config = load(argv)
        values, base = check(command, config)
    except (BadInput, ConfigError) as error:
        return _fail(str(error))
    out = pathlib.Path(values["out"])
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    from deepnorm.analysis import commands  # imports jax; after the cheap checks

    try:
        records = commands.run(command, values, base, config, out)
    except ConfigError as error:  # e.g. a stability map's cells of another setup in ``out``
        return _fail(str(error))
    elapsed = time.perf_counter() - start
    (out / f"{command}.json").write_text(json.dumps(records, indent=0))
    meta = {"command": " ".join([PROG] + argv), "seconds": round(elapsed, 1),
            "base_model": dataclasses.asdict(base), "config": config.to_dict(),
            "machine": platform.machine(), "num_records": len(records)}
    (out / f"{command}.meta.json").write_text(json.dumps(meta, indent=1, default=str))
    print(f"{command}: {len(records)} records in {elapsed:.1f}s -> "
          f"{out / (command + '.json')}, {out / (command + '.png')}")
    return 0
