"""What the per-layer diagnostics of the training loop cost: train_step with and without them.

    python benchmarks/diagnostics_overhead.py            # goal: <= 10% of step time
    python benchmarks/diagnostics_overhead.py --quick

The step is the training loop's own (``deepnorm.training.steps.make_train_step``), jitted with
the state donated, once with ``diagnostics=True`` (adds grad_norm_per_layer,
update_norm_per_layer, activation_norm_per_layer: one reduction over all axes but the layer
axis per parameter leaf, twice, plus a slice of the model's stats) and once with
``diagnostics=False``. Both steps also return the metrics the loop always logs (loss, global
norms). Metrics stay on the device (as in the loop, which fetches them a step late); each
round blocks on the last step's loss. Decoder-only DeepNorm, Adam; the two variants run in
alternating rounds, median of several.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepnorm.training import hugepages  # noqa: E402

if __name__ == "__main__":
    hugepages.reexec_with_hugepages(by_default=True)

import bench_common as bc  # noqa: E402
from deepnorm import TransformerConfig  # noqa: E402

# (label, d_model, layers)
SHAPES = [("d=64 L=100", 64, 100), ("d=256 L=24", 256, 24)]
BATCH, SEQ = 8, 64


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--remat", default="save_dots")
    args = p.parse_args(argv)
    shapes = SHAPES[:1] if args.quick else SHAPES
    rounds, steps = (3, 1) if args.quick else (args.rounds, args.steps)
    print(bc.machine_line() + f"; {hugepages.describe()}")
    print(f"# decoder DeepNorm, batch {BATCH}x{SEQ}, remat_policy={args.remat}; "
          f"median of {rounds} alternating rounds x {steps} steps")
    print(f"{'shape':<14}{'plain ms':>10}{'diagnostics ms':>16}{'overhead':>10}"
          f"{'cpu overhead':>14}")
    worst = 0.0
    for label, d, layers in shapes:
        cfg = TransformerConfig(arch="decoder", num_layers=layers, d_model=d, num_heads=4,
                                d_ff=4 * d, residual="deepnorm", remat_policy=args.remat)
        batch = bc.random_batch(cfg, BATCH, SEQ)
        runners = {diag: bc.LoopStepRunner(cfg, batch, diagnostics=diag) for diag in (False, True)}
        t = bc.alternate({k: (lambda r=r: r.run(steps)) for k, r in runners.items()}, rounds)
        over = t[True].wall / t[False].wall - 1
        worst = max(worst, over)
        print(f"{label:<14}{t[False].wall / steps * 1e3:>10.1f}{t[True].wall / steps * 1e3:>16.1f}"
              f"{over:>9.1%}{t[True].cpu / t[False].cpu - 1:>13.1%}", flush=True)
        del runners
    print(f"RATIO diagnostics step / plain step - 1: max {worst:.1%} "
          f"(goal <= 10%: {'met' if worst <= 0.10 else 'NOT met'})")
    return worst


if __name__ == "__main__":
    main()
