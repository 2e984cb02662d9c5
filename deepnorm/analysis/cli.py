"""``python -m deepnorm.analysis COMMAND --out=DIR [--config=configs/X.py] [flags]``.

Commands (each writes DIR/<command>.json, DIR/<command>.png and DIR/<command>.meta.json):

``grad-norms``     Xiong et al. 2020 Fig. 3: expected gradient norm per layer at init.
``update-norms``   DeepNet Fig. 4-5: ||F(x, theta_t) - F(x, theta_0)|| over early training.
``stability-map``  residual x depth x peak lr (x warmup): final loss or divergence.

``--config`` loads the same ``configs/*.py`` file train.py takes, and ``--config.KEY=VALUE``
overrides a field, e.g. ``--config.model.d_model=128``. Without ``--config`` each command uses
its paper's setup scaled to a CPU (see DEFAULT_MODELS). ``--residuals`` and ``--depths`` then
vary the model's residual scheme and layers per stack (L-L for an encoder-decoder).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import time

from deepnorm.analysis import schemes as schemes_lib
from deepnorm.analysis.config_file import ConfigFileError, apply_override, load_config
from deepnorm.config import ConfigError, TransformerConfig
from deepnorm.training.platform import resolve_model_config

COMMANDS = ("grad-norms", "update-norms", "stability-map")

# Each command's model when no --config is given: the paper's shape, shrunk to fit a CPU.
DEFAULT_MODELS = {
    # Xiong et al. 2020 used a 6-6 encoder-decoder, d=512, FFN 1024, 4 heads; a quarter width.
    "grad-norms": dict(arch="encoder_decoder", num_encoder_layers=6, num_decoder_layers=6,
                       d_model=128, d_ff=256, num_heads=4, remat_policy="none"),
    # DeepNet Fig. 5's tiny 64-128-2 encoder-decoders, as in the paper.
    "update-norms": dict(arch="encoder_decoder", num_encoder_layers=6, num_decoder_layers=6,
                         d_model=64, d_ff=128, num_heads=2, remat_policy="none"),
    # Decoder-only 64-128-2: the cheapest model whose divergence behaviour depends on depth.
    "stability-map": dict(arch="decoder", num_layers=6, d_model=64, d_ff=128, num_heads=2,
                          remat_policy="none"),
}
DEFAULTS = {
    "grad-norms": dict(residuals="post,pre,deepnorm", depths="6", seeds=3, batches=16,
                       batch_size=16, seq_len=64, lr=1e-3),
    "update-norms": dict(residuals="post,pre,deepnorm", depths="6,12,24,48", seeds=2,
                         batches=4, batch_size=8, seq_len=32, lr=5e-4, steps=20),
    "stability-map": dict(residuals="post,pre,deepnorm", depths="6,18", seeds=1, batches=0,
                          batch_size=8, seq_len=32, lrs="3e-4,1e-3,3e-3,1e-2",
                          warmups="0,50", steps=150),
}


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump): 'error: <what and what's allowed>'."""

    def error(self, message):
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)


def _int_list(flag):
    def parse(text):
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of positive integers") from None
        if not values or any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(
                f"{text!r}: every value must be a positive integer")
        return values
    parse.__name__ = flag
    return parse


def _float_list(text):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be positive")
    return values


def _schemes(text):
    names = [v.strip() for v in text.split(",") if v.strip()]
    for name in names:
        if name not in schemes_lib.PRESETS:
            raise argparse.ArgumentTypeError(
                f"{name!r} is not one of {', '.join(schemes_lib.SCHEMES)}")
    if not names:
        raise argparse.ArgumentTypeError("give at least one scheme")
    return names


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def _non_negative(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m deepnorm.analysis",
                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    helps = {"grad-norms": "expected gradient norm per layer (Xiong et al. 2020, Fig. 3)",
             "update-norms": "model update norm in early training (DeepNet, Fig. 4-5)",
             "stability-map": "final loss or divergence over scheme x depth x lr x warmup"}
    for command in COMMANDS:
        d = DEFAULTS[command]
        p = sub.add_parser(command, help=helps[command], description=helps[command])
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--config", help="configs/*.py with get_config(); default: the "
                       "command's paper setup scaled to a CPU")
        p.add_argument("--residuals", type=_schemes, default=_schemes(d["residuals"]),
                       help=f"comma-separated schemes from {', '.join(schemes_lib.SCHEMES)} "
                       f"(default {d['residuals']})")
        p.add_argument("--depths", type=_int_list("depths"), default=None,
                       help="layers per stack, L-L for encoder_decoder (default: the "
                       f"config's depth, or {d['depths']} without --config)")
        p.add_argument("--seeds", type=_positive, default=d["seeds"],
                       help=f"number of seeds 0..n-1 (default {d['seeds']})")
        p.add_argument("--batch-size", type=_positive, default=d["batch_size"])
        p.add_argument("--seq-len", type=_positive, default=d["seq_len"])
        if command == "grad-norms":
            p.add_argument("--batches", type=_positive, default=d["batches"],
                           help="mini-batches averaged into the expected gradient")
            p.add_argument("--warmup-steps", type=_non_negative, default=0,
                           help="Adam steps (linear warmup to --lr) before measuring")
            p.add_argument("--lr", type=_positive_float, default=d["lr"])
        elif command == "update-norms":
            p.add_argument("--batches", type=_positive, default=d["batches"],
                           help="distinct training batches, cycled")
            p.add_argument("--steps", type=_positive, default=d["steps"])
            p.add_argument("--lr", type=_positive_float, default=d["lr"], help="Adam peak lr")
            p.add_argument("--warmup-steps", type=_non_negative, default=0)
        else:
            p.add_argument("--lrs", type=_float_list, default=_float_list(d["lrs"]),
                           help=f"peak learning rates (default {d['lrs']})")
            p.add_argument("--warmups", type=_warmup_list, default=_warmup_list(d["warmups"]),
                           help=f"warmup steps (default {d['warmups']})")
            p.add_argument("--steps", type=_positive, default=d["steps"])
            p.add_argument("--workers", type=_positive, default=1,
                           help="cells trained side by side, one process each")
    return parser


def _warmup_list(text):
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: warmups must be 0 or more")
    return values


def resolve_config(command: str, config_path: str | None, overrides: list[str]):
    """(full ConfigDict or None, base TransformerConfig) from --config and --config.* flags."""
    if config_path is None:
        if overrides:
            raise ConfigFileError(f"{overrides[0]!r} needs --config=FILE to override")
        return None, TransformerConfig(**DEFAULT_MODELS[command])
    config = load_config(config_path)
    for assignment in overrides:
        apply_override(config, assignment)
    # As train.py runs it: the platform's choice for "auto" (deepnorm.training.platform).
    return config, resolve_model_config(TransformerConfig.from_mapping(config.model.to_dict()))


def _split_overrides(argv):
    """Separates ``--config.KEY=VALUE`` from the flags argparse knows."""
    rest, overrides = [], []
    for arg in argv:
        if arg.startswith("--config."):
            overrides.append(arg[len("--config."):])
        else:
            rest.append(arg)
    return rest, overrides


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = _split_overrides(argv)
    parser = build_parser()
    args = parser.parse_args(rest)
    try:
        config, base = resolve_config(args.command, args.config, overrides)
        if args.depths is None:
            args.depths = (_int_list("depths")(DEFAULTS[args.command]["depths"])
                           if config is None else [schemes_lib.depth_of(base)])
        for depth in args.depths:  # validate every model before any compilation
            for scheme in args.residuals:
                schemes_lib.scheme_config(base, scheme, depth)
    except (ConfigFileError, ConfigError) as error:
        parser.error(str(error))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_config = None if config is None else config.get("data")
    start = time.perf_counter()
    from deepnorm.analysis import commands  # imports jax; after the cheap argument checks

    records = commands.run(args.command, args, base, data_config, config, out)
    elapsed = time.perf_counter() - start
    name = args.command
    (out / f"{name}.json").write_text(json.dumps(records, indent=0))
    meta = {"command": " ".join(["python -m deepnorm.analysis"] + argv),
            "seconds": round(elapsed, 1), "base_model": dataclasses.asdict(base),
            "args": {k: v for k, v in vars(args).items()}, "machine": platform.machine(),
            "num_records": len(records)}
    (out / f"{name}.meta.json").write_text(json.dumps(meta, indent=1, default=str))
    print(f"{name}: {len(records)} records in {elapsed:.1f}s -> {out / (name + '.json')}, "
          f"{out / (name + '.png')}")
    return 0
