"""Step time per layer from 12 to 1,000 layers, and the peak memory of a 1,000-layer step.

    python benchmarks/depth_scaling.py            # depths 12, 100, 1000; memory at 1000
    python benchmarks/depth_scaling.py --quick    # depths 12, 100; memory at 100

Model: decoder-only DeepNorm, d=64, 4 heads, d_ff 256, batch 8 x 64 tokens, float32, Adam (the
vs_torchscale deep shape, made a decoder). Step time per layer = median step time / L; the
depths run in alternating rounds. The ratio (per-layer time at the deepest / at 12 layers) is
the goal's measure (<= 1.2): the fixed costs (embedding, output head) are shared by fewer
layers at 12, so a flat scan gives a ratio at or below 1.

Memory, for each ``remat_policy``: XLA's own accounting of the compiled step
(``compiled.memory_analysis()``: arguments + outputs - donated aliases + temporaries) against
the parameter + Adam footprint (params, mu, nu: 3 x 4 bytes per parameter; the gradients are
temporaries). Compiling needs no memory for the model (abstract arguments).
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

import bench_common as bc  # noqa: E402
from deepnorm import TransformerConfig  # noqa: E402
from deepnorm.config import REMAT_POLICIES  # noqa: E402

D, HEADS, BATCH, SEQ = 64, 4, 8, 64


def config(layers: int, remat: str) -> TransformerConfig:
    return TransformerConfig(arch="decoder", num_layers=layers, d_model=D, num_heads=HEADS,
                             d_ff=4 * D, residual="deepnorm", remat_policy=remat)


def peak_bytes(compiled) -> int | None:
    """Arguments + outputs - aliased (donated) + temporaries, from XLA's buffer assignment."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: depths 12 and 100")
    p.add_argument("--depths", default="12,100,1000")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--remat", default="save_dots", help="remat_policy for the timing part")
    args = p.parse_args(argv)
    depths = [12, 100] if args.quick else [int(x) for x in args.depths.split(",")]
    rounds = 3 if args.quick else args.rounds
    print(bc.machine_line() + f"; {hugepages.describe()}")
    print(f"# decoder DeepNorm d={D} heads={HEADS} d_ff={4 * D} batch {BATCH}x{SEQ}, "
          f"remat_policy={args.remat}; median of {rounds} alternating rounds")
    trainers = {L: bc.JaxTrainer(config(L, args.remat), bc.random_batch(config(L, "none"),
                                                                         BATCH, SEQ))
                for L in depths}
    t = bc.alternate({L: (lambda tr=tr: tr.run(1)) for L, tr in trainers.items()}, rounds)
    print(f"{'layers':>7}{'step ms':>10}{'ms/layer':>10}{'cpu ms/layer':>14}{'vs 12':>8}")
    base = t[depths[0]].wall / depths[0]
    for L in depths:
        per = t[L].wall / L
        print(f"{L:>7}{t[L].wall * 1e3:>10.1f}{per * 1e3:>10.3f}{t[L].cpu / L * 1e3:>14.3f}"
              f"{per / base:>7.2f}x", flush=True)
    ratio = (t[depths[-1]].wall / depths[-1]) / base
    del trainers

    deepest = depths[-1]
    print(f"\n# memory of one {deepest}-layer training step (XLA memory_analysis, compile only)")
    print(f"{'remat_policy':>20}{'peak MiB':>10}{'temp MiB':>10}{'params+Adam MiB':>17}"
          f"{'peak / footprint':>18}")
    for remat in REMAT_POLICIES:
        cfg = config(deepest, remat)
        trainer = bc.JaxTrainer.abstract(cfg, bc.random_batch(cfg, BATCH, SEQ))
        compiled = trainer.compile()
        foot = 3 * 4 * trainer.num_params()
        peak = peak_bytes(compiled)
        temp = compiled.memory_analysis().temp_size_in_bytes if peak is not None else None
        mib = lambda b: "n/a" if b is None else f"{b / 2 ** 20:,.0f}"  # noqa: E731
        print(f"{remat:>20}{mib(peak):>10}{mib(temp):>10}{mib(foot):>17}"
              f"{'n/a' if peak is None else f'{peak / foot:.2f}x':>18}", flush=True)
    print(f"RATIO per-layer step time {deepest} vs {depths[0]} layers: {ratio:.2f} "
          f"(goal <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})")
    return ratio


if __name__ == "__main__":
    main()
