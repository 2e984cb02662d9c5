"""The analysis CLI reads configs as train.py does (absl + config_flags): the default config is
configs/analysis/<command>.py, ``:EXPERIMENT`` measures a training config's model, and
``--config.KEY=VALUE`` overrides any field; bad input fails in one line with exit code 2; a
small grad-norms run writes JSON and PNG."""

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from deepnorm.analysis import cli, commands, settings
from deepnorm.analysis.batches import stacked_batches
from deepnorm.analysis.train_steps import optimizer_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = "--config.analysis.out=x"


def _fails(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("python -m deepnorm.analysis: error: "), err
    return err


@pytest.mark.parametrize("argv, expected", [
    (["grad-norm", OUT], "'grad-norm' is not a command; COMMAND is one of grad-norms"),
    (["grad-norms"], "analysis.out is empty; give the output directory"),
    (["grad-norms", "--out=x"], "Unknown command line flag 'out'; settings are "
                                "--config.analysis.KEY=VALUE"),
    (["grad-norms", OUT, "extra"], "unexpected arguments ['extra']"),
    (["grad-norms", OUT, "--config.analysis.residuals=post,prelN"],
     "analysis.residuals: residual scheme 'prelN' is not one of post"),
    (["grad-norms", OUT, "--config.analysis.depths=6,0"],
     "analysis.depths='6,0': every value must be a positive integer"),
    (["grad-norms", OUT, "--config.analysis.depths=six"],
     "analysis.depths='six' is not a comma-separated list of integers"),
    (["grad-norms", OUT, "--config.analysis.seeds=0"], "analysis.seeds=0 must be a positive"),
    (["grad-norms", OUT, "--config.analysis.seeds=abc"], "--config.analysis.seeds=abc"),
    (["grad-norms", OUT, "--config.analysis.train_steps=-1"],
     "analysis.train_steps=-1 must be 0 or more"),
    (["grad-norms", OUT, "--config.analysis.plot_params=ffn_out,w2"],
     "analysis.plot_params: 'w2' is not one of ffn_in, ffn_out, self_attn.query"),
    (["grad-norms", OUT, "--config.analysis.depth=6"],
     "unknown config key 'depth'. Did you mean \"depths\""),
    (["update-norms", OUT, "--config.optimizer.learning_rate=-1"],
     "optimizer.learning_rate=-1.0 must be positive"),
    (["stability-map", OUT, "--config.analysis.lrs=1e-3,abc"],
     "analysis.lrs='1e-3,abc' is not a comma-separated list of numbers"),
    (["stability-map", OUT, "--config.analysis.warmups=-5"],
     "analysis.warmups='-5': every value must be an integer >= 0"),
    # Every cell sets its own rate and warmup: overriding the block's would do nothing.
    (["stability-map", OUT, "--config.optimizer.learning_rate=1"],
     "unknown config key 'learning_rate'"),
    (["stability-map", OUT, "--config.analysis.max_loss=0"], "analysis.max_loss=0"),
    (["grad-norms", "--config=nope.py", OUT], "--config='nope.py' is not a file"),
    (["grad-norms", "--config=configs/post_ln.py", OUT], "has no 'analysis' block"),
    (["grad-norms", "--config=configs/post_ln.py"],
     "has no 'analysis' block; use configs/analysis/grad_norms.py[:EXPERIMENT]"),
    (["grad-norms", "--config=configs/analysis/grad_norms.py:nope", OUT],
     "experiment 'nope' is not a file in configs/"),
    (["stability-map", "--config=configs/analysis/grad_norms.py", OUT],
     "it is not a stability-map config"),
    (["grad-norms", OUT, "--config=configs/analysis/grad_norms.py"],
     "Found --config.analysis.out=x in argv before a value for --config"),
    (["grad-norms", OUT, "--config.model.num_heads=3"],
     "model.d_model=128 is not divisible by model.num_heads=3"),
    # Running batch statistics are not carried by the measurements (nor per lane by the map).
    *[([command, OUT, f"--config.model.norm={norm}"],
       f"model.norm='{norm}' keeps running batch statistics, which the analysis commands do "
       f"not carry") for command in ("grad-norms", "update-norms", "stability-map")
      for norm in ("batchnorm", "powernorm")],
])
def test_bad_input_fails_in_one_line(capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(ROOT)
    assert expected in _fails(capsys, argv)


def test_defaults_are_the_commands_paper_setups():
    _, config = cli.load(["grad-norms", OUT])
    values, base = cli.check("grad-norms", config)
    assert values == dict(out="x", residuals=["post", "pre", "deepnorm"], depths=[6], seeds=3,
                          batches=16, batch_size=16, seq_len=64, train_steps=0,
                          plot_params=["ffn_out", "ffn_in", "self_attn.out"])
    assert (base.arch, base.num_encoder_layers, base.d_model, base.d_ff, base.num_heads) == (
        "encoder_decoder", 6, 128, 256, 4)
    _, config = cli.load(["update-norms", OUT])
    values, base = cli.check("update-norms", config)
    assert values["depths"] == [6, 12, 24, 48] and values["steps"] == 20
    assert (base.d_model, base.d_ff, base.num_heads) == (64, 128, 2)
    assert config.optimizer.to_dict() == optimizer_config(5e-4).to_dict()
    _, config = cli.load(["stability-map", OUT])
    values, base = cli.check("stability-map", config)
    assert values["lrs"] == [3e-4, 1e-3, 3e-3, 1e-2] and values["warmups"] == [0, 50]
    assert (values["steps"], values["max_loss"], base.arch, base.num_layers) == (
        150, 100.0, "decoder", 6)
    # The block is the library's default optimizer without the per-cell rate and warmup.
    want = optimizer_config(1.0).to_dict()
    del want["learning_rate"], want["warmup_steps"]
    assert config.optimizer.to_dict() == want
    assert set(settings.FIELDS["stability-map"]) == set(config.analysis)
    # depth-sweep shares the stability map's blocks, so both can fill one cells directory.
    _, sweep = cli.load(["depth-sweep", OUT])
    values, _ = cli.check("depth-sweep", sweep)
    assert values["dtypes"] == ["float32", "float16"] and values["float16_max_depth"] == 12
    assert set(settings.FIELDS["depth-sweep"]) == set(sweep.analysis)
    for block in ("model", "optimizer", "data"):
        assert sweep[block].to_dict() == config[block].to_dict()


def test_overrides_and_an_experiments_model(monkeypatch):
    monkeypatch.chdir(ROOT)
    _, config = cli.load(["grad-norms", OUT, "--config.analysis.depths=6,12",
                          "--config.analysis.residuals=post,dsinit",
                          "--config.model.d_model=64", "--config.analysis.train_steps=5"])
    values, base = cli.check("grad-norms", config)
    assert values["depths"] == [6, 12] and values["residuals"] == ["post", "dsinit"]
    assert base.d_model == 64 and values["train_steps"] == 5
    # A training experiment: its model and optimizer, its depth as the default depth, and
    # no train / mesh block (the analysis would ignore them).
    _, config = cli.load(["update-norms",
                          "--config=configs/analysis/update_norms.py:decoder_lm:quick", OUT])
    values, base = cli.check("update-norms", config)
    sys.path.insert(0, str(ROOT))
    from configs import decoder_lm

    experiment = decoder_lm.get_config("quick")
    assert base.arch == "decoder" and base.d_model == experiment.model.d_model
    assert values["depths"] == [experiment.model.num_layers]
    assert config.optimizer.to_dict() == experiment.optimizer.to_dict()
    assert "train" not in config and "mesh" not in config


def test_an_experiment_file_by_path(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "tiny.py"
    path.write_text(textwrap.dedent("""
        from configs import base
        def get_config(arg=None):
            return base.get_config(dict(arch="decoder", num_layers=3, d_model=32,
                                        num_heads=2, d_ff=64, residual="pre"))
    """))
    _, config = cli.load(["stability-map",
                          f"--config=configs/analysis/stability_map.py:{path}", OUT])
    values, base = cli.check("stability-map", config)
    assert values["depths"] == [3] and base.d_model == 32
    assert "learning_rate" not in config.optimizer
    assert config.optimizer.weight_decay == 0.01  # the experiment's, not the analysis's


def test_grad_norm_training_batches_are_held_out_from_the_measured_ones():
    """grad-norms with train_steps trains on the batches after the measured ones: training on
    the measured batches would shrink exactly the gradient being measured."""
    sizes = dict(arch="decoder", batch_size=2, seq_len=32)
    measured, train = commands.grad_norm_batches(None, num_batches=3, train_steps=4, **sizes)
    stream = stacked_batches(None, num_batches=7, **sizes)
    np.testing.assert_array_equal(measured["inputs"], stream["inputs"][:3])
    np.testing.assert_array_equal(train["inputs"], stream["inputs"][3:])

    def examples(batches):  # skip near-constant rows (padding), which may recur anywhere
        rows = np.asarray(batches["inputs"]).reshape(-1, 32)
        return {r.tobytes() for r in rows if len(set(r.tolist())) > 4}

    assert len(examples(measured)) >= 4 and len(examples(train)) >= 6
    assert not examples(measured) & examples(train)
    at_init, none = commands.grad_norm_batches(None, num_batches=3, train_steps=0, **sizes)
    assert none is None
    np.testing.assert_array_equal(at_init["inputs"], measured["inputs"])


def test_grad_norms_command_writes_json_and_png(tmp_path):
    out = tmp_path / "out"
    # A subprocess, as a user runs it (python -m), from the repository root.
    proc = subprocess.run(
        [sys.executable, "-m", "deepnorm.analysis", "grad-norms",
         f"--config.analysis.out={out}", "--config.model.d_model=16",
         "--config.model.d_ff=32", "--config.model.num_heads=2",
         "--config.analysis.depths=1", "--config.analysis.residuals=post,deepnorm",
         "--config.analysis.seeds=2", "--config.analysis.batches=2",
         "--config.analysis.batch_size=2", "--config.analysis.seq_len=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = json.loads((out / "grad-norms.json").read_text())
    assert {r["residual"] for r in records} == {"post", "deepnorm"}
    assert {r["layer"] for r in records} == {1, 2}
    assert (out / "grad-norms.png").stat().st_size > 10_000
    meta = json.loads((out / "grad-norms.meta.json").read_text())
    assert meta["base_model"]["d_model"] == 16 and meta["seconds"] > 0
    assert meta["config"]["analysis"]["depths"] == "1"


def test_every_declared_scheme_is_an_analysis_scheme_with_a_valid_config():
    """Each ``model.residual`` value (deepnorm.residual) is a name for grad-norms,
    update-norms and stability-map, builds a valid config on the analysis base (norm switched
    off for a scheme without one, auto init kept) and has a colour and a label."""
    from deepnorm.analysis import plotting, schemes as schemes_lib
    from deepnorm.config import TransformerConfig
    from deepnorm.residual import SCHEMES as DECLARED
    base = TransformerConfig(arch="encoder_decoder", num_encoder_layers=2, num_decoder_layers=2,
                             d_model=16, num_heads=2, d_ff=32, residual="post", norm="none",
                             init="tfixup")
    names = tuple(DECLARED) + ("skipinit",)
    assert schemes_lib.check_schemes(names) == names
    for name in names:
        cfg = schemes_lib.scheme_config(base, name, depth=3)
        assert cfg.residual == (name if name in DECLARED else "rezero")
        assert (cfg.norm == "none") == (not cfg.scheme.uses_norm)
        assert cfg.init == "auto" and cfg.num_decoder_layers == 3
        assert plotting.color(name).startswith("#") and plotting.label(name) != name
    assert schemes_lib.scheme_config(base, "fixup").resolved_init == "fixup"
    new = "fixup,normformer,layerscale,deepscale,rescaled,skipinit"
    for command in ("grad-norms", "update-norms", "stability-map"):
        values, _ = cli.check(*cli.load([command, OUT, f"--config.analysis.residuals={new}"]))
        assert values["residuals"] == new.split(",")
