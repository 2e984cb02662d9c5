"""deepnorm.analysis.grad_norms: the expected gradient's maths, the records, and Xiong et al.
2020's claims (Fig. 3, Theorem 1) measured by the real analysis code on tiny models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepnorm import Transformer, TransformerConfig
from deepnorm.analysis import grad_norms
from deepnorm.analysis.batches import stacked_batches
from deepnorm.analysis.params import init_params
from deepnorm.analysis.train_steps import optimizer_config
from deepnorm.training.loss import loss_fn
from deepnorm.training.optim import make_optimizer
from deepnorm.training.state import TrainState
from deepnorm.training.steps import make_train_step

TINY = dict(d_model=32, num_heads=2, d_ff=64, remat_policy="none")
ENC_DEC = TransformerConfig(arch="encoder_decoder", num_encoder_layers=2, num_decoder_layers=2,
                            residual="post", **TINY)
DECODER = TransformerConfig(arch="decoder", num_layers=3, residual="pre", **TINY)


@pytest.fixture(scope="module")
def enc_dec_batches():
    return stacked_batches(None, arch="encoder_decoder", num_batches=3, batch_size=4,
                           seq_len=32)


def test_vmapped_init_matches_one_model_per_seed():
    _, params = init_params(DECODER, [0, 3])
    for i, seed in enumerate([0, 3]):
        own = nnx.split(Transformer(DECODER, rngs=nnx.Rngs(jax.random.key(seed))), nnx.Param)[1]
        for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b[i], rtol=1e-6, atol=1e-7)


def test_expected_gradient_is_the_mean_of_batch_gradients(enc_dec_batches):
    graphdef, params = init_params(ENC_DEC, [0])
    params = jax.tree.map(lambda p: p[0], params)
    mean = jax.jit(grad_norms.expected_gradient, static_argnums=0)(
        graphdef, params, jax.tree.map(jnp.asarray, enc_dec_batches))
    k = 3
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(nnx.merge(graphdef, p), b)[0]))
    grads = [grad(params, {key: v[i] for key, v in enc_dec_batches.items()}) for i in range(k)]
    want = jax.tree.map(lambda *g: np.mean(np.stack(g), axis=0), *grads)
    for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    # The norm of the mean is what Xiong et al. plot; it is below the mean of the norms
    # (triangle inequality), strictly so when batch gradients disagree.
    w2 = lambda g: g["decoder"]["layers"]["ffn"]["ffn_out"]["kernel"][...][1]  # noqa: E731
    norm_of_mean = np.linalg.norm(w2(mean))
    mean_of_norms = np.mean([np.linalg.norm(w2(g)) for g in grads])
    assert norm_of_mean < mean_of_norms


def test_per_layer_group_norms_are_frobenius_norms_of_layer_slices():
    _, params = init_params(ENC_DEC, [1])
    params = jax.tree.map(lambda p: p[0], params)
    norms = grad_norms.per_layer_group_norms(params)
    assert set(norms) == {(stack, g) for stack in ("encoder", "decoder") for g in
                          ["ffn_in", "ffn_out", "self_attn.query", "self_attn.key",
                           "self_attn.value", "self_attn.out"]} | {
                              ("decoder", f"cross_attn.{r}") for r in
                              ("query", "key", "value", "out")}
    kernel = np.asarray(params["decoder"]["layers"]["ffn"]["ffn_out"]["kernel"][...])
    want = [np.linalg.norm(kernel[layer], "fro") for layer in range(2)]
    np.testing.assert_allclose(norms[("decoder", "ffn_out")], want, rtol=1e-5)


def test_records_schema_encoder_decoder(enc_dec_batches):
    records = grad_norms.measure(ENC_DEC, seeds=[0, 1], batches=enc_dec_batches)
    keys = {"residual", "num_layers", "seed", "layer", "param", "expected_grad_norm", "stack"}
    assert all(set(r) == keys for r in records)
    assert {r["seed"] for r in records} == {0, 1}
    assert {(r["stack"], r["layer"]) for r in records} == {
        ("encoder", 1), ("encoder", 2), ("decoder", 3), ("decoder", 4)}
    assert all(r["residual"] == "post" and r["num_layers"] == 2 for r in records)
    assert all(np.isfinite(r["expected_grad_norm"]) and r["expected_grad_norm"] > 0
               for r in records)
    # 2 seeds x (2 encoder layers x 6 groups + 2 decoder layers x 10 groups)
    assert len(records) == 2 * (2 * 6 + 2 * 10)


def test_records_schema_decoder_only_has_no_stack():
    batches = stacked_batches(None, arch="decoder", num_batches=2, batch_size=4, seq_len=16)
    at_init = grad_norms.measure(DECODER, seeds=[0], batches=batches)
    assert all("stack" not in r for r in at_init)
    assert sorted({r["layer"] for r in at_init}) == [1, 2, 3]


def test_after_training_it_is_the_training_steps_model_measured():
    """train_steps > 0: each seed takes the training package's train step (make_optimizer's
    AdamW, linear warmup) on the training batches, then the expected gradient is taken on
    the measured ones; checked against that done by hand, one jitted step at a time."""
    cfg = TransformerConfig(arch="decoder", num_layers=2, residual="post", **TINY)
    measured = stacked_batches(None, arch="decoder", num_batches=2, batch_size=2, seq_len=8)
    train = stacked_batches(None, arch="decoder", num_batches=2, batch_size=2, seq_len=8,
                            seed=5)
    opt = optimizer_config(3e-3, warmup_steps=2)
    records = grad_norms.measure(cfg, seeds=[0, 1], batches=measured, train_steps=3,
                                 opt_config=opt, train_batches=train)
    graphdef, params_S = init_params(cfg, [0, 1])
    tx, _ = make_optimizer(opt, 3)
    step = jax.jit(make_train_step(graphdef, tx, diagnostics=False))
    for s in (0, 1):
        params = jax.tree.map(lambda p: p[s], params_S)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), rng=jax.random.PRNGKey(0))
        for t in range(3):  # cycling through the 2 training batches
            state, _ = step(state, {k: jnp.asarray(v[t % 2]) for k, v in train.items()})
        grads = grad_norms.expected_gradient(graphdef, state.params,
                                             jax.tree.map(jnp.asarray, measured))
        want = np.asarray(grad_norms.per_layer_group_norms(grads)[("decoder", "ffn_out")])
        got = [r["expected_grad_norm"] for r in records
               if r["seed"] == s and r["param"] == "ffn_out"]
        np.testing.assert_allclose(got, want, rtol=2e-3)
    with pytest.raises(ValueError, match="held out"):
        grad_norms.measure(cfg, seeds=[0], batches=measured, train_steps=1, opt_config=opt)


# --- The paper's claims ------------------------------------------------------------------
# Encoder-decoder, d=32, 8 seeds, depths 4 and 12 (L-L). Checked before asserting on 16 seeds
# and two batch sets: the decoder's top/bottom W2 ratio was 41-47 for Post-LN and 0.54-0.60
# for Pre-LN; the last layer's W2 norm at L=12 over L=4 was 0.95-0.99 for Post-LN and
# 0.55-0.57 for Pre-LN (Theorem 1 predicts sqrt(4/12) = 0.58).

CLAIM_DEPTHS = (4, 12)


@pytest.fixture(scope="module")
def claim_records():
    base = TransformerConfig(arch="encoder_decoder", num_encoder_layers=4, num_decoder_layers=4,
                             residual="post", **TINY)
    batches = stacked_batches(None, arch="encoder_decoder", num_batches=4, batch_size=8,
                              seq_len=32)
    return grad_norms.run(base, schemes=["post", "pre"], depths=CLAIM_DEPTHS, seeds=range(8),
                          batches=batches, log=lambda _: None)


@pytest.mark.slow  # 16 models trained; the mechanism's maths is tested above
def test_post_ln_gradient_grows_toward_the_top_while_pre_ln_stays_flat(claim_records):
    depth = CLAIM_DEPTHS[1]
    post = grad_norms.by_layer(claim_records, "post", depth)[:, depth:].mean(0)  # decoder
    pre = grad_norms.by_layer(claim_records, "pre", depth)[:, depth:].mean(0)
    assert post[-1] / post[0] > 10, post  # Post-LN: gradients vanish toward the bottom
    assert np.all(np.diff(post[depth // 2:]) > 0), post  # and rise layer by layer at the top
    assert pre[-1] / pre[0] < 1.2, pre  # Pre-LN: no growth toward the top
    assert pre.max() / pre.min() < 2.5, pre  # and within a small factor everywhere


@pytest.mark.slow
def test_pre_ln_last_layer_gradient_falls_with_depth_post_ln_does_not(claim_records):
    finals = grad_norms.final_layer(claim_records)
    shallow, deep = CLAIM_DEPTHS
    pre = finals[("pre", deep)].mean() / finals[("pre", shallow)].mean()
    post = finals[("post", deep)].mean() / finals[("post", shallow)].mean()
    assert abs(pre - np.sqrt(shallow / deep)) < 0.12, pre  # ~ 1/sqrt(L), Xiong Theorem 1
    assert post > 0.85, post  # ~ independent of L


def test_analysis_training_takes_the_z_loss():
    """optimizer.z_loss reaches the analysis's own train steps: the z-loss term's gradient
    changes the parameters after a step, as in train.py."""
    from deepnorm.analysis.train_steps import train_seeds
    cfg = TransformerConfig(arch="decoder", num_layers=2, residual="pre", **TINY)
    train = stacked_batches(None, arch="decoder", num_batches=1, batch_size=2, seq_len=8)
    graphdef, params_S = init_params(cfg, [0])
    out = {}
    for z in (0.0, 1.0):
        opt = optimizer_config(1e-2)
        opt.z_loss = z
        out[z], _ = train_seeds(graphdef, params_S, [0], train, opt, num_steps=1)
    head = lambda p: np.asarray(p["embed"])  # noqa: E731 (tied: the head is the embedding)
    assert not np.allclose(head(out[0.0]), head(out[1.0]))
