"""Loading an experiment config (``configs/*.py`` with ``get_config()``) and ``--config.*``
overrides, so the analysis measures exactly the model that training builds."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys

from ml_collections import config_dict


class ConfigFileError(ValueError):
    """A config file or override that cannot be used; the message says which and why."""


def load_config(path: str) -> config_dict.ConfigDict:
    """Runs ``path``'s ``get_config()``; ``path:arg`` passes ``arg`` (as config_flags does)."""
    file, _, arg = str(path).partition(":")
    if not pathlib.Path(file).is_file():
        raise ConfigFileError(f"--config={file!r} is not a file")
    # configs/*.py import their shared base as ``from configs import base``: make the
    # directory holding configs/ importable, as running from the repository root does.
    root = str(pathlib.Path(file).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_analysis_config_{pathlib.Path(file).stem}",
                                                  file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigFileError(f"--config={file!r} defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    if "model" not in config:
        raise ConfigFileError(f"--config={file!r}: get_config() has no 'model' block")
    return config


def apply_override(config: config_dict.ConfigDict, assignment: str) -> None:
    """Applies ``model.d_model=64`` to ``config`` in place, parsing the value as the type the
    field already has (strings stay strings; numbers, booleans and None are literals)."""
    key, sep, text = assignment.partition("=")
    if not sep:
        raise ConfigFileError(f"--config.{assignment}: expected --config.KEY=VALUE")
    parts = key.split(".")
    node = config
    for i, part in enumerate(parts):
        if not isinstance(node, config_dict.ConfigDict) or part not in node:
            raise ConfigFileError(
                f"--config.{key}: config has no field {'.'.join(parts[:i + 1])!r}")
        if i < len(parts) - 1:
            node = node[part]
    old = node[parts[-1]]
    if isinstance(old, str):
        value = text
    else:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
    try:
        node[parts[-1]] = value
    except TypeError as error:
        raise ConfigFileError(f"--config.{key}={text!r}: {error}") from None
