"""nGPT (Loshchilov et al. 2024): the block against its equation in NumPy, the stream on the
unit sphere, the weight projection after an optimizer step, scanned == unrolled, cached
decoding, jit == eager."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deepnorm import Block, Transformer, TransformerConfig
from deepnorm.config import ConfigError
from deepnorm.residual import NGPT_UNIT_AXES, get
from deepnorm.training import state as state_lib
from deepnorm.training import steps

D, HEADS, FF, VOCAB = 16, 2, 32, 30
TOL = dict(rtol=2e-5, atol=2e-5)


def config(**kw):
    kw.setdefault("num_layers", 3)
    return TransformerConfig(arch="decoder", d_model=D, num_heads=HEADS, d_ff=FF,
                             vocab_size=VOCAB, residual="ngpt", norm="none",
                             remat_policy="none", **kw)


def perturb(module, seed=1, scale=0.3):
    """Every parameter moved off its init (alpha, s_qk, s_v, s_z, biases)."""
    graphdef, params = nnx.split(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    leaves = [x * (1 + scale * jax.random.normal(k, x.shape)) + 0.05 * jax.random.normal(k, x.shape)
              for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_block(block, h):
    """h <- Norm(h + a_A (Norm(Attn(h)) - h)); h <- Norm(h + a_M (Norm(MLP(h)) - h)), in NumPy:
    q, k per head s_qk Norm(.), softmax scale sqrt(K), causal; MLP gelu(s_v sqrt(d) (h W1 + b1))
    W2 + b2; alpha = stored * 0.05 sqrt(d), s_qk = stored * sqrt(d)."""
    p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    a, f = block.self_attn, block.ffn
    b, t, d = h.shape
    k_dim = d // HEADS
    dense = lambda x, lin: x @ p(lin.kernel) + p(lin.bias)  # noqa: E731
    s_qk = p(a.qk_scale) * np.sqrt(d)
    q = s_qk * unit(dense(h, a.query).reshape(b, t, HEADS, k_dim))
    k = s_qk * unit(dense(h, a.key).reshape(b, t, HEADS, k_dim))
    v = dense(h, a.value).reshape(b, t, HEADS, k_dim)
    logits = np.einsum("bthk,bshk->bhts", q, k) * np.sqrt(k_dim)
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    attn = dense(np.einsum("bhts,bshk->bthk", w, v).reshape(b, t, d), a.out)
    h = unit(h + p(block.self_attn_alpha) * 0.05 * np.sqrt(d) * (unit(attn) - h))
    pre = dense(h, f.ffn_in) * p(f.scale) * np.sqrt(d)
    gelu = np.asarray(jax.nn.gelu(jnp.asarray(pre, jnp.float32)), np.float64)
    mlp = dense(gelu, f.ffn_out)
    return unit(h + p(block.ffn_alpha) * 0.05 * np.sqrt(d) * (unit(mlp) - h))


def test_block_computes_its_equation():
    block = perturb(Block.standalone(config(), 2, rngs=nnx.Rngs(0)))
    x = unit(np.random.default_rng(0).normal(size=(2, 5, D)))
    got, _ = block(jnp.asarray(x, jnp.float32), causal=True)
    np.testing.assert_allclose(np.asarray(got), np_block(block, x), **TOL)


def test_alpha_and_scales_start_at_the_paper_s_values():
    """Stored s_scale, used s_init: alpha 0.05, s_qk 1, s_v 1, s_z 1."""
    model = Transformer(config(), rngs=nnx.Rngs(0))
    layers = model.decoder.layers
    np.testing.assert_allclose(layers.self_attn_alpha[...] * 0.05 * np.sqrt(D), 0.05, rtol=1e-6)
    np.testing.assert_allclose(layers.ffn_alpha[...] * 0.05 * np.sqrt(D), 0.05, rtol=1e-6)
    np.testing.assert_allclose(layers.self_attn.qk_scale[...] * np.sqrt(D), 1.0, rtol=1e-6)
    np.testing.assert_allclose(layers.ffn.scale[...], 1.0)
    np.testing.assert_allclose(model.logit_scale[...] * np.sqrt(D), 1.0, rtol=1e-6)


def test_stream_stays_on_the_unit_sphere_and_logits_are_scaled_cosines():
    model = perturb(Transformer(config(num_layers=6), rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(2).integers(1, VOCAB, (2, 7)), jnp.int32)
    logits, aux = model(tokens)
    np.testing.assert_allclose(np.asarray(aux["decoder"]["stream_out_norm"]), 1.0, rtol=1e-5)
    # The stack's output is unit-norm: logits / s_z are its dot products with the embedding.
    cos = np.asarray(logits) / (np.asarray(model.logit_scale[...]) * np.sqrt(D))
    assert np.all(np.abs(cos) <= np.linalg.norm(np.asarray(model.embed[...]), axis=-1) + 1e-5)


def _unit_norm_errors(params):
    """max | ||w|| - 1 | along d_model for every declared matrix and the embedding."""
    errs = {"embed": np.max(np.abs(np.linalg.norm(params["embed"], axis=-1) - 1))}

    def visit(tree, path=()):
        for name, sub in tree.items():
            if isinstance(sub, dict):
                visit(sub, path + (name,))
            elif (path[-1:] + (name,)) in NGPT_UNIT_AXES:
                axis = NGPT_UNIT_AXES[path[-1:] + (name,)]
                errs["/".join(path + (name,))] = np.max(np.abs(
                    np.linalg.norm(np.asarray(sub), axis=axis) - 1))
    visit(params)
    return errs


@pytest.mark.parametrize("tie", [True, False])
def test_training_step_projects_the_matrices_to_unit_norm(tie):
    cfg = config(tie_embeddings=tie)
    tx = optax.adam(0.1)  # a big step: the raw update moves the norms well off 1
    graphdef, st = state_lib.create_train_state(cfg, tx, seed=0)
    assert max(_unit_norm_errors(st.params).values()) < 1e-5  # normalized at init too
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.integers(4, VOCAB, (4, 8)), jnp.int32),
             "targets": jnp.asarray(rng.integers(4, VOCAB, (4, 8)), jnp.int32),
             "weights": jnp.ones((4, 8), jnp.float32)}
    new, _ = jax.jit(steps.make_train_step(graphdef, tx, diagnostics=False))(st, batch)
    errs = _unit_norm_errors(new.params)
    assert ("head/kernel" in errs) == (not tie)
    assert len(errs) == 1 + 6 * 1 + (0 if tie else 1)  # embed, 6 kernels (stacked), head
    assert max(errs.values()) < 1e-5, errs
    # The projection is a real effect: the same update without it leaves them off the sphere.
    grads = jax.grad(lambda p: steps_loss(graphdef, p, batch))(st.params)
    updates, _ = tx.update(grads, st.opt_state, st.params)
    raw = optax.apply_updates(st.params, updates)
    assert min(_unit_norm_errors(raw).values()) > 1e-2
    # The other parameters (alpha, s_qk, biases) are the optimizer's, untouched by it.
    np.testing.assert_allclose(new.params["decoder"]["layers"]["ffn_alpha"],
                               raw["decoder"]["layers"]["ffn_alpha"], rtol=1e-6)


def steps_loss(graphdef, params, batch):
    logits, _ = nnx.merge(graphdef, params)(batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()


def test_scanned_equals_unrolled_and_jit_equals_eager():
    tokens = jnp.asarray(np.random.default_rng(3).integers(1, VOCAB, (2, 6)), jnp.int32)
    scanned = perturb(Transformer(config(), rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(scanned, nnx.Param)
    unrolled_def, _ = nnx.split(Transformer(config(scan_layers=False), rngs=nnx.Rngs(0)),
                                nnx.Param)
    want = np.asarray(scanned(tokens)[0])
    got = nnx.merge(unrolled_def, params)(tokens)[0]
    np.testing.assert_allclose(np.asarray(got), want, **TOL)
    jitted = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])(params, tokens)
    np.testing.assert_allclose(np.asarray(jitted), want, **TOL)


@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])
def test_cached_decoding_equals_full_pass(arch):
    from tests.test_decoding import _check_cache
    _check_cache(arch, "ngpt", True)


def test_ngpt_refuses_a_norm_and_qk_norm_with_one_line():
    with pytest.raises(ConfigError, match="model.norm='none'"):
        TransformerConfig(arch="decoder", num_layers=2, residual="ngpt", norm="layernorm")
    with pytest.raises(ConfigError, match="normalizes q and k itself"):
        config(qk_norm=True)


def test_project_is_declared_on_the_scheme_only():
    assert get("ngpt").project is not None
    assert all(get(n).project is None for n in ("pre", "post", "deepnorm"))


def test_fold_norms_has_nothing_to_fold_and_keeps_the_logits():
    from deepnorm.export import fold_norms
    model = perturb(Transformer(config(), rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(4).integers(1, VOCAB, (2, 6)), jnp.int32)
    folded, report = fold_norms(model, untie_head=True, strict=True)
    assert report.folded == [] and report.remaining == []
    np.testing.assert_allclose(np.asarray(folded(tokens)[0]), np.asarray(model(tokens)[0]),
                               **TOL)
