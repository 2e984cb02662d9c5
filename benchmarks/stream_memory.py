"""Backward-pass memory per layer of the multi-stream schemes against Pre-LN's.

A scheme with n residual streams (``Scheme.streams``: ResiDual 2, hyper-connections 4) carries
an [n, B, T, D] array through the layer scan, and the scan keeps each layer's input carry for
the backward pass. This reads XLA's own figure: ``memory_analysis().temp_size_in_bytes`` of the
compiled gradient of a decoder's loss (remat ``full``: a layer keeps nothing else), at 8 and 16
layers; the difference over 8 is the memory one more layer costs, printed in units of one
stream's B x T x D float32. A property of the compiled program, not a timing: the machine's
load does not change it.

    python benchmarks/stream_memory.py                       # pre, resi_dual, hyper
    python benchmarks/stream_memory.py --residuals pre,hyper
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from deepnorm import Transformer, TransformerConfig

try:  # run as `python benchmarks/stream_memory.py` from the repository root
    from bench_common import machine_line
except ImportError:  # pragma: no cover - imported as benchmarks.stream_memory
    from benchmarks.bench_common import machine_line

B, T, D = 4, 64, 64
DEPTHS = (8, 16)


def temp_bytes(residual: str, num_layers: int) -> int:
    """XLA's temporary buffer bytes of the loss gradient, compiled on abstract arguments."""
    cfg = TransformerConfig(arch="decoder", num_layers=num_layers, d_model=D, num_heads=2,
                            d_ff=2 * D, residual=residual, remat_policy="full")
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)

    def loss(p, tokens):
        return jnp.mean(nnx.merge(graphdef, p)(tokens)[0] ** 2)

    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--residuals", default="pre,resi_dual,hyper")
    args = parser.parse_args(argv)
    print(machine_line())
    print(f"# decoder, d_model={D}, batch {B}x{T}, remat full; temp bytes of the gradient at "
          f"{DEPTHS[0]} and {DEPTHS[1]} layers")
    print("| residual | temp MiB (8) | temp MiB (16) | per layer KiB | per layer / (B T D float32) |")
    print("|---|--:|--:|--:|--:|")
    stream = B * T * D * 4
    for residual in args.residuals.split(","):
        lo, hi = (temp_bytes(residual, n) for n in DEPTHS)
        per_layer = (hi - lo) / (DEPTHS[1] - DEPTHS[0])
        print(f"| {residual} | {lo / 2**20:.2f} | {hi / 2**20:.2f} | {per_layer / 2**10:.1f} | "
              f"{per_layer / stream:.2f} |", flush=True)


if __name__ == "__main__":
    main()
