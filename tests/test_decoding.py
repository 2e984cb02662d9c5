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


# The KV cache against the full forward pass ------------------------------------------------

from flax import nnx  # noqa: E402

from deepnorm.config import RESIDUALS, TransformerConfig  # noqa: E402
from deepnorm.decoding import incremental  # noqa: E402
from deepnorm.residual import SCHEMES  # noqa: E402
from deepnorm.transformer import Transformer  # noqa: E402


def tiny_model(arch, residual, scan_layers=True, seed=0, **extra):
    layers = (dict(num_encoder_layers=2, num_decoder_layers=2) if arch == "encoder_decoder"
              else dict(num_layers=2))
    cfg = TransformerConfig(arch=arch, vocab_size=11, d_model=16, num_heads=2, d_ff=32,
                            residual=residual, norm="layernorm" if SCHEMES[residual].uses_norm
                            else "none", scan_layers=scan_layers, **layers, **extra)
    model = Transformer(cfg, rngs=nnx.Rngs(params=seed))
    # Perturb every parameter, so ReZero's gates, Admin's omegas and the norms' scales are
    # not at their special initial values (a zero gate would hide a wrong branch).
    graphdef, state = nnx.split(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def cached_logits(model, tokens_BxT, inputs_BxS=None):
    """Logits at every position from one-token decode steps over a cache."""
    b, t = tokens_BxT.shape
    cache = model.init_decode_cache(b, t + 2, inputs_BxS)
    out = []
    for i in range(t):
        logits, cache = model.decode_step(tokens_BxT[:, i:i + 1], cache)
        out.append(logits[:, 0])
    return jnp.stack(out, axis=1)


def full_logits(model, tokens_BxT, inputs_BxS=None):
    if model.config.arch == "encoder_decoder":
        return model(inputs_BxS, tokens_BxT)[0]
    return model(tokens_BxT)[0]


TOKENS = jnp.array([[1, 5, 7, 3, 9], [1, 4, 4, 10, 2]])
SOURCE = jnp.array([[3, 4, 5, 6, 0, 0], [7, 8, 9, 2, 5, 6]])  # row 0 padded


def _check_cache(arch, residual, scan_layers, **extra):
    model = tiny_model(arch, residual, scan_layers, **extra)
    graphdef, params = nnx.split(model, nnx.Param)
    src = SOURCE if arch == "encoder_decoder" else None

    @jax.jit  # one compilation for both passes
    def both(p):
        m = nnx.merge(graphdef, p)
        return cached_logits(m, TOKENS, src), full_logits(m, TOKENS, src)

    cached, full = both(params)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), rtol=1e-5, atol=1e-5,
                               err_msg=f"{arch} {residual} scan_layers={scan_layers} {extra}")


@pytest.mark.parametrize("arch,residual,scan_layers", [
    ("encoder_decoder", "deepnorm", True), ("decoder", "b2t", False),
    ("encoder_decoder", "rezero", False), ("decoder", "mixln", True),
    ("encoder_decoder", "resi_dual", True), ("decoder", "hyper", False),
    ("encoder_decoder", "dlcl", False), ("decoder", "dlcl", True)])
def test_cached_decoder_equals_full_pass(arch, residual, scan_layers):
    _check_cache(arch, residual, scan_layers)


@pytest.mark.parametrize("arch,residual", [("encoder_decoder", "normformer"),
                                           ("decoder", "pre")])
def test_cached_decoder_equals_full_pass_with_qk_norm(arch, residual):
    """QK-norm normalizes the cached keys before they are written and the cross-attention
    keys once per source; NormFormer's head scales sit in the cached path too."""
    _check_cache(arch, residual, True, qk_norm=True)


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("arch", ["encoder_decoder", "decoder"])
@pytest.mark.parametrize("residual", RESIDUALS)
def test_cached_decoder_equals_full_pass_every_scheme(arch, residual, scan_layers):
    _check_cache(arch, residual, scan_layers)


def test_cached_decoding_with_learned_positions():
    model = tiny_model("decoder", "pre", positions="learned", max_len=8)
    np.testing.assert_allclose(np.asarray(cached_logits(model, TOKENS)),
                               np.asarray(full_logits(model, TOKENS)), rtol=1e-5, atol=1e-5)


def test_cached_step_under_jit_equals_eager_and_beam_search_runs_on_the_model():
    model = tiny_model("encoder_decoder", "post")
    graphdef, params = nnx.split(model, nnx.Param)
    run = jax.jit(lambda p, s: cached_logits(nnx.merge(graphdef, p), TOKENS, s))
    np.testing.assert_allclose(np.asarray(run(params, SOURCE)),
                               np.asarray(cached_logits(model, TOKENS, SOURCE)),
                               rtol=1e-5, atol=1e-6)
    greedy = jax.jit(lambda p, s: incremental.translate_batch(
        graphdef, p, s, beam_size=1, max_steps=6, bos_id=1, eos_id=1))(params, SOURCE)

    def beam1(p, s):
        m = nnx.merge(graphdef, p)
        tokens, _ = search.beam_search(
            incremental.step_fn(m), m.init_decode_cache(2, 7, s), batch_size=2, beam_size=1,
            max_len_B=search.max_lengths(jnp.sum(s != 0, 1), 1.2, 10, 6), max_steps=6,
            bos_id=1, eos_id=1, reorder_cache=incremental.reorder_cache)
        return tokens[:, 0]

    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(jax.jit(beam1)(params, SOURCE)))
    # Greedy tokens re-scored by the full pass are each position's argmax (PAD banned).
    seq = np.asarray(greedy)
    dec_in = jnp.concatenate([jnp.ones((2, 1), jnp.int32), jnp.asarray(seq[:, :-1])], axis=1)
    logits = np.asarray(full_logits(model, dec_in, SOURCE)).copy()
    logits[..., 0] = -np.inf
    for b in range(2):
        n = min(len(strip(seq[b])), 6)  # the 7th token is EOS forced at max_steps=6
        np.testing.assert_array_equal(seq[b, :n], logits[b, :n].argmax(-1))
