"""deepnorm.analysis.depth_sweep (over the stability map's cells): float16 rows really run
float16 matmuls with loss scaling, the divergence step follows the training loop's rule,
finished cells are never rerun, the float16 depth cap, and the summary's arithmetic."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deepnorm import TransformerConfig
from deepnorm.analysis import depth_sweep, stability_map
from deepnorm.analysis.cli import main
from deepnorm.training.state import build_model

BASE = TransformerConfig(arch="decoder", num_layers=1, d_model=16, num_heads=2, d_ff=32,
                         residual="pre", remat_policy="none")
SETTINGS = dict(residuals=["pre", "deepnorm"], depths=[1, 2], dtypes=["float32", "float16"],
                float16_max_depth=1, lrs=[1e-3, 1e-2], warmups=[0], steps=3, seeds=1,
                batch_size=2, seq_len=8, max_loss=100.0, workers=1)


def dot_input_dtypes(cfg):
    """The operand dtypes of every dot_general in the model's forward pass."""
    model = build_model(cfg, 0)
    graphdef, params = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda p, x: nnx.merge(graphdef, p)(x))(
        params, jnp.zeros((1, 4), jnp.int32))
    found = set()

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "dot_general":
                found.update(str(v.aval.dtype) for v in eqn.invars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jaxpr.jaxpr)
    return found


def test_float16_rows_multiply_in_float16_with_a_loss_scale():
    row16 = stability_map.Row("pre", 1, 0, "float16")
    # The projections multiply float16 operands (CPU attention's score einsums stay float32).
    assert "float16" in dot_input_dtypes(stability_map.row_config(BASE, row16))
    assert dot_input_dtypes(stability_map.row_config(
        BASE, stability_map.Row("pre", 1, 0, "float32"))) == {"float32"}
    kw = dict(num_steps=3, batch_size=2, seq_len=8, initial_loss_scale=2.0**15,
              loss_scale_period=2)
    (c16,) = stability_map.run_row(BASE, row16, [1e-3], [0], **kw)
    (c32,) = stability_map.run_row(BASE, stability_map.Row("pre", 1, 0), [1e-3], [0], **kw)
    assert c16["dtype"] == "float16" and c32["dtype"] == "float32"
    # 3 finite steps with period 2: the scale doubled once; float32 keeps no scale.
    assert c16["final_loss_scale"] == 2.0**16 and c16["overflow_steps"] == 0
    assert c32["final_loss_scale"] is None and c32["overflow_steps"] is None
    # Same data and init, rounded operands: close, not identical.
    assert c16["final_loss"] == pytest.approx(c32["final_loss"], rel=1e-2)
    assert c16["final_loss"] != c32["final_loss"]


def test_divergence_step_is_the_training_loops_rule():
    losses = np.array([[3.0, 3.0, 3.0], [3.0, np.nan, 3.0], [3.0, 3.0, 200.0], [3.0, 3.0, 3.0]])
    finite = np.array([[1, 1, 1], [1, 0, 1], [0, 1, 1], [0, 1, 0]])
    overflow = np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]])
    # lane 0: an overflow at step 3 is skipped, not divergence; non-finite grads at step 4 are.
    # lane 1: NaN loss at step 2; lane 2: loss above max_loss at step 3 (lane 2, step 4:
    # non-finite gradients, later).
    assert stability_map.divergence_steps(losses, finite, overflow, 100.0) == [4, 2, 3]
    assert stability_map.divergence_steps(losses[:1], finite[:1], overflow[:1], 100.0) == [
        None, None, None]


def test_a_diverging_float16_cell_records_its_step(tmp_path):
    s = dict(SETTINGS, residuals=["post"], depths=[1], dtypes=["float16"], lrs=[1e-3, 1.0],
             max_loss=20.0)
    calm, wild = depth_sweep.run(BASE, s, out=tmp_path, log=lambda _: None)
    assert calm["diverged_at_step"] is None and not calm["diverged"]
    assert wild["diverged"] and 1 <= wild["diverged_at_step"] <= 3
    (row,) = depth_sweep.summary([calm, wild])
    assert row["diverged_lanes"] == 1 and row["first_divergence_step"] == wild["diverged_at_step"]
    assert row["best_loss"] == calm["final_loss"] and row["best_lr"] == 1e-3


def test_rerun_computes_nothing_and_float16_is_capped(tmp_path, monkeypatch):
    first = depth_sweep.run(BASE, SETTINGS, out=tmp_path, log=lambda _: None)
    rows = {(c["residual"], c["num_layers"], c["dtype"]) for c in first}
    # float16 only at depth 1 (the cap), float32 at both depths.
    assert rows == {(s, d, "float32") for s in ("pre", "deepnorm") for d in (1, 2)} | {
        (s, 1, "float16") for s in ("pre", "deepnorm")}
    calls = []
    monkeypatch.setattr(stability_map, "run_row", lambda *a, **k: calls.append(a))
    assert depth_sweep.run(BASE, SETTINGS, out=tmp_path, log=lambda _: None) == first
    assert calls == []


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    for flag in ("--config.analysis.dtypes=float32,bfloat16", "--config.model.dtype=float16",
                 "--config.analysis.float16_max_depth=-1"):
        with pytest.raises(SystemExit) as exit_info:
            main(["depth-sweep", f"--config.analysis.out={tmp_path}", flag])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("python -m deepnorm.analysis: error:")
