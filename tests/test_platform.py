"""deepnorm.training.platform: the training setup resolves the platform-dependent "auto"."""

import jax
import pytest

from deepnorm import TransformerConfig
from deepnorm.training.platform import resolve_model_config, resolve_remat_policy
from test_transformer import _remat_policies_in_grad  # tests/ is on sys.path (pytest's default)


def test_auto_remat_is_save_dots_on_cpu_in_float32_and_full_elsewhere():
    assert resolve_remat_policy("auto", "cpu") == "save_dots"
    assert resolve_remat_policy("auto", "cpu", "bfloat16") == "full"
    assert resolve_remat_policy("auto", "gpu", "bfloat16") == "full"
    assert resolve_remat_policy("auto", "gpu") == "full"
    assert resolve_remat_policy("auto", "tpu") == "full"
    assert all(resolve_remat_policy(p, "gpu") == p for p in ("none", "full", "save_dots"))


@pytest.mark.parametrize("dtype,policy", [("float32", "save_dots"), ("bfloat16", "full")])
def test_resolved_config_reaches_the_graph(dtype, policy):
    cfg = TransformerConfig(arch="decoder", num_layers=1, d_model=16, num_heads=2, d_ff=32,
                            vocab_size=20, dtype=dtype)
    assert jax.default_backend() == "cpu"
    resolved = resolve_model_config(cfg)
    assert resolved.remat_policy == policy
    assert resolve_model_config(cfg, "gpu").remat_policy == "full"
    assert resolve_model_config(resolved) == resolved  # resolving twice changes nothing
    # Only remat_policy changes; everything else is the config as given.
    assert {f: getattr(cfg, f) for f in cfg.__dataclass_fields__ if f != "remat_policy"} == \
        {f: getattr(resolved, f) for f in cfg.__dataclass_fields__ if f != "remat_policy"}
    found = _remat_policies_in_grad(resolved)
    want = jax.checkpoint_policies.dots_saveable if policy == "save_dots" else None
    assert found and all(p is want for p in found)
