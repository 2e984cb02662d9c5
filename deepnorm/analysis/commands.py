"""What each CLI command runs: batches from the data pipeline, the measurement, the figure."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # the CLI writes files; never open a window

from deepnorm.analysis import grad_norms, plotting, update_norms  # noqa: E402
from deepnorm.analysis.batches import first, stacked_batches  # noqa: E402


def run(command: str, args, base, data_config, config, out: pathlib.Path) -> list[dict]:
    """Runs ``command`` and writes its figure to ``out``; returns the JSON records."""
    seeds = list(range(args.seeds))
    if command == "grad-norms":
        # One stream of batches: the first ones are measured, the ones after them (disjoint)
        # train the model first when --warmup-steps > 0.
        stream = stacked_batches(data_config, arch=base.arch,
                                 num_batches=args.batches + args.warmup_steps,
                                 batch_size=args.batch_size, seq_len=args.seq_len)
        batches = {k: v[:args.batches] for k, v in stream.items()}
        train = {k: v[args.batches:] for k, v in stream.items()} if args.warmup_steps else None
        records = grad_norms.run(base, schemes=args.residuals, depths=args.depths, seeds=seeds,
                                 batches=batches, warmup_steps=args.warmup_steps,
                                 warmup_lr=args.lr, train_batches=train)
        plotting.plot_grad_norms(records, out / "grad-norms.png")
        return records
    if command == "update-norms":
        batches = stacked_batches(data_config, arch=base.arch, num_batches=args.batches,
                                  batch_size=args.batch_size, seq_len=args.seq_len)
        # The fixed input x comes from the validation split: never trained on.
        probe = first(stacked_batches(data_config, arch=base.arch, num_batches=1,
                                      batch_size=args.batch_size, seq_len=args.seq_len,
                                      split="validation"))
        records = update_norms.run(base, schemes=args.residuals, depths=args.depths,
                                   seeds=seeds, batches=batches, probe=probe,
                                   num_steps=args.steps, peak_lr=args.lr,
                                   warmup_steps=args.warmup_steps)
        plotting.plot_update_norms(records, out / "update-norms.png")
        return records
    if command == "stability-map":
        from deepnorm.analysis import stability_map

        cells = stability_map.run(base, config, out=out, schemes=args.residuals,
                                  depths=args.depths, lrs=args.lrs, warmups=args.warmups,
                                  num_steps=args.steps, batch_size=args.batch_size,
                                  seq_len=args.seq_len, seeds=seeds, workers=args.workers)
        plotting.plot_stability_map(cells, out / "stability-map.png")
        return cells
    raise ValueError(f"unknown command {command!r}")
