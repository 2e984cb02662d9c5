"""Forward speed of a model with its norms folded away (deepnorm.export.fold_norms) against
the same model unfolded.

    python benchmarks/fold_speed.py            # Pre-LN LayerNorm decoders, two shapes
    python benchmarks/fold_speed.py --quick

Three variants of one model, each a jitted forward pass (logits) on the same batch: the
original, folded without centering (norms keep their statistics, lose gain and bias), and
folded with centering (LayerNorm's mean subtraction also gone: an RMS normalization). Their
logits are checked equal before timing. Untied head and learned positions, so every norm
folds and centering is exact. The variants run in alternating rounds (bench_common.alternate),
median of several; the norms are a small share of a forward pass whose time is mostly matmuls,
so the expected gain is small, and largest at small d_model where the matmuls are cheap.
Beside the times: the ratio of CPU time (the work, whatever else the machine runs) and of
the bytes XLA's cost analysis says each compiled program moves.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepnorm.training import hugepages  # noqa: E402

if __name__ == "__main__":
    hugepages.reexec_with_hugepages(by_default=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import bench_common as bc  # noqa: E402
from deepnorm import Transformer, TransformerConfig  # noqa: E402
from deepnorm.export import fold_norms  # noqa: E402

# (label, d_model, layers)
SHAPES = [("d=64 L=24", 64, 24), ("d=256 L=12", 256, 12)]
BATCH, SEQ = 8, 128


def forward(model):
    graphdef, params = nnx.split(model)
    fn = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)[0])
    return fn, params


def bytes_accessed(fn, params, x) -> float:
    """XLA's count of the bytes the compiled forward pass reads and writes: a figure of the
    program, free of the machine's noise (the scan body counted once, as XLA counts loops)."""
    cost = fn.lower(params, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("bytes accessed", float("nan")))


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=5, help="forward passes per timed call")
    p.add_argument("--residual", default="pre")
    p.add_argument("--norm", default="layernorm")
    p.add_argument("--shape", type=int, nargs=2, metavar=("D_MODEL", "LAYERS"),
                   help="one shape instead of the default two")
    args = p.parse_args(argv)
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shape:
        shapes = [(f"d={args.shape[0]} L={args.shape[1]}", *args.shape)]
    rounds, calls = (3, 1) if args.quick else (args.rounds, args.calls)
    print(bc.machine_line() + f"; {hugepages.describe()}")
    print(f"# decoder residual={args.residual} norm={args.norm}, untied head, learned "
          f"positions, batch {BATCH}x{SEQ}; median of {rounds} alternating rounds x {calls} "
          "forward passes")
    print(f"{'shape':<12}{'original ms':>12}{'folded ms':>11}{'+centered ms':>14}"
          f"{'folded/orig':>13}{'centered/orig':>15}{'cpu time ratios':>18}"
          f"{'XLA bytes ratios':>19}")
    best = float("inf")
    for label, d, layers in shapes:
        cfg = TransformerConfig(arch="decoder", num_layers=layers, d_model=d, num_heads=4,
                                d_ff=4 * d, residual=args.residual, norm=args.norm,
                                tie_embeddings=False, positions="learned", max_len=SEQ)
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        variants = {"original": model, "folded": fold_norms(model, center=False)[0],
                    "centered": fold_norms(model, center=True)[0]}
        x = jax.device_put(bc.random_batch(cfg, BATCH, SEQ)["inputs"])
        fns = {k: forward(m) for k, m in variants.items()}
        ref = np.asarray(fns["original"][0](fns["original"][1], x))
        for k, (fn, params) in fns.items():
            np.testing.assert_allclose(np.asarray(fn(params, x)), ref, rtol=1e-3,
                                       atol=1e-3 * np.abs(ref).max(), err_msg=k)

        def runner(fn, params):
            def run():
                for _ in range(calls):
                    out = fn(params, x)
                jax.block_until_ready(out)
            return run

        moved = {k: bytes_accessed(fn, params, x) for k, (fn, params) in fns.items()}
        t = bc.alternate({k: runner(*v) for k, v in fns.items()}, rounds)
        ms = {k: v.wall / calls * 1e3 for k, v in t.items()}
        r_fold, r_center = ms["folded"] / ms["original"], ms["centered"] / ms["original"]
        best = min(best, r_center)
        print(f"{label:<12}{ms['original']:>12.2f}{ms['folded']:>11.2f}{ms['centered']:>14.2f}"
              f"{r_fold:>13.3f}{r_center:>15.3f}"
              f"{t['folded'].cpu / t['original'].cpu:>10.3f}"
              f"{t['centered'].cpu / t['original'].cpu:>8.3f}"
              f"{moved['folded'] / moved['original']:>11.3f}"
              f"{moved['centered'] / moved['original']:>8.3f}", flush=True)
    print(f"RATIO folded+centered / original forward time: best {best:.3f} "
          "(below 1: faster; outputs equal)")
    return best


if __name__ == "__main__":
    main()
