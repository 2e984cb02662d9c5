"""The Transformer end to end: causality, padding, jit/scan/remat equivalences, bfloat16,
depth 1 to 1,000, per-layer reductions and logical axes."""

import itertools
import time

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepnorm import Transformer, TransformerConfig
from deepnorm.layerwise import global_norm, per_layer_norm
from deepnorm.partitioning import logical_axes, partition_specs
from deepnorm.training.loss import loss_fn

VOCAB = 30


def make_cfg(arch="decoder", layers=2, **kw):
    counts = (dict(num_encoder_layers=layers, num_decoder_layers=layers)
              if arch == "encoder_decoder" else dict(num_layers=layers))
    # remat "none" unless a test is about remat: the smaller graph compiles faster.
    base = dict(arch=arch, d_model=16, num_heads=2, d_ff=32, vocab_size=VOCAB,
                remat_policy="none", **counts)
    base.update(kw)
    return TransformerConfig(**base)


def tokens(shape, seed=0):
    """Random non-pad token ids (0 is the pad id)."""
    return jnp.asarray(np.random.default_rng(seed).integers(1, VOCAB, shape), jnp.int32)


def make_batch(cfg, b=2, t=6, seed=0):
    batch = {"inputs": tokens((b, t), seed), "targets": tokens((b, t), seed + 1),
             "weights": jnp.ones((b, t), jnp.float32)}
    if cfg.arch == "encoder_decoder":
        batch["decoder_inputs"] = tokens((b, t - 1), seed + 2)
        batch["targets"] = tokens((b, t - 1), seed + 3)
        batch["weights"] = jnp.ones((b, t - 1), jnp.float32)
    return batch


def loss_and_grads(graphdef, params, batch):
    def loss(p):
        return loss_fn(nnx.merge(graphdef, p), batch)[0]
    return jax.value_and_grad(loss)(params)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                         rtol=rtol, atol=atol), a, b)


# --- causality and padding -------------------------------------------------------------------

@pytest.mark.parametrize("arch,residual", [("decoder", "deepnorm"), ("encoder_decoder", "b2t")])
def test_decoder_is_causal_through_gradients(arch, residual):
    """d logits[:, t] / d stream-input[:, s] == 0 for every s > t, and != 0 for s <= t."""
    model = Transformer(make_cfg(arch, residual=residual), rngs=nnx.Rngs(0))
    t = 5
    context = (jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 16)), jnp.float32)
               if arch == "encoder_decoder" else None)

    def logits_from_embeddings(x_1xTxD):
        y, _ = model.decoder(x_1xTxD, context_BxSxD=context, causal=True)
        return model._logits(y)[0]  # [T, V]

    x = model._embed(tokens((1, t)), None)
    jac = jax.jit(jax.jacrev(logits_from_embeddings))(x)  # [T, V, 1, T, D]
    influence = np.asarray(jnp.abs(jac).sum(axis=(1, 2, 4)))  # [t_out, s_in]
    future = np.triu(np.ones((t, t), bool), k=1)
    assert np.all(influence[future] == 0.0), influence
    assert np.all(influence[~future] > 0.0), influence


def test_decoder_tokens_do_not_change_earlier_logits():
    model = Transformer(make_cfg("decoder", residual="post"), rngs=nnx.Rngs(0))
    a = tokens((2, 7), seed=3)
    b = a.at[:, 4].set((a[:, 4] % (VOCAB - 1)) + 1)  # a different non-pad token at t = 4
    la, lb = model(a)[0], model(b)[0]
    np.testing.assert_allclose(la[:, :4], lb[:, :4], rtol=0, atol=1e-6)
    assert np.all(np.abs(np.asarray(la[:, 4:] - lb[:, 4:])).max(axis=-1) > 1e-4)


def test_encoder_is_bidirectional():
    model = Transformer(make_cfg("encoder", residual="pre"), rngs=nnx.Rngs(0))
    a = tokens((1, 6), seed=4)
    b = a.at[:, -1].set((a[:, -1] % (VOCAB - 1)) + 1)
    diff = np.abs(np.asarray(model(a)[0] - model(b)[0])).max(axis=-1)
    assert np.all(diff[:, :-1] > 1e-5), diff  # the last token reaches every earlier position


@pytest.mark.parametrize("arch", ["encoder", "encoder_decoder"])
def test_padding_does_not_reach_real_tokens(arch):
    """Trailing pad tokens (id 0) are masked as keys: the outputs at the real positions equal
    those of the same sequence without the padding (positions are absolute, so unchanged)."""
    model = Transformer(make_cfg(arch, residual="deepnorm"), rngs=nnx.Rngs(0))
    real = tokens((2, 4), seed=5)
    padded = jnp.concatenate([real, jnp.zeros((2, 3), jnp.int32)], axis=1)
    if arch == "encoder":
        np.testing.assert_allclose(model(padded)[0][:, :4], model(real)[0], rtol=1e-5, atol=1e-5)
        return
    dec = tokens((2, 3), seed=6)  # for enc-dec: the decoder must not attend to encoder pads
    np.testing.assert_allclose(model(padded, dec)[0], model(real, dec)[0], rtol=1e-5, atol=1e-5)


# --- jit / scan / remat / dtype equivalences -------------------------------------------------

@pytest.mark.parametrize("arch", ["encoder", "decoder", pytest.param(
    "encoder_decoder", marks=pytest.mark.slow)])  # eager cross-attention: a minute on 2 cores
def test_jit_and_eager_agree(arch):
    cfg = make_cfg(arch, layers=1, residual="deepnorm")
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    batch = make_batch(cfg)
    eager = loss_and_grads(graphdef, params, batch)
    jitted = jax.jit(loss_and_grads, static_argnums=0)(graphdef, params, batch)
    assert_trees_close(eager, jitted)
    fwd = lambda p: nnx.merge(graphdef, p)(batch["inputs"], batch.get("decoder_inputs"))[0]  # noqa
    np.testing.assert_allclose(fwd(params), jax.jit(fwd)(params), rtol=1e-5, atol=1e-6)


def test_scan_and_unrolled_stack_agree():
    """Mix-LN with 1 of 2 layers Post-LN checks that the scanned per-layer flag reaches each
    layer the same way in both paths (the unrolled one slices the same scanned arrays)."""
    batch = None
    results = []
    for scan in (True, False):
        cfg = make_cfg("decoder", layers=2, residual="mixln", mixln_fraction=0.5,
                       scan_layers=scan)
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(1)), nnx.Param)
        batch = batch or make_batch(cfg)
        results.append(jax.jit(loss_and_grads, static_argnums=0)(graphdef, params, batch))
    assert_trees_close(*results)


def test_unrolled_stack_unstacks_once_and_matches_scan_under_dropout():
    """The unrolled path takes each layer's parameters and dropout key from one jnp.unstack: its
    gradient is one stack per stacked array (no per-layer pad or update-slice, whose sum cost
    O(L^2) memory traffic), and with dropout on it draws the same masks as the scan."""
    x, key = tokens((2, 6)), jax.random.PRNGKey(3)
    results = []
    for scan in (True, False):
        cfg = make_cfg("decoder", layers=3, residual="pre", dropout_rate=0.3, scan_layers=scan)
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(2)), nnx.Param)

        def loss(p, graphdef=graphdef):
            logits = nnx.merge(graphdef, p)(x, deterministic=False, dropout_key=key)[0]
            return jnp.mean(logits ** 2)

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    assert_trees_close(*results)
    unrolled_grad = jax.make_jaxpr(jax.value_and_grad(loss))(params)  # the last: scan=False
    prims = {eqn.primitive.name for eqn in unrolled_grad.jaxpr.eqns}
    assert "unstack" in prims and "stack" in prims, prims
    assert not prims & {"pad", "dynamic_update_slice", "scan"}, prims


def test_scan_unroll_reaches_the_scan_and_keeps_loss_and_grads():
    """3 Mix-LN layers (one Post-LN) with 1, 2 (a remainder layer) and 3 layers per loop trip:
    the same loss and gradients, and the scan in the jaxpr carries the asked-for unroll."""
    results = {}
    for unroll in (1, 2, 3):
        cfg = make_cfg("decoder", layers=3, residual="mixln", mixln_fraction=0.34,
                       scan_unroll=unroll)
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(4)), nnx.Param)
        batch = make_batch(cfg)
        jaxpr = jax.make_jaxpr(lambda p: loss_and_grads(graphdef, p, batch))(params)  # noqa: B023
        unrolls = {eqn.params["unroll"] for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "scan"}
        assert unrolls == {unroll}, unrolls
        results[unroll] = jax.jit(loss_and_grads, static_argnums=0)(graphdef, params, batch)
    assert_trees_close(results[1], results[2])
    assert_trees_close(results[1], results[3])


def test_every_remat_policy_gives_the_same_loss_and_grads():
    results = {}
    for policy in ("none", "full", "save_dots", "save_dots_no_batch", "auto"):
        cfg = make_cfg("decoder", layers=2, residual="pre", remat_policy=policy)
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(2)), nnx.Param)
        results[policy] = jax.jit(loss_and_grads, static_argnums=0)(
            graphdef, params, make_batch(cfg))
    for policy in ("full", "save_dots", "save_dots_no_batch", "auto"):
        assert_trees_close(results["none"], results[policy])


def _remat_policies_in_grad(cfg):
    """The ``policy`` of every checkpoint (remat) in the jaxpr of the model's gradient."""
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    jaxpr = jax.make_jaxpr(lambda p: loss_and_grads(graphdef, p, make_batch(cfg)))(params)
    found = []

    def walk(jx):
        for eqn in jx.eqns:
            if "checkpoint" in eqn.primitive.name or "remat" in eqn.primitive.name:
                found.append(eqn.params.get("policy"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return found


def test_unresolved_auto_remat_is_full_whatever_the_platform_and_dtype():
    """The model does not know the backend: "auto" that nobody resolved (the training setup
    does, deepnorm.training.platform) checkpoints each layer saving nothing, in either dtype."""
    assert TransformerConfig.__dataclass_fields__["remat_policy"].default == "auto"
    for dtype in ("float32", "bfloat16"):
        policies = _remat_policies_in_grad(make_cfg("decoder", layers=2, remat_policy="auto",
                                                    dtype=dtype))
        assert policies and all(p is None for p in policies), (dtype, policies)
    saved = _remat_policies_in_grad(make_cfg("decoder", layers=2, remat_policy="save_dots"))
    assert saved and all(p is jax.checkpoint_policies.dots_saveable for p in saved)
    assert _remat_policies_in_grad(make_cfg("decoder", layers=2, remat_policy="none")) == []


def _logits_loss_grads(graphdef, params, batch):
    logits, _ = nnx.merge(graphdef, params)(batch["inputs"], batch.get("decoder_inputs"))
    return (logits,) + loss_and_grads(graphdef, params, batch)


@pytest.mark.parametrize("arch,tied", [("decoder", True), ("encoder", False),
                                       pytest.param("encoder_decoder", True,
                                                    marks=pytest.mark.slow)])
def test_bfloat16_compute_stays_close_to_float32_at_init(arch, tied):
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = make_cfg(arch, layers=4, residual="deepnorm", dtype=dtype, tie_embeddings=tied)
        graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(3)), nnx.Param)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))  # float32 params
        logits, loss, grads = jax.jit(_logits_loss_grads, static_argnums=0)(
            graphdef, params, make_batch(cfg))
        assert logits.dtype == jnp.float32
        out[dtype] = (np.asarray(logits), float(loss), grads)
    (l32, loss32, g32), (l16, loss16, g16) = out["float32"], out["bfloat16"]
    # bfloat16 has an 8-bit mantissa: ~0.4% relative error per rounding, a few roundings deep.
    assert np.max(np.abs(l16 - l32)) < 0.05 * np.max(np.abs(l32))
    assert loss16 == pytest.approx(loss32, rel=0.01)
    assert float(global_norm(g16)) == pytest.approx(float(global_norm(g32)), rel=0.05)


def test_dropout_is_keyed_and_off_when_deterministic():
    cfg = make_cfg("decoder", residual="pre", dropout_rate=0.3)
    model = Transformer(cfg, rngs=nnx.Rngs(4))
    graphdef, params = nnx.split(model, nnx.Param)
    x = tokens((2, 6))

    @jax.jit
    def run(key):
        return nnx.merge(graphdef, params)(x, deterministic=False, dropout_key=key)[0]

    det = model(x, deterministic=True, dropout_key=jax.random.PRNGKey(0))[0]
    np.testing.assert_allclose(det, jax.jit(lambda: nnx.merge(graphdef, params)(x)[0])(),
                               rtol=1e-5, atol=1e-6)
    a, a_again, b = run(jax.random.PRNGKey(0)), run(jax.random.PRNGKey(0)), run(
        jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a, a_again)
    assert not np.allclose(a, det) and not np.allclose(a, b)
    with pytest.raises(ValueError, match="dropout_key"):
        model(x, deterministic=False)


def test_norm_switch_reaches_the_model():
    """No silent no-op switch: each norm gives different logits, except RMSNorm and ScaleNorm,
    which coincide at init by design (ScaleNorm's g = sqrt(d) makes sqrt(d) x / ||x|| equal
    x / RMS(x)) and part as soon as RMSNorm's per-dimension gain moves."""
    x = tokens((2, 6))
    models = {n: Transformer(make_cfg("decoder", residual="post", norm=n), rngs=nnx.Rngs(5))
              for n in ("layernorm", "rmsnorm", "scalenorm", "dyt")}
    logits = {n: np.asarray(m(x)[0]) for n, m in models.items()}
    for a, b in itertools.combinations(logits, 2):
        diff = np.max(np.abs(logits[a] - logits[b]))
        if {a, b} == {"rmsnorm", "scalenorm"}:
            assert diff < 1e-4, diff
        else:
            assert diff > 1e-3, (a, b, diff)
    scale = models["rmsnorm"].decoder.layers.ffn_norm.scale
    scale.set_value(scale[...] * jnp.linspace(0.5, 1.5, scale[...].shape[-1]))
    assert np.max(np.abs(np.asarray(models["rmsnorm"](x)[0]) - logits["scalenorm"])) > 1e-3


def test_statistics_describe_the_residual_stream():
    """aux: input_var is Var[embedding]; stream_in_norm of sublayer 0 is the embedding's mean
    token norm; each sublayer's input is the previous one's output."""
    model = Transformer(make_cfg("decoder", layers=3, residual="pre"), rngs=nnx.Rngs(6))
    x = tokens((2, 6))
    _, aux = model(x)
    stats = aux["decoder"]
    emb = model._embed(x, None)
    np.testing.assert_allclose(stats["input_var"], jnp.var(emb), rtol=1e-5)
    np.testing.assert_allclose(stats["stream_in_norm"][0, 0],
                               jnp.mean(jnp.linalg.norm(emb, axis=-1)), rtol=1e-5)
    flat_in = np.asarray(stats["stream_in_norm"]).reshape(-1)
    flat_out = np.asarray(stats["stream_out_norm"]).reshape(-1)
    np.testing.assert_allclose(flat_in[1:], flat_out[:-1], rtol=1e-5)
    assert stats["branch_norm"].shape == stats["branch_var"].shape == (3, 2)


# --- depth -----------------------------------------------------------------------------------

TINY = dict(d_model=8, num_heads=2, d_ff=16, vocab_size=VOCAB, residual="deepnorm")


@pytest.mark.parametrize("layers", [1, 1000])
def test_one_and_a_thousand_layers_run_forward_and_backward(layers):
    cfg = TransformerConfig(arch="decoder", num_layers=layers, **TINY)
    t0 = time.perf_counter()
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    batch = {"inputs": tokens((1, 4)), "targets": tokens((1, 4), 1),
             "weights": jnp.ones((1, 4), jnp.float32)}
    loss, grads = jax.jit(loss_and_grads, static_argnums=0)(graphdef, params, batch)
    assert np.isfinite(float(loss))
    per_layer = np.asarray(per_layer_norm(grads))
    assert per_layer.shape == (layers,)
    assert np.all(np.isfinite(per_layer)) and np.all(per_layer > 0)
    # The scan compiles one layer whatever the depth; 1,000 layers must not take minutes.
    assert time.perf_counter() - t0 < 120


@pytest.mark.slow  # the 1,000-layer decoder test covers depth in the default suite
def test_encoder_decoder_500_500_builds_and_runs():
    """The issue's example depth (the paper's 1,000-layer model) at tiny width."""
    cfg = TransformerConfig(arch="encoder_decoder", num_encoder_layers=500,
                            num_decoder_layers=500, **TINY)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    logits, aux = model(tokens((1, 4)), tokens((1, 3), 1))
    assert logits.shape == (1, 3, VOCAB) and np.all(np.isfinite(np.asarray(logits)))
    assert aux["encoder"]["stream_out_norm"].shape == (500, 2)
    assert aux["decoder"]["stream_out_norm"].shape == (500, 3)


# --- per-layer reductions and logical axes ---------------------------------------------------

def _leaves_by_path(tree):
    return {tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_per_layer_norm_matches_numpy():
    cfg = make_cfg("encoder_decoder", layers=3, residual="rezero", norm="none")
    _, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(7)), nnx.Param)
    # A tree with the params' structure but different values per layer (like gradients).
    tree = jax.tree.map(lambda x: x * (1 + jnp.arange(x.shape[0]).reshape((-1,) + (1,) *
                                                                          (x.ndim - 1)))
                        if x.ndim else x, params)
    want = {"encoder": np.zeros(3), "decoder": np.zeros(3)}
    total = 0.0
    for path, leaf in _leaves_by_path(tree).items():
        total += float(np.sum(leaf.astype(np.float64) ** 2))
        if path[0] in want and path[1] == "layers":
            want[path[0]] += (leaf.astype(np.float64) ** 2).reshape(leaf.shape[0], -1).sum(1)
    got = np.asarray(per_layer_norm(tree))
    np.testing.assert_allclose(got, np.sqrt(np.concatenate([want["encoder"], want["decoder"]])),
                               rtol=1e-5)
    np.testing.assert_allclose(float(global_norm(tree)), np.sqrt(total), rtol=1e-5)


def test_logical_axes_name_the_layer_axis():
    cfg = make_cfg("encoder_decoder", layers=2, residual="rezero", norm="none",
                   positions="learned", tie_embeddings=False)
    _, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(8)), nnx.Param)
    axes = _leaves_by_path(logical_axes(params))
    shapes = {k: v.shape for k, v in _leaves_by_path(params).items()}
    axes = {k[:-1] if k[-1] == "value" else k: tuple(v) for k, v in
            jax.tree_util.tree_flatten_with_path(
                logical_axes(params), is_leaf=lambda x: isinstance(x, tuple))[0]
            for k, v in [(tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in k), v)]}
    for path, shape in shapes.items():
        key = path[:-1] if path[-1] == "value" else path
        names = axes[key]
        assert len(names) == len(shape), (path, names, shape)
        stacked = key[0] in ("encoder", "decoder") and key[1] == "layers"
        assert (names[:1] == ("layers",)) == stacked, (path, names)
    assert axes[("decoder", "layers", "self_attn", "query", "kernel")] == (
        "layers", "embed", "heads")
    assert axes[("decoder", "layers", "ffn", "ffn_out", "kernel")] == ("layers", "mlp", "embed")
    assert axes[("decoder", "layers", "self_attn_gate")] == ("layers",)
    assert axes[("embed",)] == ("vocab", "embed")


def test_partition_specs_follow_rules_and_never_reuse_a_mesh_axis():
    cfg = make_cfg("decoder", layers=2, residual="pre")
    _, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(9)), nnx.Param)
    rules = {"layers": None, "embed": "fsdp", "mlp": "fsdp", "heads": "tensor",
             "vocab": ("tensor", "fsdp"), "norm": None}
    specs = partition_specs(params, rules)
    spec_of = lambda *path: specs["decoder"]["layers"][path[0]][path[1]]["kernel"]  # noqa
    assert tuple(spec_of("self_attn", "query")) == (None, "fsdp", "tensor")
    # embed and mlp both map to fsdp: the first one wins, the second stays replicated.
    assert tuple(spec_of("ffn", "ffn_in")) == (None, "fsdp", None)
    assert tuple(spec_of("ffn", "ffn_out")) == (None, "fsdp", None)
    # vocab takes (tensor, fsdp), so embed cannot also use fsdp.
    assert tuple(specs["embed"]) == (("tensor", "fsdp"), None)
    for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
        used = list(itertools.chain.from_iterable(
            (a,) if isinstance(a, str) else tuple(a or ()) for a in spec))
        assert len(used) == len(set(used)), spec
