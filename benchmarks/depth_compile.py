"""Compile time of one training step against depth: scanned stack vs unrolled anchor.

Depth is an array axis in deepnorm (DESIGN.md): the L blocks are stacked parameters run by one
``jax.lax.scan``, so XLA compiles one layer whatever L is. This script measures that claim on
the real training step (``deepnorm.training.steps.make_train_step``: forward, backward, an
optax Adam update and the per-layer diagnostics the training loop logs), decoder-only,
residual=deepnorm, at a fixed tiny width (d_model 64, 2 heads, d_ff 128, batch 2 x 32 tokens).

Compile time = wall clock of ``jax.jit(step).lower(state, batch).compile()`` on abstract
arguments (``jax.eval_shape``: no parameters are materialised, so 1,000 layers cost no memory),
after ``jax.clear_caches()``; the median of ``--repeats`` runs. Tracing/lowering and XLA
compilation are printed separately; the ratio uses their sum.

The anchor is the same step with ``scan_layers=False`` (a Python loop over the layers), whose
compile time grows with depth; it is measured at ``--unrolled-depths`` and stops at the first
depth whose compile exceeds ``--unrolled-limit`` seconds.

    python benchmarks/depth_compile.py            # 12, 100, 1000 scanned; 12, 24, 48, 96 unrolled
    python benchmarks/depth_compile.py --quick    # 12, 100 scanned; 12, 24 unrolled
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

from deepnorm import TransformerConfig
from deepnorm.training.state import create_train_state
from deepnorm.training.steps import make_train_step

try:  # run as `python benchmarks/depth_compile.py` from the repository root
    from bench_common import machine_line
except ImportError:  # pragma: no cover - imported as benchmarks.depth_compile
    from benchmarks.bench_common import machine_line

WIDTH = dict(d_model=64, num_heads=2, d_ff=128, vocab_size=260)
BATCH, SEQ = 2, 32


def abstract_step_args(cfg: TransformerConfig):
    """(graphdef, tx, abstract TrainState, abstract batch) for one decoder training step."""
    tx = optax.adam(1e-4)
    graphdef, state = None, None

    def build():
        nonlocal graphdef
        graphdef, st = create_train_state(cfg, tx, seed=0)
        return st

    state = jax.eval_shape(build)
    tokens = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens,
             "weights": jax.ShapeDtypeStruct((BATCH, SEQ), jnp.float32)}
    return graphdef, tx, state, batch


def compile_seconds(num_layers: int, scan: bool, repeats: int) -> tuple[float, float]:
    """Median (lowering seconds, XLA compile seconds) of one training step at this depth."""
    cfg = TransformerConfig(arch="decoder", num_layers=num_layers, residual="deepnorm",
                            scan_layers=scan, **WIDTH)
    graphdef, tx, state, batch = abstract_step_args(cfg)
    lowers, compiles = [], []
    for _ in range(repeats):
        jax.clear_caches()
        step = jax.jit(make_train_step(graphdef, tx), donate_argnums=0)
        t0 = time.perf_counter()
        lowered = step.lower(state, batch)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        lowers.append(t1 - t0)
        compiles.append(t2 - t1)
    return statistics.median(lowers), statistics.median(compiles)


def measure(depths, scan: bool, repeats: int, limit: float | None = None) -> dict[int, float]:
    totals = {}
    for depth in depths:
        low, comp = compile_seconds(depth, scan, repeats)
        totals[depth] = low + comp
        print(f"| {'scan' if scan else 'unrolled':8} | {depth:5d} | {low:7.2f} | {comp:8.2f} | "
              f"{low + comp:7.2f} |", flush=True)
        if limit is not None and low + comp > limit:
            print(f"# unrolled compile took {low + comp:.1f} s > {limit:.0f} s at {depth} layers;"
                  " deeper unrolled depths skipped", flush=True)
            break
    return totals


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default="12,100,1000",
                        help="scanned depths (comma-separated); the ratio is last / first")
    parser.add_argument("--unrolled-depths", default="12,24,48,96",
                        help="unrolled (scan_layers=False) depths, the anchor")
    parser.add_argument("--unrolled-limit", type=float, default=60.0,
                        help="stop the unrolled series after a compile slower than this (s)")
    parser.add_argument("--repeats", type=int, default=2, help="compiles per depth (median)")
    parser.add_argument("--quick", action="store_true",
                        help="12,100 scanned and 12,24 unrolled, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.unrolled_depths, args.repeats = "12,100", "12,24", 1
    depths = [int(d) for d in args.depths.split(",")]
    unrolled = [int(d) for d in args.unrolled_depths.split(",") if d]

    print(machine_line())
    print(f"# {' '.join(sys.argv)}")
    print(f"# train step (make_train_step: fwd + bwd + adam + per-layer diagnostics), decoder, "
          f"residual=deepnorm, d_model={WIDTH['d_model']}, heads={WIDTH['num_heads']}, "
          f"d_ff={WIDTH['d_ff']}, batch {BATCH}x{SEQ}; median of {args.repeats} compile(s)")
    print("| stack    | layers | lower s | compile s | total s |")
    print("|----------|-------:|--------:|----------:|--------:|")
    scanned = measure(depths, scan=True, repeats=args.repeats)
    anchor = measure(unrolled, scan=False, repeats=args.repeats, limit=args.unrolled_limit)

    lo, hi = depths[0], depths[-1]
    print(f"scan:     compile({hi})/compile({lo}) = {scanned[hi] / scanned[lo]:.2f}  (goal <= 1.5)")
    if len(anchor) > 1:
        a_lo, a_hi = min(anchor), max(anchor)
        print(f"unrolled: compile({a_hi})/compile({a_lo}) = {anchor[a_hi] / anchor[a_lo]:.2f}  "
              f"({a_hi / a_lo:.0f}x the layers)")
        print(f"at {a_hi} layers the unrolled step compiles "
              f"{anchor[a_hi] / scanned.get(a_hi, scanned[hi]):.1f}x slower than the scanned "
              f"step at {a_hi if a_hi in scanned else hi} layers")


if __name__ == "__main__":
    main()
