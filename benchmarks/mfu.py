"""Model FLOPs utilisation (MFU) of a training step, against the matmul peak measured in the same run.

    python benchmarks/mfu.py            # CPU: d=512 x 12 layers (goal >= 50%); GPU: see below
    python benchmarks/mfu.py --quick    # smoke run
    python benchmarks/mfu.py --unrolled # the stack as a Python loop (scan_layers=False)

MFU = model FLOPs per step / step time / peak FLOP/s.
* Model FLOPs: ``bench_common.forward_flops`` x 3 (forward + backward), counted from the shapes:
  per layer 8 n d^2 (q, k, v, o) + 4 n T d (scores and weighted values, the full T x T) +
  4 n d f (feed-forward), plus 2 n d V for the output head; n = batch x tokens. Remat's
  recomputation is not counted (it is hardware work, not model work).
* Peak: the measured rate of one large matmul through XLA in the same process and in the
  row's dtype (CPU: 2048^3 float32, and 2048^3 bfloat16 into float32 for the bfloat16 rows;
  GPU: 8192^3 bfloat16), fastest of 20 runs. On a GPU the nominal datasheet peak is printed
  too when the device is known (H100 SXM: 989 TFLOP/s dense bf16).

Shapes. CPU: decoder-only DeepNorm, d=512, 12 layers, 8 heads, d_ff 2048, at the
vs_torchscale batch (8 x 64 tokens) and a larger one (16 x 128), in float32 and with bfloat16
matmuls (model.dtype=bfloat16; remat "auto" per dtype). GPU (runs only where
jax.devices() is a GPU): decoder-only DeepNorm, bfloat16 compute, d=1024, 48 layers, 16 heads,
d_ff 4096, 1,024 tokens per sequence, batch 8, cuDNN attention.
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
import jax.numpy as jnp  # noqa: E402

import bench_common as bc  # noqa: E402
from deepnorm import TransformerConfig  # noqa: E402
from deepnorm.training.platform import resolve_remat_policy  # noqa: E402

NOMINAL_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, FLOP/s

# (label, d_model, layers, heads, batch, seq, dtype, remat, attention_impl)
CPU_SHAPES = [
    ("d=512 L=12 8x64", 512, 12, 8, 8, 64, "float32", "auto", None),
    ("d=512 L=12 16x128", 512, 12, 8, 16, 128, "float32", "auto", None),
    ("d=512 L=12 8x64 bf16", 512, 12, 8, 8, 64, "bfloat16", "auto", None),
    ("d=512 L=12 16x128 bf16", 512, 12, 8, 16, 128, "bfloat16", "auto", None),
]
GPU_SHAPES = [
    ("d=1024 L=48 8x1024 bf16", 1024, 48, 16, 8, 1024, "bfloat16", "save_dots", "cudnn"),
]


def nominal_peak(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    return next((v for k, v in NOMINAL_PEAK.items() if k in kind), None)


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: first shape, few steps")
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    p.add_argument("--remat", default=None, help="override model.remat_policy")
    bc.add_stack_flags(p)
    args = p.parse_args(argv)
    stack, stack_words = bc.stack_options(p, args)
    dev = jax.devices()[0]
    gpu = dev.platform == "gpu"
    shapes = GPU_SHAPES if gpu else CPU_SHAPES
    if args.quick:
        shapes, args.steps, args.rounds = shapes[:1], 1, 3
    peak_n = 8192 if gpu else 2048
    print(bc.machine_line() + f"; {hugepages.describe()}")
    peaks = {dt: bc.matmul_peak_flops(peak_n, jnp.dtype(dt), repeats=20)
             for dt in sorted({s[6] for s in shapes})}
    nominal = nominal_peak(dev) if gpu else None
    for dt, peak in peaks.items():
        print(f"# measured peak: {peak_n}^3 {dt} matmul (float32 sums) through XLA = "
              f"{peak / 1e9:,.0f} GFLOP/s" + (f"; nominal {nominal / 1e12:.0f} TFLOP/s"
                                               if nominal else ""))
    print(f"# stack: {stack_words}")
    print(f"{'shape':<26}{'remat':>10}{'GFLOP/step':>12}{'step ms':>10}{'GFLOP/s':>10}"
          f"{'MFU':>8}" + (f"{'MFU nominal':>13}" if nominal else ""))
    mfus = []
    for label, d, layers, heads, batch, seq, dtype, remat, impl in shapes:
        remat = resolve_remat_policy(args.remat or remat, dtype=dtype)
        peak = peaks[dtype]
        cfg = TransformerConfig(arch="decoder", num_layers=layers, d_model=d, num_heads=heads,
                                d_ff=4 * d, residual="deepnorm", dtype=dtype,
                                remat_policy=remat, **stack,
                                attention_impl=impl,
                                max_len=max(seq, 2048))
        trainer = bc.JaxTrainer(cfg, bc.random_batch(cfg, batch, seq))
        timing = bc.alternate({"step": lambda: trainer.run(args.steps)}, args.rounds)["step"]
        step = timing.wall / args.steps
        flops = bc.train_flops(cfg, batch, seq)
        mfu = flops / step / peak
        mfus.append(mfu)
        line = (f"{label:<26}{remat:>10}{flops / 1e9:>12.1f}{step * 1e3:>10.1f}"
                f"{flops / step / 1e9:>10.0f}{mfu:>7.1%}")
        if nominal:
            line += f"{flops / step / nominal:>12.1%}"
        print(line, flush=True)
        del trainer
    goal = "(goal on CPU >= 50%)" if not gpu else "(goal on H100 >= 45%)"
    print(f"RATIO model FLOP/s / measured matmul peak of its dtype: {mfus[0]:.1%} at "
          f"{shapes[0][0]} {goal}; best {max(mfus):.1%}")
    return mfus[0]


if __name__ == "__main__":
    main()
