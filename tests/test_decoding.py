"""Search (greedy, beam, sampling) against enumeration and formulas; the KV cache against the
full forward pass."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepnorm.decoding import search

PAD, EOS = 0, 1
VOCAB = 5  # PAD (never produced), EOS and three word tokens


class ToyRNN:
    """A tiny model whose next-token logits depend on the whole prefix: h <- tanh(h A + E[tok]),
    logits = h W (PAD banned). The cache is h itself, [B, D]."""

    def __init__(self, seed, d=6, scale=2.0):
        rng = np.random.default_rng(seed)
        self.a = rng.normal(size=(d, d)).astype(np.float32) * 0.8
        self.e = rng.normal(size=(VOCAB, d)).astype(np.float32)
        self.w = rng.normal(size=(d, VOCAB)).astype(np.float32) * scale
        self.d = d

    @classmethod
    def from_arrays(cls, a, e, w):
        model = cls.__new__(cls)
        model.a, model.e, model.w, model.d = a, e, w, a.shape[0]
        return model

    def init_cache(self, batch):
        return jnp.zeros((batch, self.d), jnp.float32)

    def step(self, token_B, h):
        h = jnp.tanh(h @ self.a + jnp.asarray(self.e)[token_B])
        logits = (h @ self.w).at[:, PAD].set(-1e9)
        return logits, h

    def logprob(self, seq, bos=EOS):
        """Summed log-probability of ``seq`` (ending in EOS) after ``bos``, in NumPy float64."""
        h, total, prev = np.zeros(self.d), 0.0, bos
        a, e, w = (x.astype(np.float64) for x in (self.a, self.e, self.w))
        for tok in seq:
            h = np.tanh(h @ a + e[prev])
            logits = h @ w
            logits[PAD] = -1e9
            m = logits.max()
            total += logits[tok] - (m + np.log(np.exp(logits - m).sum()))
            prev = tok
        return total


def all_hypotheses(max_len):
    """Every word sequence of 0..max_len tokens, each followed by EOS."""
    words = range(2, VOCAB)
    for n in range(max_len + 1):
        for body in itertools.product(words, repeat=n):
            yield list(body) + [EOS]


def strip(tokens):
    tokens = list(np.asarray(tokens))
    return tokens[: tokens.index(EOS) + 1]


@jax.jit
def _wide_beam(a, e, w, lenpen):
    model = ToyRNN.from_arrays(a, e, w)
    return search.beam_search(model.step, model.init_cache(1), batch_size=1, beam_size=64,
                              max_len_B=[3], max_steps=3, bos_id=EOS, eos_id=EOS, lenpen=lenpen)


def test_wide_beam_finds_the_best_sequence_exhaustive_enumeration_finds():
    for seed, lenpen in [(0, 0.0), (1, 1.0), (2, 2.5), (3, 0.6)]:
        model = ToyRNN(seed)
        tokens, scores = _wide_beam(model.a, model.e, model.w, lenpen)
        scored = [(model.logprob(h) / len(h) ** lenpen, h) for h in all_hypotheses(3)]
        best_score, best = max(scored, key=lambda x: x[0])
        assert strip(tokens[0, 0]) == best
        np.testing.assert_allclose(float(scores[0, 0]), best_score, rtol=1e-5)
        # The K finished hypotheses are the K best of all 40, in order.
        top = sorted((s for s, _ in scored), reverse=True)
        np.testing.assert_allclose(np.asarray(scores[0, :len(top)]), top, rtol=1e-4)


def test_beam_one_is_greedy_and_jit_agrees():
    model = ToyRNN(7, scale=1.0)
    batch, max_steps = 4, 6
    max_len = jnp.array([6, 3, 5, 1])
    greedy = jax.jit(lambda: search.greedy_search(
        model.step, model.init_cache(batch), batch_size=batch, max_len_B=max_len,
        max_steps=max_steps, bos_id=EOS, eos_id=EOS))()

    def beam(cache, lenpen):
        return search.beam_search(model.step, cache, batch_size=batch, beam_size=1,
                                  max_len_B=max_len, max_steps=max_steps, bos_id=EOS,
                                  eos_id=EOS, lenpen=lenpen)

    jit_beam = jax.jit(beam)
    for lenpen in (0.0, 0.6, 1.0):
        tokens, scores = jit_beam(model.init_cache(batch), lenpen)
        np.testing.assert_array_equal(np.asarray(tokens[:, 0]), np.asarray(greedy))
        for b in range(batch):
            hyp = strip(greedy[b])
            assert len(hyp) <= int(max_len[b]) + 1  # at most max_len words, then EOS
            np.testing.assert_allclose(float(scores[b, 0]),
                                       model.logprob(hyp) / len(hyp) ** lenpen, rtol=1e-5)
    eager_tokens, eager_scores = beam(model.init_cache(batch), 1.0)  # not under jax.jit
    np.testing.assert_array_equal(np.asarray(eager_tokens), np.asarray(tokens))
    np.testing.assert_allclose(np.asarray(eager_scores), np.asarray(scores), rtol=1e-6)


class PositionTable:
    """Logits that depend on the position only: "EOS" has p = 0.55; "w EOS" has 0.45 * 0.9.
    So sum log p is -0.598 (length 1) against -0.904 (length 2): the longer one wins exactly
    when 2 ** lenpen > 0.904 / 0.598 = 1.512, i.e. lenpen > 0.596."""

    def __init__(self):
        table = np.full((4, VOCAB), 1e-9)
        table[0, EOS], table[0, 2] = 0.55, 0.45
        table[1, EOS], table[1, 2] = 0.9, 0.1
        table[2:, EOS] = 1.0
        self.logits = jnp.log(jnp.asarray(table / table.sum(1, keepdims=True), jnp.float32))

    def step(self, token_B, pos_B):
        return self.logits[pos_B], pos_B + 1


def test_length_penalty_changes_the_choice_where_its_formula_says():
    threshold = np.log(np.log(0.45 * 0.9) / np.log(0.55)) / np.log(2.0)
    assert 0.59 < threshold < 0.60
    table = PositionTable()
    run = jax.jit(lambda lenpen: search.beam_search(
        table.step, jnp.zeros((1,), jnp.int32), batch_size=1, beam_size=2, max_len_B=[3],
        max_steps=3, bos_id=EOS, eos_id=EOS, lenpen=lenpen))
    for lenpen, expected in [(0.0, [EOS]), (0.5, [EOS]), (0.7, [2, EOS]), (1.0, [2, EOS])]:
        assert (lenpen > threshold) == (len(expected) == 2)
        tokens, scores = run(lenpen)
        assert strip(tokens[0, 0]) == expected
        logp = np.log(0.55) if len(expected) == 1 else np.log(0.45 * 0.9)
        np.testing.assert_allclose(float(scores[0, 0]), logp / len(expected) ** lenpen,
                                   rtol=1e-5)


def test_max_lengths_follow_a_times_source_length_plus_b():
    np.testing.assert_array_equal(
        np.asarray(search.max_lengths(jnp.array([1, 4, 10]), 1.5, 2, max_steps=12)),
        [3, 8, 12])


def test_prompted_generation_keeps_each_prompt_then_continues_greedily():
    model = ToyRNN(3, scale=1.0)
    prompt = jnp.array([[EOS, 2, 3, 4], [EOS, 4, 0, 0]])
    lengths = jnp.array([4, 2])
    tokens, n = search.generate(model.step, model.init_cache(2), prompt_BxP=prompt,
                                prompt_len_B=lengths, max_len_B=jnp.array([5, 5]),
                                max_steps=5, eos_id=EOS)
    for b in range(2):
        p, row = int(lengths[b]), list(np.asarray(tokens[b]))
        assert row[:p] == list(np.asarray(prompt[b, :p]))
        generated = strip(row[p:])
        assert int(n[b]) == len(generated)
        # Every generated token but a forced final EOS is the argmax after all before it.
        h = model.init_cache(1)
        for i in range(p + len(generated) - 1):
            logits, h = model.step(jnp.array([row[i]]), h)
            if i + 1 >= p and i + 1 - p < 5:
                assert row[i + 1] == int(jnp.argmax(logits[0]))


def test_temperature_sampling_matches_the_softmax_and_tiny_temperature_is_greedy():
    model = ToyRNN(5, scale=1.0)
    batch = 2000
    prompt = jnp.full((batch, 1), EOS, jnp.int32)
    kw = dict(prompt_BxP=prompt, prompt_len_B=jnp.ones((batch,), jnp.int32),
              max_len_B=jnp.full((batch,), 2), max_steps=2, eos_id=EOS)
    tokens, _ = jax.jit(lambda key: search.generate(
        model.step, model.init_cache(batch), temperature=1.0, key=key, **kw))(
        jax.random.PRNGKey(0))
    logits, _ = model.step(jnp.array([EOS]), model.init_cache(1))
    probs = np.asarray(jax.nn.softmax(logits[0]))
    freq = np.bincount(np.asarray(tokens[:, 1]), minlength=VOCAB) / batch
    sigma = np.sqrt(probs * (1 - probs) / batch)
    assert np.all(np.abs(freq - probs) <= 4 * sigma + 1e-9), (freq, probs)
    cold, _ = jax.jit(lambda key: search.generate(
        model.step, model.init_cache(batch), temperature=1e-4, key=key, **kw))(
        jax.random.PRNGKey(1))
    greedy = search.greedy_search(model.step, model.init_cache(1), batch_size=1,
                                  max_len_B=[2], max_steps=2, bos_id=EOS, eos_id=EOS)
    assert np.all(np.asarray(cold[:, 1:]) == np.asarray(greedy))
