"""Named schemes for the analysis: a residual placement plus the norm and init it needs.

Most schemes are one ``model.residual`` value (post, pre, deepnorm, ...), declared in
``deepnorm.residual``; a scheme declared without a norm (ReZero, Fixup, ...) also sets
``norm="none"``. A few methods in the literature are an *initialization* on top of a residual
placement, so they get a name here:

``tfixup``  T-Fixup (Huang et al. 2020): Post-LN's x + F(x) with no norm and the T-Fixup init.
``dsinit``  DS-Init (Zhang, Titov, Sennrich 2019): Post-LN with layer l's init scaled 1/sqrt(l).

and one method is another's equation under its own name:

``skipinit``  SkipInit (De & Smith 2020): x + a F(x), a = 0 at init, no norm: ReZero's equation.
"""

from __future__ import annotations

import dataclasses

from deepnorm.config import ConfigError, TransformerConfig
from deepnorm.residual import SCHEMES as DECLARED

# scheme name -> the model fields it sets on top of the base configuration.
PRESETS: dict[str, dict] = {
    **{name: {"residual": name, **({} if s.uses_norm else {"norm": "none"})}
       for name, s in DECLARED.items()},
    "tfixup": {"residual": "post", "norm": "none", "init": "tfixup"},
    "dsinit": {"residual": "post", "init": "dsinit"},
    "skipinit": {"residual": "rezero", "norm": "none"},
}
# Figure colour and label of each name (declared schemes carry their own).
COLORS = {**{name: s.color for name, s in DECLARED.items()},
          "tfixup": "#843c39", "dsinit": "#637939", "skipinit": "#dbdb8d"}
LABELS = {**{name: s.label for name, s in DECLARED.items()},
          "tfixup": "T-Fixup", "dsinit": "DS-Init", "skipinit": "SkipInit"}
SCHEMES = tuple(PRESETS)


def check_schemes(names) -> tuple[str, ...]:
    """Validates scheme names; raises ConfigError naming the first unknown one."""
    names = tuple(names)
    if not names:
        raise ConfigError(f"no residual scheme given; allowed: {', '.join(SCHEMES)}")
    for name in names:
        if name not in PRESETS:
            raise ConfigError(f"residual scheme {name!r} is not one of {', '.join(SCHEMES)}")
    return names


def scheme_config(base: TransformerConfig, scheme: str, depth: int | None = None
                  ) -> TransformerConfig:
    """``base`` with ``scheme``'s fields and, if given, ``depth`` layers per stack.

    For encoder_decoder, ``depth`` L means an L-L model (N = M = L, "6L-6L" in DeepNet). A
    scheme that needs a norm on a base with ``norm="none"`` gets LayerNorm.
    """
    check_schemes([scheme])
    fields = dict(PRESETS[scheme])
    if "norm" not in fields and base.norm == "none":
        fields["norm"] = "layernorm"
    if "init" not in fields and base.init in ("tfixup", "dsinit", "fixup"):
        fields["init"] = "auto"  # the base's special init belongs to its own scheme
    if depth is not None:
        if base.arch == "encoder_decoder":
            fields.update(num_encoder_layers=depth, num_decoder_layers=depth)
        else:
            fields["num_layers"] = depth
    return dataclasses.replace(base, **fields)


def depth_of(cfg: TransformerConfig) -> int:
    """Layers per stack: L for an L-L encoder-decoder, else num_layers."""
    if cfg.arch == "encoder_decoder":
        return cfg.num_decoder_layers
    return cfg.num_layers
