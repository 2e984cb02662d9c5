"""Gradient accumulation (``train.grad_accum_steps``): one accumulated step is the big-batch step.

The micro-batch losses are sums over the whole batch's token count, so k micro-batches give the
big batch's gradient up to float summation order; with padding (weights 0) spread unevenly
over the micro-batches this is where a per-micro-batch mean would go wrong.
"""

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from deepnorm import ConfigError, TransformerConfig
from deepnorm.training import optim, state, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for `configs`
from configs import base  # noqa: E402

TINY = TransformerConfig(arch="decoder", num_layers=2, d_model=16, num_heads=2, d_ff=32,
                         residual="deepnorm", remat_policy="none")


def batch_for(cfg, b=8, t=8, seed=0):
    rng = np.random.default_rng(seed)
    weights = np.ones((b, t), np.float32)
    weights[:3, t // 2:] = 0.0  # padding in the first examples only: uneven per micro-batch
    weights[5, :] = 0.0
    out = {"inputs": rng.integers(4, cfg.vocab_size, (b, t)).astype(np.int32),
           "targets": rng.integers(4, cfg.vocab_size, (b, t)).astype(np.int32),
           "weights": weights}
    if cfg.arch == "encoder_decoder":
        out["decoder_inputs"] = rng.integers(4, cfg.vocab_size, (b, t)).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in out.items()}


def make(cfg, label_smoothing=0.0):
    # Adam's first update is lr * g / (|g| + eps). With the default eps (1e-8) an element whose
    # gradient is near zero (the key bias's is exactly zero: softmax ignores a shift shared by
    # all keys) turns its float noise, which depends on summation order, into an update of up
    # to lr of either sign. eps=1e-4 keeps the map smooth at noise level; it is still Adam.
    opt = ml_collections.ConfigDict(dict(base.optimizer_config(), warmup_steps=0, eps=1e-4,
                                         schedule="constant", label_smoothing=label_smoothing))
    tx, _ = optim.make_optimizer(opt, 10)
    graphdef, st = state.create_train_state(cfg, tx, seed=0)
    return graphdef, tx, st


@pytest.mark.parametrize("cfg,k,smoothing", [
    (TINY, 4, 0.0),
    (TINY, 2, 0.1),
    pytest.param(TransformerConfig(arch="encoder_decoder", num_encoder_layers=1,
                                   num_decoder_layers=2, d_model=16, num_heads=2, d_ff=32,
                                   residual="pre"), 2, 0.0, marks=pytest.mark.slow),
], ids=["decoder_k4", "decoder_k2_smoothed", "encdec_k2"])
def test_accumulated_step_equals_the_big_batch_step(cfg, k, smoothing):
    graphdef, tx, st = make(cfg, smoothing)
    batch = batch_for(cfg)
    kw = dict(label_smoothing=smoothing)
    big_state, big = jax.jit(steps.make_train_step(graphdef, tx, **kw))(st, batch)
    acc_state, acc = jax.jit(steps.make_train_step(graphdef, tx, grad_accum_steps=k, **kw))(
        st, batch)
    for key in ("loss", "nll", "grad_norm", "update_norm", "param_norm"):
        np.testing.assert_allclose(acc[key], big[key], rtol=2e-6, err_msg=key)
    assert float(acc["num_tokens"]) == float(big["num_tokens"]) == float(
        jnp.sum(batch["weights"]))
    for key in ("grad_norm_per_layer", "update_norm_per_layer", "activation_norm_per_layer"):
        assert acc[key].shape == (cfg.total_layers,)
        np.testing.assert_allclose(acc[key], big[key], rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(acc_state.params), jax.tree.leaves(big_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The step actually moved the parameters (a no-op would pass the comparison above).
    assert float(big["update_norm"]) > 0 and int(acc_state.step) == 1


def test_accumulated_gradient_is_the_token_weighted_sum_of_micro_batch_gradients():
    # A direct reference: the mean loss of the whole batch differentiated at once, against the
    # gradient the step applies (read back through plain SGD with rate 1: update = -grad).
    import optax

    from deepnorm.training.loss import loss_fn
    from flax import nnx

    graphdef, _, st = make(TINY)
    sgd = optax.sgd(1.0)
    st = st.replace(opt_state=sgd.init(st.params))
    batch = batch_for(TINY, seed=1)
    new, _ = jax.jit(steps.make_train_step(graphdef, sgd, grad_accum_steps=4))(st, batch)
    grads = jax.jit(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch)[0]))(st.params)
    for g, a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(st.params),
                       jax.tree.leaves(new.params)):
        # a - b cancels in float32: parameters of size ~1 leave ~1e-7 of absolute noise.
        np.testing.assert_allclose(a - b, g, rtol=1e-4, atol=1e-6)


def test_micro_batches_are_strided_slices_of_the_batch():
    x = jnp.arange(8 * 3).reshape(8, 3)
    micro = steps.split_micro_batches({"x": x}, 4)["x"]
    assert micro.shape == (4, 2, 3)
    for i in range(4):
        np.testing.assert_array_equal(micro[i], x[i::4])


@pytest.mark.parametrize("batch_size,k,replicas,match", [
    (10, 4, 1, r"train.batch_size=10 is not divisible by train.grad_accum_steps=4"),
    (8, 4, 4, r"train.batch_size=8 in train.grad_accum_steps=4 micro-batches of 2 does not "
              r"split over the 4 data x fsdp devices; use a multiple of 16"),
    (8, 0, 1, r"train.grad_accum_steps=0 must be a positive integer"),
    (8, 2.0, 1, r"train.grad_accum_steps=2.0 must be a positive integer"),
])
def test_bad_grad_accum_is_one_line(batch_size, k, replicas, match):
    with pytest.raises(ConfigError, match=match):
        steps.check_grad_accum(batch_size, k, replicas)


def test_train_config_rejects_an_indivisible_batch():
    from deepnorm.training import loop

    train = base.train_config(batch_size=6, grad_accum_steps=4)
    with pytest.raises(ConfigError, match="train.batch_size=6 is not divisible by "
                                          "train.grad_accum_steps=4"):
        loop.check_train_config(train)
