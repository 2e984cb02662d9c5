"""Shared pieces of the benchmarks: machine description, alternating timer, a JAX train step,
and the model-FLOP count.

Timing rules every script follows: each candidate is compiled and warmed up first, then the
candidates run in alternation (A, B, A, B, ...) so that drift of the machine (frequency, other
load) hits all of them alike, and the reported figure is the median over those runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing
import os
import platform
import statistics
import subprocess
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from deepnorm import Transformer, TransformerConfig
from deepnorm.training.loss import loss_fn


def cpu_model() -> str:
    """The CPU's model name as lscpu prints it (falls back to platform.processor())."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """One line naming the machine, the software and the date, printed above every table."""
    dev = jax.devices()[0]
    where = (f"{dev.platform}: {getattr(dev, 'device_kind', '')}" if dev.platform != "cpu"
             else f"cpu: {cpu_model()}, {os.cpu_count()} cores")
    return f"# {where}; jax {jax.__version__}; {datetime.date.today().isoformat()}"


def median_seconds(fn: Callable[[], None], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls (``fn`` must block on its result)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Median seconds per call: wall clock, and CPU time of the whole process (all threads).

    CPU time is the work done whatever else the machine runs; on a shared machine, where
    other jobs take cores, wall time grows but CPU time barely moves, so both are printed.
    """

    wall: float
    cpu: float


def alternate(runners: dict[str, Callable[[], None]], rounds: int) -> dict[str, Timing]:
    """Runs each runner once per round, in turn; returns each one's median time per call.

    Every runner is called once before timing starts (warm-up: compilation, allocator, caches).
    """
    for run in runners.values():
        run()
    wall: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(rounds):
        # Reverse the order every other round so neither side always runs right after the other.
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            runners[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: Timing(statistics.median(wall[name]), statistics.median(cpu[name]))
            for name in runners}


def add_stack_flags(parser, prefix: str = "") -> None:
    """``--unroll K`` (model.scan_unroll) and ``--unrolled`` (model.scan_layers=False)."""
    parser.add_argument("--unroll", type=int, default=1, help=f"{prefix}model.scan_unroll")
    parser.add_argument("--unrolled", action="store_true",
                        help=f"{prefix}model.scan_layers=False (a Python loop of layers)")


def stack_options(parser, args) -> tuple[dict, str]:
    """The config keys ``add_stack_flags`` set, and words for a header line; a bad pair is a
    one-line parser error, not the config's traceback."""
    if args.unrolled and args.unroll != 1:
        parser.error(f"--unroll={args.unroll} needs the scanned stack; drop --unrolled")
    words = "unrolled stack" if args.unrolled else f"scan_unroll={args.unroll}"
    return dict(scan_layers=not args.unrolled, scan_unroll=args.unroll), words


def random_batch(cfg: TransformerConfig, batch: int, seq: int, seed: int = 0) -> dict:
    """A batch of random non-pad tokens (ids 1..V-1) with all weights 1, as numpy arrays."""
    rng = np.random.default_rng(seed)
    tok = lambda: rng.integers(1, cfg.vocab_size, (batch, seq), dtype=np.int32)  # noqa: E731
    out = {"inputs": tok(), "targets": tok(), "weights": np.ones((batch, seq), np.float32)}
    if cfg.arch == "encoder_decoder":
        out["decoder_inputs"] = tok()
    return out


class JaxTrainer:
    """params + Adam state and one jitted, buffer-donating training step of the deepnorm model.

    The step is the plain one the training loop runs without diagnostics: loss_fn, grad, Adam.
    ``run(n)`` does n steps and blocks on the result, so it can be timed from the outside.
    """

    def __init__(self, cfg: TransformerConfig, batch: dict, *, lr: float = 1e-4, seed: int = 0,
                 abstract: bool = False):
        make = lambda: nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed)), nnx.Param)  # noqa: E731
        self.tx = optax.adam(lr)
        if abstract:  # shapes only: enough to compile (memory_analysis) a model of any size
            model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))
            self.graphdef, params = nnx.split(model, nnx.Param)
            self.state = (params, jax.eval_shape(self.tx.init, params))
            self.batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), batch)
        else:
            self.graphdef, params = make()
            self.state = (params, self.tx.init(params))
            self.batch = jax.device_put(batch)
        graphdef, tx = self.graphdef, self.tx

        def step(state, batch):
            params, opt_state = state

            def loss(p):
                return loss_fn(nnx.merge(graphdef, p), batch)[0]

            value, grads = jax.value_and_grad(loss)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        self.step = jax.jit(step, donate_argnums=0)
        self.lowered = None

    @classmethod
    def abstract(cls, cfg: TransformerConfig, batch: dict, **kw) -> "JaxTrainer":
        """A trainer holding only shapes (``jax.eval_shape``): for compile() and memory."""
        return cls(cfg, batch, abstract=True, **kw)

    def compile(self):
        """Compiles the step (and keeps the compiled object for memory_analysis)."""
        self.lowered = self.step.lower(self.state, self.batch)
        return self.lowered.compile()

    def run(self, n: int = 1) -> float:
        loss = None
        for _ in range(n):
            self.state, loss = self.step(self.state, self.batch)
        return float(loss)  # blocks until the last step is done

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.state[0]))


class LoopStepRunner:
    """The training loop's own step (``make_train_step``, state donated) on one fixed batch.

    Unlike ``JaxTrainer`` (loss, grad, Adam), this is exactly what ``train_and_evaluate`` jits:
    with the loop's metrics and, if asked, its diagnostics (``make_train_step``'s
    ``diagnostics``: a bool or the groups). ``run(n)`` does n steps and blocks on the last loss.
    """

    def __init__(self, cfg: TransformerConfig, batch: dict, *, diagnostics, tx=None,
                 seed: int = 0, label_smoothing: float = 0.0):
        from deepnorm.training.state import create_train_state
        from deepnorm.training.steps import make_train_step

        tx = tx or optax.adam(1e-4)
        self.graphdef, self.state = create_train_state(cfg, tx, seed=seed)
        self.step = jax.jit(make_train_step(self.graphdef, tx, diagnostics=diagnostics,
                                            label_smoothing=label_smoothing),
                            donate_argnums=0)
        self.batch = jax.device_put(batch)

    def run(self, n: int) -> None:
        metrics = None
        for _ in range(n):
            self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics["loss"])


def build_jax_trainer(cfg_kwargs: dict, batch: dict) -> JaxTrainer:
    """A JaxTrainer from plain arguments (picklable, for a Worker process)."""
    return JaxTrainer(TransformerConfig(**cfg_kwargs), batch)


def _worker_main(conn, build, args) -> None:
    runner = build(*args)
    conn.send((runner.num_params(), runner.run(1)))  # also the first (compiling) step
    while True:
        n = conn.recv()
        if n is None:
            return
        # One untimed step first: after the pause between turns the first step of a turn ran
        # up to 25% slower for JAX (d=64 x 100: ~510 vs ~415 ms; thread pool and caches gone
        # cold), a cost of the alternation, not of either framework.
        runner.run(1)
        t0, c0 = time.perf_counter(), time.process_time()
        runner.run(n)
        conn.send((time.perf_counter() - t0, time.process_time() - c0))


class Worker:
    """A trainer living in its own process, run on request: ``run(n) -> (wall, cpu)`` seconds.

    Two frameworks in one process disturb each other: each keeps a thread pool whose idle
    workers spin for a while before sleeping, on the cores the other one needs. On a 2-core
    CPU a JAX step alternated in-process with torch steps took 1.7x its time alone (285 vs
    170 ms, docs/performance.md). In separate processes, with a pause between
    turns, each side runs on idle cores. ``build(*args)`` makes the trainer in the worker.
    """

    def __init__(self, build, *args):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(child, build, args), daemon=True)
        self._proc.start()
        self.num_params, self.loss0 = self._conn.recv()

    def run(self, n: int) -> tuple[float, float]:
        self._conn.send(n)
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._proc.join(timeout=60)


def alternate_workers(workers: dict[str, Worker], rounds: int, steps: int,
                      pause: float = 1.0) -> dict[str, Timing]:
    """Like ``alternate``, over Worker processes; times are per call of ``steps`` steps,
    measured inside each worker. ``pause`` seconds between turns let the idle side's spinning
    threads go to sleep before the other side starts."""
    for w in workers.values():
        w.run(steps)
    wall: dict[str, list[float]] = {name: [] for name in workers}
    cpu: dict[str, list[float]] = {name: [] for name in workers}
    for r in range(rounds):
        order = list(workers) if r % 2 == 0 else list(reversed(workers))
        for name in order:
            time.sleep(pause)
            w, c = workers[name].run(steps)
            wall[name].append(w)
            cpu[name].append(c)
    return {name: Timing(statistics.median(wall[name]), statistics.median(cpu[name]))
            for name in workers}


def forward_flops(cfg: TransformerConfig, batch: int, seq: int, dec_seq: int | None = None) -> int:
    """Matmul FLOPs of one forward pass (2 per multiply-add), counted from the shapes.

    Per layer with n = batch * seq tokens, sequence length T, width d, FFN width f:
      q, k, v, o projections   8 n d^2
      scores QK^T and A V       4 n T d      (the full T x T matrix: XLA computes it all,
                                              also under a causal mask)
      feed-forward              4 n d f
    A decoder layer of encoder_decoder adds cross-attention: q, o on its n_t tokens
    (4 n_t d^2), k, v on the n_s encoder tokens (4 n_s d^2), scores 4 n_t T_s d.
    Plus the output head 2 n d V on the tokens whose logits are computed. Norms, softmax,
    activations, the optimizer and the embedding gather are not counted (the usual MFU
    convention, Chowdhery et al. 2022, PaLM appendix B).
    """
    d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size

    def layer(n, t):
        return 8 * n * d * d + 4 * n * t * d + 4 * n * d * f

    if cfg.arch != "encoder_decoder":
        n = batch * seq
        return cfg.num_layers * layer(n, seq) + 2 * n * d * v
    t_dec = dec_seq or seq
    n_s, n_t = batch * seq, batch * t_dec
    enc = cfg.num_encoder_layers * layer(n_s, seq)
    cross = 4 * n_t * d * d + 4 * n_s * d * d + 4 * n_t * seq * d
    dec = cfg.num_decoder_layers * (layer(n_t, t_dec) + cross)
    return enc + dec + 2 * n_t * d * v


def train_flops(cfg: TransformerConfig, batch: int, seq: int, dec_seq: int | None = None) -> int:
    """Model FLOPs of one training step: forward + backward = 3 x forward (the backward pass
    computes two matmuls per forward matmul). Rematerialised recomputation is NOT counted:
    it is work the hardware does, but not model FLOPs (MFU, not HFU)."""
    return 3 * forward_flops(cfg, batch, seq, dec_seq)


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
    """The machine's measured matmul rate: an n^3 matmul through XLA, FLOP/s.

    Products are summed into float32, as in the model (for bfloat16 inputs this is the dot
    that runs on AMX on XLA:CPU: deepnorm.layers.bf16_matmul). The fastest of ``repeats``
    runs (a peak is what the hardware can do; on a machine shared with other jobs the median
    of a 64 ms matmul moved by 2x between runs here).
    """
    key = jax.random.PRNGKey(0)
    a = jax.random.normal(key, (n, n), dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype)
    mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / min(times)
