"""Deciding that a run has diverged, and naming the layer where it started.

The policy is ``train.on_nonfinite``:

* ``stop`` (default): the first non-finite loss or gradient, or a loss above
  ``train.max_loss``, ends the run (summary.json status "diverged", train.py exits non-zero).
* ``skip``: a step with a non-finite loss or gradient is dropped on the device (params and
  optimizer state unchanged, see ``make_train_step(skip_nonfinite=True)``) and counted; more
  than ``train.max_consecutive_skips`` in a row ends the run. A finite loss above ``max_loss``
  still ends it (skipping cannot help a run that is finite but exploding).

With float16 loss scaling (``deepnorm.training.loss_scale``) a step whose metrics say
``overflow`` = 1 (non-finite gradients while the loss scale can still be halved) was already
skipped on the device and the scale lowered: it is counted in ``overflow_steps`` and is no
divergence under either policy, nor a gradient spike of any layer.

"The layer whose gradient norm blew up first": each layer's gradient norm is compared with its
own running (exponential) average over healthy steps; the first step at which some layer is
``spike_factor`` times above its average, or non-finite, is remembered (the earliest such
event within the last ``window`` steps is reported).

A *loss spike* (``SpikeDetector``) is a finite loss above ``train.spike_factor`` times the
median of the ``train.spike_window`` finite losses before it; no spike is called before the
window is full (early training, where the loss falls fast, has no baseline yet). What a spike
does is ``train.on_spike`` (``SPIKE_POLICIES``): ``stop`` ends the run as diverged,
``continue`` only records it, ``rewind`` restores the newest checkpoint and skips the batch
(see ``deepnorm.training.rewind``). Float16 overflow steps and non-finite steps are never
spikes: the former are the loss scale's business, the latter the divergence policy's.
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

from deepnorm.config import ConfigError

POLICIES = ("stop", "skip")
SPIKE_POLICIES = ("stop", "continue", "rewind")


def layer_names(num_encoder_layers: int, num_decoder_layers: int) -> list[str]:
    """Names in the order of every per-layer vector: encoder layers then decoder layers."""
    return ([f"encoder layer {i}" for i in range(1, num_encoder_layers + 1)]
            + [f"decoder layer {i}" for i in range(1, num_decoder_layers + 1)])


@dataclasses.dataclass
class Divergence:
    step: int
    loss: float
    reason: str
    layer: str

    def line(self) -> str:
        return (f"diverged at step {self.step}: loss={self.loss:.6g} ({self.reason}); "
                f"gradient norm blew up first in {self.layer}")


class DivergenceMonitor:
    """Feed it each step's host metrics; it returns a ``Divergence`` when the run must stop."""

    def __init__(self, names: list[str], *, policy: str = "stop", max_loss: float = math.inf,
                 max_consecutive_skips: int = 10, spike_factor: float = 10.0,
                 ema_decay: float = 0.9, window: int = 200):
        if policy not in POLICIES:
            raise ValueError(f"train.on_nonfinite={policy!r} is not one of {', '.join(POLICIES)}")
        self.names, self.policy, self.max_loss = names, policy, max_loss
        self.max_consecutive_skips = max_consecutive_skips
        self.spike_factor, self.ema_decay, self.window = spike_factor, ema_decay, window
        self._ema: np.ndarray | None = None
        # (step, index of the worst layer, how many layers were bad at that step)
        self._events: collections.deque = collections.deque()
        self.consecutive_skips = 0
        self.skipped_steps = 0
        self.overflow_steps = 0

    def observe(self, step: int, metrics) -> Divergence | None:
        if int(metrics.get("overflow", 0)):
            self.overflow_steps += 1
            return None
        loss = float(metrics["loss"])
        finite = bool(metrics["finite"])
        per_layer = metrics.get("grad_norm_per_layer")
        if per_layer is not None:
            self._track_layers(step, np.asarray(per_layer, np.float64), finite)
        if not finite:
            self.skipped_steps += self.policy == "skip"
            self.consecutive_skips += 1
            if self.policy == "stop":
                return self._diverged(step, loss, "non-finite loss or gradient", per_layer)
            if self.consecutive_skips > self.max_consecutive_skips:
                return self._diverged(
                    step, loss, f"{self.consecutive_skips} non-finite steps in a row, more "
                    f"than train.max_consecutive_skips={self.max_consecutive_skips}", per_layer)
            return None
        self.consecutive_skips = 0
        if loss > self.max_loss:
            return self._diverged(step, loss, f"above train.max_loss={self.max_loss:g}",
                                  per_layer)
        return None

    def _track_layers(self, step: int, grads: np.ndarray, finite: bool) -> None:
        while self._events and self._events[0][0] < step - self.window:
            self._events.popleft()
        bad = ~np.isfinite(grads)
        if self._ema is not None:
            bad |= grads > self.spike_factor * self._ema
        if bad.any():
            ratio = np.where(np.isfinite(grads), grads / np.maximum(
                self._ema if self._ema is not None else grads, 1e-30), np.inf)
            worst = int(np.argmax(np.where(bad, ratio, -np.inf)))
            self._events.append((step, worst, int(bad.sum())))
        if finite and np.isfinite(grads).all():
            self._ema = (grads if self._ema is None
                         else self.ema_decay * self._ema + (1 - self.ema_decay) * grads)

    def explain(self, step: int, loss: float, reason: str, per_layer=None) -> Divergence:
        """A ``Divergence`` at ``step`` for ``reason``, naming the layer that blew up first
        (used for loss spikes that end the run, which the monitor itself does not decide)."""
        return self._diverged(step, loss, reason, per_layer)

    def _diverged(self, step, loss, reason, per_layer) -> Divergence:
        if self._events:
            first_step, index, count = self._events[0]
            if count == len(self.names) > 1:
                layer = f"all {count} layers at once (at step {first_step})"
            elif count > 1:
                layer = (f"{self.names[index]} (the largest jump of {count} layers at step "
                         f"{first_step})")
            else:
                layer = f"{self.names[index]} (at step {first_step})"
        elif per_layer is not None:
            grads = np.asarray(per_layer, np.float64)
            index = int(np.argmax(np.where(np.isfinite(grads), grads, np.inf)))
            layer = f"{self.names[index]} (largest gradient norm at step {step})"
        else:
            layer = "unknown (per-layer gradient norms not recorded at this step)"
        return Divergence(step=step, loss=loss, reason=reason, layer=layer)


@dataclasses.dataclass
class Spike:
    step: int
    loss: float
    median: float  # of the window of finite losses before this step
    factor: float  # train.spike_factor
    window: int  # train.spike_window

    @property
    def ratio(self) -> float:
        return self.loss / self.median if self.median > 0 else math.inf

    def reason(self) -> str:
        return (f"loss spike: {self.ratio:.3g} x the median {self.median:.6g} of the "
                f"{self.window} steps before it, above train.spike_factor={self.factor:g}")

    def line(self) -> str:
        return f"loss spike at step {self.step}: loss={self.loss:.6g}, {self.reason()}"


class SpikeDetector:
    """``observe(step, loss)`` -> ``Spike`` when ``loss`` > ``factor`` x the running median."""

    def __init__(self, factor: float, window: int):
        self.factor, self.window = factor, window
        self._losses: collections.deque = collections.deque(maxlen=window)  # (step, loss)

    def observe(self, step: int, loss: float) -> Spike | None:
        """Feed finite losses only. A spike still joins the window: a loss that stays at a new
        level stops being a spike once it is the median, instead of being one forever."""
        spike = None
        if len(self._losses) == self.window:
            median = float(np.median([value for _, value in self._losses]))
            if loss > self.factor * median:
                spike = Spike(step, loss, median, self.factor, self.window)
        self._losses.append((step, loss))
        return spike

    def forget_after(self, step: int) -> None:
        """Drops the losses of steps after ``step`` (a rewind to ``step`` undoes them)."""
        kept = [(s, v) for s, v in self._losses if s <= step]
        self._losses.clear()
        self._losses.extend(kept)


def check_spike_config(train) -> None:
    """One-line ``ConfigError`` for the ``train.*`` keys of spikes, forensics and rewinds."""
    if train.on_spike not in SPIKE_POLICIES:
        raise ConfigError(f"train.on_spike={train.on_spike!r} is not one of "
                          f"{', '.join(SPIKE_POLICIES)}")
    factor = train.spike_factor
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ConfigError(f"train.spike_factor={factor!r} must be a number > 1 (a loss above "
                          "this many times its running median is a spike)")
    for name in ("spike_window", "forensics_steps", "rewind_skip_batches"):
        value = train[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"train.{name}={value!r} must be a positive integer")
    value = train.max_rewinds
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"train.max_rewinds={value!r} must be an integer >= 0")
