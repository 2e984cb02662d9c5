"""Per-example norm-parameter gradients from the probes (deepnorm.norm_probes) against
``jax.vmap(jax.grad)`` over the examples, on tiny models: scanned and unrolled stacks, remat,
padding, every norm with parameters, and the schemes that place norms differently (inner
norms, output norms, an input norm, a norm applied twice)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepnorm import TransformerConfig, norm_probes
from deepnorm.training.loss import cross_entropy, model_forward
from deepnorm.transformer import Transformer

TINY = dict(d_model=16, num_heads=2, d_ff=32, vocab_size=40, max_len=16)
B, T = 3, 8


def _batch(arch, rng):
    inputs = rng.integers(1, 40, (B, T)).astype(np.int32)
    inputs[0, 5:] = 0  # padding: example 0 has 5 real tokens, example 2 has 7
    inputs[2, 7:] = 0
    targets = rng.integers(1, 40, (B, T)).astype(np.int32)
    batch = {"inputs": inputs, "targets": targets, "weights": (inputs != 0).astype(np.float32)}
    if arch == "encoder_decoder":
        batch["decoder_inputs"] = rng.integers(1, 40, (B, T)).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _randomized_model(cfg, seed=0):
    """The model's structure with random parameters drawn in NumPy (compiling the real init
    costs seconds on CPU and is not under test): weights N(0, 0.3^2), norm gains around 1, so
    no zero init hides a gradient and a gain-only or bias-only mistake shows."""
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed))), nnx.Param)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        offset = 1.0 if path[-2].key in ("scale", "alpha") else 0.0
        return jnp.asarray(offset + 0.3 * rng.standard_normal(leaf.shape), jnp.float32)

    return graphdef, jax.tree_util.tree_map_with_path(draw, abstract)


def _probe_grads(graphdef, params, batch):
    denom = jnp.sum(batch["weights"])

    def loss(probes):
        model = nnx.merge(graphdef, params)
        norm_probes.attach_probes(model, probes)
        logits, _ = model_forward(model, batch)
        return cross_entropy(logits, batch["targets"], batch["weights"])[0] / denom

    probes = norm_probes.zero_probes(nnx.merge(graphdef, params), B)
    return jax.jit(jax.grad(loss))(probes)


def _vmapped_norm_grads(graphdef, params, batch):
    """Each example's share of the batch loss's gradient, by vmap(grad) over examples, for
    the norm parameters only: {norm path: {param: [B, ...] or [L, B, ...]}}."""
    denom = jnp.sum(batch["weights"])

    def example_loss(p, example):
        one = jax.tree.map(lambda x: x[None], example)
        logits, _ = model_forward(nnx.merge(graphdef, p), one)
        return cross_entropy(logits, one["targets"], one["weights"])[0] / denom

    grads = jax.jit(jax.vmap(jax.grad(example_loss), in_axes=(None, 0)))(params, batch)
    model = nnx.merge(graphdef, grads)  # a model-shaped tree of [B, ...] gradients
    out = {}
    for name, norm in norm_probes.norm_modules(model).items():
        out[name] = {}
        for pname, value in vars(norm).items():
            if isinstance(value, nnx.Param):
                g = value[...]
                # vmap puts the example axis first; the probes keep the layer axis first.
                out[name][pname] = jnp.moveaxis(g, 0, 1) if norm_probes.stack_of(name) else g
    return out


CASES = [
    dict(arch="decoder", num_layers=2, residual="pre", norm="layernorm"),  # scan + full remat
    dict(arch="decoder", num_layers=2, residual="post", norm="dyt", scan_layers=False),
    dict(arch="encoder", num_layers=2, residual="subln", norm="rmsnorm", remat_policy="none"),
    # Opt-in: each compiles two more models (seconds on a loaded CPU).
    pytest.param(dict(arch="encoder", num_layers=2, residual="peri", norm="scalenorm"),
                 marks=pytest.mark.slow),
    pytest.param(dict(arch="decoder", num_layers=3, residual="mixln", norm="layernorm",
                      remat_policy="save_dots"), marks=pytest.mark.slow),
    pytest.param(dict(arch="encoder_decoder", num_encoder_layers=2, num_decoder_layers=1,
                      residual="sandwich", norm="layernorm"), marks=pytest.mark.slow),
]


def _case_id(case):
    case = case if isinstance(case, dict) else case.values[0]
    return f"{case['arch']}-{case['residual']}-{case['norm']}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_probe_gradients_are_the_per_example_gradients(case):
    cfg = TransformerConfig(**TINY, **case)
    graphdef, params = _randomized_model(cfg)
    batch = _batch(cfg.arch, np.random.default_rng(0))
    got = _probe_grads(graphdef, params, batch)
    want = _vmapped_norm_grads(graphdef, params, batch)
    assert set(got) == set(want) and got
    for name in want:
        assert set(got[name]) == set(want[name]), name
        for pname in want[name]:
            np.testing.assert_allclose(np.asarray(got[name][pname]),
                                       np.asarray(want[name][pname]),
                                       rtol=2e-4, atol=1e-6, err_msg=f"{name}.{pname}")
    # The per-layer per-example squared norms the train step logs, against the same reference.
    per_layer, total = norm_probes.per_layer_sq_norms(got, batch=True)
    ref_layer, ref_total = norm_probes.per_layer_sq_norms(want, batch=True)
    assert per_layer.shape == (cfg.total_layers, B)
    np.testing.assert_allclose(per_layer, ref_layer, rtol=5e-4)
    np.testing.assert_allclose(total, ref_total, rtol=5e-4)


def test_probes_leave_the_forward_pass_and_the_batch_gradient_unchanged():
    cfg = TransformerConfig(**TINY, arch="decoder", num_layers=2, residual="pre", norm="dyt")
    graphdef, params = _randomized_model(cfg)
    batch = _batch("decoder", np.random.default_rng(1))

    @functools.partial(jax.jit, static_argnums=1)
    def forward(p, with_probes):
        model = nnx.merge(graphdef, p)
        if with_probes:
            norm_probes.attach_probes(model, norm_probes.zero_probes(model, B))
        return model_forward(model, batch)[0]

    np.testing.assert_array_equal(np.asarray(forward(params, True)),
                                  np.asarray(forward(params, False)))

    def loss(p):
        logits, _ = model_forward(nnx.merge(graphdef, p), batch)
        return cross_entropy(logits, batch["targets"], batch["weights"])[0] / jnp.sum(
            batch["weights"])

    grads = nnx.merge(graphdef, jax.jit(jax.grad(loss))(params))
    summed = norm_probes.summed_over_examples(_probe_grads(graphdef, params, batch))
    for name, norm in norm_probes.norm_modules(grads).items():
        for pname in summed[name]:
            np.testing.assert_allclose(summed[name][pname], getattr(norm, pname)[...],
                                       rtol=1e-4, atol=1e-7)


def test_a_model_without_norms_has_no_probes():
    cfg = TransformerConfig(**TINY, arch="decoder", num_layers=2, residual="rezero",
                            norm="none")
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # shapes suffice
    assert norm_probes.zero_probes(model, B) == {}
    per_layer, total = norm_probes.per_layer_sq_norms({})
    assert per_layer.shape == (0,) and float(total) == 0.0
