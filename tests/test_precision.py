"""Precision as a stated choice: ``model.matmul_precision`` reaches every float32 dot of the
compiled program, and ``model.dtype="float16"`` trains with dynamic loss scaling
(``deepnorm.training.loss_scale``): overflows halve the scale and are skipped, not divergence;
the scale is checkpointed, so a killed run resumes bit-identically, scale included."""

import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import jaxprs_in_params

from deepnorm import ConfigError, TransformerConfig, ops
from deepnorm.training import divergence, loss_scale, optim, state, steps
from deepnorm.training.loss import loss_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for `configs`
from configs import base  # noqa: E402

TINY = dict(arch="decoder", num_layers=1, d_model=16, num_heads=2, d_ff=32, residual="pre",
            remat_policy="none", tie_embeddings=False)


def batch_for(cfg, b=4, t=8, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, 40, (b, t + 1)).astype(np.int32)  # a small alphabet: learnable
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "weights": jnp.ones((b, t), jnp.float32)}


# --- matmul_precision -------------------------------------------------------------------------

@pytest.mark.parametrize("name,hlo", [("float32", "HIGHEST"), ("tensorfloat32", "HIGH"),
                                      ("default", "DEFAULT")])
def test_matmul_precision_is_in_the_stablehlo(name, hlo):
    x, k = jnp.ones((4, 8)), jnp.ones((3, 8))
    text = jax.jit(lambda x, k: ops.matmul(x, k, jnp.float32, kernel_axis=1, precision=name)
                   ).lower(x, k).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) == 1 and f"precision = [{hlo}, {hlo}]" in dots[0], dots


def _dot_precisions(jaxpr):
    """(operand dtype, precision) of every dot_general, sub-jaxprs (scan, remat) included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append((eqn.invars[0].aval.dtype, eqn.params["precision"]))
        for sub in jaxprs_in_params(eqn.params):
            out.extend(_dot_precisions(sub))
    return out


def _model_grad_dots(**model):
    cfg = TransformerConfig(**dict(TINY, **model))
    graphdef, params = state.abstract_params(cfg)
    batch = batch_for(cfg)
    grad = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch)[0])
    return _dot_precisions(jax.make_jaxpr(grad)(nnx.to_pure_dict(params)).jaxpr)


def test_every_float32_dot_of_the_training_gradient_is_highest_by_default():
    # Forward and backward, projections, attention einsums and the untied head.
    dots = _model_grad_dots()
    assert len(dots) >= 12
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert all(dt == jnp.float32 and p == highest for dt, p in dots), dots


def test_default_precision_is_opt_in_and_reaches_every_dot():
    dots = _model_grad_dots(matmul_precision="default")
    assert dots and all(p in (None, (jax.lax.Precision.DEFAULT,) * 2) for _, p in dots), dots


def test_float16_dots_take_float16_operands_and_return_float32():
    x, k = jnp.ones((4, 8)), jnp.ones((8, 3))
    y = ops.matmul(x, k, jnp.float16)
    assert y.dtype == jnp.float32
    eqn = jax.make_jaxpr(lambda x, k: ops.matmul(x, k, jnp.float16))(x, k).jaxpr.eqns[-1]
    assert eqn.primitive.name == "dot_general"
    assert [v.aval.dtype for v in eqn.invars] == [jnp.float16, jnp.float16]
    # The products are exact in float32 (both inputs are representable in float16).
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 8)).astype(np.float16)
    b = rng.normal(size=(8, 3)).astype(np.float16)
    np.testing.assert_allclose(ops.matmul(jnp.asarray(a, jnp.float32), jnp.asarray(b), "float16"),
                               a.astype(np.float64) @ b.astype(np.float64), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("key,value,match", [
    ("matmul_precision", "highest", r"model.matmul_precision='highest' is not one of float32, "
                                    r"tensorfloat32, default"),
    ("dtype", "float64", r"model.dtype='float64' is not one of float32, bfloat16, float16"),
])
def test_bad_precision_values_are_one_line(key, value, match):
    with pytest.raises(ConfigError, match=match):
        TransformerConfig(**dict(TINY, **{key: value}))


@pytest.mark.parametrize("key,value,match", [
    ("loss_scale_period", 0, r"train.loss_scale_period=0 must be a positive integer"),
    ("initial_loss_scale", 0.5, r"train.initial_loss_scale=0.5 must be a finite number >= 1"),
])
def test_bad_loss_scale_values_are_one_line(key, value, match):
    with pytest.raises(ConfigError, match=match):
        loss_scale.check_config(base.train_config(**{key: value}))


# --- dynamic loss scaling -----------------------------------------------------------------

def _optimizer():
    opt = ml_collections.ConfigDict(dict(base.optimizer_config(), warmup_steps=0,
                                         schedule="constant", label_smoothing=0.0,
                                         learning_rate=3e-3))
    return optim.make_optimizer(opt, 100)[0]


@pytest.fixture(scope="module")
def float16_step():
    cfg = TransformerConfig(**dict(TINY, dtype="float16"))
    tx = _optimizer()
    graphdef, st = state.create_train_state(cfg, tx, seed=0, loss_scale=2.0**15)
    return cfg, tx, graphdef, st, jax.jit(steps.make_train_step(graphdef, tx,
                                                                loss_scale_period=2))


def test_an_overflow_halves_the_scale_and_skips_the_step(float16_step):
    cfg, _, _, st, train_step = float16_step
    # 2^60 x the loss's cotangents cannot be rounded to float16 (max 65504) at the matmuls.
    huge = st.replace(loss_scale=loss_scale.initial_state(2.0**60))
    new, m = train_step(huge, batch_for(cfg))
    assert int(m["overflow"]) == 1 and int(m["finite"]) == 0 and np.isfinite(m["loss"])
    assert float(m["loss_scale"]) == 2.0**60
    assert float(new.loss_scale["scale"]) == 2.0**59 and int(new.loss_scale["good_steps"]) == 0
    assert int(new.step) == 1
    for a, b in zip(jax.tree.leaves((new.params, new.opt_state)),
                    jax.tree.leaves((huge.params, huge.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_the_scale_doubles_after_period_finite_steps_and_unscales_the_gradient(float16_step):
    cfg, _, _, st, train_step = float16_step
    batch = batch_for(cfg)
    one, m1 = train_step(st, batch)
    two, m2 = train_step(one, batch)
    assert int(m1["overflow"]) == int(m2["overflow"]) == 0
    assert float(one.loss_scale["scale"]) == 2.0**15 and int(one.loss_scale["good_steps"]) == 1
    assert float(two.loss_scale["scale"]) == 2.0**16 and int(two.loss_scale["good_steps"]) == 0
    # The reported gradient norm is the true one: the same step at scale 2^4 agrees closely.
    _, small = train_step(st.replace(loss_scale=loss_scale.initial_state(16.0)), batch)
    np.testing.assert_allclose(m1["grad_norm"], small["grad_norm"], rtol=1e-2)


def test_a_non_finite_step_at_the_floor_scale_is_no_overflow(float16_step):
    cfg, _, _, st, train_step = float16_step
    params = jax.tree.map(lambda x: x, st.params)
    params["embed"] = params["embed"].at[5, 0].set(jnp.inf)  # inputs use token ids >= 4
    bad = st.replace(params=params, loss_scale=loss_scale.initial_state(1.0))
    new, m = train_step(bad, batch_for(cfg))
    assert int(m["overflow"]) == 0 and int(m["finite"]) == 0
    assert float(new.loss_scale["scale"]) == 1.0


def test_float16_with_loss_scaling_trains_to_the_float32_loss(float16_step):
    # With loss_scale_period=2 the scale keeps probing upwards, so some float16 steps overflow
    # and are skipped; float32 takes the same batch only where float16 applied its update, so
    # both have made the same number of updates when their losses are compared.
    cfg16, tx, graphdef16, st16, step16 = float16_step
    cfg32 = TransformerConfig(**TINY)
    graphdef32, st32 = state.create_train_state(cfg32, tx, seed=0)
    step32 = jax.jit(steps.make_train_step(graphdef32, tx))
    batch = batch_for(cfg16)
    pairs, overflows = [], 0
    for _ in range(30):
        st16, m16 = step16(st16, batch)
        overflows += int(m16["overflow"])
        if int(m16["finite"]):
            st32, m32 = step32(st32, batch)
            pairs.append((float(m16["loss"]), float(m32["loss"])))
    assert overflows > 0 and len(pairs) + overflows == 30 and len(pairs) >= 15
    np.testing.assert_allclose(pairs[0][0], pairs[0][1], rtol=1e-2)
    assert pairs[-1][1] < 0.8 * pairs[0][1]  # it did learn the batch
    np.testing.assert_allclose(pairs[-1][0], pairs[-1][1], rtol=0.03)


def test_monitor_counts_overflows_and_never_calls_them_divergence():
    mon = divergence.DivergenceMonitor(["decoder layer 1"], policy="stop")
    for step in range(1, 4):
        assert mon.observe(step, {"loss": 5.0, "finite": 0, "overflow": 1,
                                  "grad_norm_per_layer": np.array([np.inf])}) is None
    assert mon.overflow_steps == 3 and mon.skipped_steps == 0
    assert mon.observe(4, {"loss": 5.0, "finite": 1, "overflow": 0,
                           "grad_norm_per_layer": np.array([1.0])}) is None
    # Past the floor a non-finite step is a divergence again, under the run's policy.
    event = mon.observe(5, {"loss": 5.0, "finite": 0, "overflow": 0,
                            "grad_norm_per_layer": np.array([np.inf])})
    assert event is not None and "non-finite" in event.reason
    assert "(at step 5)" in event.layer  # the overflow steps left no spike behind


# --- a killed float16 run resumes bit-identically, loss scale included ----------------------

NUM_STEPS = 8
TRAIN = dict(num_steps=NUM_STEPS, batch_size=4, seq_len=16, log_every=1, eval_every=100,
             eval_steps=1, checkpoint_every=2, keep_checkpoints=2, progress_bar=False,
             initial_loss_scale=2.0**24, loss_scale_period=2)
FLAGS = ["--config=configs/decoder_lm.py:quick", "--config.model.d_model=16",
         "--config.model.d_ff=32", "--config.model.num_layers=1", "--config.model.dtype=float16",
         *[f"--config.train.{k}={v}" for k, v in TRAIN.items()]]


def _rows(workdir):
    import json
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def _train_py(workdir):
    return subprocess.Popen([sys.executable, "train.py", *FLAGS, f"--workdir={workdir}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_killed_float16_run_resumes_bit_identically_with_its_loss_scale(tmp_path):
    import json

    reference, workdir = str(tmp_path / "reference"), str(tmp_path / "killed")
    _, err = _train_py(reference).communicate(timeout=900)
    with open(os.path.join(reference, "summary.json")) as f:
        expected = json.load(f)
    assert expected["status"] == "completed", err[-3000:]
    assert "dynamic loss scale from 1.67772e+07" in err
    # The scale moved both ways: some steps overflowed, some trained.
    assert 0 < expected["overflow_steps"] < NUM_STEPS, expected
    assert len({r["loss_scale"] for r in _rows(reference)}) > 2

    process = _train_py(workdir)
    deadline = time.time() + 900
    while not any(r["step"] >= 5 for r in (_rows(workdir) if os.path.exists(
            os.path.join(workdir, "metrics.jsonl")) else [])):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    _, err = _train_py(workdir).communicate(timeout=900)
    with open(os.path.join(workdir, "summary.json")) as f:
        resumed = json.load(f)
    assert resumed["status"] == "completed" and resumed["resumed_from_step"], err[-3000:]
    assert resumed["loss_scale"] == expected["loss_scale"]
    want = {r["step"]: r for r in _rows(reference)}
    for row in _rows(workdir):
        for key in ("loss", "loss_scale", "overflow", "param_norm"):
            assert row[key] == want[row["step"]][key], (row["step"], key)
