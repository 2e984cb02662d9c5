"""What the training step's diagnostics cost: train_step with none, with the per-layer norms,
and with every group.

    python benchmarks/diagnostics_overhead.py            # goal: every group <= 10% of a step
    python benchmarks/diagnostics_overhead.py --quick
    python benchmarks/diagnostics_overhead.py --quick --per-group --rounds 5 --steps 2
    python benchmarks/diagnostics_overhead.py --cadence    # also the loop's default cadence

The step is the training loop's own (``deepnorm.training.steps.make_train_step``), jitted with
the state donated, three ways: ``off`` (no diagnostics), ``norms`` (the per-layer gradient,
update and activation norms: one reduction over all axes but the layer axis per parameter
leaf, twice, plus a slice of the model's stats) and ``all`` (every group of
``train.diagnostic_groups``: the norms, attention max logit and entropy per head from the
attention's own logits, kurtosis and max-abs of every branch output and residual stream, the
output-logit statistics, update / parameter ratios and Adam's nu per parameter group). Every
variant also returns the metrics the loop always logs (loss, global norms). Metrics stay on the
device (as in the loop, which fetches them a step late); each round blocks on the last step's
loss. Decoder-only DeepNorm, Adam; the variants run in alternating rounds, median of several.

``--cadence`` adds what ``train.py`` runs by default (``train.diagnostics=every_step``,
``train.every_step_groups=norms``, ``train.log_every=10``): the ``norms`` step on 9 steps of
10 and the ``all`` step on the logged one, sharing one state, against ``off`` over the same
10 steps.
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
import jax  # noqa: E402
from deepnorm import TransformerConfig  # noqa: E402
from deepnorm.training.diagnostics import GROUPS  # noqa: E402

# (label, d_model, layers)
SHAPES = [("d=64 L=100", 64, 100), ("d=256 L=24", 256, 24)]
BATCH, SEQ = 8, 64


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, help="alternating rounds (7; --quick: 3)")
    p.add_argument("--steps", type=int, help="steps per round (3; --quick: 1)")
    p.add_argument("--remat", default="save_dots")
    p.add_argument("--per-group", action="store_true",
                   help="also each group alone (its overhead over off, in CPU time)")
    p.add_argument("--cadence", action="store_true",
                   help="also the loop's default: every group on 1 step in 10 (log_every), norms on "
                        "the others")
    args = p.parse_args(argv)
    shapes = SHAPES[:1] if args.quick else SHAPES
    rounds = args.rounds or (3 if args.quick else 7)
    steps = args.steps or (1 if args.quick else 3)
    print(bc.machine_line() + f"; {hugepages.describe()}")
    print(f"# decoder DeepNorm, batch {BATCH}x{SEQ}, remat_policy={args.remat}; "
          f"median of {rounds} alternating rounds x {steps} steps")
    variants = {"off": False, "norms": "norms", "all": "all"}
    if args.per_group:
        variants.update({g: {g} for g in GROUPS if g != "norms"})
    print(f"{'shape':<14}{'off ms':>9}{'norms ms':>10}{'all ms':>9}{'norms':>8}{'all':>8}"
          f"{'all (cpu)':>11}")
    worst = worst_cadence = 0.0
    for label, d, layers in shapes:
        cfg = TransformerConfig(arch="decoder", num_layers=layers, d_model=d, num_heads=4,
                                d_ff=4 * d, residual="deepnorm", remat_policy=args.remat)
        batch = bc.random_batch(cfg, BATCH, SEQ)
        runners = {name: bc.LoopStepRunner(cfg, batch, diagnostics=groups)
                   for name, groups in variants.items()}
        t = bc.alternate({k: (lambda r=r: r.run(steps)) for k, r in runners.items()}, rounds)
        over = {name: t[name].wall / t["off"].wall - 1 for name in ("norms", "all")}
        worst = max(worst, over["all"])
        if args.cadence:
            cadence = cadence_overhead(runners, rounds)
            worst_cadence = max(worst_cadence, cadence)
        ms = {name: t[name].wall / steps * 1e3 for name in variants}
        print(f"{label:<14}{ms['off']:>9.1f}{ms['norms']:>10.1f}{ms['all']:>9.1f}"
              f"{over['norms']:>7.1%}{over['all']:>8.1%}"
              f"{t['all'].cpu / t['off'].cpu - 1:>10.1%}", flush=True)
        if args.per_group:
            print("  each group alone, cpu time over off: " + ", ".join(
                f"{g} {t[g].cpu / t['off'].cpu - 1:+.1%}" for g in variants
                if g not in ("off", "all")), flush=True)
        if args.cadence:
            print(f"  loop default (all on 1 step in {LOG_EVERY}, norms on the others): "
                  f"{cadence:+.1%} over off", flush=True)
        del runners
    print(f"RATIO all-diagnostics step / plain step - 1: max {worst:.1%} "
          f"(goal <= 10%: {'met' if worst <= 0.10 else 'NOT met'})")
    if args.cadence:
        print(f"RATIO loop default (every group on logged steps) / plain - 1: max "
              f"{worst_cadence:.1%} (goal <= 10%: {'met' if worst_cadence <= 0.10 else 'NOT met'})")
    return worst


LOG_EVERY = 10  # train.log_every's default


def cadence_overhead(runners: dict, rounds: int) -> float:
    """The loop's default cadence against ``off`` over ``LOG_EVERY`` steps: the ``all`` and
    ``norms`` programs take turns on one state as ``train_and_evaluate``'s two steps do."""
    mixed, off = runners["norms"], runners["off"]
    logged = runners["all"].step

    def run_mixed():
        metrics = None
        for i in range(LOG_EVERY):
            step = logged if i == 0 else mixed.step
            mixed.state, metrics = step(mixed.state, mixed.batch)
        jax.block_until_ready(metrics["loss"])

    t = bc.alternate({"off": lambda: off.run(LOG_EVERY), "mixed": run_mixed}, rounds)
    return t["mixed"].wall / t["off"].wall - 1


if __name__ == "__main__":
    main()
