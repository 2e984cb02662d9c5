"""Matmul rates on this machine by dtype and form: why model.dtype=bfloat16 is written as it is.

    python benchmarks/matmul_forms.py            # ~1 min on 2 cores
    python benchmarks/matmul_forms.py --quick

Times, through XLA, one [m, k] x [k, n] product (m = 512 tokens, the vs_torchscale batch) in
the three forms a training step needs (forward x W, input gradient g W^T, weight gradient
x^T g summed over batch and positions) and in three dtype combinations: float32; bfloat16
inputs with a bfloat16 result (what ``jnp.dot`` of two bfloat16 arrays does); bfloat16 inputs
summed into a float32 result (``preferred_element_type=float32``, what
``deepnorm.layers.bf16_matmul`` issues). Plus the 2048^3 rates of ``bench_common``. Prints
GFLOP/s (median of ``--repeats``) and, last, the ratio of the bfloat16 -> float32 forward to
the float32 one. On CPUs without a fast bfloat16 path (no AMX / AVX512-BF16) that ratio is
about 1 or below, and model.dtype=bfloat16 buys nothing there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deepnorm.training import hugepages  # noqa: E402

if __name__ == "__main__":
    hugepages.reexec_with_hugepages(by_default=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import bench_common as bc  # noqa: E402

BF16, F32 = jnp.bfloat16, jnp.float32
# name -> (input dtype, result dtype); result None = the inputs' dtype
DTYPES = {"float32": (F32, None), "bf16 -> bf16": (BF16, None), "bf16 -> f32": (BF16, F32)}


def forms(m: int, k: int, n: int):
    """(name, dimension numbers, lhs shape, rhs shape) of the three matmuls of a step."""
    b, t = 8, m // 8
    return [
        ("forward x W", (((2,), (0,)), ((), ())), (b, t, k), (k, n)),
        ("input grad g W^T", (((2,), (1,)), ((), ())), (b, t, n), (k, n)),
        ("weight grad x^T g", (((0, 1), (0, 1)), ((), ())), (b, t, k), (b, t, n)),
    ]


def rate(dims, lhs_shape, rhs_shape, dtype, out_dtype, repeats: int) -> float:
    key = jax.random.PRNGKey(0)
    lhs = jax.random.normal(key, lhs_shape, dtype)
    rhs = jax.random.normal(jax.random.fold_in(key, 1), rhs_shape, dtype)
    f = jax.jit(lambda a, b: lax.dot_general(a, b, dims, preferred_element_type=out_dtype))
    out = f(lhs, rhs).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(lhs, rhs).block_until_ready()
        times.append(time.perf_counter() - t0)
    contracted = 1
    for d in dims[0][0]:
        contracted *= lhs_shape[d]
    return 2 * out.size * contracted / statistics.median(times)


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: one shape, few repeats")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args(argv)
    shapes = [(512, 512, 2048), (512, 256, 256)]
    if args.quick:
        shapes, args.repeats = shapes[:1], 5
    print(bc.machine_line() + f"; {hugepages.describe()}")
    print(f"# GFLOP/s, median of {args.repeats}; m = tokens, k = contracted width, "
          f"n = output width")
    print(f"{'m x k x n':<18}{'form':<20}" + "".join(f"{name:>14}" for name in DTYPES))
    fwd = {}
    for m, k, n in shapes:
        for form, dims, ls, rs in forms(m, k, n):
            rates = [rate(dims, ls, rs, dt, out, args.repeats) for dt, out in DTYPES.values()]
            if form.startswith("forward") and (m, k, n) == shapes[0]:
                fwd = dict(zip(DTYPES, rates))
            print(f"{f'{m}x{k}x{n}':<18}{form:<20}" + "".join(f"{r / 1e9:>14,.0f}" for r in rates),
                  flush=True)
    for name, dt in (("float32", F32), ("bf16 -> f32", BF16)):
        print(f"# 2048^3 {name}: {bc.matmul_peak_flops(2048, dt, repeats=10) / 1e9:,.0f} GFLOP/s")
    ratio = fwd["bf16 -> f32"] / fwd["float32"]
    print(f"RATIO bf16 -> f32 / float32 forward matmul at {shapes[0]}: {ratio:.2f}x")
    return ratio


if __name__ == "__main__":
    main()
