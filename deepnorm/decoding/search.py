"""Greedy search, beam search and sampling as pure functions of a step function.

Every search here drives ``step_fn(last_token_B, cache) -> (logits_BxV, cache)``: it feeds the
token chosen at the previous position and gets the next position's logits; the cache (any
pytree: a KV cache, an RNN state, the prefix itself) keeps whatever the model needs about the
earlier positions, including its own position counter. Each search is one ``lax.while_loop``
over positions for a whole batch, so it jits (``max_steps`` and ``beam_size`` are static) and
stops as soon as every sentence is finished.

Lengths follow fairseq's ``sequence_generator``: ``max_len = a * src_len + b`` counts the
generated tokens before EOS; at that many tokens EOS is forced. Beam search's length penalty is
fairseq's ``score / len ** lenpen``, where ``score`` is the summed log-probability of the
hypothesis and ``len`` is the number of generated tokens *including* EOS (fairseq divides by
``step + 1`` with the EOS at index ``step`` of the tokens after BOS).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

StepFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]
NEG_INF = -jnp.inf


def max_lengths(src_len_B, a: float, b: int, max_steps: int) -> jax.Array:
    """fairseq's ``max_len_a * src_len + max_len_b`` per sentence, capped at ``max_steps``."""
    raw = jnp.floor(a * jnp.asarray(src_len_B, jnp.float32) + b).astype(jnp.int32)
    return jnp.clip(raw, 0, max_steps)


def gather_batch(cache, indices: jax.Array, batch_axis: int = 0):
    """Every cache leaf with at least ``batch_axis + 1`` axes, re-indexed along that axis.

    Leaves with fewer axes (a scalar position counter) are shared by all rows and kept.
    Used to expand a cache to beams (``repeat(arange(B), K)``) and to reorder beams.
    """
    def take(x):
        return jnp.take(x, indices, axis=batch_axis) if x.ndim > batch_axis else x
    return jax.tree.map(take, cache)


def _force_eos(logp_BxV: jax.Array, force_B: jax.Array, eos_id: int) -> jax.Array:
    """Rows in ``force_B`` can only continue with EOS, which keeps its own log-probability
    (as in fairseq: the hypothesis is scored by what the model gave EOS, not by 0)."""
    is_eos = jnp.arange(logp_BxV.shape[-1]) == eos_id
    return jnp.where(jnp.logical_and(force_B[:, None], ~is_eos[None]), NEG_INF, logp_BxV)


def generate(step_fn: StepFn, cache, *, prompt_BxP: jax.Array, prompt_len_B: jax.Array,
             max_len_B: jax.Array, max_steps: int, eos_id: int, pad_id: int = 0,
             temperature: float = 0.0, key: jax.Array | None = None):
    """Greedy (``temperature=0``) or temperature sampling after a prompt, for a batch.

    ``prompt_BxP`` holds each row's first ``prompt_len_B`` tokens (at least one: the start
    token for a decoder of encoder_decoder, the text to continue for decoder-only). Prompt
    tokens are fed one per step through the same ``step_fn`` (teacher forcing), so rows may
    have prompts of different lengths. At most ``max_len_B`` (<= ``max_steps``) tokens are
    generated after the prompt, then EOS. Returns ``(tokens [B, P + max_steps + 1], length_B)``:
    prompt, generated tokens, EOS, then ``pad_id``; ``length_B`` counts the generated tokens
    including the EOS.
    """
    b, p = prompt_BxP.shape
    total = p + max_steps + 1
    if temperature > 0 and key is None:
        raise ValueError("temperature sampling needs a PRNG key")
    key = jax.random.PRNGKey(0) if key is None else key
    tokens = jnp.full((b, total), pad_id, jnp.int32).at[:, :p].set(prompt_BxP.astype(jnp.int32))
    max_len_B = jnp.minimum(jnp.asarray(max_len_B, jnp.int32), max_steps)
    prompt_len_B = jnp.asarray(prompt_len_B, jnp.int32)

    def cond(carry):
        t, _, _, done, _ = carry
        return jnp.logical_and(t < total - 1, jnp.logical_not(jnp.all(done)))

    def body(carry):
        t, tokens, cache, done, key = carry
        logits, cache = step_fn(tokens[:, t], cache)
        generated = t + 1 - prompt_len_B  # tokens already generated before position t + 1
        logp = _force_eos(jax.nn.log_softmax(logits.astype(jnp.float32)),
                          generated >= max_len_B, eos_id)
        key, sub = jax.random.split(key)
        if temperature > 0:
            choice = jax.random.categorical(sub, logp / temperature)
            # A forced EOS stays forced whatever the temperature.
            choice = jnp.where(generated >= max_len_B, eos_id, choice)
        else:
            choice = jnp.argmax(logp, axis=-1)
        in_prompt = t + 1 < prompt_len_B
        forced = tokens[:, t + 1]  # the prompt's next token (padding past the prompt)
        nxt = jnp.where(in_prompt, forced, jnp.where(done, pad_id, choice)).astype(jnp.int32)
        tokens = tokens.at[:, t + 1].set(nxt)
        done = jnp.logical_or(done, jnp.logical_and(~in_prompt, nxt == eos_id))
        return t + 1, tokens, cache, done, key

    init = (jnp.int32(0), tokens, cache, jnp.zeros((b,), bool), key)
    _, tokens, _, _, _ = lax.while_loop(cond, body, init)
    after = jnp.arange(total)[None] >= prompt_len_B[:, None]
    length = jnp.sum(jnp.logical_and(after, tokens != pad_id), axis=1)
    return tokens, length


def greedy_search(step_fn: StepFn, cache, *, batch_size: int, max_len_B, max_steps: int,
                  bos_id: int, eos_id: int, pad_id: int = 0):
    """The argmax token at every position from ``bos_id``; returns ``tokens [B, max_steps +
    1]`` (the generated tokens, EOS, padding; BOS dropped)."""
    prompt = jnp.full((batch_size, 1), bos_id, jnp.int32)
    tokens, _ = generate(step_fn, cache, prompt_BxP=prompt,
                         prompt_len_B=jnp.ones((batch_size,), jnp.int32), max_len_B=max_len_B,
                         max_steps=max_steps, eos_id=eos_id, pad_id=pad_id)
    return tokens[:, 1:]


def beam_search(step_fn: StepFn, cache, *, batch_size: int, beam_size: int, max_len_B,
                max_steps: int, bos_id: int, eos_id: int, pad_id: int = 0,
                lenpen: float = 1.0, reorder_cache: Callable = gather_batch):
    """fairseq-style beam search for a batch; returns ``(tokens [B, K, max_steps + 1],
    scores [B, K])``, each sentence's K finished hypotheses best first (BOS dropped, EOS kept,
    then ``pad_id``), scored ``sum log p / len ** lenpen`` with ``len`` including EOS.

    ``cache`` is the cache for ``batch_size`` rows; it is expanded to ``B * K`` rows (row
    ``b * K + k`` is beam k of sentence b) and reordered after every step with
    ``reorder_cache(cache, row_indices)`` (default: a gather on every leaf's axis 0).

    Each step ranks the 2K best continuations of the K live beams by summed log-probability.
    As in fairseq, an EOS among the top K of them finishes a hypothesis (so beam 1 is exactly
    greedy search), and the K best non-EOS continuations stay live. A sentence is done once
    it holds K finished hypotheses (fairseq's stopping rule) or reaches its maximum length,
    where EOS is forced; the loop ends when every sentence is done. Where more than K
    hypotheses finish, the K with the best normalized score are kept.
    """
    bsz, k = batch_size, beam_size
    t_out = max_steps + 1
    max_len_B = jnp.minimum(jnp.asarray(max_len_B, jnp.int32), max_steps)
    cache = reorder_cache(cache, jnp.repeat(jnp.arange(bsz), k))
    alive_logp = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)[None], (bsz, 1))
    state = dict(
        t=jnp.int32(0), cache=cache,
        alive_tokens=jnp.full((bsz, k, t_out), pad_id, jnp.int32),
        alive_logp=alive_logp, last=jnp.full((bsz, k), bos_id, jnp.int32),
        fin_tokens=jnp.full((bsz, k, t_out), pad_id, jnp.int32),
        fin_scores=jnp.full((bsz, k), NEG_INF), done=jnp.zeros((bsz,), bool))

    def cond(s):
        return jnp.logical_and(s["t"] < t_out, jnp.logical_not(jnp.all(s["done"])))

    def body(s):
        t = s["t"]
        logits, cache = step_fn(s["last"].reshape(bsz * k), s["cache"])
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        logp = _force_eos(logp, jnp.repeat(t >= max_len_B, k), eos_id).reshape(bsz, k, vocab)
        cand = (s["alive_logp"][:, :, None] + logp).reshape(bsz, k * vocab)
        top_logp, top_idx = lax.top_k(cand, 2 * k)
        beam, tok = top_idx // vocab, top_idx % vocab
        is_eos = tok == eos_id
        prefixes = jnp.take_along_axis(s["alive_tokens"], beam[:, :, None], axis=1)
        with_tok = prefixes.at[:, :, t].set(tok)

        # Finished: EOS among the top K candidates, normalized by the length with EOS.
        finishing = jnp.logical_and(is_eos, jnp.arange(2 * k)[None] < k)
        norm = (t + 1).astype(jnp.float32) ** lenpen
        new_scores = jnp.where(finishing, top_logp / norm, NEG_INF)
        all_scores = jnp.concatenate([s["fin_scores"], new_scores], axis=1)
        all_tokens = jnp.concatenate([s["fin_tokens"], with_tok], axis=1)
        fin_scores, pick = lax.top_k(all_scores, k)
        fin_tokens = jnp.take_along_axis(all_tokens, pick[:, :, None], axis=1)
        keep = s["done"][:, None]
        fin_scores = jnp.where(keep, s["fin_scores"], fin_scores)
        fin_tokens = jnp.where(keep[:, :, None], s["fin_tokens"], fin_tokens)

        # Live: the K best continuations that are not EOS.
        alive_cand = jnp.where(is_eos, NEG_INF, top_logp)
        alive_logp, pick = lax.top_k(alive_cand, k)
        alive_tokens = jnp.take_along_axis(with_tok, pick[:, :, None], axis=1)
        last = jnp.take_along_axis(tok, pick, axis=1)
        src_beam = jnp.take_along_axis(beam, pick, axis=1)
        rows = (jnp.arange(bsz)[:, None] * k + src_beam).reshape(-1)
        cache = reorder_cache(cache, rows)

        full = jnp.all(jnp.isfinite(fin_scores), axis=1)
        done = s["done"] | full | (t >= max_len_B)
        return dict(t=t + 1, cache=cache, alive_tokens=alive_tokens, alive_logp=alive_logp,
                    last=last, fin_tokens=fin_tokens, fin_scores=fin_scores, done=done)

    out = lax.while_loop(cond, body, state)
    return out["fin_tokens"], out["fin_scores"]
