"""Defaults that depend on the platform, chosen once by the training setup.

The model does not know the backend (deepnorm.ops holds the backend paths), so a config value
that means "whatever is fastest here" is resolved here, before the model is built, and the
resolved value is what the run's start line prints.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from deepnorm.config import TransformerConfig


def resolve_remat_policy(name: str, backend: str | None = None, dtype: str = "float32") -> str:
    """The policy ``model.remat_policy`` names; ``"auto"`` depends on the platform and dtype.

    On CPU in float32, save_dots: keeping the matmul outputs and recomputing only element-wise
    work was the fastest policy on both CPUs measured (9-15% less step time than full, 12-37%
    less than none, whose stacked intermediates cost more to write than to recompute).
    On CPU in bfloat16, full: once the matmuls run on AMX (``ops.bf16_matmul``) recomputing
    them is cheaper than writing and reading their saved outputs (4-25% less step time than
    save_dots). Elsewhere, full: it needs the least memory (1.6x the parameter + Adam footprint
    at 1,000 layers against 4.6x for save_dots), which is what bounds depth on an accelerator
    (a CPU measurement of XLA's buffer accounting; no GPU/TPU timing stands behind it).
    All figures: docs/performance.md, "Remat policy" and "bfloat16 matmuls".
    """
    if name != "auto":
        return name
    on_cpu = (backend or jax.default_backend()) == "cpu"
    return "save_dots" if on_cpu and jnp.dtype(dtype) == jnp.float32 else "full"


def resolve_model_config(model_cfg: TransformerConfig,
                         backend: str | None = None) -> TransformerConfig:
    """``model_cfg`` with every platform-dependent ``"auto"`` replaced by its choice here."""
    policy = resolve_remat_policy(model_cfg.remat_policy, backend, model_cfg.dtype)
    return dataclasses.replace(model_cfg, remat_policy=policy)
