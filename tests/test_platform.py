"""deepnorm.training.platform: the training setup resolves the platform-dependent "auto"."""

import jax
import pytest
from flax import nnx

from deepnorm import Transformer, TransformerConfig
from deepnorm.training.platform import resolve_model_config, resolve_remat_policy


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
    model = Transformer(resolved, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jax.numpy.ones((1, 4), jax.numpy.int32)

    def loss(p):
        return nnx.merge(graphdef, p)(tokens)[0].sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    found = []

    def walk(jx):
        for eqn in jx.eqns:
            if "checkpoint" in eqn.primitive.name or "remat" in eqn.primitive.name:
                found.append(eqn.params.get("policy"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    want = jax.checkpoint_policies.dots_saveable if policy == "save_dots" else None
    assert found and all(p is want for p in found)
