"""What each CLI command runs: batches from the data pipeline, the measurement, the figure."""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")  # the CLI writes files; never open a window

from deepnorm.analysis import grad_norms, plotting, update_norms  # noqa: E402
from deepnorm.analysis.batches import first, stacked_batches  # noqa: E402


def grad_norm_batches(data_config, *, arch, num_batches, train_steps, batch_size, seq_len):
    """(measured, training or None): consecutive batches of one stream, the first
    ``num_batches`` measured and the ``train_steps`` after them (disjoint) trained on."""
    stream = stacked_batches(data_config, arch=arch, num_batches=num_batches + train_steps,
                             batch_size=batch_size, seq_len=seq_len)
    measured = {k: v[:num_batches] for k, v in stream.items()}
    train = {k: v[num_batches:] for k, v in stream.items()} if train_steps else None
    return measured, train


def run(command: str, s: dict, base, config, out: pathlib.Path) -> list[dict]:
    """Runs ``command`` with the checked settings ``s`` (deepnorm.analysis.settings) and
    ``config``'s optimizer and data blocks; writes its figure to ``out``; returns the records."""
    seeds = list(range(s["seeds"]))
    data_config = config.data
    if command == "grad-norms":
        batches, train = grad_norm_batches(data_config, arch=base.arch,
                                           num_batches=s["batches"],
                                           train_steps=s["train_steps"],
                                           batch_size=s["batch_size"], seq_len=s["seq_len"])
        records = grad_norms.run(base, schemes=s["residuals"], depths=s["depths"], seeds=seeds,
                                 batches=batches, train_steps=s["train_steps"],
                                 opt_config=config.optimizer, train_batches=train)
        plotting.plot_grad_norms(records, out / "grad-norms.png", params=s["plot_params"])
        return records
    if command == "update-norms":
        batches = stacked_batches(data_config, arch=base.arch, num_batches=s["batches"],
                                  batch_size=s["batch_size"], seq_len=s["seq_len"])
        # The fixed input x comes from the validation split: never trained on.
        probe = first(stacked_batches(data_config, arch=base.arch, num_batches=1,
                                      batch_size=s["batch_size"], seq_len=s["seq_len"],
                                      split="validation"))
        records = update_norms.run(base, schemes=s["residuals"], depths=s["depths"],
                                   seeds=seeds, batches=batches, probe=probe,
                                   num_steps=s["steps"], opt_config=config.optimizer)
        plotting.plot_update_norms(records, out / "update-norms.png")
        return records
    if command == "stability-map":
        from deepnorm.analysis import stability_map

        cells = stability_map.run(base, out=out, schemes=s["residuals"], depths=s["depths"],
                                  lrs=s["lrs"], warmups=s["warmups"], num_steps=s["steps"],
                                  batch_size=s["batch_size"], seq_len=s["seq_len"],
                                  seeds=seeds, opt_config=config.optimizer,
                                  data_config=data_config, max_loss=s["max_loss"],
                                  workers=s["workers"])
        plotting.plot_stability_map(cells, out / "stability-map.png")
        return cells
    if command == "depth-sweep":
        from deepnorm.analysis import depth_sweep

        cells = depth_sweep.run(base, s, out=out, opt_config=config.optimizer,
                                data_config=data_config)
        plotting.plot_depth_sweep(cells, out / "depth-sweep.png")
        return depth_sweep.summary(cells)
    if command == "signal-prop":
        from deepnorm.analysis import signal_prop

        batch = first(stacked_batches(data_config, arch=base.arch, num_batches=1,
                                      batch_size=s["batch_size"], seq_len=s["seq_len"]))
        records = signal_prop.run(base, schemes=s["residuals"], depths=s["depths"],
                                  seeds=seeds, batch=batch)
        plotting.plot_signal_prop(records, out / "signal-prop.png")
        return records
    if command == "gns":
        from deepnorm.analysis import gns

        # Measured on the first s["batches"] batches of the stream, trained on the ones after.
        batches, train = grad_norm_batches(data_config, arch=base.arch,
                                           num_batches=s["batches"],
                                           train_steps=s["train_batches"],
                                           batch_size=s["batch_size"], seq_len=s["seq_len"])
        records = gns.run(base, schemes=s["residuals"], depths=s["depths"], seeds=seeds,
                          batches=batches, train_batches=train, num_steps=s["steps"],
                          checkpoints=s["checkpoints"], opt_config=config.optimizer)
        plotting.plot_gns(records, out / "gns.png")
        return records
    raise ValueError(f"unknown command {command!r}")
