"""The stability map: which residual schemes train at which depth, peak learning rate, warmup
and matmul precision.

Each cell (scheme, depth, precision, warmup, peak lr, seed) is a short run through the training package's
own pieces (``make_optimizer``, ``create_train_state``, ``make_train_step``,
``make_eval_step``), recording the final validation loss or divergence (a non-finite loss or
one above ``max_loss``, the training loop's definition) and the step where it happened. The
precision is ``model.dtype``: float32, or float16 matmuls with the training loop's dynamic loss
scaling (``deepnorm.training.loss_scale``), whose overflow steps are skipped and, as in the
loop, are no divergence. The claims it tests: Post-LN needs
warmup and fails at depth and high learning rate (Xiong et al. 2020; Liu et al. 2020), Pre-LN
trains without warmup (Xiong et al. 2020), DeepNorm trains deep Post-LN-style stacks (Wang et
al. 2022, DeepNet).

Speed: the learning rate is a vmapped axis. ``make_optimizer``'s updates are linear in the peak
learning rate (AdamW's update is ``-lr * shape(t) * (adam + wd * p)``), so one optimizer built
at lr = 1 followed by a per-lane ``scale(lr)`` is exactly each lane's own optimizer; a row of
learning rates is then one compiled ``lax.scan`` over steps. Rows (scheme, depth, precision,
warmup) can run side by side in worker processes.

Resumable: each finished cell is one JSON file in ``DIR/cells/``; a rerun computes only missing
cells, so an interrupted map continues where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import pathlib
import time

import numpy as np
from ml_collections import config_dict

from deepnorm.analysis import schemes as schemes_lib
from deepnorm.training import loss_scale as loss_scale_lib

DEFAULT_MAX_LOSS = 100.0  # train.max_loss's default: a finite loss above it is divergence
EVAL_BATCHES = 4


@dataclasses.dataclass(frozen=True)
class Row:
    """Cells sharing one compiled program: everything but the learning rate and seed."""

    scheme: str
    depth: int
    warmup_steps: int
    dtype: str = "float32"  # model.dtype: the matmul precision


def cell_key(scheme, depth, warmup_steps, peak_lr, seed, dtype="float32") -> str:
    """The file name of one cell's result (stable across runs, so reruns find it)."""
    return f"{scheme}_L{depth}_{dtype}_w{warmup_steps}_lr{peak_lr:.3g}_s{seed}"


def row_config(base_cfg, row: Row):
    """The model one row trains: ``row.scheme``'s fields at ``row.depth``, in ``row.dtype``."""
    return dataclasses.replace(schemes_lib.scheme_config(base_cfg, row.scheme, row.depth),
                               dtype=row.dtype)


def divergence_steps(losses_TxN, finite_TxN, overflow_TxN, max_loss):
    """Per lane, the first step (1-based) that diverged, or None: a non-finite loss, a loss
    above ``max_loss``, or non-finite gradients that were not a float16 overflow (one the loss
    scale fixes by halving, ``overflow`` = 1); the training loop's rule
    (``deepnorm.training.divergence``)."""
    bad = (~np.isfinite(losses_TxN) | (losses_TxN > max_loss)
           | ((finite_TxN == 0) & (overflow_TxN == 0)))
    return [int(np.argmax(bad[:, n])) + 1 if bad[:, n].any() else None
            for n in range(bad.shape[1])]


def lane_optimizer(opt_config, warmup_steps: int, num_steps: int):
    """``make_optimizer`` at learning rate 1 chained with a per-lane ``scale(lr)``.

    ``opt_config`` is an ``optimizer`` block; its ``learning_rate`` and ``warmup_steps`` (if
    any) are replaced by 1 and the row's ``warmup_steps``.

    Returns (tx, set_lr): ``set_lr(opt_state, lr)`` writes a lane's peak learning rate into its
    optimizer state (the injected scale's hyperparameter).
    """
    import optax

    from deepnorm.training.optim import make_optimizer

    unit = config_dict.ConfigDict(opt_config.to_dict())
    unit.learning_rate = 1.0
    unit.warmup_steps = warmup_steps
    tx_unit, _ = make_optimizer(unit, num_steps)
    tx = optax.chain(tx_unit, optax.inject_hyperparams(optax.scale)(step_size=1.0))

    def set_lr(opt_state, lr):
        inner, scale_state = opt_state
        hyper = dict(scale_state.hyperparams, step_size=lr)
        return (inner, scale_state._replace(hyperparams=hyper))

    return tx, set_lr


def run_row(base_cfg, row: Row, lrs, seeds, *, num_steps, batch_size, seq_len,
            opt_config=None, data_config=None, max_loss=DEFAULT_MAX_LOSS,
            initial_loss_scale=loss_scale_lib.INITIAL_SCALE,
            loss_scale_period=loss_scale_lib.DEFAULT_PERIOD) -> list[dict]:
    """Trains every (lr, seed) lane of ``row`` at once; returns one result per lane.

    ``opt_config``: the ``optimizer`` block (default: ``train_steps.optimizer_config``);
    ``data_config``: the ``data`` block (default: the embedded corpus);
    ``initial_loss_scale`` / ``loss_scale_period``: float16 rows' dynamic loss scale
    (``train.initial_loss_scale`` / ``train.loss_scale_period``; unused in float32)."""
    import jax
    import jax.numpy as jnp

    from deepnorm.analysis.batches import stacked_batches
    from deepnorm.training.state import create_train_state
    from deepnorm.training.steps import make_eval_step, make_train_step

    from deepnorm.analysis.train_steps import optimizer_config

    cfg = row_config(base_cfg, row)
    scaling = loss_scale_lib.uses_loss_scaling(cfg.dtype)
    if opt_config is None:
        opt_config = optimizer_config(learning_rate=1.0)
    tx, set_lr = lane_optimizer(opt_config, row.warmup_steps, num_steps)
    train = stacked_batches(data_config, arch=cfg.arch, num_batches=num_steps,
                            batch_size=batch_size, seq_len=seq_len, seed=0)
    valid = stacked_batches(data_config, arch=cfg.arch, num_batches=EVAL_BATCHES,
                            batch_size=batch_size, seq_len=seq_len, seed=1, split="validation")
    lanes = [(lr, seed) for lr in lrs for seed in seeds]
    states = []
    for seed in seeds:
        first_batch = {k: jnp.asarray(v[0]) for k, v in train.items()}
        graphdef, state = create_train_state(
            cfg, tx, seed, admin_batch=first_batch,
            loss_scale=float(initial_loss_scale) if scaling else 1.0)
        states.append(state)
    lane_states = [states[seeds.index(seed)].replace(
        opt_state=set_lr(states[seeds.index(seed)].opt_state, jnp.float32(lr)))
        for lr, seed in lanes]
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *lane_states)
    train_step = make_train_step(graphdef, tx, diagnostics=False,
                                 label_smoothing=float(opt_config.label_smoothing),
                                 z_loss=float(opt_config.get("z_loss", 0.0)),
                                 loss_scale_period=int(loss_scale_period) if scaling else None)
    eval_step = make_eval_step(graphdef)

    @jax.jit
    def run(state, train_batches, valid_batches):
        def body(s, batch):
            s, m = jax.vmap(train_step, in_axes=(0, None))(s, batch)
            overflow = m.get("overflow", jnp.zeros_like(m["finite"]))  # float32: never
            return s, (m["loss"], m["finite"], overflow)

        state, per_step = jax.lax.scan(body, state, train_batches)

        def evaluate(params):
            def one(batch):
                m = eval_step(params, batch)
                return m["nll_sum"], m["num_tokens"]
            sums, counts = jax.lax.map(one, valid_batches)
            return jnp.sum(sums) / jnp.maximum(jnp.sum(counts), 1.0)

        return per_step, jax.vmap(evaluate)(state.params), state.loss_scale["scale"]

    start = time.perf_counter()
    (losses_TxN, finite_TxN, overflow_TxN), eval_N, scale_N = jax.device_get(
        run(stacked, jax.tree.map(jnp.asarray, train), jax.tree.map(jnp.asarray, valid)))
    seconds = time.perf_counter() - start
    diverged_at = divergence_steps(losses_TxN, finite_TxN, overflow_TxN, max_loss)
    results = []
    for n, (lr, seed) in enumerate(lanes):
        losses = losses_TxN[:, n]
        final = float(eval_N[n])
        results.append({
            "residual": row.scheme, "num_layers": row.depth, "dtype": row.dtype,
            "warmup_steps": row.warmup_steps,
            "peak_lr": float(lr), "seed": seed, "num_steps": num_steps,
            "diverged": bool(diverged_at[n] is not None or not np.isfinite(final)),
            "diverged_at_step": diverged_at[n],
            # float16: steps skipped for overflowing gradients and the scale at the end
            "overflow_steps": int(overflow_TxN[:, n].sum()) if scaling else None,
            "final_loss_scale": float(scale_N[n]) if scaling else None,
            "final_loss": final if np.isfinite(final) else None,
            "final_train_loss": float(np.mean(losses[-max(1, num_steps // 10):])),
            "initial_loss": float(losses[0]),
            "row_seconds": round(seconds, 2),
        })
    return results


def _row_worker(args):
    """Entry point of a worker process: one row, written cell by cell."""
    base_cfg, row, lrs, seeds, kwargs, cells_dir = args
    kwargs = {k: config_dict.ConfigDict(v) if isinstance(v, dict) else v
              for k, v in kwargs.items()}
    results = run_row(base_cfg, row, lrs, seeds, **kwargs)
    for r in results:
        write_cell(cells_dir, r)
    return results


def write_cell(cells_dir: pathlib.Path, result: dict) -> None:
    """Writes one cell atomically (a crash never leaves a half-written file to be trusted)."""
    key = cell_key(result["residual"], result["num_layers"], result["warmup_steps"],
                   result["peak_lr"], result["seed"], result["dtype"])
    tmp = cells_dir / f"{key}.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(cells_dir / f"{key}.json")


def read_cell(cells_dir: pathlib.Path, key: str) -> dict | None:
    path = cells_dir / f"{key}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _with_new_model_fields(old: dict) -> dict:
    """``old`` setup with the model fields added to ``TransformerConfig`` since it was written
    at their defaults: a field the cells' code did not have cannot have changed them."""
    from deepnorm import TransformerConfig

    if "base_model" not in old:
        return old
    defaults = json.loads(json.dumps(
        {f.name: f.default for f in dataclasses.fields(TransformerConfig)
         if f.default is not dataclasses.MISSING}, default=str))
    return dict(old, base_model={**defaults, **old["base_model"]})


def _check_setup(cells_dir: pathlib.Path, setup: dict) -> None:
    """Cell files are named by scheme, depth, warmup, rate and seed only; everything else they
    depend on is ``setup``, written once to ``cells/setup.json``. A rerun with another setup
    in the same directory fails instead of mixing cells of two experiments."""
    from deepnorm.config import ConfigError

    setup = json.loads(json.dumps(setup, default=str))  # the form it takes on disk
    path = cells_dir / "setup.json"
    if path.exists():
        old = _with_new_model_fields(json.loads(path.read_text()))
        if old != setup:
            diff = sorted(k for k in set(old) | set(setup) if old.get(k) != setup.get(k))
            raise ConfigError(f"{cells_dir} holds cells of another setup (differs in "
                              f"{', '.join(diff)}); give a new output directory")
        return
    cells_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(setup, indent=1))


def rows_of(schemes, depths, warmups, dtypes, keep=None) -> list[Row]:
    """Every row of the grid, in order, less those ``keep(row)`` rejects."""
    rows = [Row(scheme, depth, warmup, dtype) for scheme in schemes for depth in depths
            for dtype in dtypes for warmup in warmups]
    return [row for row in rows if keep is None or keep(row)]


def run(base_cfg, *, out, schemes, depths, lrs, warmups, num_steps, batch_size, seq_len,
        seeds=(0,), dtypes=None, keep=None, opt_config=None, data_config=None,
        max_loss=DEFAULT_MAX_LOSS, initial_loss_scale=loss_scale_lib.INITIAL_SCALE,
        loss_scale_period=loss_scale_lib.DEFAULT_PERIOD, workers=1, log=print) -> list[dict]:
    """Every cell of schemes x depths x dtypes x warmups x lrs x seeds, computing only
    missing ones.

    ``dtypes``: the precisions (``model.dtype`` values; default: the base model's own);
    ``keep(row)``: rows it returns False for are left out (a depth cap per scheme or
    precision); ``opt_config`` / ``data_config`` / loss scale: as in ``run_row``."""
    cells_dir = pathlib.Path(out) / "cells"
    seeds = list(seeds)
    dtypes = [base_cfg.dtype] if dtypes is None else list(dtypes)
    # Plain dicts: they travel to spawned worker processes.
    kwargs = dict(num_steps=num_steps, batch_size=batch_size, seq_len=seq_len,
                  max_loss=float(max_loss), initial_loss_scale=float(initial_loss_scale),
                  loss_scale_period=int(loss_scale_period),
                  opt_config=None if opt_config is None else opt_config.to_dict(),
                  data_config=None if data_config is None else data_config.to_dict())
    # The base model's dtype is each row's own choice, not part of the setup.
    base_model = dict(dataclasses.asdict(base_cfg), dtype=None)
    _check_setup(cells_dir, dict(kwargs, base_model=base_model))
    rows = rows_of(schemes, depths, warmups, dtypes, keep)

    def key(row, lr, seed):
        return cell_key(row.scheme, row.depth, row.warmup_steps, lr, seed, row.dtype)

    jobs = []
    for row in rows:
        missing = [lr for lr in lrs
                   if any(read_cell(cells_dir, key(row, lr, s)) is None for s in seeds)]
        if missing:
            jobs.append((row, missing))
    log(f"stability-map: {len(jobs)} rows to run, {len(rows) - len(jobs)} already finished "
        f"in {cells_dir}")
    args = [(base_cfg, row, missing, seeds, kwargs, cells_dir) for row, missing in jobs]

    def report(row, results):
        log(f"  {row.scheme} L={row.depth} {row.dtype} warmup={row.warmup_steps}: "
            f"{results[0]['row_seconds']:.1f}s")

    if workers > 1 and len(args) > 1:
        # spawn: a forked JAX process is unsafe; each worker starts its own runtime.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            for (row, _), results in zip(jobs, pool.map(_row_worker, args)):
                report(row, results)
    else:
        for a in args:
            report(a[1], _row_worker(a))
    cells = []
    for row in rows:
        for lr in lrs:
            for seed in seeds:
                cell = read_cell(cells_dir, key(row, lr, seed))
                if cell is None:
                    raise RuntimeError(f"cell {row.scheme} L={row.depth} {row.dtype} warmup="
                                       f"{row.warmup_steps} lr={lr} seed={seed} was not written")
                cells.append(cell)
    return cells
