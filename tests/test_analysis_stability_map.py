"""deepnorm.analysis.stability_map: a vmapped learning-rate lane is exactly the training
package's own optimizer at that rate; finished cells are never rerun; the records' schema."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepnorm import TransformerConfig
from deepnorm.config import ConfigError
from deepnorm.analysis import stability_map
from deepnorm.analysis.batches import stacked_batches
from deepnorm.analysis.train_steps import optimizer_config
from deepnorm.training.optim import make_optimizer
from deepnorm.training.state import create_train_state
from deepnorm.training.steps import make_eval_step, make_train_step

BASE = TransformerConfig(arch="decoder", num_layers=1, d_model=16, num_heads=2, d_ff=32,
                         residual="pre", remat_policy="none")
SIZES = dict(num_steps=3, batch_size=2, seq_len=8)


def test_a_learning_rate_lane_equals_its_own_optimizer():
    row = stability_map.Row("deepnorm", 2, warmup_steps=2)
    lanes = stability_map.run_row(BASE, row, [1e-3, 3e-2], [0], **SIZES)
    # The same cell trained the plain way: make_optimizer at lr 3e-2, one step at a time.
    cfg = TransformerConfig(**{**BASE.__dict__, "residual": "deepnorm", "num_layers": 2})
    opt = optimizer_config(learning_rate=3e-2, warmup_steps=2)
    tx, _ = make_optimizer(opt, SIZES["num_steps"])
    graphdef, state = create_train_state(cfg, tx, 0)
    step = jax.jit(make_train_step(graphdef, tx, diagnostics=False))
    train = stacked_batches(None, arch="decoder", num_batches=3, batch_size=2, seq_len=8)
    losses = []
    for t in range(3):
        state, metrics = step(state, {k: jnp.asarray(v[t]) for k, v in train.items()})
        losses.append(float(metrics["loss"]))
    valid = stacked_batches(None, arch="decoder", num_batches=stability_map.EVAL_BATCHES,
                            batch_size=2, seq_len=8, seed=1, split="validation")
    evals = [make_eval_step(graphdef)(state.params, {k: jnp.asarray(v[i])
                                                     for k, v in valid.items()})
             for i in range(stability_map.EVAL_BATCHES)]
    want = sum(float(e["nll_sum"]) for e in evals) / sum(float(e["num_tokens"]) for e in evals)
    lane = lanes[1]
    assert lane["peak_lr"] == 3e-2
    np.testing.assert_allclose(lane["initial_loss"], losses[0], rtol=1e-5)
    np.testing.assert_allclose(lane["final_train_loss"], losses[-1], rtol=1e-4)
    np.testing.assert_allclose(lane["final_loss"], want, rtol=1e-4)
    assert lanes[0]["final_loss"] != pytest.approx(lane["final_loss"])


def test_finished_cells_are_not_rerun(tmp_path, monkeypatch):
    grid = dict(schemes=["pre"], depths=[1], warmups=[0], seeds=[0], log=lambda _: None,
                **SIZES)
    first = stability_map.run(BASE, out=tmp_path, lrs=[1e-3, 1e-2], **grid)
    keys = {"residual", "num_layers", "dtype", "overflow_steps", "final_loss_scale",
            "warmup_steps", "peak_lr", "seed", "num_steps",
            "diverged", "diverged_at_step", "final_loss", "final_train_loss", "initial_loss",
            "row_seconds"}
    assert [set(c) for c in first] == [keys, keys]
    assert [c["peak_lr"] for c in first] == [1e-3, 1e-2]
    cell_files = [p for p in (tmp_path / "cells").glob("*.json") if p.name != "setup.json"]
    assert len(cell_files) == 2

    calls = []
    real = stability_map.run_row

    def counting(base, row, lrs, seeds, **kw):
        calls.append(list(lrs))
        return real(base, row, lrs, seeds, **kw)

    monkeypatch.setattr(stability_map, "run_row", counting)
    again = stability_map.run(BASE, out=tmp_path, lrs=[1e-3, 1e-2], **grid)
    assert calls == [] and again == first
    grown = stability_map.run(BASE, out=tmp_path, lrs=[1e-3, 1e-2, 3e-3], **grid)
    assert calls == [[3e-3]]  # only the new cell trained
    assert grown[:2] == first
    # Cells of another setup (here: more steps) are never mixed in: one-line error.
    with pytest.raises(ConfigError, match=r"holds cells of another setup \(differs in "
                                          r"num_steps\); give a new output directory"):
        stability_map.run(BASE, out=tmp_path, lrs=[1e-3], **dict(grid, num_steps=4))
    assert calls == [[3e-3]]
    # A model field added to TransformerConfig after the cells were written, at its default,
    # changes nothing they measured: the directory is still this setup's. Off its default it is
    # another setup.
    setup_path = tmp_path / "cells" / "setup.json"
    setup = json.loads(setup_path.read_text())
    del setup["base_model"]["norm_eps"]
    setup_path.write_text(json.dumps(setup))
    assert stability_map.run(BASE, out=tmp_path, lrs=[1e-3, 1e-2], **grid) == first
    with pytest.raises(ConfigError, match=r"differs in base_model"):
        stability_map.run(dataclasses.replace(BASE, norm_eps=1e-3), out=tmp_path,
                          lrs=[1e-3], **grid)
    assert calls == [[3e-3]]


def test_divergence_is_a_nonfinite_or_too_large_loss(tmp_path):
    # A Post-LN model at lr 1 (no warmup) reaches a loss of ~25 in 3 steps, finite but
    # exploding; with max_loss=20 that counts as diverged, as in the training loop.
    cells = stability_map.run(BASE, max_loss=20.0, out=tmp_path, schemes=["post"], depths=[1],
                              warmups=[0], lrs=[1e-3, 1.0], seeds=[0], log=lambda _: None,
                              **SIZES)
    calm, wild = cells
    assert not calm["diverged"] and calm["diverged_at_step"] is None
    assert calm["final_loss"] < 7
    assert wild["diverged"] and wild["diverged_at_step"] >= 1
