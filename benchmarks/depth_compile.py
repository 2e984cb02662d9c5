"""Compile time of one training step against depth: scanned stack vs unrolled anchor.

Depth is an array axis in deepnorm (DESIGN.md): the L blocks are stacked parameters run by one
``jax.lax.scan``, so XLA compiles one layer whatever L is. This script measures that claim on
the real training step (``deepnorm.training.steps.make_train_step``: forward, backward, an
optax Adam update and the per-layer diagnostics the training loop logs), decoder-only,
residual=deepnorm, at a fixed tiny width (d_model 64, 2 heads, d_ff 128, batch 2 x 32 tokens).

Compile time = wall clock of ``jax.jit(step).lower(state, batch).compile()`` on abstract
arguments (``jax.eval_shape``: no parameters are materialised, so 1,000 layers cost no memory),
after ``jax.clear_caches()``. The depths are measured in alternation (12, 100, 1000, then
1000, 100, 12, ...) for ``--repeats`` rounds and each reports its median, so that drift of a
shared machine's load hits every depth alike. Tracing/lowering and XLA compilation are printed
separately; the ratio uses their sum. The process CPU time of the same span is printed too
(``cpu s``, all threads): on a machine shared with other jobs it is far less sensitive to their
load than the wall clock, so the script prints the ratio of both.

The anchor is the same step with ``scan_layers=False`` (a Python loop over the layers), whose
compile time grows with depth; it is measured at ``--unrolled-depths`` and stops at the first
depth whose compile exceeds ``--unrolled-limit`` seconds.

    python benchmarks/depth_compile.py            # 12, 100, 1000 scanned; 12, 24, 48, 96 unrolled
    python benchmarks/depth_compile.py --quick    # 12, 100 scanned; 12, 24 unrolled
    python benchmarks/depth_compile.py --unroll 2 --unrolled-depths=   # 2 layers per loop trip
    python benchmarks/depth_compile.py --residual hyper --depths 12,100 --unrolled-depths= \
        --repeats 1   # a multi-stream scheme's carry ([4, B, T, D]) keeps compile time flat
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
from deepnorm.residual import SCHEMES
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


def compile_seconds(num_layers: int, scan: bool, unroll: int = 1,
                    residual: str = "deepnorm") -> tuple[float, float, float]:
    """(lowering s, XLA compile s, process CPU s of both) of one training step, cold."""
    norm = "layernorm" if SCHEMES[residual].uses_norm else "none"
    cfg = TransformerConfig(arch="decoder", num_layers=num_layers, residual=residual, norm=norm,
                            scan_layers=scan, scan_unroll=unroll if scan else 1, **WIDTH)
    graphdef, tx, state, batch = abstract_step_args(cfg)
    jax.clear_caches()
    step = jax.jit(make_train_step(graphdef, tx), donate_argnums=0)
    c0, t0 = time.process_time(), time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    lowered.compile()
    return t1 - t0, time.perf_counter() - t1, time.process_time() - c0


def measure(depths, scan: bool, repeats: int, limit: float | None = None,
            unroll: int = 1, residual: str = "deepnorm") -> dict[int, tuple[float, float]]:
    """Median total compile seconds per depth, depths alternated round by round. With
    ``limit``, the first (ascending) round stops at the first depth slower than ``limit``."""
    samples: dict[int, list[tuple[float, float, float]]] = {}
    active = list(depths)
    for r in range(repeats):
        for depth in (active if r % 2 == 0 else active[::-1]):
            low, comp, cpu = compile_seconds(depth, scan, unroll, residual)
            samples.setdefault(depth, []).append((low, comp, cpu))
            print(f"#   {'scan' if scan else 'unrolled'} {depth} layers, round {r + 1}: "
                  f"{low + comp:.2f} s", file=sys.stderr, flush=True)
            if r == 0 and limit is not None and low + comp > limit:
                print(f"# unrolled compile took {low + comp:.1f} s > {limit:.0f} s at {depth} "
                      "layers; deeper unrolled depths skipped", flush=True)
                active = [d for d in active if d <= depth]
                break
    totals = {}
    for depth in active:
        low = statistics.median(x[0] for x in samples[depth])
        comp = statistics.median(x[1] for x in samples[depth])
        total = statistics.median(x[0] + x[1] for x in samples[depth])
        cpu = statistics.median(x[2] for x in samples[depth])
        totals[depth] = (total, cpu)
        print(f"| {'scan' if scan else 'unrolled':8} | {depth:6d} | {low:7.2f} | {comp:9.2f} | "
              f"{total:7.2f} | {cpu:7.2f} |", flush=True)
    return totals


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default="12,100,1000",
                        help="scanned depths (comma-separated); the ratio is last / first")
    parser.add_argument("--unrolled-depths", default="12,24,48,96",
                        help="unrolled (scan_layers=False) depths, the anchor")
    parser.add_argument("--unrolled-limit", type=float, default=60.0,
                        help="stop the unrolled series after a compile slower than this (s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternating rounds; each depth reports its median")
    parser.add_argument("--unroll", type=int, default=1,
                        help="model.scan_unroll of the scanned stack (layers per loop trip)")
    parser.add_argument("--residual", default="deepnorm", choices=tuple(SCHEMES),
                        help="model.residual (multi-stream schemes: resi_dual, hyper, dlcl)")
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
          f"residual={args.residual}, d_model={WIDTH['d_model']}, heads={WIDTH['num_heads']}, "
          f"d_ff={WIDTH['d_ff']}, batch {BATCH}x{SEQ}; scan_unroll={args.unroll}; median of "
          f"{args.repeats} alternating "
          "round(s)")
    print("| stack    | layers | lower s | compile s | total s |   cpu s |")
    print("|----------|-------:|--------:|----------:|--------:|--------:|")
    scanned = measure(depths, scan=True, repeats=args.repeats, unroll=args.unroll,
                      residual=args.residual)
    anchor = measure(unrolled, scan=False, repeats=args.repeats, limit=args.unrolled_limit,
                     residual=args.residual)

    def ratio(table, a, b):
        return (f"{table[a][0] / table[b][0]:.2f} wall, {table[a][1] / table[b][1]:.2f} cpu")

    lo, hi = depths[0], depths[-1]
    print(f"scan:     compile({hi})/compile({lo}) = {ratio(scanned, hi, lo)}  (goal <= 1.5)")
    if len(anchor) > 1:
        a_lo, a_hi = min(anchor), max(anchor)
        print(f"unrolled: compile({a_hi})/compile({a_lo}) = {ratio(anchor, a_hi, a_lo)}  "
              f"({a_hi / a_lo:.3g}x the layers)")
    if anchor:
        a_hi = max(anchor)
        print(f"unrolled at {a_hi} layers / scanned at {hi} layers = "
              f"{ratio({0: anchor[a_hi], 1: scanned[hi]}, 0, 1)}")


if __name__ == "__main__":
    main()
