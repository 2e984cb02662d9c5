# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tour of the modules: using deepnorm's pieces in your own Flax NNX model
#
# The package is built so its parts can be taken one at a time: a norm function, a residual
# scheme written as one line, DeepNorm's derived constants, a whole scanned stack of layers.
# This notebook builds a small model of its own (a byte-level sequence classifier) from those
# pieces and trains it for a few steps.

# %%
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import deepnorm
from deepnorm import (LayerNorm, RMSNorm, Stack, TransformerConfig, deepnorm_coefficients,
                      make_norm)
from deepnorm import residual as residual_lib
from deepnorm.data import encode

QUICK = os.environ.get("DEEPNORM_QUICK") == "1"

# %% [markdown]
# ## 1. Norms are small NNX modules
#
# `LayerNorm`, `RMSNorm`, `ScaleNorm`, `DyT`, or `make_norm(name, dim)`. Statistics are
# computed in float32 whatever the activation dtype.

# %%
x = jax.random.normal(jax.random.key(0), (2, 5, 8)) * 3 + 1
ln, rms = LayerNorm(8), RMSNorm(8)
print("LayerNorm: mean", float(ln(x).mean(-1).mean()), " var", float(ln(x).var(-1).mean()))
print("RMSNorm:   rms", float(jnp.sqrt(jnp.mean(rms(x) ** 2, -1)).mean()))
print("make_norm('dyt', 8):", type(make_norm("dyt", 8)).__name__)

# %% [markdown]
# ## 2. A residual scheme is one line
#
# `deepnorm.residual` writes each placement the way the paper does, as a function of the
# stream `x`, a `Sublayer` (branch `f`, norm `ln`) and the layer's constants `c`.

# %%
import inspect

for name in ("post", "pre", "deepnorm", "sandwich"):
    print(inspect.getsource(residual_lib.SCHEMES[name].step).splitlines()[-1].strip(),
          f"   # {name}")

f = nnx.Linear(8, 8, rngs=nnx.Rngs(1))
sub = residual_lib.Sublayer(f=f, ln=LayerNorm(8))
alpha = deepnorm_coefficients("decoder", num_decoder_layers=12)["decoder"][0]
y = residual_lib.deepnorm(x, sub, {"alpha": alpha})
np.testing.assert_allclose(y, LayerNorm(8)(alpha * x + f(x)), rtol=1e-5, atol=1e-5)
print(f"DeepNorm with alpha={alpha:.3f}: LN(alpha * x + F(x)) checked")

# %% [markdown]
# ## 3. DeepNorm's constants for any architecture
#
# $(\alpha, \beta)$ from the DeepNet paper: encoder-only $(2N)^{1/4}, (8N)^{-1/4}$,
# decoder-only $(2M)^{1/4}, (8M)^{-1/4}$, encoder-decoder $0.81(N^4M)^{1/16},
# 0.87(N^4M)^{-1/16}$ (encoder) and $(3M)^{1/4}, (12M)^{-1/4}$ (decoder).

# %%
for arch, n, m in [("encoder", 12, 0), ("decoder", 0, 12), ("encoder_decoder", 6, 6),
                   ("encoder_decoder", 500, 500)]:
    coeffs = deepnorm_coefficients(arch, n, m)
    print(f"{arch:16s} N={n:3d} M={m:3d} ",
          "  ".join(f"{s}: alpha={a:.3f} beta={b:.3f}" for s, (a, b) in coeffs.items()))

# %% [markdown]
# ## 4. A scanned stack inside your own model
#
# `Stack(cfg, "encoder")` is L identical blocks with stacked parameters, run by one
# `lax.scan`; its residual placement, norm and init come from a `TransformerConfig`. Here it
# is the body of a classifier that predicts whether a line of bytes is Python code or English
# prose. Everything outside the stack is ours.

# %%
class ByteClassifier(nnx.Module):
    """Embedding -> deepnorm Stack (any scheme, any depth) -> mean pool -> linear head."""

    def __init__(self, cfg: TransformerConfig, num_classes: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
        self.body = Stack(cfg, "encoder", rngs=rngs)
        self.head = nnx.Linear(cfg.d_model, num_classes, rngs=rngs)

    def __call__(self, tokens_BxT):
        mask = (tokens_BxT != 0)[:, None, None, :]
        h, stats = self.body(self.embed(tokens_BxT), self_mask=mask)
        pooled = jnp.sum(h * (tokens_BxT != 0)[..., None], 1) / jnp.sum(tokens_BxT != 0, 1,
                                                                          keepdims=True)
        return self.head(pooled), stats


cfg = TransformerConfig(arch="encoder", num_layers=2 if QUICK else 24, d_model=32,
                        num_heads=2, d_ff=64, residual="deepnorm", remat_policy="none")
model = ByteClassifier(cfg, 2, rngs=nnx.Rngs(0))
print("stacked FFN kernel:", model.body.layers.ffn.ffn_out.kernel[...].shape,
      "(layers, d_ff, d_model)")

# %% [markdown]
# Data: lines of this Python's own standard library (label 1) and English sentences made from
# its docstrings (label 0); bytes through the package's tokenizer.

# %%
import ast
import pathlib

source = pathlib.Path(ast.__file__).read_text()
code = [l.strip() for l in source.splitlines() if len(l.strip()) > 20 and "=" in l][:256]
prose = [l.strip() for l in ast.get_docstring(ast.parse(source)).splitlines()
         if len(l.strip()) > 20]
prose += [l.strip() for node in ast.walk(ast.parse(source))
          if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node)
          for l in ast.get_docstring(node).splitlines() if len(l.strip()) > 20 and "=" not in l]
n = min(len(code), len(prose), 128)
lines, labels = code[:n] + prose[:n], [1] * n + [0] * n


def tokens(text, length=48):
    ids = np.zeros(length, np.int32)
    enc = np.asarray(encode(text))[:length]
    ids[: len(enc)] = enc
    return ids


X = np.stack([tokens(l) for l in lines])
Y = np.asarray(labels)
print(X.shape, "examples, class balance", Y.mean())

# %% [markdown]
# Train with the functional pattern the package uses: split once into graphdef + params, jit
# a pure step over pytrees.

# %%
graphdef, params = nnx.split(model, nnx.Param)
tx = optax.adam(1e-3)
opt_state = tx.init(params)


@jax.jit
def step(params, opt_state, xb, yb):
    def loss_fn(p):
        logits, stats = nnx.merge(graphdef, p)(xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, stats


rng = np.random.default_rng(0)
for i in range(5 if QUICK else 60):
    idx = rng.choice(len(X), 32, replace=False)
    params, opt_state, loss, stats = step(params, opt_state, X[idx], Y[idx])
    if i % 10 == 0 or i == (4 if QUICK else 59):
        print(f"step {i:3d} loss {float(loss):.3f}")
logits, _ = nnx.merge(graphdef, params)(X)
print("training accuracy", float((logits.argmax(-1) == Y).mean()))

# %% [markdown]
# ## 5. Per-layer statistics come for free
#
# Every block returns residual-stream statistics, stacked along the layer axis by the scan:
# `stream_in_norm`, `branch_norm`, `branch_var`, `stream_out_norm`, each [layers, sublayers].
# With DeepNorm the stream is renormalized after every sublayer, so its norm stays at
# $\sqrt{d}$ at every depth; the branch norms show how much each layer adds.

# %%
print("stream_out_norm (first 4 layers, [attn, ffn]):\n",
      np.round(np.asarray(stats["stream_out_norm"][:4]), 2))
print("branch_norm (first 4 layers):\n", np.round(np.asarray(stats["branch_norm"][:4]), 3))

# %% [markdown]
# ## 6. Swapping the scheme is one field
#
# The same classifier with any residual placement: only `cfg.residual` changes; the
# per-layer parameter gradient norm is one reduction over the stacked axis
# (`deepnorm.layerwise.per_layer_norm`).

# %%
from deepnorm.layerwise import per_layer_norm

for scheme in ["post", "pre", "deepnorm"]:
    c = TransformerConfig(**{**cfg.__dict__, "residual": scheme})
    m = ByteClassifier(c, 2, rngs=nnx.Rngs(0))
    g, p = nnx.split(m, nnx.Param)
    grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        nnx.merge(g, p)(X[:64])[0], Y[:64]).mean())(p)
    body_grads = {"encoder": grads["body"]}
    print(f"{scheme:9s} per-layer grad norm, first/last layer:",
          np.round(np.asarray(per_layer_norm(body_grads))[[0, -1]], 4))
