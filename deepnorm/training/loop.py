"""``train_and_evaluate(config, workdir)``: the whole run, importable (train.py is a shell).

One pass through the setup (every bad value fails here, as ``ConfigError``, before anything
is compiled), then the hot loop: a jitted, donated, sharded ``train_step`` per batch. The
metrics of step ``s`` are fetched to the host only after step ``s + 1`` has been launched, so
logging never leaves the device idle (nanodo's trick); checkpoint and eval steps synchronize.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import numpy as np

from deepnorm.config import ConfigError, TransformerConfig
from deepnorm.initializers import describe
from deepnorm.training import bleu as bleu_lib
from deepnorm.training import checkpoint as checkpoint_lib
from deepnorm.training import divergence as divergence_lib
from deepnorm.training import hugepages
from deepnorm.training import mesh as mesh_lib
from deepnorm.training import preemption as preemption_lib
from deepnorm.training import validation
from deepnorm.training.data import DataSource
from deepnorm.training.metrics import MetricsWriter
from deepnorm.training.optim import make_optimizer
from deepnorm.training.state import abstract_params, abstract_train_state, create_train_state
from deepnorm.training.platform import resolve_model_config
from deepnorm.training.steps import make_eval_step, make_train_step

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
                 "checkpoint_every", "keep_checkpoints", "max_consecutive_skips"):
        value = train[name]
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"train.{name}={value!r} must be a positive integer")
    if train.on_nonfinite not in divergence_lib.POLICIES:
        raise ConfigError(f"train.on_nonfinite={train.on_nonfinite!r} is not one of "
                          f"{', '.join(divergence_lib.POLICIES)}")
    if train.diagnostics not in DIAGNOSTICS:
        raise ConfigError(f"train.diagnostics={train.diagnostics!r} is not one of "
                          f"{', '.join(DIAGNOSTICS)}")
    if not train.max_loss > 0:
        raise ConfigError(f"train.max_loss={train.max_loss!r} must be positive")


def derived_constants(model_cfg: TransformerConfig, config) -> dict:
    """What the DeepNet maintainers ask first about a diverged run, flat, for the logs."""
    out = {k: float(v) for k, v in describe(model_cfg).items()}
    out.update(learning_rate=float(config.optimizer.learning_rate),
               warmup_steps=int(config.optimizer.warmup_steps),
               schedule=config.optimizer.schedule, b1=float(config.optimizer.b1),
               b2=float(config.optimizer.b2), batch_size=int(config.train.batch_size),
               seq_len=int(config.train.seq_len))
    return out


def _stack_words(model_cfg: TransformerConfig) -> str:
    """How the layers run, in the start line when it is not the default one-layer scan."""
    if not model_cfg.scan_layers:
        return "unrolled stack; "
    return f"{model_cfg.scan_unroll} layers per scan trip; " if model_cfg.scan_unroll > 1 else ""


def _start_line(model_cfg: TransformerConfig, derived: dict, num_params: int, mesh) -> str:
    stacks = "; ".join(
        f"{s} alpha={derived[f'{s}_alpha']:.4g} beta(branch gain)="
        f"{derived[f'{s}_branch_gain']:.4g}"
        for s in ("encoder", "decoder") if f"{s}_alpha" in derived)
    return (f"{model_cfg.arch} N={model_cfg.encoder_layers} M={model_cfg.decoder_layers} "
            f"d={model_cfg.d_model} residual={model_cfg.residual} norm={model_cfg.norm} "
            f"init={model_cfg.resolved_init}; {stacks}; lr={derived['learning_rate']:g} "
            f"({derived['schedule']}, warmup {derived['warmup_steps']}) adam b1="
            f"{derived['b1']:g} b2={derived['b2']:g}; batch {derived['batch_size']} x "
            f"{derived['seq_len']}; {num_params:,} params; mesh {dict(mesh.shape)} over "
            f"{jax.device_count()} devices, {jax.process_count()} process(es); remat "
            f"{model_cfg.remat_policy}; "
            + _stack_words(model_cfg)
            + f"{model_cfg.dtype} matmuls; {hugepages.describe()}")


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

    def __call__(self, params) -> dict:
        self.iterator.set_state(self.start)
        nll = tokens = 0.0
        for _ in range(self.num_batches):
            out = to_host(self.eval_step(params, self.data.to_global(next(self.iterator))))
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
    # Platform-dependent "auto" values are chosen here, once, before any model is built.
    model_cfg = resolve_model_config(TransformerConfig.from_mapping(config.model))
    train = config.train
    check_train_config(train)
    # Everything is validated before the workdir is created (deepnorm.training.validation).
    workdir = validation.check_workdir(workdir)
    validation.check_data(config.data)
    primary = jax.process_index() == 0

    mesh = mesh_lib.make_mesh(config.mesh)
    rules = mesh_lib.sharding_rules(config.mesh)
    mesh_lib.check_batch_size(train.batch_size, mesh, jax.process_count())
    data = DataSource(config, model_cfg, mesh)
    tx, schedule = make_optimizer(config.optimizer, train.num_steps)
    graphdef, param_state = abstract_params(model_cfg, train.seed)
    shardings = mesh_lib.state_shardings(mesh, tx, param_state, rules)
    train_iter = data.iterator("train")
    evaluator = _Evaluator(data, jax.jit(make_eval_step(graphdef),
                                         in_shardings=(shardings.params, data.sharding)),
                           train.eval_steps)
    if primary:
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--workdir={workdir} cannot be created: {err.strerror}") from err
    checkpointer = checkpoint_lib.Checkpointer(workdir, every=train.checkpoint_every,
                                               keep=train.keep_checkpoints,
                                               async_save=train.async_checkpoints)
    abstract = checkpoint_lib.abstract_like(abstract_train_state(model_cfg, tx, train.seed),
                                            shardings)
    state, start_step = checkpointer.restore_latest(
        abstract, train_iter, changed_keys=validation.changed_config_keys(workdir, config))
    finished = _finished_summary(workdir, start_step, train.num_steps)
    if finished is not None:
        checkpointer.close()
        logging.info("%s already completed %d steps; nothing to do (raise "
                     "train.num_steps to continue)", workdir, start_step)
        return finished
    if state is None:
        admin_batch = data.first_batch() if model_cfg.residual == "admin" else None
        graphdef, state = create_train_state(model_cfg, tx, train.seed, shardings=shardings,
                                             admin_batch=admin_batch)
    if primary:
        write_resolved_config(workdir, config, resuming=start_step > 0)

    derived = derived_constants(model_cfg, config)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    logging.info("%s", _start_line(model_cfg, derived, num_params, mesh))
    if start_step:
        logging.info("resuming from checkpoint step %d in %s", start_step, workdir)

    diagnostics = train.diagnostics != "off"
    step_kwargs = dict(label_smoothing=float(config.optimizer.label_smoothing),
                       skip_nonfinite=train.on_nonfinite == "skip")
    jit_step = lambda diag: jax.jit(  # noqa: E731
        make_train_step(graphdef, tx, diagnostics=diag, **step_kwargs),
        in_shardings=(shardings, data.sharding),
        out_shardings=(shardings, mesh_lib.replicated(mesh)), donate_argnums=0)
    full_step = jit_step(diagnostics)
    # "log_steps": the per-layer reductions only on the steps that are logged.
    light_step = jit_step(False) if train.diagnostics == "log_steps" else full_step

    monitor = divergence_lib.DivergenceMonitor(
        divergence_lib.layer_names(model_cfg.encoder_layers, model_cfg.decoder_layers),
        policy=train.on_nonfinite, max_loss=float(train.max_loss),
        max_consecutive_skips=train.max_consecutive_skips)
    writer = MetricsWriter(workdir, primary=primary, start_step=start_step,
                           num_steps=train.num_steps, progress=train.progress_bar)
    bleu_every = int(train.get("bleu_every", 0))  # BLEU hook: deepnorm.training.bleu
    if bleu_every > 0 and model_cfg.arch != "encoder_decoder":
        raise ConfigError(f"train.bleu_every={bleu_every} needs model.arch='encoder_decoder' "
                          f"(got {model_cfg.arch!r}); set train.bleu_every=0")
    bleu = bleu_lib.loop_bleu_eval(config, graphdef, data) if bleu_every > 0 else None
    tokens_per_step = train.batch_size * train.seq_len
    last = {"loss": None, "eval": None, "diverged": None}
    timer = {"t": None, "steps": 0}

    def is_logged(step: int) -> bool:
        """Every log_every-th step, plus the first (the starting loss) and the last."""
        return step % train.log_every == 0 or step in (1, train.num_steps)

    def handle(step: int, metrics_device) -> bool:
        """Host side of step ``step`` (1-based count of finished updates); False = stop."""
        metrics = to_host(metrics_device)
        writer.advance()
        last["loss"] = float(metrics["loss"])
        event = monitor.observe(step, metrics)
        if event is not None:
            last["diverged"] = event
            writer.write(step, dict(metrics, learning_rate=schedule(step - 1),
                                    skipped_steps=monitor.skipped_steps))
            return False
        now = time.time()
        if timer["t"] is None:  # the first step includes compilation: time from its end
            timer["t"], timer["steps"] = now, 0
        else:
            timer["steps"] += 1
        if is_logged(step):
            elapsed = now - timer["t"]
            row = dict(metrics, learning_rate=schedule(step - 1),
                       tokens_per_s=(timer["steps"] * tokens_per_step / elapsed
                                     if timer["steps"] and elapsed > 0 else float("nan")),
                       steps_per_s=timer["steps"] / elapsed if elapsed > 0 else float("nan"))
            if train.on_nonfinite == "skip":
                row["skipped_steps"] = monitor.skipped_steps
            writer.write(step, row)
            timer["t"], timer["steps"] = now, 0
        return True

    pending = None  # (step, device metrics) launched but not yet looked at on the host
    step = start_step
    preempted = None  # the line saying where a SIGTERM / SIGINT stopped the run
    guard = preemption_lib.PreemptionGuard().install()
    try:
        while step < train.num_steps:
            batch = data.to_global(next(train_iter))
            state, metrics = (full_step if is_logged(step + 1) else light_step)(state, batch)
            step += 1
            previous, pending = pending, (step, metrics)
            if previous is not None and not handle(*previous):
                break
            final = step == train.num_steps
            if checkpointer.due(step) or step % train.eval_every == 0 or final:
                previous, pending = pending, None  # checkpoints and evals synchronize
                if not handle(*previous):
                    break
                if checkpointer.due(step) or final:
                    checkpointer.save(step, state, train_iter)
                if step % train.eval_every == 0 or final:
                    last["eval"] = evaluator(state.params)
                    writer.write(step, last["eval"], kind="eval")
                    writer.message(f"step {step}: loss {last['loss']:.4f}, eval loss "
                                   f"{last['eval']['eval_loss']:.4f}, perplexity "
                                   f"{last['eval']['eval_perplexity']:.2f}")
            if bleu is not None and (step % bleu_every == 0 or final):
                last["bleu"] = bleu(state.params)
                writer.write(step, last["bleu"], kind="eval")
                writer.message(f"step {step}: BLEU {last['bleu']['bleu']:.2f}, chrF "
                               f"{last['bleu']['chrf']:.2f}")
            if step < train.num_steps and guard.requested():
                previous, pending = pending, None
                if previous is not None and not handle(*previous):
                    break  # diverged on this very step: nothing worth checkpointing
                checkpointer.save(step, state, train_iter)
                preempted = (f"preempted by {guard.signal_name} at step {step} of "
                             f"{train.num_steps}; checkpoint {checkpointer.directory}/{step}; "
                             "run the same command to resume")
                break
        else:
            if pending is not None:
                handle(*pending)
    finally:
        guard.uninstall()
        checkpointer.close()
        writer.close()
    checkpoint_steps = checkpointer.steps()

    event = last["diverged"]
    summary = {
        "status": "diverged" if event else "preempted" if preempted else "completed",
        "final_step": event.step if event else step,
        "final_loss": event.loss if event else last["loss"],
        "final_eval_loss": last["eval"]["eval_loss"] if last["eval"] else None,
        "final_eval_perplexity": last["eval"]["eval_perplexity"] if last["eval"] else None,
        "divergence": event.line() if event else None,
        "preempted": preempted,
        "final_bleu": last.get("bleu"),
        "skipped_steps": monitor.skipped_steps,
        "resumed_from_step": start_step or None,
        "checkpoint_steps": checkpoint_steps,
        "num_parameters": num_params,
        "derived": derived,
        "mesh": dict(mesh.shape),
        "num_devices": jax.device_count(),
        "num_processes": jax.process_count(),
        "wall_s": round(time.time() - started, 2),
    }
    if event:
        logging.error("%s", event.line())
    if preempted:
        logging.warning("%s", preempted)
    if primary:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary
