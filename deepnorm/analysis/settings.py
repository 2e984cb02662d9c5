"""The ``analysis`` block of a config (configs/analysis/*.py), checked and typed.

Lists are comma-separated strings on the command line (``--config.analysis.depths=6,12``);
here they become lists, and a bad value raises ``ConfigError`` with one line naming the field,
the value and what is allowed. Every value is checked before anything is compiled.
"""

from __future__ import annotations

from deepnorm.analysis import schemes as schemes_lib
from deepnorm.config import ConfigError

# The fields each command's analysis block has (configs/analysis/<command>.py).
FIELDS = {
    "grad-norms": ("out", "residuals", "depths", "seeds", "batches", "batch_size", "seq_len",
                   "train_steps", "plot_params"),
    "update-norms": ("out", "residuals", "depths", "seeds", "batches", "batch_size", "seq_len",
                     "steps"),
    "stability-map": ("out", "residuals", "depths", "lrs", "warmups", "steps", "seeds",
                      "batch_size", "seq_len", "max_loss", "workers"),
    "depth-sweep": ("out", "residuals", "depths", "dtypes", "float16_max_depth", "lrs",
                    "warmups", "steps", "seeds", "batch_size", "seq_len", "max_loss", "workers"),
    "signal-prop": ("out", "residuals", "depths", "seeds", "batch_size", "seq_len"),
    "gns": ("out", "residuals", "depths", "seeds", "batches", "batch_size", "seq_len",
            "train_batches", "steps", "checkpoints"),
}
# The projection groups grad-norms records (deepnorm.analysis.grad_norms.group_name).
PARAM_GROUPS = ("ffn_in", "ffn_out") + tuple(
    f"{attn}.{role}" for attn in ("self_attn", "cross_attn")
    for role in ("query", "key", "value", "out"))
# depth-sweep's precisions: float32, and float16 matmuls with dynamic loss scaling.
DTYPES = ("float32", "float16")
POSITIVE = ("seeds", "batches", "batch_size", "seq_len", "steps", "workers", "train_batches")


def _items(name, text):
    items = [v.strip() for v in str(text).split(",") if v.strip()]
    if not items:
        raise ConfigError(f"analysis.{name}={text!r} is empty; give a comma-separated list")
    return items


def _int_list(name, text, minimum):
    try:
        values = [int(v) for v in _items(name, text)]
    except ValueError:
        raise ConfigError(f"analysis.{name}={text!r} is not a comma-separated list of "
                          "integers") from None
    if any(v < minimum for v in values):
        what = "a positive integer" if minimum == 1 else "an integer >= 0"
        raise ConfigError(f"analysis.{name}={text!r}: every value must be {what}")
    return values


def _positive_floats(name, text):
    try:
        values = [float(v) for v in _items(name, text)]
    except ValueError:
        raise ConfigError(f"analysis.{name}={text!r} is not a comma-separated list of "
                          "numbers") from None
    if any(not v > 0 for v in values):
        raise ConfigError(f"analysis.{name}={text!r}: every value must be positive")
    return values


def parse(command: str, analysis) -> dict:
    """``analysis`` (a ConfigDict) as a dict of checked values for ``command``."""
    missing = [f for f in FIELDS[command] if f not in analysis]
    if missing:
        raise ConfigError(f"the config's analysis block has no {', '.join(missing)}: it is "
                          f"not a {command} config (use configs/analysis/"
                          f"{command.replace('-', '_')}.py)")
    values = {name: analysis[name] for name in FIELDS[command]}
    if not values["out"]:
        raise ConfigError("analysis.out is empty; give the output directory, "
                          "--config.analysis.out=DIR")
    try:
        values["residuals"] = list(schemes_lib.check_schemes(_items("residuals",
                                                                    values["residuals"])))
    except ConfigError as error:
        raise ConfigError(f"analysis.residuals: {error}") from None
    values["depths"] = _int_list("depths", values["depths"], minimum=1)
    for name in POSITIVE:
        if name in values and values[name] < 1:
            raise ConfigError(f"analysis.{name}={values[name]} must be a positive integer")
    if "train_steps" in values and values["train_steps"] < 0:
        raise ConfigError(f"analysis.train_steps={values['train_steps']} must be 0 or more")
    if "plot_params" in values:
        values["plot_params"] = _items("plot_params", values["plot_params"])
        for name in values["plot_params"]:
            if name not in PARAM_GROUPS:
                raise ConfigError(f"analysis.plot_params: {name!r} is not one of "
                                  f"{', '.join(PARAM_GROUPS)}")
    if command == "gns":
        _check_gns(values)
    if command == "depth-sweep":
        values["dtypes"] = _items("dtypes", values["dtypes"])
        for name in values["dtypes"]:
            if name not in DTYPES:
                raise ConfigError(f"analysis.dtypes: {name!r} is not one of {', '.join(DTYPES)}")
        if values["float16_max_depth"] < 0:
            raise ConfigError(f"analysis.float16_max_depth={values['float16_max_depth']} must "
                              "be 0 (no cap) or a positive depth")
    if command in ("stability-map", "depth-sweep"):
        values["lrs"] = _positive_floats("lrs", values["lrs"])
        values["warmups"] = _int_list("warmups", values["warmups"], minimum=0)
        if not values["max_loss"] > 0:
            raise ConfigError(f"analysis.max_loss={values['max_loss']} must be positive")
    return values


def _check_gns(values: dict) -> None:
    """gns: per-example against batch needs B >= 2; checkpoints within the run; schemes
    with norm parameters to measure."""
    if values["batch_size"] < 2:
        raise ConfigError(f"analysis.batch_size={values['batch_size']}: the noise scale "
                          "compares batch sizes 1 and B, so B must be at least 2")
    values["checkpoints"] = sorted(set(_int_list("checkpoints", values["checkpoints"],
                                                 minimum=0)))
    if values["checkpoints"][-1] > values["steps"]:
        raise ConfigError(f"analysis.checkpoints: step {values['checkpoints'][-1]} is after "
                          f"the run's last, analysis.steps={values['steps']}")
    for name in values["residuals"]:
        if schemes_lib.PRESETS[name].get("norm") == "none":
            raise ConfigError(f"analysis.residuals: {name!r} has no norm layers to measure; "
                              "choose schemes with norms")
