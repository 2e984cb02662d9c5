"""Derived constants and initialization: pure functions of the configuration.

Everything here is a formula from a paper, written so it can be checked against that paper in
a unit test. Projections are named by role:

``query, key, value, out``  attention projections (self- and cross-attention alike)
``ffn_in, ffn_out``          the two feed-forward projections

An init scheme is a *gain* per role, multiplying a Xavier-normal draw
(std = gain * sqrt(2 / (fan_in + fan_out))), exactly the form in which the DeepNet paper states
its initialization.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from deepnorm.config import ConfigError, TransformerConfig

ROLES = ("query", "key", "value", "out", "ffn_in", "ffn_out")
# The roles DeepNorm / Magneto / T-Fixup rescale; query and key keep gain 1 because they only
# change attention logits, not the magnitude of what is added to the residual stream.
BRANCH_ROLES = ("value", "out", "ffn_in", "ffn_out")


def deepnorm_coefficients(arch: str, num_encoder_layers: int = 0,
                          num_decoder_layers: int = 0) -> dict[str, tuple[float, float]]:
    """DeepNorm's (alpha, beta) per stack, as Wang et al. 2022 (arXiv 2203.00555) state them.

    N = num_encoder_layers, M = num_decoder_layers.

    ===================  =========================  ==========================
    architecture         alpha                      beta
    ===================  =========================  ==========================
    encoder-only         (2N)^(1/4)                 (8N)^(-1/4)
    decoder-only         (2M)^(1/4)                 (8M)^(-1/4)
    enc-dec, encoder     0.81 (N^4 M)^(1/16)        0.87 (N^4 M)^(-1/16)
    enc-dec, decoder     (3M)^(1/4)                 (12M)^(-1/4)
    ===================  =========================  ==========================

    Returns ``{"encoder": (alpha, beta), "decoder": (alpha, beta)}`` with only the stacks the
    architecture has. (torchscale multiplies the enc-dec encoder's weights by 1.15 instead of
    0.87; we follow the paper, see README.)
    """
    n, m = num_encoder_layers, num_decoder_layers
    if arch == "encoder":
        _need_layers(arch, encoder=n, unused_decoder=m)
        return {"encoder": ((2 * n) ** 0.25, (8 * n) ** -0.25)}
    if arch == "decoder":
        _need_layers(arch, decoder=m, unused_encoder=n)
        return {"decoder": ((2 * m) ** 0.25, (8 * m) ** -0.25)}
    if arch == "encoder_decoder":
        _need_layers(arch, encoder=n, decoder=m)
        return {
            "encoder": (0.81 * (n ** 4 * m) ** (1 / 16), 0.87 * (n ** 4 * m) ** (-1 / 16)),
            "decoder": ((3 * m) ** 0.25, (12 * m) ** -0.25),
        }
    raise ConfigError(f"arch={arch!r} is not one of encoder, decoder, encoder_decoder")


def _need_layers(arch: str, encoder: int | None = None, decoder: int | None = None,
                 unused_encoder: int = 0, unused_decoder: int = 0) -> None:
    for name, value in (("num_encoder_layers", encoder), ("num_decoder_layers", decoder)):
        if value is not None and (not isinstance(value, (int, np.integer)) or value <= 0):
            raise ConfigError(f"{name}={value!r} must be a positive integer for arch={arch!r}")
    for name, value in (("num_encoder_layers", unused_encoder),
                        ("num_decoder_layers", unused_decoder)):
        if value:
            raise ConfigError(f"{name}={value!r} is not used by arch={arch!r}")


def subln_gamma(arch: str, num_encoder_layers: int = 0,
                num_decoder_layers: int = 0) -> dict[str, float]:
    """Magneto's (Wang et al. 2022, "Foundation Transformers") init gain gamma per stack.

    encoder-only sqrt(log 2N); decoder-only sqrt(log 2M); encoder-decoder: encoder
    sqrt(log(3M) log(2N) / 3), decoder sqrt(log 3M).
    """
    n, m = num_encoder_layers, num_decoder_layers
    if arch == "encoder":
        _need_layers(arch, encoder=n, unused_decoder=m)
        return {"encoder": math.sqrt(math.log(2 * n))}
    if arch == "decoder":
        _need_layers(arch, decoder=m, unused_encoder=n)
        return {"decoder": math.sqrt(math.log(2 * m))}
    if arch == "encoder_decoder":
        _need_layers(arch, encoder=n, decoder=m)
        return {"encoder": math.sqrt(math.log(3 * m) * math.log(2 * n) / 3),
                "decoder": math.sqrt(math.log(3 * m))}
    raise ConfigError(f"arch={arch!r} is not one of encoder, decoder, encoder_decoder")


def tfixup_scale(stack: str, num_layers: int) -> float:
    """T-Fixup (Huang et al. 2020): encoder 0.67 N^(-1/4), decoder (9M)^(-1/4)."""
    if stack == "encoder":
        return 0.67 * num_layers ** -0.25
    return (9 * num_layers) ** -0.25


def fixup_branches(cfg: TransformerConfig) -> int:
    """L in Fixup: the residual branches of the whole network (2 per encoder layer, 2 per
    decoder-only layer, 3 per decoder layer of encoder_decoder)."""
    cross = 1 if cfg.arch == "encoder_decoder" else 0
    return 2 * cfg.encoder_layers + (2 + cross) * cfg.decoder_layers


def fixup_gains(cfg: TransformerConfig) -> dict[str, float]:
    """Fixup (Zhang, Dauphin & Ma 2019) per role: the last projection of each branch is zero
    (``out``, ``ffn_out``), the other weight layer of the branch (``value``, ``ffn_in``) is
    scaled by L^(-1/(2m-2)) with m = 2 layers per branch, i.e. L^(-1/2).

    Attention counts as m = 2 (value then out): query and key only set the mixing weights, not
    the size of what is added to the stream, so they keep gain 1, as in DeepNorm's init.
    """
    m = 2
    scale = fixup_branches(cfg) ** (-1.0 / (2 * m - 2))
    return {"query": 1.0, "key": 1.0, "value": scale, "out": 0.0, "ffn_in": scale,
            "ffn_out": 0.0}


def residual_alpha(cfg: TransformerConfig, stack: str) -> float:
    """The weight of the residual stream in layer 1 (``c["alpha"]``): DeepNorm's alpha for
    DeepNorm, 1 where a scheme does not weight it."""
    layers = cfg.encoder_layers if stack == "encoder" else cfg.decoder_layers
    return float(layer_constants(cfg, stack, layers)["alpha"][0])


def role_gains(cfg: TransformerConfig, stack: str) -> dict[str, float]:
    """Constant (layer-independent) Xavier gain for each projection role of one stack."""
    init = cfg.resolved_init
    gains = dict.fromkeys(ROLES, 1.0)
    if init in ("xavier", "dsinit"):
        return gains
    if init == "deepnorm":
        scale = deepnorm_coefficients(cfg.arch, cfg.encoder_layers, cfg.decoder_layers)[stack][1]
    elif init == "subln":
        scale = subln_gamma(cfg.arch, cfg.encoder_layers, cfg.decoder_layers)[stack]
    elif init == "tfixup":
        layers = cfg.encoder_layers if stack == "encoder" else cfg.decoder_layers
        scale = tfixup_scale(stack, layers)
    elif init == "fixup":
        return fixup_gains(cfg)
    else:  # pragma: no cover - TransformerConfig validates init
        raise ConfigError(f"model.init={init!r} is unknown")
    gains.update(dict.fromkeys(BRANCH_ROLES, scale))
    return gains


def layer_gain(cfg: TransformerConfig, layer_index: jax.Array) -> jax.Array:
    """Per-layer gain on every projection: DS-Init's 1/sqrt(l) (Zhang, Titov, Sennrich 2019).

    DS-Init draws layer l's weights with the Xavier range times alpha/sqrt(l) (alpha = 1), i.e.
    the std shrinks like 1/sqrt(l) and the variance like 1/l. ``layer_index`` counts from 1 and
    may be traced (it is a vmapped array while the stacked layers are created).
    """
    if cfg.resolved_init != "dsinit":
        return jnp.ones((), jnp.float32)
    return jax.lax.rsqrt(jnp.asarray(layer_index, jnp.float32))


def xavier_normal(key: jax.Array, shape: tuple[int, int], gain: jax.Array | float = 1.0,
                  dtype=jnp.float32) -> jax.Array:
    """N(0, gain^2 * 2 / (fan_in + fan_out)): torch's xavier_normal_, as DeepNet specifies.

    Plain (untruncated) normal, so the std of the result is exactly gain * xavier std.
    """
    fan_in, fan_out = shape
    std = math.sqrt(2.0 / (fan_in + fan_out))
    return (gain * std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


# The constants every layer carries, whatever its scheme, so that a scheme's equation can read
# them unconditionally; a scheme's own ``constants`` override these defaults or add keys.
DEFAULT_CONSTANTS = {"alpha": 1.0, "lnscale": 1.0, "is_post": False}


def layer_constants(cfg: TransformerConfig, stack: str, num_layers: int) -> dict[str, jax.Array]:
    """Everything about a layer that depends on its index, as arrays scanned with the weights.

    ``layer``      the 1-based layer index
    ``alpha``      residual weight (DeepNorm's alpha, else 1)
    ``lnscale``    LayerNorm-Scaling's 1/sqrt(l) (Sun et al. 2025), else 1
    ``is_post``    Mix-LN: True for the first round(fraction * L) layers (Post-LN), else Pre-LN
    and whatever else the scheme declares (``deepnorm.residual.Scheme.constants``).
    """
    index = np.arange(1, num_layers + 1, dtype=np.float32)
    out = {name: np.full((num_layers,), value) for name, value in DEFAULT_CONSTANTS.items()}
    out.update(cfg.scheme.constants(cfg, stack, index))
    out["layer"] = index
    return {name: jnp.asarray(value, jnp.bool_ if value.dtype == bool else jnp.float32)
            for name, value in out.items()}


def block_constants(cfg: TransformerConfig, stack: str, layer_index: int) -> dict:
    """Layer ``layer_index`` (1-based) of ``stack``'s constants as Python scalars: what a
    ``Block`` used on its own carries."""
    layers = cfg.encoder_layers if stack == "encoder" else cfg.decoder_layers
    if not 1 <= layer_index <= layers:
        raise ConfigError(f"layer_index={layer_index} is not in 1..{layers}, the layers of "
                          f"cfg's {stack}")
    consts = layer_constants(cfg, stack, layers)
    return {name: np.asarray(value[layer_index - 1]).item() for name, value in consts.items()}


def describe(cfg: TransformerConfig) -> Mapping[str, float]:
    """The derived constants of a configuration, flat, for logging (the DeepNet maintainers'
    first question on a diverged run is alpha and beta)."""
    out: dict[str, float] = {}
    for stack, layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        if not layers:
            continue
        out[f"{stack}_alpha"] = residual_alpha(cfg, stack)
        gains = role_gains(cfg, stack)
        out[f"{stack}_branch_gain"] = gains["value"]
    return out
