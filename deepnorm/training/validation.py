"""Up-front checks of a run's inputs that the config types alone cannot catch.

``train_and_evaluate`` validates everything before it creates anything in the workdir, so a
bad value never leaves a half-made workdir that a later run would try to resume from. The
order there is: model and ``train.*`` values, then ``check_workdir`` and ``check_data``
(here), the mesh and the batch split, the optimizer, the data iterators; only then is the
workdir created. Each failure is one ``ConfigError`` line naming the value and the fix;
``train.py`` prints it and exits with code 2.

``changed_config_keys`` is for resuming: it names the model / optimizer keys that differ from
the ``config.json`` the workdir's previous run wrote, which is what a user needs to see when a
checkpoint no longer fits the model (see ``Checkpointer.restore_latest``).
"""

from __future__ import annotations

import json
import os
import tempfile

from deepnorm.config import ConfigError

# Sections whose keys decide the shapes and structure of the train state.
STATE_SECTIONS = ("model", "optimizer")


def check_gns(train, model_cfg) -> None:
    """``train.gns``: a bool, a batch of at least two examples, and norm parameters to probe
    (``deepnorm.norm_probes``; the model is built abstractly, no FLOPs)."""
    if not isinstance(train.gns, bool):
        raise ConfigError(f"train.gns={train.gns!r} must be True or False")
    if not train.gns:
        return
    if train.batch_size < 2:
        raise ConfigError(f"train.gns=True needs train.batch_size >= 2 (got "
                          f"{train.batch_size}): the noise scale compares batch sizes 1 and B")
    from flax import nnx

    from deepnorm import norm_probes
    from deepnorm.transformer import Transformer

    model = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    if not norm_probes.norm_modules(model):
        raise ConfigError(f"train.gns=True needs norm parameters, and model.norm="
                          f"{model_cfg.norm!r} with model.residual={model_cfg.residual!r} has "
                          "none; set train.gns=False")


def check_workdir(workdir: str) -> str:
    """The absolute workdir, after checking it is (or can become) a writable directory.

    Creates nothing that stays: writability is probed with a temporary directory inside the
    deepest existing ancestor (``os.access`` alone says yes to root on any directory).
    """
    if not workdir:
        raise ConfigError("--workdir is empty; give a directory for checkpoints and metrics")
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir={workdir} is a file, not a directory; choose another path")
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"--workdir={workdir} cannot be created: {ancestor} is a file, not a "
                          "directory; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".deepnorm-write-test-", dir=ancestor))
    except OSError as err:
        raise ConfigError(f"--workdir={workdir} is not writable ({ancestor}: {err.strerror}); "
                          "choose a directory you can write to") from err
    return path


def check_data(data_config) -> None:
    """The corpus exists: a glob that matches files, a TFDS dataset that is known and can be
    prepared (downloaded where the machine has a network; offline it must already be in
    ``data.data_dir``)."""
    from deepnorm.data import corpus  # imports tensorflow_datasets: only when validating

    try:
        if data_config.corpus == "text_files":
            corpus.corpus_config(data_config)  # expands the glob, fails if it matches nothing
        elif data_config.corpus == "tfds":
            corpus.text_keys(data_config)
            corpus.tfds_builder(data_config)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"data: {str(err).splitlines()[0]}") from err


def flat_keys(tree: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: configs compared key by key."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_config_keys(workdir: str, config) -> list[str]:
    """``["model.d_model: 16 -> 32", ...]``: the model / optimizer keys whose value differs
    from the workdir's ``config.json`` (empty when there is none)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            previous = flat_keys(json.load(f))
    except (OSError, ValueError):
        return []
    now = flat_keys(json.loads(json.dumps(config.to_dict())))
    keys = sorted(k for k in set(previous) | set(now)
                  if k.split(".")[0] in STATE_SECTIONS and previous.get(k) != now.get(k))
    return [f"{k}: {previous.get(k)!r} -> {now.get(k)!r}" for k in keys]
