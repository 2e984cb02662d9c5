"""The training loop's batches by position, so that a rewind can skip the ones that spiked.

``BatchFeed`` draws the train iterator's batches and numbers them: position p is the p-th batch
this process has drawn since the iterator's position at start (the resumed checkpoint's, or
the beginning of the data). It remembers the position at every checkpoint it is told about,
and the last few batches with their steps (the forensics of a spike need the batch itself).

A rewind (``train.on_spike=rewind``) restores the newest checkpoint, state and iterator
position (``Checkpointer.restore_latest`` sets the grain iterator in place), and then
``rewound(checkpoint_step, skip=...)`` puts the feed back at that checkpoint's position and
marks positions to skip: the next draws replay the same batches as before, except that each
marked position is drawn and dropped. The replay is deterministic because everything it
depends on is restored: the iterator's state, the params, and the dropout key (the state's
rng folded with its step). Skipped positions are absolute, so a second rewind to the same
checkpoint skips both spikes' batches.

A checkpoint written after the skipped position has the advanced iterator in it, so resuming
from it never sees the skipped batch. A run stopped between a rewind and the skipped position
(preempted, killed) resumes from the checkpoint before it and does see it again: the skip
list lives in this process only.
"""

from __future__ import annotations

import collections

# Batches kept for forensics: the step being reported lags the step launched by one, and an
# evaluation or checkpoint in between draws nothing, so two would do; a few more cost nothing.
_RECENT = 4


class BatchFeed:
    """``next(step)`` -> the local batch for ``step``, skipping marked positions."""

    def __init__(self, run):
        self.run = run  # reads run.train_iter each time: a rewind to step 0 replaces it
        self.position = 0
        self.skipped = 0  # batches dropped by rewinds, for summary.json
        self._skip: set[int] = set()
        self._checkpoints = {run.start_step: 0}  # checkpoint step -> position after its batch
        self._recent: collections.deque = collections.deque(maxlen=_RECENT)

    def next(self, step: int):
        while True:
            batch = next(self.run.train_iter)
            self.position += 1
            if self.position in self._skip:
                self.skipped += 1
                continue
            self._recent.append((step, self.position, batch))
            return batch

    def checkpointed(self, step: int) -> None:
        """The state of ``step`` (after its batch) was saved with the iterator's position."""
        self._checkpoints[step] = self.position

    def batch_of(self, step: int):
        """``(position, local batch)`` of a recent ``step``, or ``(None, None)``."""
        for s, position, batch in reversed(self._recent):
            if s == step:
                return position, batch
        return None, None

    def can_rewind_to(self, step: int) -> bool:
        return step in self._checkpoints

    def rewound(self, checkpoint_step: int, skip: range) -> None:
        """The iterator is back at ``checkpoint_step``'s position; drop ``skip`` positions."""
        self.position = self._checkpoints[checkpoint_step]
        self._checkpoints = {s: p for s, p in self._checkpoints.items() if s <= checkpoint_step}
        self._skip.update(skip)
        self._recent.clear()


class RewindRequest(Exception):
    """Raised by the reporter when ``train.on_spike=rewind`` answers the event at ``step``
    (whose batch was at ``position``); the loop restores and carries on."""

    def __init__(self, step: int, position: int, line: str):
        super().__init__(line)
        self.step, self.position, self.line = step, position, line
