"""The analysis CLI: bad arguments fail in one line naming the value; --config loads a config
file and --config.KEY=VALUE overrides it; a small grad-norms run writes JSON and PNG."""

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from deepnorm.analysis import cli
from deepnorm.analysis.config_file import ConfigFileError, apply_override, load_config


def _fails(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, expected", [
    (["grad-norm", "--out=x"], "invalid choice: 'grad-norm'"),
    (["grad-norms"], "--out"),
    (["grad-norms", "--out=x", "--residuals", "post,prelN"], "'prelN' is not one of post"),
    (["grad-norms", "--out=x", "--depths", "6,0"], "'6,0': every value must be a positive"),
    (["grad-norms", "--out=x", "--depths", "six"], "'six' is not a comma-separated list"),
    (["grad-norms", "--out=x", "--seeds", "0"], "0 must be a positive integer"),
    (["update-norms", "--out=x", "--lr", "-1"], "-1.0 must be positive"),
    (["stability-map", "--out=x", "--lrs", "1e-3,abc"], "'1e-3,abc' is not a comma-separated"),
    (["stability-map", "--out=x", "--warmups", "-5"], "warmups must be 0 or more"),
    (["grad-norms", "--out=x", "--config=nope.py"], "--config='nope.py' is not a file"),
    (["grad-norms", "--out=x", "--config.model.d_model=8"], "needs --config=FILE"),
])
def test_bad_arguments_fail_in_one_line(capsys, argv, expected):
    assert expected in _fails(capsys, argv)


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(textwrap.dedent("""
        import ml_collections
        def get_config(arg=None):
            c = ml_collections.ConfigDict()
            c.model = ml_collections.ConfigDict(dict(
                arch="decoder", num_layers=2, d_model=32, num_heads=2, d_ff=64,
                residual="pre", remat_policy="none"))
            if arg == "wide":
                c.model.d_model = 64
            return c
    """))
    return path


def test_config_file_and_overrides(config_file):
    config = load_config(str(config_file))
    assert config.model.d_model == 32
    assert load_config(f"{config_file}:wide").model.d_model == 64
    apply_override(config, "model.d_model=48")
    apply_override(config, "model.residual=post")
    assert config.model.d_model == 48 and config.model.residual == "post"
    with pytest.raises(ConfigFileError, match="config has no field 'model.d_modl'"):
        apply_override(config, "model.d_modl=3")
    with pytest.raises(ConfigFileError, match="model.d_model='wide'"):
        apply_override(config, "model.d_model=wide")


def test_model_errors_from_the_config_are_one_line(capsys, config_file):
    err = _fails(capsys, ["grad-norms", "--out=x", f"--config={config_file}",
                          "--config.model.num_heads=3"])
    assert "model.d_model=32 is not divisible by model.num_heads=3" in err


def test_grad_norms_command_writes_json_and_png(tmp_path, config_file):
    out = tmp_path / "out"
    # A subprocess, as a user runs it (python -m), from the repository root.
    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "deepnorm.analysis", "grad-norms", f"--out={out}",
         f"--config={config_file}", "--config.model.d_model=16", "--residuals=post,deepnorm",
         "--seeds=2", "--batches=2", "--batch-size=2", "--seq-len=8"],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads((out / "grad-norms.json").read_text())
    assert {r["residual"] for r in records} == {"post", "deepnorm"}
    assert {r["layer"] for r in records} == {1, 2}
    assert (out / "grad-norms.png").stat().st_size > 10_000
    meta = json.loads((out / "grad-norms.meta.json").read_text())
    assert meta["base_model"]["d_model"] == 16 and meta["seconds"] > 0


def test_grad_norms_after_training_measures_on_held_out_batches(tmp_path, config_file,
                                                                monkeypatch):
    """The expected gradient after warmup training is taken on batches the model never
    trained on: training on the measured batches would shrink exactly what is measured."""
    from deepnorm.analysis import grad_norms

    seen = {}
    real_train, real_norms = grad_norms.adam_train, grad_norms._expected_norms

    def train(graphdef, params, batches, **kw):
        seen["train"] = batches
        return real_train(graphdef, params, batches, **kw)

    def norms(graphdef, params, batches):
        seen["measure"] = batches
        return real_norms(graphdef, params, batches)

    monkeypatch.setattr(grad_norms, "adam_train", train)
    monkeypatch.setattr(grad_norms, "_expected_norms", norms)
    assert cli.main(["grad-norms", f"--out={tmp_path}", f"--config={config_file}",
                     "--config.model.d_model=16", "--residuals=pre", "--seeds=1",
                     "--batches=2", "--batch-size=2", "--seq-len=8", "--warmup-steps=3"]) == 0
    trained = {row.tobytes() for row in np.asarray(seen["train"]["inputs"]).reshape(-1, 8)}
    measured = {row.tobytes() for row in np.asarray(seen["measure"]["inputs"]).reshape(-1, 8)}
    assert len(trained) >= 3 and len(measured) == 4
    assert not trained & measured
