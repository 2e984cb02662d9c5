"""What the training loop costs on top of its step: train_and_evaluate's tokens/s against the
same jitted step run back to back on one fixed batch.

    python benchmarks/loop_overhead.py            # configs/deepnorm.py, 60 steps
    python benchmarks/loop_overhead.py --quick    # 20 steps

The loop does per step what the bare step does not: draw the next batch from the grain
pipeline and put it on the mesh, look at the previous step's metrics on the host (one step
late, so the device is never idle waiting for Python), the divergence check, the per-layer
diagnostics (``train.diagnostics``, every step by default), metrics.jsonl / TensorBoard rows
every ``log_every`` steps, and the progress bar. Checkpoints and evals are pushed past the end of
the run except the final ones, which fall outside the timed window (the loop's tokens/s is
measured between logged steps, from the end of the first step, so compilation is excluded).

The anchor is the loop's own step function (``make_train_step``, diagnostics off, state
donated) on the first batch of the same pipeline, measured before and after the loop run; the
ratio uses the mean of the two anchors so drift of the machine during the run cancels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deepnorm.training import hugepages  # noqa: E402

if __name__ == "__main__":
    hugepages.reexec_with_hugepages(by_default=True)

import bench_common as bc  # noqa: E402
from configs import deepnorm as deepnorm_config  # noqa: E402
from deepnorm import TransformerConfig  # noqa: E402
from deepnorm.training import mesh as mesh_lib  # noqa: E402
from deepnorm.training.data import DataSource  # noqa: E402
from deepnorm.training.loop import train_and_evaluate  # noqa: E402
from deepnorm.training.optim import make_optimizer  # noqa: E402


def bare_step_seconds(config, repeats: int, steps: int) -> float:
    """Median seconds per step of the jitted step alone, on one fixed batch."""
    model_cfg = TransformerConfig.from_mapping(config.model)
    batch = DataSource(config, model_cfg, mesh_lib.make_mesh(config.mesh)).first_batch()
    tx, _ = make_optimizer(config.optimizer, config.train.num_steps)
    runner = bc.LoopStepRunner(model_cfg, batch, diagnostics=False, tx=tx,
                               seed=config.train.seed,
                               label_smoothing=float(config.optimizer.label_smoothing))
    runner.run(steps)  # compile and warm up
    return bc.median_seconds(lambda: runner.run(steps), repeats) / steps


def loop_tokens_per_s(config, workdir: str) -> list[float]:
    """tokens/s of every logged step after the first two (compile, warm-up)."""
    summary = train_and_evaluate(config, workdir)
    assert summary["status"] == "completed", summary
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    rates = [r["tokens_per_s"] for r in rows
             if r.get("kind") == "train" and r.get("tokens_per_s") is not None
             and not math.isnan(r["tokens_per_s"])]
    return rates[1:]


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="20 steps instead of 60")
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args(argv)
    num_steps = 20 if args.quick else args.steps
    config = deepnorm_config.get_config()
    train = config.train
    train.num_steps, train.log_every = num_steps, 5
    train.eval_every = train.checkpoint_every = 10 * num_steps  # only the final ones
    train.progress_bar = False
    tokens_per_step = train.batch_size * train.seq_len

    print(bc.machine_line() + f"; {hugepages.describe()}")
    print(f"# configs/deepnorm.py ({config.model.arch}, {config.model.num_encoder_layers}+"
          f"{config.model.num_decoder_layers} layers, d={config.model.d_model}), batch "
          f"{train.batch_size}x{train.seq_len}, {num_steps} loop steps, diagnostics="
          f"{train.diagnostics}, log_every={train.log_every}")
    before = bare_step_seconds(config, repeats=5, steps=3)
    with tempfile.TemporaryDirectory() as workdir:
        rates = loop_tokens_per_s(config, workdir)
    after = bare_step_seconds(config, repeats=5, steps=3)
    bare = tokens_per_step / ((before + after) / 2)
    loop = statistics.median(rates)
    print(f"{'':<26}{'tokens/s':>10}")
    print(f"{'bare step (before run)':<26}{tokens_per_step / before:>10,.0f}")
    print(f"{'train_and_evaluate':<26}{loop:>10,.0f}   (median of {len(rates)} logged windows)")
    print(f"{'bare step (after run)':<26}{tokens_per_step / after:>10,.0f}")
    ratio = loop / bare
    print(f"RATIO loop tokens/s / bare step tokens/s: {ratio:.3f} "
          f"(loop overhead {1 - ratio:.1%} of the step)")
    return ratio


if __name__ == "__main__":
    main()
