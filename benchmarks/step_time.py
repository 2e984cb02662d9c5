"""One encoder training step of the vs_torchscale shapes, timed alone: for comparing variants.

    python benchmarks/step_time.py --d 64                      # d=64 x 100 layers, remat auto
    python benchmarks/step_time.py --d 512 --dtype bfloat16    # bfloat16 matmuls
    python benchmarks/step_time.py --d 256 --remat full
    python benchmarks/step_time.py --d 512 --unrolled
    python benchmarks/step_time.py --d 64 --unroll 2           # 2 layers per scan-loop trip
    DEEPNORM_HUGEPAGES=0 python benchmarks/step_time.py --d 256           # huge pages off
    XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/step_time.py --d 256
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/step_time.py --d 256
        # two virtual CPU devices: the batch is split over a data-parallel mesh

The step is the JAX side of vs_torchscale (``bench_common.JaxTrainer``: loss, grad, Adam; a
DeepNorm encoder, 4 heads, d_ff = 4 d, batch 8 x 64 of random tokens). Two warm-up steps, then
the median of ``--rounds`` timings of 2 steps; prints milliseconds per step, wall and process
CPU time. Run each variant in its own process (flags act at start-up) and alternate them by
hand; this machine's noise between identical runs was ~5% (benchmarks/RESULTS.md, changes 8-14,
which this script's timing produced).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepnorm.training import hugepages  # noqa: E402

if __name__ == "__main__":
    hugepages.reexec_with_hugepages(by_default=True)

import statistics  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

import bench_common as bc  # noqa: E402
from deepnorm import TransformerConfig  # noqa: E402
from deepnorm.training.platform import resolve_remat_policy  # noqa: E402

LAYERS = {64: 100, 256: 24, 512: 12}  # the vs_torchscale encoder shapes


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=64, help="d_model (64, 256, 512 have default depths)")
    p.add_argument("--layers", type=int, default=None, help="default: 100 / 24 / 12 by --d")
    p.add_argument("--remat", default="auto", help="model.remat_policy")
    bc.add_stack_flags(p)
    p.add_argument("--dtype", default="float32", help="model.dtype, the matmul compute dtype")
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args(argv)
    layers = args.layers or LAYERS.get(args.d)
    if not layers:
        p.error(f"--d={args.d} has no default depth; give --layers (defaults for {list(LAYERS)})")
    stack, stack_words = bc.stack_options(p, args)
    cfg = TransformerConfig(arch="encoder", num_layers=layers, d_model=args.d, num_heads=4,
                            d_ff=4 * args.d, residual="deepnorm",
                            remat_policy=resolve_remat_policy(args.remat, dtype=args.dtype),
                            dtype=args.dtype, **stack)
    batch = bc.random_batch(cfg, 8, 64)
    trainer = bc.JaxTrainer(cfg, batch)
    devices = jax.devices()
    if len(devices) > 1:  # data parallel over the (virtual) devices
        mesh = Mesh(np.array(devices), ("data",))
        trainer.state = jax.device_put(trainer.state, NamedSharding(mesh, PartitionSpec()))
        trainer.batch = jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))
    trainer.run(2)
    wall, cpu = [], []
    for _ in range(args.rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.run(2)
        wall.append((time.perf_counter() - t0) / 2)
        cpu.append((time.process_time() - c0) / 2)
    ms = statistics.median(wall) * 1e3
    print(bc.machine_line() + f"; {hugepages.describe()}; XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}")
    remat = resolve_remat_policy(args.remat, dtype=args.dtype)
    print(f"encoder d={args.d} L={layers} remat={remat} "
          f"{stack_words} {args.dtype} "
          f"devices={len(devices)}: "
          f"step ms {ms:.1f}, cpu ms {statistics.median(cpu) * 1e3:.1f}")
    return ms


if __name__ == "__main__":
    main()
