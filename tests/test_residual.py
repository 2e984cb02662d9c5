"""Each residual scheme (``model.residual``) against its one-line definition.

Every test recomputes the scheme's equation by hand from the block's own submodules (its
attention, feed-forward and norms, sliced out of the stacked layers) and compares with what
the scanned Stack computes. Definitions (see deepnorm/residual.py for the papers):

  post      x <- LN(x + F(x))
  pre       x <- x + F(LN(x)), final LN after the stack
  sandwich  x <- x + LN_out(F(LN(x))), final LN
  peri      x <- x + LN_out(F(LN_in(x))), LN on the embedding output, final LN
  deepnorm  x <- LN(alpha * x + F(x))
  subln     x <- x + F(LN(x)) with LN inside F (before attn out-proj, after FFN activation)
  b2t       h = LN(x + Attn(x)); x <- LN(h + FFN(h) + x)
  rezero    x <- x + a * F(x), a = 0 at init
  admin     x <- LN(omega * x + F(x)), omega from the profiling pass
  mixln     post in the first round(frac * L) layers, pre after, final LN
  lnscale   x <- x + F(LN(x) / sqrt(l)), final LN
  dlcl      x_{l+1} = sum_{k<=l} W_{l+1,k} LN_k(y_k), y_0 the embedding output (no LN),
            y_l = the Pre-LN layer on x_l, W_{l+1,k} = 1/(l+1) at init; final LN
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepnorm import Transformer, TransformerConfig
from deepnorm.profiling import admin_initialize
from deepnorm.residual import SCHEMES

D, HEADS, FF, VOCAB = 16, 2, 32, 30
TOL = dict(rtol=2e-5, atol=2e-5)


def make_model(residual, num_layers=4, arch="encoder", seed=0, **kw):
    layers = (dict(num_encoder_layers=num_layers, num_decoder_layers=num_layers)
              if arch == "encoder_decoder" else dict(num_layers=num_layers))
    cfg = TransformerConfig(arch=arch, d_model=D, num_heads=HEADS, d_ff=FF, vocab_size=VOCAB,
                            norm="layernorm" if SCHEMES[residual].uses_norm else "none",
                            residual=residual, remat_policy="none", **layers, **kw)
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def block_at(stack, i):
    """Layer i of a stack as an ordinary Block (its slice of the stacked parameters)."""
    graphdef, state = nnx.split(stack.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))


def randomize_norms(stack, seed=0):
    """Moves every norm's scale/bias off (1, 0), so that a norm in the wrong place shows."""
    rng = np.random.default_rng(seed)
    for path, var in nnx.iter_graph(stack):
        if isinstance(var, nnx.Param) and path and path[-1] in ("scale", "bias") and any(
                "norm" in str(p) for p in path):
            var.set_value(jnp.asarray(rng.normal(1.0 if path[-1] == "scale" else 0.0, 0.2,
                                                 var[...].shape), jnp.float32))


def random_stream(seed=0, t=5):
    return jnp.asarray(np.random.default_rng(seed).normal(0, 1.0, (2, t, D)), jnp.float32)


def branches(blk, causal=False, context=None):
    """The layer's branches F, in sublayer order, with their norms (name -> (F, LN, LN_out))."""
    out = [("self_attn", lambda h: blk.self_attn(h, causal=causal))]
    if blk.cross_attn is not None:
        out.append(("cross_attn", lambda h: blk.cross_attn(h, context)))
    out.append(("ffn", blk.ffn))
    return [(name, f, getattr(blk, f"{name}_norm"), getattr(blk, f"{name}_norm_out"))
            for name, f in out]


def reference_layer(scheme, blk, x, *, layer, num_layers, alpha=1.0, mix_post=0, causal=False,
                    context=None):
    """The scheme's one-line equation, applied sublayer by sublayer with the block's modules."""
    x_in = x
    subs = branches(blk, causal, context)
    for k, (name, f, ln, ln_out) in enumerate(subs):
        if scheme == "post":
            x = ln(x + f(x))
        elif scheme in ("pre", "subln"):
            x = x + f(ln(x))
        elif scheme in ("sandwich", "peri"):
            x = x + ln_out(f(ln(x)))
        elif scheme == "deepnorm":
            x = ln(alpha * x + f(x))
        elif scheme == "admin":
            x = ln(getattr(blk, f"{name}_omega")[...] * x + f(x))
        elif scheme == "rezero":
            x = x + getattr(blk, f"{name}_gate")[...] * f(x)
        elif scheme == "mixln":
            x = ln(x + f(x)) if layer <= mix_post else x + f(ln(x))
        elif scheme == "lnscale":
            x = x + f(ln(x) / np.sqrt(layer))
        elif scheme == "b2t":
            x = ln(x + f(x) + x_in) if k == len(subs) - 1 else ln(x + f(x))
        else:
            raise AssertionError(scheme)
    return x


def reference_stack(scheme, stack, x, **kw):
    if stack.input_norm is not None:
        x = stack.input_norm(x)
    for i in range(stack.num_layers):
        x = reference_layer(scheme, block_at(stack, i), x, layer=i + 1,
                            num_layers=stack.num_layers, **kw)
    if stack.final_norm is not None:
        x = stack.final_norm(x)
    return x


# Which schemes end the stack with a norm and which normalize the embedding output.
FINAL_NORM = {"pre", "sandwich", "peri", "subln", "mixln", "lnscale"}


@pytest.mark.parametrize("scheme", ["post", "pre", "sandwich", "peri", "deepnorm", "b2t",
                                    "lnscale"])
def test_stack_computes_the_scheme_equation(scheme):
    model = make_model(scheme)
    stack = model.encoder
    randomize_norms(stack)
    x = random_stream()
    alpha = (2 * 4) ** 0.25 if scheme == "deepnorm" else 1.0  # DeepNet: encoder (2N)^(1/4)
    got, _ = stack(x)
    np.testing.assert_allclose(got, reference_stack(scheme, stack, x, alpha=alpha), **TOL)
    assert (stack.final_norm is not None) == (scheme in FINAL_NORM)
    assert (stack.input_norm is not None) == (scheme == "peri")


@pytest.mark.parametrize("scheme", ["post", "pre", "deepnorm", "b2t", "sandwich"])
def test_encoder_decoder_decoder_layer_with_cross_attention(scheme):
    """Three sublayers (self, cross, ffn) per decoder layer; DeepNet's decoder alpha (3M)^(1/4)."""
    model = make_model(scheme, num_layers=2, arch="encoder_decoder")
    randomize_norms(model.decoder, seed=3)
    y, context = random_stream(1, t=4), random_stream(2, t=6)
    got, stats = model.decoder(y, context_BxSxD=context, causal=True)
    alpha = (3 * 2) ** 0.25 if scheme == "deepnorm" else 1.0
    want = reference_stack(scheme, model.decoder, y, alpha=alpha, causal=True, context=context)
    np.testing.assert_allclose(got, want, **TOL)
    assert stats["stream_out_norm"].shape == (2, 3)


def test_deepnorm_block_equals_ln_of_alpha_x_plus_attention():
    """The block-level statement of DeepNorm on its first sublayer: LN(alpha*x + Attn(x))."""
    model = make_model("deepnorm", num_layers=6)
    blk = block_at(model.encoder, 0)
    x = random_stream(4)
    alpha = (2 * 6) ** 0.25
    consts = {"alpha": jnp.float32(alpha), "lnscale": jnp.float32(1), "is_post": False,
              "layer": jnp.float32(1)}
    _, stats = blk(x, consts)
    h = blk.self_attn_norm(alpha * x + blk.self_attn(x))
    np.testing.assert_allclose(stats["stream_out_norm"][0],
                               jnp.mean(jnp.linalg.norm(h, axis=-1)), rtol=1e-5)
    out, _ = blk(x, consts)
    np.testing.assert_allclose(out, blk.ffn_norm(alpha * h + blk.ffn(h)), **TOL)


def _manual_attention(attn, x, inner_norm):
    """Multi-head attention from the raw kernels, with SubLN's norm before the out-projection."""
    def proj(dense, h):
        return h @ dense.kernel[...] + dense.bias[...]

    b, t, _ = x.shape
    split = lambda a: a.reshape(b, t, HEADS, D // HEADS)  # noqa: E731
    q, k, v = split(proj(attn.query, x)), split(proj(attn.key, x)), split(proj(attn.value, x))
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D // HEADS)
    o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v).reshape(b, t, D)
    return proj(attn.out, inner_norm(o))


def _manual_ffn(ffn, x, inner_norm):
    h = jax.nn.gelu(x @ ffn.ffn_in.kernel[...] + ffn.ffn_in.bias[...])
    return inner_norm(h) @ ffn.ffn_out.kernel[...] + ffn.ffn_out.bias[...]


def test_subln_inner_norms_sit_before_out_projection_and_after_activation():
    model = make_model("subln", num_layers=2)
    stack = model.encoder
    randomize_norms(stack, seed=5)
    x0 = random_stream(6)
    x = x0
    for i in range(2):
        blk = block_at(stack, i)
        assert blk.self_attn.inner_norm is not None and blk.ffn.inner_norm is not None
        x = x + _manual_attention(blk.self_attn, blk.self_attn_norm(x), blk.self_attn.inner_norm)
        x = x + _manual_ffn(blk.ffn, blk.ffn_norm(x), blk.ffn.inner_norm)
    got, _ = stack(x0)
    np.testing.assert_allclose(got, stack.final_norm(x), rtol=1e-4, atol=1e-4)
    # Every other scheme has no inner norm.
    pre = block_at(make_model("pre", num_layers=1).encoder, 0)
    assert pre.self_attn.inner_norm is None and pre.ffn.inner_norm is None


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_mixln_is_post_in_the_first_layers_and_pre_after(fraction):
    model = make_model("mixln", num_layers=4, mixln_fraction=fraction)
    stack = model.encoder
    randomize_norms(stack, seed=7)
    x = random_stream(8)
    got, _ = stack(x)
    want = reference_stack("mixln", stack, x, mix_post=round(fraction * 4))
    np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("layer", [1, 4])
def test_lnscale_scales_the_norm_output_by_inverse_sqrt_layer(layer):
    model = make_model("lnscale", num_layers=4)
    blk = block_at(model.encoder, layer - 1)
    x = random_stream(9)
    consts = {"alpha": jnp.float32(1), "lnscale": jnp.float32(layer ** -0.5),
              "is_post": False, "layer": jnp.float32(layer)}
    from deepnorm.initializers import layer_constants
    scanned = layer_constants(model.config, "encoder", 4)
    np.testing.assert_allclose(scanned["lnscale"][layer - 1], layer ** -0.5, rtol=1e-7)
    got, _ = blk(x, consts)
    h = x + blk.self_attn(blk.self_attn_norm(x) / np.sqrt(layer))
    np.testing.assert_allclose(got, h + blk.ffn(blk.ffn_norm(h) / np.sqrt(layer)), **TOL)


def test_rezero_is_identity_at_init_then_x_plus_a_f():
    model = make_model("rezero", num_layers=3)
    stack = model.encoder
    x = random_stream(10)
    got, _ = stack(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x))
    assert stack.final_norm is None and stack.layers.self_attn_norm is None
    stack.layers.self_attn_gate.set_value(jnp.asarray([0.3, -0.2, 0.5], jnp.float32))
    stack.layers.ffn_gate.set_value(jnp.asarray([0.1, 0.4, -0.6], jnp.float32))
    got, _ = stack(x)
    np.testing.assert_allclose(got, reference_stack("rezero", stack, x), **TOL)
    assert not np.allclose(got, x)


def _admin_reference_omegas(model, tokens):
    """Admin's profiling pass by hand: run the Post-LN stack with omega = 1, record each
    branch output's variance; omega_i = sqrt(Var[embedding] + sum_{j<i} Var[f_j])."""
    stack = model.encoder
    x = model._embed(tokens, None)
    total, omegas = float(jnp.var(x)), []
    for i in range(stack.num_layers):
        blk = block_at(stack, i)
        row = []
        for name, f, ln, _ in branches(blk):
            row.append(np.sqrt(total))
            y = f(x)
            total += float(jnp.var(y))
            x = ln(x + y)  # omega = 1 during profiling
        omegas.append(row)
    return np.asarray(omegas)


def test_admin_omegas_from_profiling_and_block_equation():
    model = make_model("admin", num_layers=3)
    tokens = jnp.asarray(np.random.default_rng(11).integers(1, VOCAB, (2, 6)), jnp.int32)
    want = _admin_reference_omegas(model, tokens)
    before, _ = model(tokens)
    omegas = admin_initialize(model, tokens)
    np.testing.assert_allclose(omegas["encoder"], want, rtol=1e-4)
    layers = model.encoder.layers
    for s, name in enumerate(("self_attn", "ffn")):
        param = getattr(layers, f"{name}_omega")[...]  # [L, d], one value per sublayer
        np.testing.assert_allclose(param, np.broadcast_to(want[:, s, None], param.shape),
                                   rtol=1e-4)
    x = random_stream(12)
    got, _ = model.encoder(x)
    np.testing.assert_allclose(got, reference_stack("admin", model.encoder, x), **TOL)
    after, _ = model(tokens)
    assert not np.allclose(before, after, atol=1e-3)


def test_admin_initialize_refuses_other_schemes():
    with pytest.raises(ValueError, match="residual='admin'"):
        admin_initialize(make_model("post", num_layers=1), jnp.ones((1, 3), jnp.int32))


ALL_SCHEMES = ["post", "pre", "sandwich", "peri", "deepnorm", "subln", "b2t", "rezero",
               "admin", "mixln", "lnscale"]


def test_every_scheme_gives_a_different_output():
    """No silent no-op switch: same seed, same tokens, 4 layers (so lnscale's 1/sqrt(l) and
    Mix-LN's 25% post layers both act); Admin after its profiling pass."""
    tokens = jnp.asarray(np.random.default_rng(13).integers(1, VOCAB, (2, 6)), jnp.int32)
    outputs = {}
    for scheme in ALL_SCHEMES:
        model = make_model(scheme, num_layers=4, arch="decoder")
        if scheme == "admin":
            admin_initialize(model, tokens)
        outputs[scheme] = np.asarray(model(tokens)[0])
    for a, b in itertools.combinations(ALL_SCHEMES, 2):
        diff = np.max(np.abs(outputs[a] - outputs[b]))
        assert diff > 1e-3, f"residual={a!r} and {b!r} give the same logits (max diff {diff})"


# The schemes declared after the refactor: each against its equation -----------------------

def perturb(stack, seed=0, scale=0.3):
    """Moves every parameter off its init, so that a zero gate, a zero last projection
    (Fixup) or a unit scale cannot hide a term in the wrong place."""
    rng = np.random.default_rng(seed)
    for _, var in nnx.iter_graph(stack):
        if isinstance(var, nnx.Param):
            value = np.asarray(var[...])
            var.set_value(jnp.asarray(value + scale * rng.normal(size=value.shape), jnp.float32))


def _stack_output_and_reference(scheme, equation, num_layers=3, arch="encoder", **kw):
    """Runs the scanned stack of ``scheme`` and the reference built from ``equation(blk,
    name, f, ln, ln_out, x, layer)`` applied sublayer by sublayer."""
    model = make_model(scheme, num_layers=num_layers, arch=arch, **kw)
    stack = model.encoder if arch == "encoder" else model.decoder
    perturb(stack, seed=num_layers)
    x0 = random_stream(21)
    x = stack.input_norm(x0) if stack.input_norm is not None else x0
    for i in range(num_layers):
        blk = block_at(stack, i)
        for name, f, ln, ln_out in branches(blk, causal=arch != "encoder"):
            x = equation(blk, name, f, ln, ln_out, x, i + 1)
    if stack.final_norm is not None:
        x = stack.final_norm(x)
    got, _ = stack(x0, causal=arch != "encoder")
    return model, got, x


def test_fixup_is_x_plus_m_f_of_x_plus_b_in_plus_b_out():
    def eq(blk, name, f, ln, ln_out, x, layer):
        p = lambda k: getattr(blk, f"{name}_{k}")[...]  # noqa: E731
        return x + p("multiplier") * f(x + p("bias_in")) + p("bias_out")

    model, got, want = _stack_output_and_reference("fixup", eq)
    np.testing.assert_allclose(got, want, **TOL)
    assert model.encoder.final_norm is None and model.encoder.layers.ffn_norm is None


def test_fixup_init_zeroes_each_branch_s_last_projection_so_the_stack_is_the_identity():
    model = make_model("fixup", num_layers=3)
    layers = model.encoder.layers
    for dense in (layers.self_attn.out, layers.ffn.ffn_out):
        np.testing.assert_array_equal(np.asarray(dense.kernel[...]), 0.0)
    np.testing.assert_array_equal(np.asarray(layers.ffn_multiplier[...]), 1.0)
    x = random_stream(22)
    np.testing.assert_array_equal(np.asarray(model.encoder(x)[0]), np.asarray(x))
    assert model.config.resolved_init == "fixup"


def _normformer_attention(attn, x, causal):
    """Multi-head attention from the raw kernels, heads scaled before the out-projection."""
    def proj(dense, h):
        return h @ dense.kernel[...] + dense.bias[...]

    b, t, _ = x.shape
    split = lambda a: a.reshape(b, t, HEADS, D // HEADS)  # noqa: E731
    q, k, v = split(proj(attn.query, x)), split(proj(attn.key, x)), split(proj(attn.value, x))
    scores = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D // HEADS)
    if causal:
        scores = jnp.where(np.tril(np.ones((t, t), bool)), scores, -1e30)
    o = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), v)
    o = o * attn.head_scale[...][:, None]
    return proj(attn.out, o.reshape(b, t, D))


def test_normformer_adds_post_attention_ln_head_scales_ffn_ln_and_residual_scale():
    def eq(blk, name, f, ln, ln_out, x, layer):
        if name == "ffn":
            return blk.ffn_resid_scale[...] * x + _manual_ffn(blk.ffn, ln(x), blk.ffn.inner_norm)
        return x + ln_out(_normformer_attention(blk.self_attn, ln(x), causal=True))

    model, got, want = _stack_output_and_reference("normformer", eq, arch="decoder")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    blk = block_at(model.decoder, 0)
    assert blk.self_attn.inner_norm is None and blk.ffn_norm_out is None
    assert blk.self_attn.head_scale[...].shape == (HEADS,)


def test_layerscale_is_x_plus_g_f_ln_x_with_cait_init():
    def eq(blk, name, f, ln, ln_out, x, layer):
        return x + getattr(blk, f"{name}_layerscale")[...] * f(ln(x))

    _, got, want = _stack_output_and_reference("layerscale", eq)
    np.testing.assert_allclose(got, want, **TOL)
    from deepnorm.residual import layerscale_init
    for layers, eps in ((4, 0.1), (18, 0.1), (24, 1e-5), (25, 1e-6)):
        cfg = TransformerConfig(num_layers=layers, d_model=D, num_heads=HEADS, d_ff=FF,
                                residual="layerscale")
        assert layerscale_init(cfg, layers) == eps
    init = make_model("layerscale", num_layers=4).encoder.layers.ffn_layerscale[...]
    np.testing.assert_allclose(init, np.full((4, D), 0.1, np.float32))


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_deepscale_is_lambda_x_plus_beta_f_with_unit_sum_of_squares(arch):
    num_layers = 3
    beta = (1 / (2 * num_layers)) ** 0.5  # beta^2 = 1 / (branches in the stack)
    lam = (1 - beta ** 2) ** 0.5

    def eq(blk, name, f, ln, ln_out, x, layer):
        return lam * x + beta * f(ln(x))

    _, got, want = _stack_output_and_reference("deepscale", eq, num_layers, arch=arch)
    np.testing.assert_allclose(got, want, **TOL)


def test_deepscale_counts_cross_attention_branches():
    from deepnorm.initializers import layer_constants
    cfg = make_model("deepscale", num_layers=2, arch="encoder_decoder").config
    for stack, branches_per_layer in (("encoder", 2), ("decoder", 3)):
        c = layer_constants(cfg, stack, 2)
        np.testing.assert_allclose(c["beta"] ** 2, 1 / (branches_per_layer * 2), rtol=1e-6)
        np.testing.assert_allclose(c["alpha"] ** 2 + c["beta"] ** 2, 1.0, rtol=1e-6)


def test_rescaled_is_ln_of_lambda_x_plus_f():
    def eq(blk, name, f, ln, ln_out, x, layer):
        return ln(3.0 * x + f(x))

    _, got, want = _stack_output_and_reference("rescaled", eq, skip_lambda=3.0)
    np.testing.assert_allclose(got, want, **TOL)


def test_every_declared_scheme_differs_from_every_other_off_its_init():
    """No silent no-op, for every scheme declared (a new one included without listing it):
    with every parameter moved off its init, no two schemes give the same logits."""
    tokens = jnp.asarray(np.random.default_rng(13).integers(1, VOCAB, (2, 6)), jnp.int32)
    outputs = {}
    for scheme in SCHEMES:
        # Mix-LN's fraction 0.5 of 2 layers: one Post-LN layer (the default 0.25 rounds to 0).
        model = make_model(scheme, num_layers=2, arch="decoder", mixln_fraction=0.5)
        perturb(model.decoder, seed=5, scale=0.1)
        outputs[scheme] = np.asarray(model(tokens)[0])
    for a, b in itertools.combinations(SCHEMES, 2):
        diff = np.max(np.abs(outputs[a] - outputs[b]))
        assert diff > 1e-3, f"residual={a!r} and {b!r} give the same logits (max diff {diff})"


def test_standalone_block_carries_its_layer_s_constants_and_gains():
    """Block.standalone(cfg, l) is layer l of cfg's stack: DeepNorm's alpha and beta built
    in, so block(x) needs no constants, and equals the stack's layer with the same weights."""
    from deepnorm import Block
    model = make_model("deepnorm", num_layers=4)
    blk = Block.standalone(model.config, 3, rngs=nnx.Rngs(0))
    assert blk.consts["alpha"] == pytest.approx((2 * 4) ** 0.25)
    assert blk.consts["layer"] == 3
    beta = (8 * 4) ** -0.25
    kernel = np.asarray(blk.ffn.ffn_out.kernel[...])
    assert np.std(kernel) == pytest.approx(beta * np.sqrt(2 / (FF + D)), rel=0.15)
    x = random_stream(23)
    stacked = block_at(model.encoder, 2)
    nnx.update(blk, nnx.state(stacked, nnx.Param))
    from deepnorm.initializers import layer_constants
    consts = jax.tree.map(lambda a: a[2], layer_constants(model.config, "encoder", 4))
    np.testing.assert_allclose(blk(x)[0], stacked(x, consts)[0], **TOL)
    with pytest.raises(ValueError, match="Block.standalone"):
        stacked(x)


def test_respost_is_x_plus_ln_of_f_x():
    def eq(blk, name, f, ln, ln_out, x, layer):
        return x + ln_out(f(x))

    model, got, want = _stack_output_and_reference("respost", eq)
    np.testing.assert_allclose(got, want, **TOL)
    assert model.encoder.layers.ffn_norm is None and model.encoder.final_norm is not None


def test_resi_dual_carries_a_post_ln_and_a_dual_stream():
    """ResiDual: x_a <- LN(x_a + F(x_a)), x_d <- x_d + F(x_a), both from the embedding
    output; the stack returns x_a + LN_final(x_d)."""
    model = make_model("resi_dual", num_layers=3, arch="decoder")
    stack = model.decoder
    perturb(stack, seed=8)
    x0 = random_stream(24)
    xa, xd = x0, x0
    for i in range(3):
        for name, f, ln, _ in branches(block_at(stack, i), causal=True):
            y = f(xa)
            xa, xd = ln(xa + y), xd + y
    got, stats = stack(x0, causal=True)
    np.testing.assert_allclose(got, xa + stack.final_norm(xd), **TOL)
    # The statistics describe the Post-LN stream.
    np.testing.assert_allclose(stats["stream_out_norm"][-1, -1],
                               jnp.mean(jnp.linalg.norm(xa, axis=-1)), rtol=1e-5)


def assert_scanned_equals_unrolled(scanned, unrolled, tokens):
    """Same outputs and same gradients of a squared-output loss; returns the scanned grads."""
    def loss(model):
        return jnp.mean(model(tokens)[0] ** 2)

    np.testing.assert_allclose(scanned(tokens)[0], unrolled(tokens)[0], **TOL)
    g_scan, g_loop = nnx.grad(loss)(scanned), nnx.grad(loss)(unrolled)
    for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_loop)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    return g_scan


def test_resi_dual_scanned_equals_unrolled_and_gradients_agree():
    tokens = jnp.asarray(np.random.default_rng(25).integers(1, VOCAB, (2, 6)), jnp.int32)
    scanned = make_model("resi_dual", num_layers=3, arch="decoder")
    unrolled = make_model("resi_dual", num_layers=3, arch="decoder", scan_layers=False)

    g_scan = assert_scanned_equals_unrolled(scanned, unrolled, tokens)


def test_hyper_connections_mix_n_streams_by_their_definition():
    """h = sum_i a_i H_i; H_j <- sum_i A_ij H_i + b_j F(LN(h)); output LN(sum_i H_i)."""
    model = make_model("hyper", num_layers=3, arch="decoder")
    stack = model.decoder
    init = block_at(stack, 1)  # layer 2: its sublayers are places 2 and 3 of the stack
    np.testing.assert_array_equal(init.self_attn_width[...], np.eye(4)[2])
    np.testing.assert_array_equal(init.ffn_width[...], np.eye(4)[3])
    np.testing.assert_array_equal(init.ffn_mix[...], np.eye(4))
    np.testing.assert_array_equal(init.ffn_depth[...], np.ones(4))
    perturb(stack, seed=9)
    x0 = random_stream(26)
    streams = np.stack([np.asarray(x0)] * 4)
    for i in range(3):
        blk = block_at(stack, i)
        for name, f, ln, _ in branches(blk, causal=True):
            a, mix, b = (np.asarray(getattr(blk, f"{name}_{k}")[...])
                         for k in ("width", "mix", "depth"))
            y = np.asarray(f(ln(jnp.asarray(np.tensordot(a, streams, 1)))))
            streams = np.einsum("ij,ibtd->jbtd", mix, streams) + b[:, None, None, None] * y
    got, _ = stack(x0, causal=True)
    want = stack.final_norm(jnp.asarray(streams.sum(0)))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_hyper_connections_at_init_are_pre_ln_and_scan_equals_unrolled():
    tokens = jnp.asarray(np.random.default_rng(27).integers(1, VOCAB, (2, 6)), jnp.int32)
    hyper = make_model("hyper", num_layers=3, arch="decoder")
    pre = make_model("pre", num_layers=3, arch="decoder")
    # Same seed, same weights: with equal streams, A = I and b = 1, every stream is Pre-LN's
    # and LN(4 x) = LN(x) up to eps.
    np.testing.assert_allclose(hyper(tokens)[0], pre(tokens)[0], rtol=1e-4, atol=1e-4)
    perturb(hyper.decoder, seed=10, scale=0.1)
    unrolled = make_model("hyper", num_layers=3, arch="decoder", scan_layers=False)
    nnx.update(unrolled, nnx.state(hyper, nnx.Param))
    np.testing.assert_allclose(hyper(tokens)[0], unrolled(tokens)[0], **TOL)


@pytest.mark.parametrize("scheme", ["resi_dual", "hyper", "dlcl"])
def test_multi_stream_stack_traces_one_layer_whatever_the_depth(scheme):
    """The streams are one scan carry: the traced forward has the same equations at 2 and 12
    layers (benchmarks/depth_compile.py --residual measures the compile time)."""
    def equations(num_layers):
        model = nnx.eval_shape(lambda: make_model(scheme, num_layers=num_layers, arch="decoder"))
        graphdef, state = nnx.split(model)
        tokens = jnp.ones((2, 6), jnp.int32)
        jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens)[0])(state)
        return len(jaxpr.jaxpr.eqns)

    assert equations(2) == equations(12)


def _dlcl_reference(stack, x0, *, causal, context=None):
    """DLCL by its equation, in NumPy where it combines: y_0 = x0, x_1 = y_0; layer l runs
    x + F(LN(x)) per sublayer on x_l to give y_l; x_{l+1} = sum_{k<=l} W[l+1, k] LN_k(y_k)
    (row l+1 of W is layer l's ffn_dlcl, its entries after l ignored); LN_final(x_{L+1})."""
    history = [np.asarray(x0)]  # LN_0 = identity
    x = x0
    for i in range(stack.num_layers):
        blk = block_at(stack, i)
        for name, f, ln, _ in branches(blk, causal=causal, context=context):
            x = x + f(ln(x))
        history.append(np.asarray(blk.ffn_norm_out(x)))
        w = np.asarray(blk.ffn_dlcl[...])[: i + 2]
        x = jnp.asarray(sum(w_k * y_k for w_k, y_k in zip(w, history)))
    return stack.final_norm(x)


@pytest.mark.parametrize("arch", ["encoder", "decoder"])
def test_dlcl_is_a_learned_combination_of_every_earlier_normalized_layer_output(arch):
    model = make_model("dlcl", num_layers=3, arch=arch)
    stack = model.encoder if arch == "encoder" else model.decoder
    perturb(stack, seed=31)  # W off its average, its unused upper entries nonzero too
    x0 = random_stream(32)
    got, stats = stack(x0, causal=arch == "decoder")
    want = _dlcl_reference(stack, x0, causal=arch == "decoder")
    np.testing.assert_allclose(got, want, **TOL)
    assert stats["stream_out_norm"].shape == (3, 2)  # the statistics read the stream x_l


def test_dlcl_decoder_of_encoder_decoder_with_cross_attention():
    model = make_model("dlcl", num_layers=2, arch="encoder_decoder")
    perturb(model.decoder, seed=33)
    x0, context = random_stream(34), random_stream(35, t=7)
    got, _ = model.decoder(x0, context_BxSxD=context, causal=True)
    want = _dlcl_reference(model.decoder, x0, causal=True, context=context)
    np.testing.assert_allclose(got, want, **TOL)


def test_dlcl_init_is_the_uniform_average_of_the_earlier_outputs():
    """W_{l+1,k} = 1/(l+1) for k <= l (the reference's init_value='avg'), 0 above the
    diagonal; one norm per layer output; the embedding has none."""
    for arch, layers in (("encoder", 4), ("decoder", 3)):
        model = make_model("dlcl", num_layers=layers, arch=arch)
        stack = model.encoder if arch == "encoder" else model.decoder
        w = np.asarray(stack.layers.ffn_dlcl[...])
        want = np.tril(np.ones((layers + 1, layers + 1)))[1:]
        want /= want.sum(1, keepdims=True)
        np.testing.assert_allclose(w, want, rtol=1e-7)
        assert stack.layers.ffn_norm_out is not None and stack.layers.self_attn_norm_out is None
        assert stack.input_norm is None and stack.final_norm is not None
    cfg = TransformerConfig(arch="encoder_decoder", num_encoder_layers=3, num_decoder_layers=2,
                            d_model=D, num_heads=HEADS, d_ff=FF, vocab_size=VOCAB,
                            residual="dlcl")
    enc_dec = Transformer(cfg, rngs=nnx.Rngs(0))
    assert enc_dec.encoder.layers.ffn_dlcl[...].shape == (3, 4)  # rows 2..4 of a 4 x 4 W
    assert enc_dec.decoder.layers.ffn_dlcl[...].shape == (2, 3)
    assert not hasattr(enc_dec.decoder.layers, "cross_attn_dlcl")  # one row per layer


@pytest.mark.parametrize("remat", ["none", "full"])
def test_dlcl_scanned_equals_unrolled_and_gradients_agree(remat):
    tokens = jnp.asarray(np.random.default_rng(36).integers(1, VOCAB, (2, 6)), jnp.int32)
    def build(scan_layers):
        cfg = TransformerConfig(arch="decoder", num_layers=3, d_model=D, num_heads=HEADS,
                                d_ff=FF, vocab_size=VOCAB, residual="dlcl",
                                remat_policy=remat, scan_layers=scan_layers)
        return Transformer(cfg, rngs=nnx.Rngs(0))

    scanned, unrolled = build(True), build(False)
    perturb(scanned.decoder, seed=37, scale=0.1)
    nnx.update(unrolled, nnx.state(scanned, nnx.Param))

    g_scan = assert_scanned_equals_unrolled(scanned, unrolled, tokens)
    # W's entries above the diagonal read a zero history: no gradient.
    w_grad = np.asarray(g_scan.decoder.layers.ffn_dlcl[...])
    assert np.all(w_grad[np.triu_indices(3, k=2, m=4)] == 0)
    assert np.all(w_grad[np.tril_indices(3, k=1, m=4)] != 0)


def test_register_refuses_a_taken_name_and_a_scheme_without_one_equation():
    from deepnorm.residual import Scheme, register
    with pytest.raises(ValueError, match="'pre' is already registered"):
        register(Scheme("pre", "Pre-LN", "#000000", lambda x, s, c: x))
    with pytest.raises(ValueError, match="exactly one of step and layer"):
        register(Scheme("neither", "Neither", "#000000"))
    assert "neither" not in SCHEMES
