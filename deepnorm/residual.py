"""How a sublayer joins the residual stream (``model.residual``), one line per scheme.

Each scheme is a function ``(x, s, c) -> x`` of the residual stream ``x``, a :class:`Sublayer`
``s`` (its branch ``s.f``, its norm ``s.ln`` and the scheme's extra parameters) and the
layer's scanned constants ``c`` (see ``deepnorm.initializers.layer_constants``). The bodies
read like the papers' equations; tests check each against exactly that equation.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


@dataclasses.dataclass
class Sublayer:
    """One branch F (attention or FFN) and what its scheme needs around it."""

    f: Callable[[Array], Array]  # the branch, dropout included
    ln: Callable[[Array], Array]  # its norm (identity for rezero)
    ln_out: Callable[[Array], Array] | None = None  # sandwich / peri: norm on the branch output
    gate: Array | None = None  # rezero: the scalar a, zero at init
    omega: Array | None = None  # admin: the residual weight set by the profiling pass


def post(x, s, c):
    """Post-LN (Vaswani et al. 2017): x <- LN(x + F(x))."""
    return s.ln(x + s.f(x))


def pre(x, s, c):
    """Pre-LN (Wang et al. 2019; Xiong et al. 2020): x <- x + F(LN(x)); final LN after the stack."""
    return x + s.f(s.ln(x))


def sandwich(x, s, c):
    """Sandwich-LN (Ding et al. 2021, CogView): x <- x + LN(F(LN(x)))."""
    return x + s.ln_out(s.f(s.ln(x)))


def peri(x, s, c):
    """Peri-LN (Kim et al. 2025): x <- x + LN_out(F(LN_in(x))).

    Per sublayer the same equation as Sandwich-LN; Peri-LN also normalizes the embedding output
    before the first layer (done by the stack, ``Stack.input_norm``).
    """
    return x + s.ln_out(s.f(s.ln(x)))


def deepnorm(x, s, c):
    """DeepNorm (Wang et al. 2022, DeepNet): x <- LN(alpha * x + F(x))."""
    return s.ln(c["alpha"] * x + s.f(x))


def subln(x, s, c):
    """SubLN / Magneto (Wang et al. 2022): x <- x + F(LN(x)), F carrying an extra inner LN
    (before the attention output projection, after the FFN activation)."""
    return x + s.f(s.ln(x))


def rezero(x, s, c):
    """ReZero (Bachlechner et al. 2020): x <- x + a * F(x), a = 0 at init, no norm."""
    return x + s.gate * s.f(x)


def admin(x, s, c):
    """Admin (Liu et al. 2020): x <- LN(omega * x + F(x)), omega from a profiling pass."""
    return s.ln(s.omega * x + s.f(x))


def mixln(x, s, c):
    """Mix-LN (Li et al. 2025): Post-LN in the first layers (c["is_post"]), Pre-LN after.

    Written as a select on the scanned flag rather than a Python branch, so every layer has one
    shape and the stack stays one scan; the unused norm costs one element-wise pass.
    """
    h = jnp.where(c["is_post"], x, s.ln(x))
    y = x + s.f(h)
    return jnp.where(c["is_post"], s.ln(y), y)


def lnscale(x, s, c):
    """LayerNorm-Scaling (Sun et al. 2025): x <- x + F(LN(x) / sqrt(l)), l the 1-based layer."""
    return x + s.f(s.ln(x) * c["lnscale"])


def b2t(x, sublayers: Sequence[Sublayer], c) -> list[Array]:
    """B2T (Takase et al. 2022): Post-LN whose last norm also adds the layer's input x_l.

    h = LN(x + Attn(x)) [, h = LN(h + CrossAttn(h))]; x <- LN(h + FFN(h) + x_l).
    Works on a whole layer, so it returns the stream after each sublayer.
    """
    states, h = [], x
    for s in sublayers[:-1]:
        h = post(h, s, c)
        states.append(h)
    last = sublayers[-1]
    states.append(last.ln(h + last.f(h) + x))
    return states


SCHEMES: dict[str, Callable] = {
    "post": post, "pre": pre, "sandwich": sandwich, "peri": peri, "deepnorm": deepnorm,
    "subln": subln, "rezero": rezero, "admin": admin, "mixln": mixln, "lnscale": lnscale,
}


def apply_layer(scheme: str, x: Array, sublayers: Sequence[Sublayer], c) -> list[Array]:
    """Runs one layer's sublayers under ``scheme``; returns the stream after each sublayer."""
    if scheme == "b2t":
        return b2t(x, sublayers, c)
    step = SCHEMES[scheme]
    states = []
    for s in sublayers:
        x = step(x, s, c)
        states.append(x)
    return states
