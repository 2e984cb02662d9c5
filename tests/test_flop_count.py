"""The model-FLOP count behind mfu.py and vs_torchscale.py's ceiling, against the traced model.

``bench_common.forward_flops`` counts matmul FLOPs from the shapes by formula. Here the same
number is counted independently: every ``dot_general`` in the jaxpr of the forward pass
(2 x output size x contracted size, scan bodies times their trip count). If the model gains a
matmul, or the formula forgets one, the two disagree.
"""

import math
import pathlib
import sys

import jax
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_common as bc  # noqa: E402
from deepnorm import Transformer, TransformerConfig  # noqa: E402
from deepnorm.training.loss import loss_fn  # noqa: E402


def dot_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            out_size = math.prod(eqn.outvars[0].aval.shape)
            total += 2 * out_size * math.prod(lhs_shape[i] for i in lhs_contract)
            continue
        inner = [dot_flops(j) for j in jax.extend.core.jaxprs_in_params(eqn.params)]
        trips = eqn.params["length"] if eqn.primitive.name == "scan" else 1  # body per trip
        total += max(inner) if eqn.primitive.name == "cond" else trips * sum(inner)  # 1 branch
    return total


def traced_forward_flops(cfg: TransformerConfig, batch: dict) -> int:
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    jaxpr = jax.make_jaxpr(lambda p: loss_fn(nnx.merge(graphdef, p), batch)[0])(params)
    return dot_flops(jaxpr.jaxpr)


SMALL = dict(d_model=32, num_heads=4, d_ff=80, vocab_size=61, residual="deepnorm")


@pytest.mark.parametrize("arch,layers", [
    ("encoder", dict(num_layers=3)),
    ("decoder", dict(num_layers=2)),
    ("encoder_decoder", dict(num_encoder_layers=2, num_decoder_layers=3)),
])
def test_forward_flops_equals_the_dots_of_the_traced_forward_pass(arch, layers):
    cfg = TransformerConfig(arch=arch, **SMALL, **layers)
    batch = bc.random_batch(cfg, 2, 12)
    dec_seq = None
    if arch == "encoder_decoder":  # a decoder length unlike the encoder's exercises dec_seq
        dec_seq = 7
        rng = np.random.default_rng(1)
        batch["decoder_inputs"] = rng.integers(1, cfg.vocab_size, (2, dec_seq), dtype=np.int32)
        batch["targets"] = rng.integers(1, cfg.vocab_size, (2, dec_seq), dtype=np.int32)
        batch["weights"] = np.ones((2, dec_seq), np.float32)
    assert bc.forward_flops(cfg, 2, 12, dec_seq) == traced_forward_flops(cfg, batch)
    assert bc.train_flops(cfg, 2, 12, dec_seq) == 3 * traced_forward_flops(cfg, batch)


def test_the_count_sees_the_unrolled_stack_and_bfloat16_matmuls_alike():
    cfg = TransformerConfig(arch="encoder", num_layers=3, **SMALL)
    batch = bc.random_batch(cfg, 2, 12)
    expected = bc.forward_flops(cfg, 2, 12)
    for variant in (dict(scan_layers=False), dict(dtype="bfloat16")):
        other = TransformerConfig(arch="encoder", num_layers=3, **SMALL, **variant)
        assert traced_forward_flops(other, batch) == expected, variant
