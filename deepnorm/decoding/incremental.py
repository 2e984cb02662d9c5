"""The Transformer as a step function for ``deepnorm.decoding.search``, with a KV cache.

``model.init_decode_cache`` allocates the decoder's self-attention keys and values as stacked
arrays [L, B, T_max, H, K] (scanned with the layers, like the parameters) and, for
encoder_decoder, runs the encoder once and stores every layer's cross-attention keys and
values. ``model.decode_step`` then costs one position per token instead of the whole prefix.
Everything but attention is position-wise, so caching self-attention keys and values is enough
for every residual scheme and norm (tests/test_decoding.py checks each against the full pass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from deepnorm import variables
from deepnorm.decoding import search

BANNED_LOGIT = -1e9  # padding is never generated (finite: no -inf arithmetic in the scores)


def reorder_cache(cache: dict, rows: jax.Array) -> dict:
    """The cache for the batch rows ``rows``: layer arrays have the batch on axis 1, the
    cross-attention mask on axis 0, the position counter is shared."""
    out = dict(cache, layers=search.gather_batch(cache["layers"], rows, batch_axis=1))
    if "cross_mask" in cache:
        out["cross_mask"] = jnp.take(cache["cross_mask"], rows, axis=0)
    return out


def step_fn(model, banned_ids=(0,)):
    """``step(last_token_B, cache) -> (logits_BxV, cache)`` over ``model.decode_step``."""
    def step(token_B, cache):
        logits, cache = model.decode_step(token_B[:, None], cache)
        logits = logits[:, 0]
        if banned_ids:
            logits = logits.at[:, jnp.asarray(banned_ids)].set(BANNED_LOGIT)
        return logits, cache
    return step


def translate_batch(graphdef, params, inputs_BxS, *, beam_size: int = 5, lenpen: float = 1.0,
                    max_len_a: float = 1.2, max_len_b: int = 10, max_steps: int = 128,
                    bos_id: int = 1, eos_id: int = 1, pad_id: int = 0, banned_ids=(0,),
                    batch_stats=None):
    """Best hypothesis per source row of an encoder_decoder: tokens [B, max_steps + 1]
    (EOS, then padding). ``beam_size=1`` is greedy search. Jit it with the static arguments.
    ``batch_stats``: the running statistics of batch-statistics norms (deepnorm.variables)."""
    model = variables.merge(graphdef, params, batch_stats)
    b = inputs_BxS.shape[0]
    src_len = jnp.sum(inputs_BxS != pad_id, axis=1)
    max_len = search.max_lengths(src_len, max_len_a, max_len_b, max_steps)
    cache = model.init_decode_cache(b, max_steps + 1, inputs_BxS)
    step = step_fn(model, banned_ids)
    kw = dict(batch_size=b, max_len_B=max_len, max_steps=max_steps, bos_id=bos_id,
              eos_id=eos_id, pad_id=pad_id)
    if beam_size == 1:
        return search.greedy_search(step, cache, **kw)
    tokens, _ = search.beam_search(step, cache, beam_size=beam_size, lenpen=lenpen,
                                   reorder_cache=reorder_cache, **kw)
    return tokens[:, 0]


def continue_text(graphdef, params, prompt_BxP, prompt_len_B, *, max_new: int,
                  temperature: float = 0.0, key=None, eos_id: int = 1, pad_id: int = 0,
                  banned_ids=(0,), batch_stats=None):
    """Decoder-only continuation: greedy (``temperature=0``) or sampled, up to ``max_new``
    tokens after each prompt; returns ``search.generate``'s ``(tokens, length)``.
    ``batch_stats`` as for ``translate_batch``."""
    model = variables.merge(graphdef, params, batch_stats)
    b, p = prompt_BxP.shape
    cache = model.init_decode_cache(b, p + max_new + 1)
    return search.generate(step_fn(model, banned_ids), cache, prompt_BxP=prompt_BxP,
                           prompt_len_B=prompt_len_B, max_len_B=jnp.full((b,), max_new),
                           max_steps=max_new, eos_id=eos_id, pad_id=pad_id,
                           temperature=temperature, key=key)
