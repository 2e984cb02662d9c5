"""Loss spikes: detection, the divergence/ forensics, and train.on_spike=rewind end to end.

The end-to-end runs feed a test-only data source (``Poisoned`` below, patched in with
monkeypatch; nothing in the package knows of it): the real stdlib iterator, with every batch's
targets replaced by one token, which a tiny model learns within a few steps, except at the
poisoned positions, whose targets are random: a batch whose loss is many times the median.
"""

import collections
import json
import math
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # for `configs`
from configs import decoder_lm  # noqa: E402

from deepnorm.training import divergence  # noqa: E402
from deepnorm.training.data import DataSource  # noqa: E402
from deepnorm.training.loop import train_and_evaluate  # noqa: E402
from deepnorm.training.metrics import read_metrics  # noqa: E402
from deepnorm.training.rewind import BatchFeed  # noqa: E402

TARGET = 70  # every clean batch's targets
POISON_AT = 7  # the position (1-based draw count) of the poisoned batch


class Poisoned:
    """Wraps a train iterator: constant targets, random ones at ``poison`` positions, and
    ``omit`` positions dropped (a reference stream that never had them). Its state is the
    inner iterator's plus its own count, so checkpoints and rewinds restore it exactly."""

    def __init__(self, inner, poison=(), omit=()):
        self.inner, self.poison, self.omit, self.count = inner, set(poison), set(omit), 0

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            batch, self.count = dict(next(self.inner)), self.count + 1
            if self.count not in self.omit:
                break
        if self.count in self.poison:
            rng = np.random.default_rng(self.count)
            batch["targets"] = rng.integers(3, 259, batch["targets"].shape).astype(np.int32)
        else:
            batch["targets"] = np.full_like(batch["targets"], TARGET)
        return batch

    def get_state(self):
        return json.dumps({"inner": self.inner.get_state(), "count": self.count}).encode()

    def set_state(self, state):
        state = json.loads(state)
        self.inner.set_state(state["inner"])
        self.count = state["count"]

    def start_prefetch(self):
        pass


def feed_data(monkeypatch, **wrap):
    real = DataSource.iterator

    def iterator(self, which):
        inner = real(self, which)
        return Poisoned(inner, **wrap) if which == "train" else inner

    monkeypatch.setattr(DataSource, "iterator", iterator)


def tiny_config(**train):
    config = decoder_lm.get_config("quick")
    config.model.update(d_model=16, d_ff=32)
    config.optimizer.update(schedule="constant", warmup_steps=0, learning_rate=2e-2)
    config.train.update(dict(num_steps=10, batch_size=4, seq_len=16, log_every=1,
                             eval_every=10, eval_steps=1, checkpoint_every=4,
                             progress_bar=False, spike_window=3, spike_factor=2.0,
                             forensics_steps=5), **train)
    return config


def train_rows(workdir):
    return {r["step"]: r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same stream without the poisoned position: what a rewind must reproduce."""
    monkeypatch = pytest.MonkeyPatch()
    feed_data(monkeypatch, omit={POISON_AT})
    workdir = str(tmp_path_factory.mktemp("reference"))
    try:
        summary = train_and_evaluate(tiny_config(on_spike="rewind"), workdir)
    finally:
        monkeypatch.undo()
    return workdir, summary


@pytest.fixture(scope="module")
def rewound(tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    feed_data(monkeypatch, poison={POISON_AT})
    workdir = str(tmp_path_factory.mktemp("rewound"))
    try:
        summary = train_and_evaluate(tiny_config(on_spike="rewind"), workdir)
    finally:
        monkeypatch.undo()
    return workdir, summary


def test_a_run_without_spikes_is_unchanged_and_writes_no_forensics(reference):
    workdir, summary = reference
    assert summary["status"] == "completed" and summary["final_step"] == 10
    assert (summary["spikes"], summary["rewinds"], summary["skipped_batches"]) == (0, 0, 0)
    assert summary["forensics"] == [] and not os.path.exists(os.path.join(workdir, "divergence"))
    losses = [train_rows(workdir)[s]["loss"] for s in range(1, 11)]
    assert losses[-1] < 0.5 * losses[0]  # it learned the constant target: a low median


def test_a_poisoned_batch_is_recorded_rewound_and_skipped(rewound, reference):
    workdir, summary = rewound
    assert summary["status"] == "completed" and summary["final_step"] == 10
    assert (summary["spikes"], summary["rewinds"], summary["skipped_batches"]) == (1, 1, 1)
    assert summary["forensics"] == [f"divergence/step_{POISON_AT}"]
    spike_rows = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
                  if r["kind"] == "spike"]
    assert spike_rows == []  # rewound: the spike is in the forensics, not a metrics row

    directory = os.path.join(workdir, "divergence", f"step_{POISON_AT}")
    with open(os.path.join(directory, "event.json")) as f:
        event = json.load(f)
    assert event["step"] == POISON_AT and event["kind"] == "spike"
    assert event["action"] == "rewind" and event["batch_position"] == POISON_AT
    assert event["newest_checkpoint_step"] == 4 and event["rewound_to_step"] == 4
    assert event["skipped_positions"] == [POISON_AT, POISON_AT]
    assert event["ratio"] > 2.0 and event["loss"] == pytest.approx(event["ratio"]
                                                                   * event["median"])
    with open(os.path.join(directory, "history.jsonl")) as f:
        history = [json.loads(line) for line in f]
    assert [r["step"] for r in history] == [3, 4, 5, 6, 7]
    assert history[-1]["loss"] == event["loss"]
    # The median is of the three losses before the spike, as the metrics logged them.
    assert event["median"] == pytest.approx(np.median([r["loss"] for r in history[1:4]]))
    for row in history:
        assert len(row["grad_norm_per_layer"]) == 2
        assert all(math.isfinite(v) for v in row["activation_norm_per_layer"])
    batch = np.load(os.path.join(directory, "batch.npz"))
    np.testing.assert_array_equal(  # the poisoned batch's random targets, as Poisoned drew them
        batch["targets"], np.random.default_rng(POISON_AT).integers(3, 259, (4, 16)))
    assert set(batch.files) >= {"inputs", "targets", "weights"}

    # After the rewind the run is the stream without the poisoned batch, step for step.
    ref_rows, rows = train_rows(reference[0]), train_rows(workdir)
    for step in range(1, 11):
        assert rows[step]["loss"] == ref_rows[step]["loss"], step
        assert rows[step]["grad_norm"] == ref_rows[step]["grad_norm"], step
    assert summary["final_eval_loss"] == reference[1]["final_eval_loss"]


@pytest.mark.slow
def test_continue_records_the_spike_and_trains_on(tmp_path, monkeypatch):
    feed_data(monkeypatch, poison={POISON_AT})
    summary = train_and_evaluate(tiny_config(on_spike="continue"), str(tmp_path))
    assert summary["status"] == "completed" and summary["rewinds"] == 0
    assert summary["spikes"] >= 1 and summary["forensics"][0] == f"divergence/step_{POISON_AT}"
    spikes = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if r["kind"] == "spike"]
    assert spikes[0]["step"] == POISON_AT and spikes[0]["ratio"] > 2.0
    with open(tmp_path / "divergence" / f"step_{POISON_AT}" / "event.json") as f:
        assert json.load(f)["action"] == "continue"


@pytest.mark.slow
def test_stop_and_an_exhausted_rewind_budget_end_the_run_saying_why(tmp_path, monkeypatch):
    feed_data(monkeypatch, poison={POISON_AT})
    summary = train_and_evaluate(tiny_config(on_spike="rewind", max_rewinds=0), str(tmp_path))
    assert summary["status"] == "diverged" and summary["final_step"] == POISON_AT
    assert summary["divergence"].startswith(f"diverged at step {POISON_AT}: loss=")
    assert "loss spike: " in summary["divergence"]
    assert "not rewound: train.max_rewinds=0 rewinds already done" in summary["divergence"]
    with open(tmp_path / "divergence" / f"step_{POISON_AT}" / "event.json") as f:
        event = json.load(f)
    assert event["action"] == "stop" and "max_rewinds=0" in event["refused"]


# ---- the pieces, without a run ----------------------------------------------------------


def test_spike_detector_against_a_direct_running_median():
    rng = np.random.default_rng(0)
    losses = rng.uniform(1.0, 2.0, 200)
    losses[[40, 41, 120]] = [9.0, 3.5, 50.0]
    detector = divergence.SpikeDetector(factor=2.5, window=7)
    found = [s for s, loss in enumerate(losses) if detector.observe(s, float(loss))]
    expected = [s for s in range(7, 200) if losses[s] > 2.5 * np.median(losses[s - 7:s])]
    assert found == expected and 40 in found and 120 in found
    spike = divergence.SpikeDetector(factor=2.0, window=3)
    for s, loss in enumerate([1.0, 3.0, 2.0]):
        assert spike.observe(s, loss) is None  # the window is not full yet
    event = spike.observe(3, 5.0)
    assert (event.median, event.ratio) == (2.0, 2.5)
    assert event.line() == ("loss spike at step 3: loss=5, loss spike: 2.5 x the median 2 of "
                            "the 3 steps before it, above train.spike_factor=2")


def test_forget_after_undoes_the_rewound_steps():
    detector = divergence.SpikeDetector(factor=2.0, window=3)
    for s, loss in enumerate([1.0, 1.0, 1.9, 1.9], start=1):
        detector.observe(s, loss)
    detector.forget_after(2)  # the window keeps step 2's loss only: no spike until it refills
    assert detector.observe(3, 1.0) is None and detector.observe(4, 1.0) is None
    assert detector.observe(5, 2.5) is not None  # against 1, 1, 1; the 1.9s would hide it


class _Numbers:
    """A stand-in train iterator yielding its position; state = the position."""

    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"x": np.array(self.i)}


def test_batch_feed_skips_marked_positions_after_a_rewind():
    run = collections.namedtuple("Run", "train_iter start_step")(_Numbers(), 0)
    feed = BatchFeed(run)
    drawn = [int(feed.next(s)["x"]) for s in range(1, 5)]
    feed.checkpointed(4)
    drawn += [int(feed.next(s)["x"]) for s in range(5, 8)]
    assert drawn == [1, 2, 3, 4, 5, 6, 7] and feed.batch_of(6)[0] == 6
    run.train_iter.i = 4  # what restoring checkpoint 4 does to the iterator
    feed.rewound(4, range(6, 8))
    assert [int(feed.next(s)["x"]) for s in range(5, 8)] == [5, 8, 9]
    assert feed.skipped == 2 and feed.batch_of(6) == (8, {"x": np.array(8)})
    run.train_iter.i = 4  # a second rewind to the same checkpoint still skips 6 and 7
    feed.rewound(4, range(9, 10))
    assert [int(feed.next(s)["x"]) for s in range(5, 8)] == [5, 8, 10]
    assert feed.can_rewind_to(0) and feed.can_rewind_to(4) and not feed.can_rewind_to(3)
