"""What one cell of a learning-rate sweep costs: the stability map's vmapped row against the
same cells run one at a time.

    python benchmarks/sweep_throughput.py                 # 4 rates x 100 steps, 6-layer 64-wide
    python benchmarks/sweep_throughput.py --quick         # 2 rates x 20 steps
    python benchmarks/sweep_throughput.py --depth 50 --scheme post

Three ways to get the same cells (scheme, depth, peak rate; the stability map's decoder-only
byte LM, AdamW with DeepNet's betas, no warmup, batch 8 x 32 tokens), each timed wall-clock
from nothing to the final validation loss, compilation and start-up included, because that is
what a researcher pays per cell:

  sweep       ``stability_map.run``: all rates of the row in one compiled, vmapped scan.
  one-by-one  ``stability_map.run_row`` once per rate in this process: one compile per cell.
  train.py    ``python train.py`` once per rate, the config matched to the cell (eval at the
              end only, one checkpoint): a fresh process per cell.

The figure is a ratio measured in one run: seconds per cell of each way over the sweep's.
A torchscale row (one cell at a time in PyTorch) is not built; ``benchmarks/vs_torchscale.py``
compares the step itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import bench_common as bc  # noqa: E402
from configs.analysis import stability_map as map_config  # noqa: E402
from deepnorm import TransformerConfig  # noqa: E402
from deepnorm.analysis import stability_map  # noqa: E402

BATCH, SEQ = 8, 32


def train_py_command(scheme: str, depth: int, lr: float, steps: int, workdir: str) -> list[str]:
    """``train.py`` flags for one cell: the stability map's model, optimizer and batch."""
    model = dict(map_config.MODEL, num_layers=depth, residual=scheme)
    flags = [f"--config.model.{k}={v}" for k, v in model.items()]
    flags += [f"--config.optimizer.learning_rate={lr}", "--config.optimizer.warmup_steps=0",
              "--config.optimizer.weight_decay=0.0", "--config.optimizer.schedule=constant",
              "--config.optimizer.label_smoothing=0.0"]
    flags += [f"--config.train.{k}={v}" for k, v in dict(
        num_steps=steps, batch_size=BATCH, seq_len=SEQ, log_every=steps, eval_every=steps,
        eval_steps=stability_map.EVAL_BATCHES, checkpoint_every=steps,
        progress_bar=False).items()]
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config=configs/decoder_lm.py",
            f"--workdir={workdir}", *flags]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--scheme", default="deepnorm")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2")
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args(argv)
    lrs = [float(x) for x in args.lrs.split(",")]
    steps = args.steps
    if args.quick:
        lrs, steps = lrs[:2], 20
    base = TransformerConfig(**map_config.MODEL)
    kw = dict(num_steps=steps, batch_size=BATCH, seq_len=SEQ)
    print(bc.machine_line())
    print(f"# {args.scheme} L={args.depth}, {len(lrs)} rates, {steps} steps per cell")

    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        swept = stability_map.run(base, out=os.path.join(tmp, "sweep"), schemes=[args.scheme],
                                  depths=[args.depth], lrs=lrs, warmups=[0], log=lambda _: None,
                                  **kw)
        seconds["sweep"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        single = []
        for lr in lrs:
            single += stability_map.run_row(base, stability_map.Row(args.scheme, args.depth, 0),
                                            [lr], [0], **kw)
        seconds["one-by-one"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        for n, lr in enumerate(lrs):
            cmd = train_py_command(args.scheme, args.depth, lr, steps, os.path.join(tmp, str(n)))
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"train.py failed for lr={lr}: {done.stderr[-2000:]}")
        seconds["train.py"] = time.perf_counter() - t0

    # The two in-process ways compute the same cells: same losses up to vmap's float order.
    for a, b in zip(swept, single):
        if a["final_loss"] is not None and b["final_loss"] is not None:
            assert abs(a["final_loss"] - b["final_loss"]) < 1e-3 * max(1.0, a["final_loss"]), (
                a, b)
    per_cell = {k: v / len(lrs) for k, v in seconds.items()}
    print(f"{'way':<12} {'s/cell':>8} {'x sweep':>8}")
    for k, v in per_cell.items():
        print(f"{k:<12} {v:8.2f} {v / per_cell['sweep']:8.2f}")
    return per_cell


if __name__ == "__main__":
    main()
