"""Unit tests of deepnorm.training: schedules, the train/eval step maths, the per-layer
diagnostics, the divergence monitor, the metrics file, the mesh arithmetic, the configs."""

import glob
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from deepnorm import ConfigError, TransformerConfig
from deepnorm.training import divergence, mesh, metrics, optim, state, steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for `configs`
from configs import base  # noqa: E402

TINY = TransformerConfig(arch="decoder", num_layers=3, d_model=16, num_heads=2, d_ff=32,
                         residual="deepnorm", remat_policy="none")


def opt_config(**kw):
    return ml_collections.ConfigDict(dict(base.optimizer_config(), **kw))


def batch_for(cfg, b=4, t=8, seed=0):
    rng = np.random.default_rng(seed)
    out = {"inputs": rng.integers(4, cfg.vocab_size, (b, t)).astype(np.int32),
           "targets": rng.integers(4, cfg.vocab_size, (b, t)).astype(np.int32),
           "weights": np.ones((b, t), np.float32)}
    if cfg.arch == "encoder_decoder":
        out["decoder_inputs"] = rng.integers(4, cfg.vocab_size, (b, t)).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in out.items()}


# --- schedules ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,warmup,decay_start", [
    ("inverse_sqrt", 4, 0), ("inverse_sqrt", 0, 0), ("inverse_sqrt", 0, 6),
    ("inverse_sqrt", 3, 7), ("cosine", 3, 0), ("cosine", 0, 0), ("constant", 0, 0),
    ("constant", 5, 0)])
def test_schedule_matches_its_formula(kind, warmup, decay_start):
    lr, n = 2e-3, 20
    schedule = optim.make_schedule(opt_config(learning_rate=lr, warmup_steps=warmup,
                                              decay_start=decay_start, schedule=kind), n)
    for count in range(n + 3):
        s = count + 1  # 1-based update number
        warm = min(1.0, s / warmup) if warmup else 1.0
        if kind == "inverse_sqrt":
            a = decay_start or warmup
            decay = math.sqrt(a / max(s, a)) if a else 1.0
        elif kind == "cosine":
            p = max(warmup, 1)
            decay = 0.5 * (1 + math.cos(math.pi * min(max((s - p) / (n + 1 - p), 0), 1)))
        else:
            decay = 1.0
        assert float(schedule(count)) == pytest.approx(lr * warm * decay, rel=1e-5), count


def test_no_warmup_means_full_rate_on_the_first_update():
    for kind in optim.SCHEDULES:
        schedule = optim.make_schedule(opt_config(warmup_steps=0, schedule=kind), 10)
        assert float(schedule(0)) == pytest.approx(5e-4), kind


def test_inverse_sqrt_without_warmup_holds_the_peak_until_its_decay_anchor():
    # No warmup and no decay_start: no time scale for a decay, the peak throughout (not
    # lr * sqrt(1 / s), a half at the 4th update and a tenth at the 100th).
    flat = optim.make_schedule(opt_config(warmup_steps=0, schedule="inverse_sqrt"), 200)
    np.testing.assert_allclose([float(flat(c)) for c in (0, 3, 99)], 5e-4, rtol=1e-6)
    # decay_start = w: the same decay as a warmup-w run, without its warmup.
    warm = optim.make_schedule(opt_config(warmup_steps=8, schedule="inverse_sqrt"), 200)
    cold = optim.make_schedule(opt_config(warmup_steps=0, decay_start=8,
                                          schedule="inverse_sqrt"), 200)
    assert float(cold(0)) == pytest.approx(5e-4)
    for count in range(7, 200, 13):
        assert float(cold(count)) == pytest.approx(float(warm(count)), rel=1e-6)


@pytest.mark.parametrize("warmup", [0, 3])
def test_cosine_last_update_still_moves_the_weights(warmup):
    n = 10
    schedule = optim.make_schedule(opt_config(schedule="cosine", warmup_steps=warmup), n)
    rates = [float(schedule(c)) for c in range(n)]
    last = 5e-4 * 0.5 * (1 - math.cos(math.pi / (n + 1 - max(warmup, 1))))
    assert rates[-1] == pytest.approx(last, rel=1e-5) and rates[-1] > 0
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1:]))  # monotone decay


def test_update_count_and_learning_rate_read_the_schedule_count():
    opt = opt_config(schedule="inverse_sqrt", warmup_steps=4, grad_clip_norm=1.0)
    tx, schedule = optim.make_optimizer(opt, 10)  # a chain: clip, then AdamW
    params = {"kernel": jnp.ones((2,))}
    opt_state = tx.init(params)
    for expected in range(3):
        assert int(optim.update_count(opt_state)) == expected
        assert float(optim.learning_rate(schedule, opt_state)) == pytest.approx(
            float(schedule(expected)))
        _, opt_state = tx.update({"kernel": jnp.ones((2,))}, opt_state, params)

@pytest.mark.parametrize("key,value,match", [
    ("schedule", "linear", r"optimizer\.schedule='linear' is not one of inverse_sqrt"),
    ("warmup_steps", -1, r"optimizer\.warmup_steps=-1 must be >= 0"),
    ("b2", 1.0, r"optimizer\.b2=1.0 must be in \[0, 1\)"),
    ("grad_clip_norm", -1.0, r"optimizer\.grad_clip_norm=-1.0"),
    ("decay_start", 3, r"optimizer\.decay_start=3 must be 0 \(the end of warmup\) or >= "
                       r"optimizer\.warmup_steps=100"),
])
def test_bad_optimizer_values_name_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        optim.make_optimizer(opt_config(**{key: value}), 10)


def test_decay_start_is_refused_where_it_would_do_nothing():
    with pytest.raises(ConfigError, match=r"optimizer\.decay_start=5 is for "
                                          r"schedule=inverse_sqrt only \(schedule='cosine'\)"):
        optim.make_schedule(opt_config(schedule="cosine", decay_start=5, warmup_steps=0), 10)


def test_weight_decay_hits_matrices_not_norms_or_biases():
    tx, _ = optim.make_optimizer(opt_config(weight_decay=0.5, warmup_steps=0,
                                            schedule="constant", learning_rate=0.1), 10)
    params = {"w": {"kernel": jnp.ones((2, 2))}, "n": {"scale": jnp.ones((2,)),
                                                        "bias": jnp.ones((2,))}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # With zero gradients, AdamW's update is exactly -lr * wd * p on decayed leaves.
    np.testing.assert_allclose(updates["w"]["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["n"]["scale"], 0.0)
    np.testing.assert_array_equal(updates["n"]["bias"], 0.0)


def test_both_embeddings_are_decayed_and_no_norm_or_bias_is():
    cfg = TransformerConfig(arch="decoder", num_layers=1, d_model=16, num_heads=2, d_ff=32,
                            positions="learned", max_len=8, tie_embeddings=True)
    _, params = state.abstract_params(cfg)
    mask = optim.decay_mask(nnx.to_pure_dict(params))
    assert mask["embed"] is True and mask["pos_embed"] is True
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    for name, decayed in flat.items():
        leaf = name.rsplit("/", 1)[-1]
        assert decayed == (leaf in ("kernel", "embed", "pos_embed")), name
    assert any(n.endswith("scale") for n in flat) and any(n.endswith("bias") for n in flat)


def test_grad_clipping_bounds_the_global_norm():
    tx, _ = optim.make_optimizer(opt_config(grad_clip_norm=1.0, b1=0.0, weight_decay=0.0,
                                            warmup_steps=0, schedule="constant"), 10)
    assert isinstance(tx, optax.GradientTransformation)
    params = {"kernel": jnp.zeros((3,))}
    clip_state = tx.init(params)
    clipped, _ = optax.clip_by_global_norm(1.0).update({"kernel": jnp.array([30., 40., 0.])},
                                                       clip_state[0])
    np.testing.assert_allclose(clipped["kernel"], [0.6, 0.8, 0.0], rtol=1e-6)


# --- the train step -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_step():
    tx, _ = optim.make_optimizer(opt_config(warmup_steps=0, schedule="constant",
                                            label_smoothing=0.0), 10)
    graphdef, st = state.create_train_state(TINY, tx, seed=0)
    return graphdef, tx, st, jax.jit(steps.make_train_step(graphdef, tx))


def _layer_slices(tree, i):
    return [np.asarray(leaf[i]) for leaf in jax.tree.leaves(tree["decoder"]["layers"])]


def test_per_layer_grad_and_update_norms_match_a_direct_computation(tiny_step):
    graphdef, tx, st, train_step = tiny_step
    batch = batch_for(TINY)
    new, m = train_step(st, batch)
    grads = jax.jit(jax.grad(lambda p: steps.loss_fn(nnx.merge(graphdef, p), batch)[0]))(
        st.params)
    for i in range(TINY.num_layers):
        g = math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2))
                          for x in _layer_slices(grads, i)))
        u = math.sqrt(sum(float(np.sum((a.astype(np.float64) - b) ** 2)) for a, b in
                          zip(_layer_slices(new.params, i), _layer_slices(st.params, i))))
        assert float(m["grad_norm_per_layer"][i]) == pytest.approx(g, rel=1e-4)
        assert float(m["update_norm_per_layer"][i]) == pytest.approx(u, rel=1e-3)
    total = math.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2))
                          for x in jax.tree.leaves(grads)))
    assert float(m["grad_norm"]) == pytest.approx(total, rel=1e-4)
    assert int(new.step) == 1 and int(m["finite"]) == 1


def test_post_norm_activations_have_norm_sqrt_d_at_init(tiny_step):
    # DeepNorm ends every layer with LayerNorm (scale 1, bias 0 at init): each token of the
    # layer's output has mean 0 and variance 1 over d_model, so its L2 norm is sqrt(d).
    graphdef, _, st, train_step = tiny_step
    _, m = train_step(st, batch_for(TINY))
    np.testing.assert_allclose(m["activation_norm_per_layer"], math.sqrt(TINY.d_model),
                               rtol=1e-3)


def test_per_layer_vectors_list_encoder_then_decoder_layers():
    cfg = TransformerConfig(arch="encoder_decoder", num_encoder_layers=2, num_decoder_layers=3,
                            d_model=16, num_heads=2, d_ff=32, residual="deepnorm")
    tx, _ = optim.make_optimizer(opt_config(), 10)
    graphdef, _ = state.abstract_params(cfg)
    abstract = state.abstract_train_state(cfg, tx)
    _, m = jax.eval_shape(steps.make_train_step(graphdef, tx), abstract, batch_for(cfg))
    for key in ("grad_norm_per_layer", "update_norm_per_layer", "activation_norm_per_layer"):
        assert m[key].shape == (5,)


def test_diagnostics_off_drops_only_the_per_layer_vectors(tiny_step):
    graphdef, tx, st, train_step = tiny_step
    batch = batch_for(TINY)
    _, on = train_step(st, batch)
    _, off = jax.jit(steps.make_train_step(graphdef, tx, diagnostics=False))(st, batch)
    assert set(on) - set(off) == {"grad_norm_per_layer", "update_norm_per_layer",
                                  "activation_norm_per_layer"}
    for key in off:
        np.testing.assert_allclose(on[key], off[key], rtol=1e-6)


def _poisoned(st):
    params = jax.tree.map(lambda x: x, st.params)
    params["decoder"]["layers"]["ffn"]["ffn_in"]["kernel"] = (
        params["decoder"]["layers"]["ffn"]["ffn_in"]["kernel"].at[1, 0, 0].set(jnp.nan))
    return st.replace(params=params)


def test_skip_nonfinite_keeps_the_old_state(tiny_step):
    graphdef, tx, st, train_step = tiny_step
    bad = _poisoned(st)
    skipping = jax.jit(steps.make_train_step(graphdef, tx, skip_nonfinite=True))
    new, m = skipping(bad, batch_for(TINY))
    assert int(m["finite"]) == 0 and int(new.step) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(bad.params)):
        np.testing.assert_array_equal(a, b)
    applied, m2 = train_step(bad, batch_for(TINY))
    assert int(m2["finite"]) == 0
    assert not np.isfinite(np.asarray(applied.params["embed"])).all()


def test_eval_step_is_the_mean_token_cross_entropy(tiny_step):
    graphdef, _, st, _ = tiny_step
    batch = dict(batch_for(TINY))
    batch["weights"] = batch["weights"].at[:, -3:].set(0.0)
    out = jax.jit(steps.make_eval_step(graphdef))(st.params, batch)
    logits, _ = nnx.merge(graphdef, st.params)(batch["inputs"])
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(batch["targets"])[..., None],
                              -1)[..., 0]
    w = np.asarray(batch["weights"])
    assert float(out["num_tokens"]) == w.sum()
    assert float(out["loss"]) == pytest.approx((nll * w).sum() / w.sum(), rel=1e-5)


# --- divergence -----------------------------------------------------------------------------

def _m(loss, grads, finite=True):
    return {"loss": loss, "finite": int(finite), "grad_norm_per_layer": np.asarray(grads)}


def test_monitor_names_the_layer_that_blew_up_first():
    names = divergence.layer_names(2, 2)
    assert names == ["encoder layer 1", "encoder layer 2", "decoder layer 1", "decoder layer 2"]
    mon = divergence.DivergenceMonitor(names)
    for step in range(1, 6):
        assert mon.observe(step, _m(3.0, [1.0, 1.0, 1.0, 1.0])) is None
    assert mon.observe(6, _m(3.1, [1.0, 1.0, 50.0, 1.0])) is None  # a spike, still finite
    assert mon.observe(7, _m(3.5, [200.0, 9.0, 1e4, 30.0])) is None
    event = mon.observe(8, _m(float("nan"), [np.nan] * 4, finite=False))
    assert event is not None and event.step == 8
    assert "decoder layer 1 (at step 6)" in event.line() and "non-finite" in event.line()


def test_monitor_says_when_every_layer_blew_up_at_once():
    mon = divergence.DivergenceMonitor(divergence.layer_names(0, 3))
    assert mon.observe(1, _m(3.0, [1.0, 2.0, 3.0])) is None
    event = mon.observe(2, _m(np.nan, [np.nan] * 3, finite=False))
    assert event.layer == "all 3 layers at once (at step 2)"
    mon = divergence.DivergenceMonitor(divergence.layer_names(0, 3))
    assert mon.observe(1, _m(3.0, [1.0, 1.0, 1.0])) is None
    assert mon.observe(2, _m(4.0, [20.0, 90.0, 1.0])) is None  # two layers jump 10x+
    event = mon.observe(3, _m(np.nan, [np.nan] * 3, finite=False))
    assert event.layer == "decoder layer 2 (the largest jump of 2 layers at step 2)"


def test_monitor_max_loss_and_skip_policy():
    mon = divergence.DivergenceMonitor(["decoder layer 1"], max_loss=10.0)
    assert "above train.max_loss=10" in mon.observe(1, _m(11.0, [1.0])).line()
    skip = divergence.DivergenceMonitor(["decoder layer 1"], policy="skip",
                                        max_consecutive_skips=2)
    assert skip.observe(1, _m(np.nan, [np.nan], finite=False)) is None
    assert skip.observe(2, _m(3.0, [1.0])) is None  # a good step resets the run of skips
    assert skip.observe(3, _m(np.nan, [np.nan], finite=False)) is None
    assert skip.observe(4, _m(np.nan, [np.nan], finite=False)) is None
    event = skip.observe(5, _m(np.nan, [np.nan], finite=False))
    assert event is not None and "3 non-finite steps in a row" in event.reason
    assert skip.skipped_steps == 4


# --- metrics --------------------------------------------------------------------------------

def test_metrics_jsonl_is_appended_and_read_back_last_line_wins(tmp_path):
    w = metrics.MetricsWriter(str(tmp_path), primary=True, start_step=0, num_steps=4,
                              progress=False)
    w.write(1, {"loss": np.float32(2.5), "grad_norm_per_layer": np.array([1.0, np.inf])})
    w.write(2, {"loss": 2.0})
    w.write(2, {"eval_loss": 2.2}, kind="eval")
    w.close()
    w = metrics.MetricsWriter(str(tmp_path), primary=True, start_step=1, num_steps=4,
                              progress=False)
    w.write(2, {"loss": 1.5})  # a resumed run re-logs step 2
    w.close()
    with open(tmp_path / "metrics.jsonl") as f:
        assert len(f.readlines()) == 4
    rows = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r["kind"]) for r in rows] == [(1, "train"), (2, "eval"), (2, "train")]
    assert rows[0]["grad_norm_per_layer"] == [1.0, math.inf] and rows[2]["loss"] == 1.5
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


# --- mesh -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes,n,expected", [((-1, 1, 1), 8, (8, 1, 1)),
                                              ((2, -1, 2), 8, (2, 2, 2)),
                                              ((1, 1, 1), 1, (1, 1, 1))])
def test_mesh_shape_fills_minus_one(sizes, n, expected):
    cfg = dict(zip(mesh.MESH_AXES, sizes))
    assert mesh.mesh_shape(cfg, n) == expected


@pytest.mark.parametrize("sizes,n,match", [((3, 1, 1), 8, "needs 3 devices but 8"),
                                           ((-1, -1, 1), 8, "at most one may be -1"),
                                           ((-1, 3, 1), 8, "do not divide the 8 devices"),
                                           ((0, 1, 1), 1, r"mesh\.data=0")])
def test_bad_mesh_sizes_are_one_clear_error(sizes, n, match):
    with pytest.raises(ConfigError, match=match):
        mesh.mesh_shape(dict(zip(mesh.MESH_AXES, sizes)), n)


def test_bad_sharding_rule_names_the_rule():
    cfg = base.mesh_config()
    cfg.rules.mlp = "model"
    with pytest.raises(ConfigError, match=r"mesh\.rules\.mlp='model' is not a mesh axis"):
        mesh.sharding_rules(cfg)


# --- configs --------------------------------------------------------------------------------

CONFIG_FILES = sorted(os.path.basename(p)[:-3] for p in glob.glob(f"{ROOT}/configs/*.py")
                      if not p.endswith(("__init__.py", "base.py")))


@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.parametrize("arg", [None, "quick"])
def test_every_config_builds_a_valid_model_and_is_locked(name, arg):
    module = __import__(f"configs.{name}", fromlist=["get_config"])
    config = module.get_config(arg)
    cfg = TransformerConfig.from_mapping(config.model)
    assert config.train.batch_size > 0 and cfg.total_layers > 0
    assert "python train.py --config=configs/" + name in module.__doc__
    with pytest.raises(AttributeError):
        config.train.num_step = 3  # a typo is an error, not a new key
    if arg == "quick":
        assert cfg.d_model == 32 and config.train.num_steps == 10


def test_unknown_config_argument_is_rejected():
    from configs import deepnorm as dn
    with pytest.raises(ValueError, match="'fast' is not known"):
        dn.get_config("fast")


def test_start_line_names_the_stack_when_it_is_not_a_one_layer_scan():
    import dataclasses
    import types

    from deepnorm.training import loop

    config = base.get_config(dict(arch="decoder", num_layers=2, d_model=16, num_heads=2,
                                  d_ff=32, residual="deepnorm"))
    one_device = types.SimpleNamespace(shape={"data": 1})
    for scan, unroll, expected in ((True, 1, "; float32 matmuls"),
                                   (True, 2, "; 2 layers per scan trip; float32"),
                                   (False, 1, "; unrolled stack; float32")):
        cfg = dataclasses.replace(TransformerConfig.from_mapping(config.model),
                                  scan_layers=scan, scan_unroll=unroll)
        line = loop._start_line(cfg, loop.derived_constants(cfg, config), 1, one_device)
        assert expected in line, line
        assert ("scan trip" in line) == (unroll > 1), line
        assert ("unrolled" in line) == (not scan), line
