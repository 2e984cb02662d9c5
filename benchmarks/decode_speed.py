"""Greedy translation with the KV cache against recomputing the whole prefix at every step.

Same model, same sources, same search (``deepnorm.decoding.search.greedy_search``); the two
step functions differ only in what they compute per token, and their outputs are checked
equal before anything is timed. Prints sentences/s of each and the ratio, per depth.

    python benchmarks/decode_speed.py                     # 6 and 48 decoder layers
    python benchmarks/decode_speed.py --layers=6 --steps=32
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deepnorm.config import TransformerConfig
from deepnorm.decoding import incremental, search
from deepnorm.transformer import Transformer

EOS = 1


def recompute_step(model, enc_inputs, max_steps):
    """A step function whose cache is the prefix itself: each step runs the full decoder."""
    def step(token_B, cache):
        prefix, t = cache
        prefix = prefix.at[:, t].set(token_B)
        logits, _ = model(enc_inputs, prefix)  # causal: position t sees only 0..t
        logits = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)
        return logits.at[:, 0].set(incremental.BANNED_LOGIT), (prefix, t + 1)
    return step, (jnp.zeros((enc_inputs.shape[0], max_steps + 1), jnp.int32), jnp.int32(0))


def run(layers, batch, src_len, steps, repeats):
    cfg = TransformerConfig(arch="encoder_decoder", num_encoder_layers=layers,
                            num_decoder_layers=layers, d_model=128, num_heads=4, d_ff=512,
                            residual="deepnorm")
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=0)), nnx.Param)
    src = jnp.asarray(np.random.default_rng(0).integers(4, 260, (batch, src_len)), jnp.int32)
    # max_len_b = steps, a = 0: every sentence decodes the same number of tokens, EOS banned
    # below so neither variant stops early.
    kw = dict(batch_size=batch, max_len_B=jnp.full((batch,), steps), max_steps=steps,
              bos_id=EOS, eos_id=EOS)

    @jax.jit
    def cached(p, s):
        m = nnx.merge(graphdef, p)
        step = incremental.step_fn(m, banned_ids=(0, EOS))
        return search.greedy_search(step, m.init_decode_cache(batch, steps + 1, s), **kw)

    @jax.jit
    def recomputed(p, s):
        m = nnx.merge(graphdef, p)
        step, cache = recompute_step(m, s, steps)
        def no_eos(t, c):
            logits, c = step(t, c)
            return logits.at[:, EOS].set(incremental.BANNED_LOGIT), c
        return search.greedy_search(no_eos, cache, **kw)

    out = {}
    for name, fn in (("cache", cached), ("recompute", recomputed)):
        tokens = jax.block_until_ready(fn(params, src))  # compile
        start = time.perf_counter()
        for _ in range(repeats):
            tokens = jax.block_until_ready(fn(params, src))
        out[name] = (batch * repeats / (time.perf_counter() - start), np.asarray(tokens))
    np.testing.assert_array_equal(out["cache"][1], out["recompute"][1])
    return out["cache"][0], out["recompute"][0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="*", default=[6, 48])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--src_len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"greedy, d=128, batch {args.batch}, source {args.src_len} tokens, {args.steps} "
          f"decoded tokens, {jax.default_backend()} ({jax.device_count()} devices)")
    for layers in args.layers:
        fast, slow = run(layers, args.batch, args.src_len, args.steps, args.repeats)
        print(f"{layers:>3} + {layers} layers: cache {fast:8.2f} sent/s, recompute "
              f"{slow:8.2f} sent/s, ratio {fast / slow:.2f}x (outputs equal)")


if __name__ == "__main__":
    main()
