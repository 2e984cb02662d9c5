"""The training diagnostics (deepnorm.training.diagnostics) against direct NumPy computations:
attention max logit and entropy (ops and a whole model, with padding), kurtosis and max-abs,
update / parameter ratios and Adam's nu per group, z-loss; the off switch; jit vs eager."""

import math
import os
import sys

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from deepnorm import ConfigError, Transformer, TransformerConfig, ops
from deepnorm.training import diagnostics, optim, state, steps
from deepnorm.training.loss import loss_sums
from deepnorm.transformer import sinusoidal_positions, token_kurtosis, token_max_abs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for `configs`
from configs import base  # noqa: E402


def np_softmax_stats(logits, keep, query_w):
    """Explicit attention weights -> per-head max logit over the kept (real query, attended
    key) pairs and the query-weighted mean entropy -sum p log p; logits [B, H, T, S]."""
    masked = np.where(keep, logits, -np.inf)
    p = np.exp(masked - masked.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    plogp = np.where(keep, p * np.log(np.where(keep, p, 1.0)), 0.0)
    entropy_bht = -plogp.sum(-1)
    real = (query_w > 0)[:, None, :, None]
    logit_max = np.where(keep & real, logits, -np.inf).max(axis=(0, 2, 3))
    entropy = np.einsum("bht,bt->h", entropy_bht, query_w)
    return p, logit_max, entropy


# --- ops.attention_with_stats --------------------------------------------------------------

@pytest.mark.parametrize("impl", [None, "xla"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_stats_match_explicit_attention_weights(impl, causal):
    rng = np.random.default_rng(0)
    b, t, h, k = 3, 6, 2, 4
    q, kk, v = (rng.normal(size=(b, t, h, k)).astype(np.float32) * 2 for _ in range(3))
    real = np.ones((b, t), bool)
    real[0, 4:] = real[2, 1:] = False  # padding at the ends
    query_w = real / real.sum()
    mask = real[:, None, None, :]
    out, stats = ops.attention_with_stats(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v),
                                          jnp.asarray(query_w, jnp.float32), mask=mask,
                                          causal=causal, impl=impl)
    keep = np.broadcast_to(mask, (b, h, t, t))
    if causal:
        keep = keep & np.tril(np.ones((t, t), bool))
    logits = np.einsum("bthk,bshk->bhts", q, kk) / math.sqrt(k)
    p, logit_max, entropy = np_softmax_stats(logits, keep, query_w)
    np.testing.assert_allclose(stats["logit_max"], logit_max, rtol=1e-5)
    np.testing.assert_allclose(stats["entropy"], entropy, rtol=1e-5, atol=1e-6)
    # real queries' outputs are the attention's own (padding queries see the same keys too)
    np.testing.assert_allclose(out, np.einsum("bhts,bshk->bthk", p, v), rtol=1e-5, atol=1e-5)
    plain = ops.attention(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v), mask=mask,
                          causal=causal, impl=impl)
    np.testing.assert_allclose(out, plain, rtol=1e-6, atol=1e-6)


def test_uniform_attention_has_entropy_log_of_the_keys_it_sees():
    b, t, h, k = 1, 5, 1, 2
    zeros = jnp.zeros((b, t, h, k))
    _, stats = ops.attention_with_stats(zeros, zeros, zeros, jnp.full((b, t), 1 / t),
                                        causal=True)
    # query i sees i + 1 keys, all with logit 0: entropy log(i + 1)
    assert float(stats["entropy"][0]) == pytest.approx(np.mean(np.log(np.arange(1, t + 1))))
    assert float(stats["logit_max"][0]) == 0.0


# --- kurtosis and max-abs ------------------------------------------------------------------

def test_kurtosis_and_max_abs_match_numpy_over_the_real_tokens():
    rng = np.random.default_rng(1)
    x = rng.standard_t(3, size=(3, 7, 8)).astype(np.float32)
    mask = rng.random((3, 7)) < 0.6
    mask[0, 0] = True
    x[~mask] = 1e3  # padding values must not count
    real = x[mask].astype(np.float64).ravel()
    centred = real - real.mean()
    want = np.mean(centred ** 4) / np.mean(centred ** 2) ** 2
    assert float(token_kurtosis(jnp.asarray(x), jnp.asarray(mask))) == pytest.approx(want,
                                                                                    rel=1e-4)
    assert float(token_max_abs(jnp.asarray(x), jnp.asarray(mask))) == np.abs(real).max()
    every = x.astype(np.float64).ravel() - x.mean()
    assert float(token_kurtosis(jnp.asarray(x))) == pytest.approx(
        np.mean(every ** 4) / np.mean(every ** 2) ** 2, rel=1e-4)
    assert float(token_kurtosis(jnp.ones((2, 3, 4)))) == 0.0  # constant: undefined, 0


# --- the statistics of a whole (one-layer Pre-LN) model, recomputed in NumPy ----------------

def _np_layernorm(x, scale, bias, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_model_attention_and_activation_stats_match_numpy(arch):
    cfg = TransformerConfig(arch=arch, num_layers=1, d_model=16, num_heads=2, d_ff=32,
                            residual="pre", remat_policy="none")
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    tokens = np.array([[5, 9, 11, 7, 3, 0], [4, 8, 0, 0, 0, 0]], np.int32)
    _, aux = model(jnp.asarray(tokens), extra_stats=("attention", "activations"))
    stack = aux[arch]
    p = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    layer = jax.tree.map(lambda a: np.asarray(a[0], np.float64), p[arch]["layers"])
    d, heads = cfg.d_model, cfg.num_heads
    x0 = (np.asarray(p["embed"], np.float64)[tokens] * math.sqrt(d)
          + sinusoidal_positions(tokens.shape[1], d))
    norm = layer["self_attn_norm"]
    hidden = _np_layernorm(x0, norm["scale"], norm["bias"])
    att = layer["self_attn"]
    q, k, v = (hidden @ att[n]["kernel"] + att[n]["bias"] for n in ("query", "key", "value"))
    b, t = tokens.shape
    split = lambda a: a.reshape(b, t, heads, d // heads)  # noqa: E731
    logits = np.einsum("bthk,bshk->bhts", split(q), split(k)) / math.sqrt(d // heads)
    real = tokens != 0
    keep = np.broadcast_to(real[:, None, None, :], logits.shape) if arch == "encoder" else \
        np.broadcast_to(np.tril(np.ones((t, t), bool)), logits.shape)
    query_w = real / real.sum()
    probs, logit_max, entropy = np_softmax_stats(logits, keep, query_w)
    np.testing.assert_allclose(stack["self_attn_logit_max"][0], logit_max, rtol=1e-4)
    np.testing.assert_allclose(stack["self_attn_entropy"][0], entropy, rtol=1e-4)
    branch = (np.einsum("bhts,bshk->bthk", probs, split(v)).reshape(b, t, d)
              @ att["out"]["kernel"] + att["out"]["bias"])
    stream = x0 + branch  # Pre-LN: x + f(LN(x))
    for kind, y in (("branch", branch), ("stream", stream)):
        vals = y[real].ravel()
        c = vals - vals.mean()
        assert float(stack[f"{kind}_kurtosis"][0, 0]) == pytest.approx(
            np.mean(c ** 4) / np.mean(c ** 2) ** 2, rel=1e-4)
        assert float(stack[f"{kind}_max_abs"][0, 0]) == pytest.approx(np.abs(vals).max(),
                                                                       rel=1e-5)


# --- the training step ---------------------------------------------------------------------

TINY = TransformerConfig(arch="decoder", num_layers=2, d_model=16, num_heads=2, d_ff=32,
                         residual="pre", remat_policy="none")


def batch_for(cfg, b=4, t=8, seed=0):
    rng = np.random.default_rng(seed)
    out = {"inputs": rng.integers(4, cfg.vocab_size, (b, t)).astype(np.int32),
           "targets": rng.integers(4, cfg.vocab_size, (b, t)).astype(np.int32),
           "weights": np.ones((b, t), np.float32)}
    out["weights"][1, 5:] = 0.0
    if cfg.arch == "encoder_decoder":
        out["decoder_inputs"] = rng.integers(4, cfg.vocab_size, (b, t)).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def tiny():
    opt = ml_collections.ConfigDict(dict(base.optimizer_config(), learning_rate=1e-2,
                                         warmup_steps=0))
    tx, _ = optim.make_optimizer(opt, 10)
    graphdef, st = state.create_train_state(TINY, tx, seed=0)
    return graphdef, tx, st


def _leaves(tree):
    return {tuple(str(getattr(e, "key", e)) for e in path): np.asarray(leaf, np.float64)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _in_group(names, group):
    """The test's own reading of the groups, from the parameter paths."""
    if group == "norms":
        return any("norm" in n for n in names)
    if any("norm" in n for n in names):
        return False
    if group == "embeddings":
        return names[-1] in ("embed", "pos_embed")
    return group in names[:-1]


def test_update_ratio_per_group_is_the_norm_ratio_of_the_update(tiny):
    graphdef, tx, st = tiny
    step = jax.jit(steps.make_train_step(graphdef, tx, diagnostics={"updates"}))
    new, m = step(st, batch_for(TINY))
    old, upd = _leaves(st.params), _leaves(new.params)
    groups = ("query", "key", "value", "out", "ffn_in", "ffn_out", "norms", "embeddings")
    assert sorted(k for k in m if k.startswith("update_ratio_") and "per_layer" not in k) == \
        sorted(f"update_ratio_{g}" for g in groups)
    covered = set()
    for g in groups:
        names = [n for n in old if _in_group(n, g)]
        covered |= set(names)
        du = math.sqrt(sum(np.sum((upd[n] - old[n]) ** 2) for n in names))
        pn = math.sqrt(sum(np.sum(old[n] ** 2) for n in names))
        assert float(m[f"update_ratio_{g}"]) == pytest.approx(du / pn, rel=1e-4), g
        layered = [n for n in names if n[:2] == ("decoder", "layers")]
        assert (f"update_ratio_{g}_per_layer" in m) == bool(layered), g
        for i in range(TINY.num_layers if layered else 0):
            du = math.sqrt(sum(np.sum((upd[n][i] - old[n][i]) ** 2) for n in layered))
            pn = math.sqrt(sum(np.sum(old[n][i] ** 2) for n in layered))
            assert float(m[f"update_ratio_{g}_per_layer"][i]) == pytest.approx(du / pn,
                                                                               rel=1e-4), g
    assert covered == set(old)  # the groups partition the parameters


def test_adam_nu_statistics_are_those_of_the_optimizer_state(tiny):
    graphdef, tx, st = tiny
    step = jax.jit(steps.make_train_step(graphdef, tx, diagnostics={"adam"}))
    new, m = step(st, batch_for(TINY))
    nu = _leaves(diagnostics.adam_second_moments(new.opt_state))
    for g in ("query", "ffn_out", "norms", "embeddings"):
        names = [n for n in nu if _in_group(n, g)]
        values = np.concatenate([nu[n].ravel() for n in names])
        assert float(m[f"adam_nu_mean_{g}"]) == pytest.approx(values.mean(), rel=1e-4)
        assert float(m[f"adam_nu_max_{g}"]) == pytest.approx(values.max(), rel=1e-5)
    layered = [n for n in nu if n[:2] == ("decoder", "layers")]
    for i in range(TINY.num_layers):
        assert float(m["adam_nu_max_per_layer"][i]) == pytest.approx(
            max(nu[n][i].max() for n in layered), rel=1e-5)


def test_z_loss_is_the_palm_formula(tiny):
    graphdef, tx, st = tiny
    batch, coefficient = batch_for(TINY), 1e-3
    logits = np.asarray(jax.jit(lambda p: nnx.merge(graphdef, p)(batch["inputs"])[0])(
        st.params), np.float64)
    top = logits.max(-1)
    lse = np.log(np.sum(np.exp(logits - top[..., None]), -1)) + top
    w = np.asarray(batch["weights"], np.float64)
    want = coefficient * np.sum(w * lse ** 2) / w.sum()
    kw = dict(diagnostics=False, label_smoothing=0.1)
    _, m0 = jax.jit(steps.make_train_step(graphdef, tx, **kw))(st, batch)
    _, m1 = jax.jit(steps.make_train_step(graphdef, tx, z_loss=coefficient, **kw))(st, batch)
    assert "z_loss" not in m0
    assert float(m1["z_loss"]) == pytest.approx(want, rel=1e-5)
    assert float(m1["loss"]) == pytest.approx(float(m0["loss"]) + want, rel=1e-6)
    assert float(m1["nll"]) == pytest.approx(float(m0["nll"]), rel=1e-6)

    # It is optimized: the gradient is that of the smoothed loss plus the formula.
    def objective(params):
        model = nnx.merge(graphdef, params)
        total, _, _ = loss_sums(model, batch, label_smoothing=0.1)
        log_z = jax.nn.logsumexp(model(batch["inputs"])[0], axis=-1)
        return (total + coefficient * jnp.sum(batch["weights"] * log_z ** 2)) / w.sum()

    g = jax.jit(jax.grad(objective))(st.params)
    assert float(m1["grad_norm"]) == pytest.approx(
        math.sqrt(sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(g))), rel=1e-4)
    assert float(m1["grad_norm"]) != pytest.approx(float(m0["grad_norm"]), rel=1e-6)


def test_output_logit_stats_match_numpy(tiny):
    graphdef, tx, st = tiny
    batch = batch_for(TINY)
    _, m = jax.jit(steps.make_train_step(graphdef, tx, diagnostics={"logits"}))(st, batch)
    logits = np.asarray(nnx.merge(graphdef, st.params)(batch["inputs"])[0], np.float64)
    w = np.asarray(batch["weights"]) > 0
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    assert float(m["output_logit_norm"]) == pytest.approx(
        np.linalg.norm(logits, axis=-1)[w].mean(), rel=1e-5)
    assert float(m["output_logit_max"]) == pytest.approx(logits[w].max(), rel=1e-6)
    assert float(m["output_log_z"]) == pytest.approx(lse[w].mean(), rel=1e-5)


def test_model_statistics_jit_agree_with_eager():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(batch_for(TINY)["inputs"]).at[1, 6:].set(0)
    forward = lambda x: model(x, extra_stats=("attention", "activations"))[1]  # noqa: E731
    eager, jitted = forward(tokens), jax.jit(forward)(tokens)
    for key, value in jitted["decoder"].items():
        np.testing.assert_allclose(eager["decoder"][key], value, rtol=1e-5, err_msg=key)


@pytest.mark.slow
def test_step_metrics_jit_agrees_with_eager(tiny):
    graphdef, tx, st = tiny
    fn = steps.make_train_step(graphdef, tx, diagnostics="all", z_loss=1e-4)
    batch = batch_for(TINY)
    _, jitted = jax.jit(fn)(st, batch)
    _, eager = fn(st, batch)
    assert set(jitted) == set(eager)
    for key in jitted:
        # Adam's first update is g / (|g| + eps): where |g| is near eps (the key projection at
        # init), float rounding of the gradient moves the update ratio by a few 1e-4.
        rtol = 2e-3 if key.startswith("update_ratio") else 1e-4
        np.testing.assert_allclose(eager[key], jitted[key], rtol=rtol, atol=1e-7, err_msg=key)
    assert all(np.all(np.isfinite(v)) for v in jitted.values())


def test_encoder_decoder_vectors_list_encoder_then_decoder_layers():
    cfg = TransformerConfig(arch="encoder_decoder", num_encoder_layers=1, num_decoder_layers=2,
                            d_model=16, num_heads=2, d_ff=32, residual="deepnorm")
    tx, _ = optim.make_optimizer(ml_collections.ConfigDict(base.optimizer_config()), 10)
    graphdef, _ = state.abstract_params(cfg)
    abstract = state.abstract_train_state(cfg, tx)
    _, m = jax.eval_shape(steps.make_train_step(graphdef, tx, diagnostics="all"), abstract,
                          batch_for(cfg))
    for key in ("self_attn_logit_max_per_layer", "self_attn_entropy_per_layer",
                "ffn_branch_kurtosis_per_layer", "ffn_stream_max_abs_per_layer",
                "update_ratio_query_per_layer", "adam_nu_max_per_layer"):
        assert m[key].shape == (3,), key  # the encoder layer, then the two decoder layers
    for key in ("cross_attn_logit_max_per_layer", "cross_attn_entropy_min_head_per_layer",
                "cross_attn_branch_max_abs_per_layer"):
        assert m[key].shape == (2,), key  # decoder layers only


def test_grad_accumulation_keeps_maxima_exact(tiny):
    graphdef, tx, st = tiny
    batch = dict(batch_for(TINY), weights=jnp.ones((4, 8)))
    groups = {"attention", "activations", "logits"}
    _, one = jax.jit(steps.make_train_step(graphdef, tx, diagnostics=groups))(st, batch)
    _, two = jax.jit(steps.make_train_step(graphdef, tx, diagnostics=groups,
                                           grad_accum_steps=2))(st, batch)
    for key in one:
        if "max" in key or "entropy_per_layer" in key:  # maxima, and means of equal halves
            np.testing.assert_allclose(two[key], one[key], rtol=1e-5, err_msg=key)


# --- the off switch ------------------------------------------------------------------------

def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


def test_the_model_computes_no_statistics_it_was_not_asked_for():
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(batch_for(TINY)["inputs"])
    prims = {extra: _primitives(jax.make_jaxpr(
        lambda x, e=extra: model(x, extra_stats=e))(tokens).jaxpr)
        for extra in ((), ("attention",), ("activations",))}
    # log: the entropy's logsumexp; abs: max-abs (kurtosis' fourth power is squares)
    assert "log" not in prims[()] and "abs" not in prims[()]
    assert "log" in prims[("attention",)]
    assert "abs" in prims[("activations",)] and "log" not in prims[("activations",)]
    with pytest.raises(ValueError, match="extra_stats attn not known"):
        model(tokens, extra_stats=("attn",))


def test_each_group_adds_to_the_step_and_none_adds_nothing(tiny):
    graphdef, tx, st = tiny
    batch = batch_for(TINY)

    def size(diag):
        jaxpr = jax.make_jaxpr(steps.make_train_step(graphdef, tx, diagnostics=diag))(st, batch)
        inner = jax.extend.core.jaxprs_in_params
        count = lambda j: sum(1 + sum(count(s) for s in inner(e.params))  # noqa: E731
                              for e in j.eqns)
        return count(jaxpr.jaxpr), set(jax.eval_shape(steps.make_train_step(
            graphdef, tx, diagnostics=diag), st, batch)[1])

    base_size, base_keys = size(False)
    assert size("none") == (base_size, base_keys)
    for group in diagnostics.GROUPS:
        n, keys = size({group})
        assert n > base_size and keys > base_keys, group


def test_parse_groups():
    assert diagnostics.parse_groups("all") == frozenset(diagnostics.GROUPS)
    assert diagnostics.parse_groups("none") == diagnostics.parse_groups("") == frozenset()
    assert diagnostics.parse_groups(" norms, adam ") == {"norms", "adam"}
    with pytest.raises(ConfigError, match=r"train.diagnostic_groups='norms,logit': logit not"):
        diagnostics.parse_groups("norms,logit")
    with pytest.raises(ConfigError, match="must be a string"):
        diagnostics.parse_groups(True)
    assert diagnostics.resolve_groups(True) == {"norms"}
    assert diagnostics.resolve_groups(False) == frozenset()


@pytest.mark.parametrize("residual", ["rezero", "admin", "fixup", "hyper", "normformer",
                                      "layerscale", "dlcl"])
def test_every_scheme_parameter_is_in_the_residual_group(residual):
    """A scheme's declared parameters (and NormFormer's head scales) are counted as
    ``residual`` in the update ratios, never as ``other``."""
    from deepnorm.layerwise import param_group
    cfg = TransformerConfig(arch="decoder", num_layers=2, d_model=16, num_heads=2, d_ff=32,
                            vocab_size=11, residual=residual,
                            norm="none" if residual in ("rezero", "fixup") else "layernorm")
    params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
    groups = {jax.tree_util.keystr(path): param_group(path)
              for path, _ in jax.tree_util.tree_leaves_with_path(params)}
    residual_leaves = [k for k, g in groups.items() if g == "residual"]
    assert residual_leaves, groups
    assert "other" not in groups.values(), groups


# --- which steps of the loop compute which groups --------------------------------------------

def test_step_groups_per_cadence():
    from deepnorm.training.loop import step_groups
    every = frozenset(diagnostics.GROUPS)

    def train(**kw):
        return ml_collections.ConfigDict(dict(dict(diagnostics="every_step",
                                                   diagnostic_groups="all",
                                                   every_step_groups="norms"), **kw))

    assert step_groups(train()) == (every, {"norms"})
    assert step_groups(train(every_step_groups="all")) == (every, every)
    # the steps between logs compute only groups the logged ones compute too
    assert step_groups(train(diagnostic_groups="adam")) == ({"adam"}, frozenset())
    assert step_groups(train(diagnostics="log_steps")) == (every, frozenset())
    assert step_groups(train(diagnostics="off")) == (frozenset(), frozenset())
    with pytest.raises(ConfigError, match=r"train.every_step_groups='norm': norm not known"):
        step_groups(train(every_step_groups="norm"))


def test_the_loop_computes_every_group_on_logged_steps_and_norms_between(tmp_path,
                                                                          monkeypatch):
    from configs import decoder_lm
    from deepnorm.training import loop
    from deepnorm.training.metrics import read_metrics

    compiled, real = [], loop.make_train_step

    def spy(graphdef, tx, *, diagnostics, gns, **kwargs):
        compiled.append(frozenset(diagnostics))
        return real(graphdef, tx, diagnostics=diagnostics, gns=gns, **kwargs)

    monkeypatch.setattr(loop, "make_train_step", spy)
    config = decoder_lm.get_config("quick")
    config.train.update(num_steps=4, log_every=3, eval_every=4, checkpoint_every=4,
                        progress_bar=False, every_step_groups="norms")  # the default's
    loop.train_and_evaluate(config, str(tmp_path))
    assert compiled == [frozenset(diagnostics.GROUPS), {"norms"}]
    rows = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 3, 4]  # step 2 ran the norms-only step
    for row in rows:
        assert "self_attn_entropy_per_layer" in row and "adam_nu_max_per_layer" in row
        assert "grad_norm_per_layer" in row
