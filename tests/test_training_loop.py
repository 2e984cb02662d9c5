"""train_and_evaluate end to end on the real data pipeline, a tiny model, one CPU device."""

import json
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for `configs`
from configs import decoder_lm  # noqa: E402

from deepnorm.training.loop import train_and_evaluate  # noqa: E402
from deepnorm.training.metrics import read_metrics  # noqa: E402

PER_LAYER = ("grad_norm_per_layer", "update_norm_per_layer", "activation_norm_per_layer")


def tiny_config(**train):
    config = decoder_lm.get_config("quick")
    config.model.update(d_model=16, d_ff=32)
    config.optimizer.update(schedule="constant", warmup_steps=0, learning_rate=3e-3)
    config.train.update(dict(num_steps=6, batch_size=4, seq_len=16, log_every=1, eval_every=3,
                             eval_steps=1, checkpoint_every=3, progress_bar=False), **train)
    return config


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("full"))
    return workdir, train_and_evaluate(tiny_config(), workdir)


def train_rows(workdir):
    return [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if r["kind"] == "train"]


def test_a_run_writes_metrics_checkpoints_config_and_summary(full_run):
    workdir, summary = full_run
    rows = train_rows(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s"):
            assert key in row
        for key in PER_LAYER:
            assert len(row[key]) == 2 and all(math.isfinite(v) for v in row[key])
        assert row["learning_rate"] == pytest.approx(3e-3)
    evals = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
             if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]  # the same batches: it learned
    assert evals[-1]["eval_perplexity"] == pytest.approx(math.exp(evals[-1]["eval_loss"]))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["d_model"] == 16
    with open(os.path.join(workdir, "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["status"] == "completed" and summary["final_step"] == 6
    assert summary["final_loss"] == rows[-1]["loss"]
    assert summary["final_eval_loss"] == evals[-1]["eval_loss"]
    assert summary["derived"]["decoder_alpha"] == pytest.approx((2 * 2) ** 0.25)
    assert summary["derived"]["decoder_branch_gain"] == pytest.approx((8 * 2) ** -0.25)


def test_rows_carry_every_diagnostics_group(full_run):
    # train.diagnostic_groups defaults to all: each group's metrics, per layer where they are
    # per layer (the quick decoder has 2 layers), finite, on every logged step.
    workdir, _ = full_run
    for row in train_rows(workdir):
        for key in ("self_attn_logit_max_per_layer", "self_attn_entropy_min_head_per_layer",
                    "ffn_branch_kurtosis_per_layer", "self_attn_stream_max_abs_per_layer",
                    "update_ratio_query_per_layer", "adam_nu_max_per_layer"):
            assert len(row[key]) == 2 and all(math.isfinite(v) for v in row[key]), key
        for key in ("output_logit_norm", "output_logit_max", "output_log_z",
                    "update_ratio_embeddings", "adam_nu_mean_ffn_out"):
            assert math.isfinite(row[key]), key
        assert 0 < row["self_attn_entropy_per_layer"][0] <= math.log(16)  # 16 keys at most


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(full_run, tmp_path):
    workdir, _ = full_run
    first = train_and_evaluate(tiny_config(num_steps=3), str(tmp_path))
    assert first["final_step"] == 3
    second = train_and_evaluate(tiny_config(), str(tmp_path))
    assert second["resumed_from_step"] == 3 and second["status"] == "completed"
    resumed, uninterrupted = train_rows(str(tmp_path)), train_rows(workdir)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, uninterrupted):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], a["step"]
    with open(tmp_path / "metrics.jsonl") as f:  # appended, never truncated
        assert sum(json.loads(line)["kind"] == "train" for line in f) == 6


def test_a_nan_stops_the_run_naming_the_step_and_layer(tmp_path):
    config = tiny_config(checkpoint_every=1)
    config.optimizer.learning_rate = 1e30  # the first update overflows the next forward pass
    summary = train_and_evaluate(config, str(tmp_path))
    assert summary["status"] == "diverged"
    assert summary["final_step"] < 6 and not math.isfinite(summary["final_loss"])
    assert summary["divergence"].startswith(f"diverged at step {summary['final_step']}: loss=")
    assert "non-finite" in summary["divergence"] and "blew up first in " in summary["divergence"]
    assert all(s < summary["final_step"] for s in summary["checkpoint_steps"])
    # The forensics of it (deepnorm.training.forensics): the event, the batch, the history.
    step = summary["final_step"]
    assert summary["forensics"] == [f"divergence/step_{step}"]
    directory = tmp_path / "divergence" / f"step_{step}"
    with open(directory / "event.json") as f:
        event = json.load(f)
    assert event["kind"] == "divergence" and event["action"] == "stop"
    assert event["line"] == summary["divergence"] and event["step"] == step
    assert event["newest_checkpoint_step"] == max(summary["checkpoint_steps"])
    assert np.load(directory / "batch.npz")["inputs"].shape == (4, 16)
    with open(directory / "history.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, step + 1))


def test_skip_policy_drops_bad_steps_then_gives_up(tmp_path):
    config = tiny_config(on_nonfinite="skip", max_consecutive_skips=2, num_steps=10)
    config.optimizer.learning_rate = 1e30
    summary = train_and_evaluate(config, str(tmp_path))
    assert summary["status"] == "diverged" and summary["skipped_steps"] == 3
    assert "3 non-finite steps in a row" in summary["divergence"]
    assert train_rows(str(tmp_path))[-1]["skipped_steps"] == 3


def test_the_logged_learning_rate_is_the_one_the_update_used_after_skips(tmp_path):
    # Warmup over 4 updates: step 1 applies rate lr/4 and overflows the params; steps 2-4 are
    # dropped, each rolling the optimizer's count back, so each of them ran at rate 2 lr/4
    # (not 3 lr/4 and 4 lr/4, what schedule(step - 1) would say).
    config = tiny_config(on_nonfinite="skip", max_consecutive_skips=2, num_steps=10)
    config.optimizer.update(learning_rate=1e30, warmup_steps=4)
    summary = train_and_evaluate(config, str(tmp_path))
    assert summary["skipped_steps"] == 3
    rows = train_rows(str(tmp_path))
    assert [r["finite"] for r in rows] == [1, 0, 0, 0]
    assert [r["learning_rate"] for r in rows] == pytest.approx([0.25e30, 0.5e30, 0.5e30,
                                                                0.5e30], rel=1e-6)
