"""What the three analysis configs share: the model, optimizer and data blocks, either the
analysis's own (the paper's setup shrunk to a CPU) or those of a training experiment.

``get_config(arg)`` of each analysis config takes the experiment to measure as ``arg``:

    --config=configs/analysis/grad_norms.py              the command's own model
    --config=configs/analysis/grad_norms.py:post_ln      configs/post_ln.py's model, optimizer, data
    --config=configs/analysis/grad_norms.py:post_ln:quick    that experiment's ':quick' variant
    --config=configs/analysis/grad_norms.py:path/to/my_experiment.py

With an experiment, ``analysis.depths`` defaults to the experiment's own depth. The blocks
the analysis does not read (``train``, ``mesh``, ``distributed``) are dropped, so overriding
one fails instead of doing nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib

import ml_collections

from configs import base

UNUSED_BLOCKS = ("train", "mesh", "distributed")


def load_experiment(arg: str) -> ml_collections.ConfigDict:
    """The training config named by ``arg``: ``NAME[:ARG]`` in configs/ or ``PATH.py[:ARG]``."""
    target, _, experiment_arg = arg.partition(":")
    if target.endswith(".py"):
        path = pathlib.Path(target)
        if not path.is_file():
            raise ValueError(f"experiment config {target!r} is not a file")
        spec = importlib.util.spec_from_file_location(f"_experiment_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if not (pathlib.Path(base.__file__).parent / f"{target}.py").is_file():
            raise ValueError(f"experiment {target!r} is not a file in configs/ "
                             "(give NAME of configs/NAME.py or a path ending in .py)")
        module = importlib.import_module(f"configs.{target}")
    return module.get_config(experiment_arg) if experiment_arg else module.get_config()


def depth_of(model: ml_collections.ConfigDict) -> int:
    """Layers per stack: L of an L-L encoder-decoder, else num_layers."""
    return model.num_decoder_layers if model.arch == "encoder_decoder" else model.num_layers


def get_config(*, arg: str | None, model: dict, optimizer: dict,
               analysis: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A locked config: model, optimizer, data, and the command's ``analysis`` block."""
    if arg:
        config = load_experiment(arg)
        config.unlock()
        analysis.depths = str(depth_of(config.model))
        if "max_loss" in analysis:  # the experiment's own divergence threshold
            analysis.max_loss = float(config.train.max_loss)
        for name in UNUSED_BLOCKS:
            if name in config:
                del config[name]
    else:
        config = ml_collections.ConfigDict()
        config.model = base.model_config(**model)
        config.optimizer = base.optimizer_config(**optimizer)
        config.data = base.data_config()
    config.analysis = analysis
    config.lock()
    return config
