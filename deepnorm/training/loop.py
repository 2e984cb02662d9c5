"""``train_and_evaluate(config, workdir)``: the whole run, importable (train.py is a shell).

``train_and_evaluate`` reads in one screen; each of its lines is one of the named pieces here:

* ``_setup``: one pass through the config (every bad value fails here, as ``ConfigError``,
  before anything is compiled or created), the mesh, data, optimizer and checkpointer, and
  the train state restored from the workdir's newest checkpoint or freshly initialized.
* ``_compile_train_step``: the jitted, donated, sharded step; it also reports the learning
  rate the update used, read from the optimizer state's count.
* ``_Lagged``: the metrics of step ``s`` are fetched to the host only after step ``s + 1`` has
  been launched, so logging never leaves the device idle (nanodo's trick).
* ``_Reporter``: the host side of a step: divergence check, timing, the metrics row.
* ``_Cadence``: which steps are logged, evaluated and checkpointed; evals and checkpoints
  synchronize (the pending step is reported first).
* ``BatchFeed`` (``deepnorm.training.rewind``): the batches by position; on a loss spike or a
  divergence the reporter writes ``<workdir>/divergence/`` (``deepnorm.training.forensics``)
  and, with ``train.on_spike=rewind``, ``_rewind`` restores the newest checkpoint and the feed
  skips the spiking batch.
* the preemption guard (``deepnorm.training.preemption``): after a signal, the step in flight
  is reported, checkpointed, and the run stops.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np

from deepnorm.config import ConfigError, TransformerConfig
from deepnorm.initializers import describe
from deepnorm.training import bleu as bleu_lib
from deepnorm.training import checkpoint as checkpoint_lib
from deepnorm.training import diagnostics as diagnostics_lib
from deepnorm.training import divergence as divergence_lib
from deepnorm.training import forensics
from deepnorm.training import hugepages
from deepnorm.training import loss_scale as loss_scale_lib
from deepnorm.training import mesh as mesh_lib
from deepnorm.training import preemption as preemption_lib
from deepnorm.training import rewind as rewind_lib
from deepnorm.training import validation
from deepnorm.training.data import DataSource
from deepnorm.training.metrics import MetricsWriter
from deepnorm.training.optim import learning_rate, make_optimizer
from deepnorm.training.state import abstract_params, abstract_train_state, create_train_state
from deepnorm.training.platform import resolve_model_config
from deepnorm.training.steps import check_grad_accum, make_eval_step, make_train_step

DIAGNOSTICS = ("every_step", "log_steps", "off")


def initialize_distributed(dist_config) -> None:
    """``jax.distributed.initialize`` when ``distributed.enabled``; must run before any other
    JAX call. With an empty coordinator address JAX auto-detects (SLURM, TPU pods, ...)."""
    if not dist_config.enabled:
        return
    # Collectives between CPU devices of different processes go through gloo (the default has
    # none); GPU/TPU collectives are unaffected by this option.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if dist_config.coordinator_address:
        kwargs = dict(coordinator_address=dist_config.coordinator_address,
                      num_processes=int(dist_config.num_processes),
                      process_id=int(dist_config.process_id))
    jax.distributed.initialize(**kwargs)


def check_train_config(train) -> None:
    """One-line errors for ``train.*`` values that cannot work."""
    for name in ("num_steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_steps",
                 "checkpoint_every", "keep_checkpoints", "max_consecutive_skips",
                 "preemption_check_every"):
        value = train[name]
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"train.{name}={value!r} must be a positive integer")
    if train.on_nonfinite not in divergence_lib.POLICIES:
        raise ConfigError(f"train.on_nonfinite={train.on_nonfinite!r} is not one of "
                          f"{', '.join(divergence_lib.POLICIES)}")
    if train.diagnostics not in DIAGNOSTICS:
        raise ConfigError(f"train.diagnostics={train.diagnostics!r} is not one of "
                          f"{', '.join(DIAGNOSTICS)}")
    step_groups(train)  # train.diagnostic_groups and train.every_step_groups
    if not train.max_loss > 0:
        raise ConfigError(f"train.max_loss={train.max_loss!r} must be positive")
    check_grad_accum(train.batch_size, train.grad_accum_steps)
    loss_scale_lib.check_config(train)
    divergence_lib.check_spike_config(train)
    for name in ("bleu_every", "bleu_examples"):
        value = train[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"train.{name}={value!r} must be an integer >= 0")


def derived_constants(model_cfg: TransformerConfig, config) -> dict:
    """What the DeepNet maintainers ask first about a diverged run, flat, for the logs."""
    out = {k: float(v) for k, v in describe(model_cfg).items()}
    out.update(learning_rate=float(config.optimizer.learning_rate),
               warmup_steps=int(config.optimizer.warmup_steps),
               schedule=config.optimizer.schedule, b1=float(config.optimizer.b1),
               b2=float(config.optimizer.b2), batch_size=int(config.train.batch_size),
               seq_len=int(config.train.seq_len),
               grad_accum_steps=int(config.train.grad_accum_steps))
    return out


def _stack_words(model_cfg: TransformerConfig) -> str:
    """How the layers run, in the start line when it is not the default one-layer scan."""
    if not model_cfg.scan_layers:
        return "unrolled stack; "
    return f"{model_cfg.scan_unroll} layers per scan trip; " if model_cfg.scan_unroll > 1 else ""


def _loss_scale_words(model_cfg: TransformerConfig, train) -> str:
    """float16 runs: where the dynamic loss scale starts and how it moves."""
    if train is None or not loss_scale_lib.uses_loss_scaling(model_cfg.dtype):
        return ""
    return (f"dynamic loss scale from {float(train.initial_loss_scale):g} (x0.5 and skip on "
            f"overflow, x2 after {train.loss_scale_period} finite steps); ")


def _start_line(model_cfg: TransformerConfig, derived: dict, num_params: int, mesh,
                train=None) -> str:
    stacks = "; ".join(
        f"{s} alpha={derived[f'{s}_alpha']:.4g} beta(branch gain)="
        f"{derived[f'{s}_branch_gain']:.4g}"
        for s in ("encoder", "decoder") if f"{s}_alpha" in derived)
    return (f"{model_cfg.arch} N={model_cfg.encoder_layers} M={model_cfg.decoder_layers} "
            f"d={model_cfg.d_model} residual={model_cfg.residual} norm={model_cfg.norm} "
            f"init={model_cfg.resolved_init}; {stacks}; lr={derived['learning_rate']:g} "
            f"({derived['schedule']}, warmup {derived['warmup_steps']}) adam b1="
            f"{derived['b1']:g} b2={derived['b2']:g}; batch {derived['batch_size']} x "
            f"{derived['seq_len']}"
            + (f" in {derived['grad_accum_steps']} accumulated micro-batches"
               if derived.get("grad_accum_steps", 1) > 1 else "")
            + f"; {num_params:,} params; mesh {dict(mesh.shape)} over "
            f"{jax.device_count()} devices, {jax.process_count()} process(es); remat "
            f"{model_cfg.remat_policy}; "
            + _stack_words(model_cfg)
            + f"{model_cfg.dtype} matmuls, float32 dots at matmul_precision="
            f"{model_cfg.matmul_precision}; " + _loss_scale_words(model_cfg, train)
            + hugepages.describe())



def to_host(tree):
    """Device metrics (replicated) -> NumPy, also for arrays spanning several processes."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def write_resolved_config(workdir: str, config, resuming: bool) -> None:
    """``config.json``: the config the run used. On resume, differing keys are named."""
    path = os.path.join(workdir, "config.json")
    current = config.to_dict()
    if resuming and os.path.exists(path):
        with open(path) as f:
            previous = validation.flat_keys(json.load(f))
        now = validation.flat_keys(json.loads(json.dumps(current)))
        changed = sorted(k for k in set(previous) | set(now) if previous.get(k) != now.get(k))
        if changed:
            logging.warning("resuming %s with a changed config: %s", workdir, ", ".join(
                f"{k}: {previous.get(k)!r} -> {now.get(k)!r}" for k in changed))
    with open(path, "w") as f:
        json.dump(current, f, indent=2, sort_keys=True)


def _finished_summary(workdir: str, start_step: int, num_steps: int) -> dict | None:
    """The summary of a run that already reached ``num_steps`` (re-running it is a no-op)."""
    path = os.path.join(workdir, "summary.json")
    if start_step < num_steps or not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    return summary if summary.get("final_step") == start_step else None


class _Evaluator:
    """Unsmoothed validation loss over ``eval_steps`` batches, the same batches every time."""

    def __init__(self, data: DataSource, eval_step, num_batches: int):
        self.data, self.eval_step, self.num_batches = data, eval_step, num_batches
        self.iterator = data.iterator("eval")
        self.start = self.iterator.get_state()

    def __call__(self, params, batch_stats=None) -> dict:
        self.iterator.set_state(self.start)
        nll = tokens = 0.0
        for _ in range(self.num_batches):
            out = to_host(self.eval_step(params, self.data.to_global(next(self.iterator)),
                                         batch_stats))
            nll += float(out["nll_sum"])
            tokens += float(out["num_tokens"])
        loss = nll / max(tokens, 1.0)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)),
                "eval_tokens": tokens}


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its checkpoints); returns the summary
    that is also written to ``workdir/summary.json``."""
    initialize_distributed(config.distributed)
    started = time.time()
    run = _setup(config, workdir)
    if run.finished is not None:
        return run.finished
    train, state, step = run.train, run.state, run.start_step
    train_step = _compile_train_step(run, config)
    feed = rewind_lib.BatchFeed(run)
    reporter = _Reporter(run, feed)
    cadence = _Cadence(train, run.checkpointer)
    lagged = _Lagged()
    preempted = None  # the line saying where a SIGTERM / SIGINT stopped the run
    guard = preemption_lib.PreemptionGuard(check_every=train.preemption_check_every).install()
    try:
        while step < train.num_steps:
            try:
                batch = run.data.to_global(feed.next(step + 1))
                state, metrics = train_step(cadence.logged(step + 1))(state, batch)
                step += 1
                if not reporter(lagged.swap(step, metrics)):
                    break
                if cadence.synchronizes(step):
                    if not reporter(lagged.drain()):
                        break
                    if cadence.checkpoints(step):
                        _save(run, feed, step, state)
                    if cadence.evaluates(step):
                        reporter.evaluate(step, state.params, state.batch_stats)
                if cadence.scores_bleu(step):
                    reporter.score_bleu(step, state.params, state.batch_stats)
                if step < train.num_steps and guard.requested(step):
                    if not reporter(lagged.drain()):
                        break  # diverged on this very step: nothing worth checkpointing
                    _save(run, feed, step, state)
                    preempted = (f"preempted by {guard.signal_name} at step {step} of "
                                 f"{train.num_steps}; checkpoint {run.checkpointer.directory}/"
                                 f"{step}; run the same command to resume")
                    break
            except rewind_lib.RewindRequest as request:
                lagged.drain()  # launched after the spiking step: undone by the rewind
                state, step = _rewind(run, reporter, feed, request)
        else:
            reporter(lagged.drain())
    finally:
        guard.uninstall()
        run.checkpointer.close()
        reporter.writer.close()
    return _finish(run, reporter, state, step, preempted, started)


@dataclasses.dataclass
class _Run:
    """Everything the loop needs, built and validated by ``_setup``."""

    model_cfg: TransformerConfig
    train: Any
    workdir: str
    primary: bool
    mesh: Any
    data: DataSource
    tx: Any
    schedule: Any
    shardings: Any
    graphdef: Any
    train_iter: Any
    evaluator: "_Evaluator"
    checkpointer: checkpoint_lib.Checkpointer
    abstract_state: Any = None  # the restore target (ShapeDtypeStructs with shardings)
    state: Any = None
    start_step: int = 0
    finished: dict | None = None  # the summary of a run that already reached num_steps
    derived: dict = dataclasses.field(default_factory=dict)
    num_params: int = 0
    config: Any = None  # the whole ConfigDict (BLEU reads its data and decode blocks)

    @property
    def scaling(self) -> bool:
        """float16: the step carries a dynamic loss scale."""
        return loss_scale_lib.uses_loss_scaling(self.model_cfg.dtype)


def _setup(config, workdir: str) -> _Run:
    """Validates, builds the pieces, restores (or initializes) the state, logs the start."""
    # Platform-dependent "auto" values are chosen here, once, before any model is built.
    model_cfg = resolve_model_config(TransformerConfig.from_mapping(config.model))
    train = config.train
    check_train_config(train)
    validation.check_gns(train, model_cfg)
    if train.bleu_every > 0 and model_cfg.arch != "encoder_decoder":
        raise ConfigError(f"train.bleu_every={train.bleu_every} needs "
                          f"model.arch='encoder_decoder' (got {model_cfg.arch!r}); set "
                          "train.bleu_every=0")
    # Everything is validated before the workdir is created (deepnorm.training.validation).
    workdir = validation.check_workdir(workdir)
    validation.check_data(config.data)
    primary = jax.process_index() == 0

    mesh = mesh_lib.make_mesh(config.mesh)
    rules = mesh_lib.sharding_rules(config.mesh)
    mesh_lib.check_batch_size(train.batch_size, mesh, jax.process_count())
    check_grad_accum(train.batch_size, train.grad_accum_steps,
                     math.prod(mesh.shape[a] for a in mesh_lib.BATCH_AXES))
    if model_cfg.batch_stats and train.grad_accum_steps > 1:  # before anything compiles
        raise ConfigError(f"train.grad_accum_steps={train.grad_accum_steps} with "
                          f"model.norm={model_cfg.norm!r}: batch-statistics norms need the "
                          "whole batch in one pass; use 1")
    # A translation run's vocabulary: the workdir's own copy when resuming, else trained/cached.
    data = DataSource(config, model_cfg, mesh, workdir=workdir)
    tx, schedule = make_optimizer(config.optimizer, train.num_steps)
    graphdef, param_state = abstract_params(model_cfg, train.seed)
    abstract_state = abstract_train_state(model_cfg, tx, train.seed)
    shardings = mesh_lib.state_shardings(mesh, tx, param_state, rules,
                                         batch_stats=abstract_state.batch_stats)
    train_iter = data.iterator("train")
    evaluator = _Evaluator(data, jax.jit(make_eval_step(graphdef),
                                         in_shardings=(shardings.params, data.sharding,
                                                       shardings.batch_stats)),
                           train.eval_steps)
    if primary:
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--workdir={workdir} cannot be created: {err.strerror}") from err
        data.save_vocab(workdir)
    checkpointer = checkpoint_lib.Checkpointer(workdir, every=train.checkpoint_every,
                                               keep=train.keep_checkpoints,
                                               async_save=train.async_checkpoints)
    run = _Run(model_cfg, train, workdir, primary, mesh, data, tx, schedule, shardings,
               graphdef, train_iter, evaluator, checkpointer, config=config)
    abstract = checkpoint_lib.abstract_like(abstract_state, shardings)
    run.abstract_state = abstract
    run.state, run.start_step = checkpointer.restore_latest(
        abstract, run.train_iter, changed_keys=validation.changed_config_keys(workdir, config))
    run.finished = _finished_summary(workdir, run.start_step, train.num_steps)
    if run.finished is not None:
        checkpointer.close()
        logging.info("%s already completed %d steps; nothing to do (raise "
                     "train.num_steps to continue)", workdir, run.start_step)
        return run
    if run.state is None:
        run.graphdef, run.state = _initial_state(run)
    if primary:
        write_resolved_config(workdir, config, resuming=run.start_step > 0)
    run.derived = derived_constants(model_cfg, config)
    run.num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.state.params))
    logging.info("%s", _start_line(model_cfg, run.derived, run.num_params, mesh, train))
    logging.info("%s", data.describe())
    if run.start_step:
        logging.info("resuming from checkpoint step %d in %s", run.start_step, workdir)
    return run


def _initial_state(run: _Run):
    """``(graphdef, state)`` of step 0: the seed's parameters (Admin: profiled on the first
    batch), a fresh optimizer state and, for float16, the initial loss scale."""
    admin_batch = run.data.first_batch() if run.model_cfg.scheme.profiled else None
    return create_train_state(
        run.model_cfg, run.tx, run.train.seed, shardings=run.shardings, admin_batch=admin_batch,
        loss_scale=float(run.train.initial_loss_scale) if run.scaling else 1.0)


def _save(run: _Run, feed: rewind_lib.BatchFeed, step: int, state) -> None:
    """A checkpoint of ``state``; the feed notes its data position (a rewind target)."""
    if run.checkpointer.save(step, state, run.train_iter):
        feed.checkpointed(step)


def _rewind(run: _Run, reporter: "_Reporter", feed: rewind_lib.BatchFeed,
            request: rewind_lib.RewindRequest):
    """``(state, step)`` of the newest checkpoint (step 0's initial state if none is on disk
    yet), with the data iterator at its position and the spiking batches marked to skip."""
    run.checkpointer.wait()  # an asynchronous save of an earlier step may still be writing
    state, restored = run.checkpointer.restore_latest(run.abstract_state, run.train_iter)
    if state is None:
        _, state = _initial_state(run)
        run.train_iter = run.data.iterator("train")
    if not feed.can_rewind_to(restored):
        raise RuntimeError(
            f"cannot rewind to checkpoint step {restored}: it is older than the step "
            f"{run.start_step} this process resumed from, so its batch positions are unknown")
    skip = range(request.position, request.position + run.train.rewind_skip_batches)
    feed.rewound(restored, skip)
    reporter.rewound(restored, request, skip)
    return state, restored


def step_groups(train) -> tuple[frozenset, frozenset]:
    """(groups of the logged steps, groups of the others) for ``train`` (a ``train`` block)."""
    if train.diagnostics == "off":
        return frozenset(), frozenset()
    logged = diagnostics_lib.parse_groups(train.get("diagnostic_groups", "all"))
    if train.diagnostics == "log_steps":
        return logged, frozenset()
    every = diagnostics_lib.parse_groups(train.get("every_step_groups", "norms"),
                                         "train.every_step_groups")
    return logged, logged & every


def _compile_train_step(run: _Run, config):
    """``train_step(logged) -> jitted step``. The logged steps compute
    ``train.diagnostic_groups`` (and the noise scale with ``train.gns``); the others compute
    only what is needed between logs, in a second compiled step: with
    ``train.diagnostics="every_step"`` the groups of ``train.every_step_groups`` (the per-layer
    norms by default, which the divergence monitor and the forensics history read), with
    ``log_steps`` or ``off`` nothing."""
    train = run.train
    step_kwargs = dict(label_smoothing=float(config.optimizer.label_smoothing),
                       skip_nonfinite=train.on_nonfinite == "skip",
                       grad_accum_steps=train.grad_accum_steps,
                       loss_scale_period=(train.loss_scale_period if run.scaling else None),
                       z_loss=float(config.optimizer.get("z_loss", 0.0)))
    logged_groups, unlogged_groups = step_groups(train)

    def compile_step(diagnostics, gns: bool):
        inner = make_train_step(run.graphdef, run.tx, diagnostics=diagnostics, gns=gns,
                                **step_kwargs)

        def step(state, batch):
            # The rate this update uses, from the optimizer's own count: a step dropped by
            # on_nonfinite=skip rolls that count back, so step - 1 would overstate it.
            rate = learning_rate(run.schedule, state.opt_state)
            state, metrics = inner(state, batch)
            return state, dict(metrics, learning_rate=rate)

        return jax.jit(step, in_shardings=(run.shardings, run.data.sharding),
                       out_shardings=(run.shardings, mesh_lib.replicated(run.mesh)),
                       donate_argnums=0)

    # Only the logged steps' metrics reach metrics.jsonl, so the heavier groups (attention,
    # activations, update ratios, Adam: 2-16% of a step together on a CPU) and the noise
    # scale run there only; one program serves both when they compute the same.
    full = compile_step(logged_groups, train.gns)
    same = unlogged_groups == logged_groups and not train.gns
    light = full if same else compile_step(unlogged_groups, False)
    return lambda logged: full if logged else light


class _Lagged:
    """Holds the newest step's device metrics until the host looks at them."""

    def __init__(self):
        self.pending = None  # (step, device metrics) launched but not yet looked at

    def swap(self, step: int, metrics):
        """Keeps step ``step``'s metrics; returns the previous step's (None the first time)."""
        previous, self.pending = self.pending, (step, metrics)
        return previous

    def drain(self):
        """The pending step's metrics (None if there is none), before a synchronizing step."""
        previous, self.pending = self.pending, None
        return previous


class _Cadence:
    """Which steps are logged, evaluated and checkpointed (the last step always is)."""

    def __init__(self, train, checkpointer: checkpoint_lib.Checkpointer):
        self.train, self.checkpointer = train, checkpointer

    def logged(self, step: int) -> bool:
        """Every log_every-th step, plus the first (the starting loss) and the last."""
        return step % self.train.log_every == 0 or step in (1, self.train.num_steps)

    def evaluates(self, step: int) -> bool:
        return step % self.train.eval_every == 0 or step == self.train.num_steps

    def checkpoints(self, step: int) -> bool:
        return self.checkpointer.due(step) or step == self.train.num_steps

    def synchronizes(self, step: int) -> bool:
        return self.checkpoints(step) or self.evaluates(step)

    def scores_bleu(self, step: int) -> bool:
        """Every train.bleu_every-th step and the last (never when bleu_every is 0)."""
        every = self.train.bleu_every
        return every > 0 and (step % every == 0 or step == self.train.num_steps)


class _Reporter:
    """The host side of each step: divergence monitor, loss spikes and their forensics,
    throughput, metrics rows, evals."""

    def __init__(self, run: _Run, feed: rewind_lib.BatchFeed):
        train = run.train
        self.run, self.train, self.cadence = run, train, _Cadence(train, run.checkpointer)
        self.feed = feed
        self.monitor = divergence_lib.DivergenceMonitor(
            divergence_lib.layer_names(run.model_cfg.encoder_layers,
                                       run.model_cfg.decoder_layers),
            policy=train.on_nonfinite, max_loss=float(train.max_loss),
            max_consecutive_skips=train.max_consecutive_skips)
        self.spikes = divergence_lib.SpikeDetector(float(train.spike_factor), train.spike_window)
        # Host metrics of the last steps, for divergence/<step>/history.jsonl.
        self.history: collections.deque = collections.deque(maxlen=train.forensics_steps)
        self.spike_count = self.rewinds = 0
        self.forensics_dirs: list[str] = []
        self._last_spike = None  # a spike's next step spiking too is the same event
        self._events_at: collections.Counter = collections.Counter()
        self._pending_event = None  # (directory, event, batch) of the event being answered
        self.writer = MetricsWriter(run.workdir, primary=run.primary,
                                    start_step=run.start_step, num_steps=train.num_steps,
                                    progress=train.progress_bar)
        self.tokens_per_step = train.batch_size * train.seq_len
        self.loss = self.eval = self.diverged = self.bleu = None
        self._bleu_eval = (bleu_lib.loop_bleu_eval(run.config, run.graphdef, run.data,
                                                     run.mesh)
                           if train.bleu_every > 0 else None)
        self._timer_start, self._timed_steps = None, 0

    def __call__(self, lagged) -> bool:
        """Reports ``(step, device metrics)`` (nothing if None); False = stop the run."""
        if lagged is None:
            return True
        step, metrics = lagged[0], to_host(lagged[1])
        self.writer.advance()
        self.loss = float(metrics["loss"])
        self.history.append((step, metrics))
        event = self.monitor.observe(step, metrics)
        if event is not None:
            return self._answer(step, metrics, divergence=event)
        spike = self._spike(step, metrics)
        if spike is not None and not self._answer(step, metrics, spike=spike):
            return False
        now = time.time()
        if self._timer_start is None:  # the first step includes compilation: time from its end
            self._timer_start, self._timed_steps = now, 0
        else:
            self._timed_steps += 1
        if self.cadence.logged(step):
            elapsed, steps = now - self._timer_start, self._timed_steps
            row = dict(metrics,
                       tokens_per_s=(steps * self.tokens_per_step / elapsed
                                     if steps and elapsed > 0 else float("nan")),
                       steps_per_s=steps / elapsed if elapsed > 0 else float("nan"))
            if self.train.on_nonfinite == "skip":
                row["skipped_steps"] = self.monitor.skipped_steps
            row.update(self._overflow_count())
            self.writer.write(step, row)
            self._timer_start, self._timed_steps = now, 0
        return True

    def _spike(self, step: int, metrics) -> divergence_lib.Spike | None:
        """Only steps that trained count: an overflow step or a non-finite one is not a loss."""
        if int(metrics.get("overflow", 0)) or not bool(metrics["finite"]):
            return None
        return self.spikes.observe(step, float(metrics["loss"]))

    def _answer(self, step: int, metrics, *, divergence=None, spike=None) -> bool:
        """Forensics, then ``train.on_spike``: True = go on; False = stop (``self.diverged``
        says why); raises ``RewindRequest`` for a rewind."""
        policy, line = self.train.on_spike, (spike or divergence).line()
        action = ("continue" if spike is not None and policy == "continue"
                  else "rewind" if policy == "rewind" else "stop")
        refused = action == "rewind" and self.rewinds >= self.train.max_rewinds
        if refused:
            action = "stop"
        if spike is not None:
            self.spike_count += 1
            repeated = self._last_spike == step - 1 and action == "continue"
            self._last_spike = step
            if repeated:  # still the same spike: counted, not written again
                return True
        position, batch = self.feed.batch_of(step)
        event = dict(step=step, kind="spike" if spike is not None else "divergence", line=line,
                     loss=float(metrics["loss"]), action=action, batch_position=position,
                     newest_checkpoint_step=max(self.run.checkpointer.steps(), default=None))
        if spike is not None:
            event.update(median=spike.median, ratio=spike.ratio)
        if refused:
            event["refused"] = f"train.max_rewinds={self.train.max_rewinds} rewinds already done"
        directory = forensics.event_directory(self.run.workdir, step, self._events_at[step])
        self._events_at[step] += 1
        self._pending_event = (directory, event, batch)
        if action != "rewind":  # a rewind's event also names the checkpoint it restored
            self._write_forensics()
        if action == "continue":
            self.writer.write(step, dict(metrics, median=spike.median, ratio=spike.ratio),
                              kind="spike")
            self.writer.message(f"{line}; recorded in {directory}")
            return True
        if action == "rewind":
            raise rewind_lib.RewindRequest(step, position, line)
        if divergence is None:
            divergence = self.monitor.explain(step, float(metrics["loss"]),
                                              spike.reason(),
                                              metrics.get("grad_norm_per_layer"))
        if refused:
            divergence.reason += (f"; not rewound: train.max_rewinds={self.train.max_rewinds} "
                                  "rewinds already done")
        self.diverged = divergence
        self.writer.write(step, dict(metrics, skipped_steps=self.monitor.skipped_steps,
                                     **self._overflow_count()))
        return False

    def _write_forensics(self, **extra) -> None:
        directory, event, batch = self._pending_event
        forensics.write(directory, event=dict(event, **extra), batch=batch,
                        history=list(self.history), primary=self.run.primary)
        self.forensics_dirs.append(os.path.relpath(directory, self.run.workdir))

    def rewound(self, checkpoint_step: int, request: rewind_lib.RewindRequest,
                skip: range) -> None:
        """After ``_rewind``: forensics, and forget what the undone steps taught."""
        self.rewinds += 1
        self._write_forensics(rewound_to_step=checkpoint_step,
                              skipped_positions=[skip.start, skip.stop - 1])
        kept = [(s, m) for s, m in self.history if s <= checkpoint_step]
        self.history.clear()
        self.history.extend(kept)
        self.spikes.forget_after(checkpoint_step)
        self.monitor.consecutive_skips = 0
        self._last_spike = None
        self._timer_start = None  # the restore is no step time
        self.writer.rewind(checkpoint_step)
        self.writer.message(
            f"{request.line}; rewound to checkpoint step {checkpoint_step} (rewind "
            f"{self.rewinds} of at most {self.train.max_rewinds}), skipping batch position(s) "
            f"{skip.start}-{skip.stop - 1}; forensics in {self.forensics_dirs[-1]}")

    def _overflow_count(self) -> dict:
        """The running count of float16 overflow steps, in loss-scaled runs' metrics rows."""
        return {"overflow_steps": self.monitor.overflow_steps} if self.run.scaling else {}

    def score_bleu(self, step: int, params, batch_stats=None) -> None:
        """BLEU / chrF of greedy translations of fixed validation pairs (sacreBLEU)."""
        self.bleu = self._bleu_eval(params, batch_stats)
        self.writer.write(step, self.bleu, kind="eval")
        self.writer.message(f"step {step}: BLEU {self.bleu['bleu']:.2f}, chrF "
                            f"{self.bleu['chrf']:.2f}")

    def evaluate(self, step: int, params, batch_stats=None) -> None:
        self.eval = self.run.evaluator(params, batch_stats)
        self.writer.write(step, self.eval, kind="eval")
        self.writer.message(f"step {step}: loss {self.loss:.4f}, eval loss "
                            f"{self.eval['eval_loss']:.4f}, perplexity "
                            f"{self.eval['eval_perplexity']:.2f}")


def _finish(run: _Run, reporter: _Reporter, state, step: int, preempted: str | None,
            started: float) -> dict:
    """The summary (returned, logged, and written to summary.json by the primary)."""
    event, last_eval = reporter.diverged, reporter.eval
    summary = {
        "status": "diverged" if event else "preempted" if preempted else "completed",
        "final_step": event.step if event else step,
        "final_loss": event.loss if event else reporter.loss,
        "final_eval_loss": last_eval["eval_loss"] if last_eval else None,
        "final_eval_perplexity": last_eval["eval_perplexity"] if last_eval else None,
        "divergence": event.line() if event else None,
        "preempted": preempted,
        "final_bleu": reporter.bleu,
        "skipped_steps": reporter.monitor.skipped_steps,
        # Loss spikes seen, rewinds done (train.on_spike) and batches the rewinds skipped;
        # counted from this process's start, like skipped_steps. forensics: the directories
        # written under the workdir (divergence/step_<s>/).
        "spikes": reporter.spike_count,
        "rewinds": reporter.rewinds,
        "skipped_batches": reporter.feed.skipped,
        "forensics": reporter.forensics_dirs,
        # float16 steps dropped for overflowing gradients (the loss scale halved); null when
        # there is no loss scaling. Counted from this process's start, like skipped_steps.
        "overflow_steps": reporter.monitor.overflow_steps if run.scaling else None,
        "loss_scale": float(to_host(state.loss_scale)["scale"]) if run.scaling else None,
        "resumed_from_step": run.start_step or None,
        "checkpoint_steps": run.checkpointer.steps(),
        "num_parameters": run.num_params,
        "dtype": run.model_cfg.dtype,
        "matmul_precision": run.model_cfg.matmul_precision,
        "derived": run.derived,
        "mesh": dict(run.mesh.shape),
        "num_devices": jax.device_count(),
        "num_processes": jax.process_count(),
        "wall_s": round(time.time() - started, 2),
    }
    if event:
        logging.error("%s", event.line())
    if preempted:
        logging.warning("%s", preempted)
    if run.primary:
        with open(os.path.join(run.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
