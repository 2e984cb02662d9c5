"""DeepNet's Table 1 and depth figure at CPU scale: scheme x depth x precision on the byte LM.

A thin layer over ``deepnorm.analysis.stability_map``: the same cells (one short run through
the training code each, the learning rates of a row vmapped, one JSON file per cell, resumable,
rows in worker processes), with the precision as a grid axis and a depth cap for float16.
``summary`` condenses a (scheme, depth, precision) row to what Table 1 reports: the best final
loss over the row's learning rates, and whether (and at which step) its lanes diverged.

Why a byte LM and not translation: an 18L-18L translation model took 15 minutes for 300 steps
on the 2-core CPU, so 50L-50L and 100L-100L are out of reach; the decoder-only byte LM of the
stability map (64-128-2) costs ~1 s per step per 100 layers and two learning rates.
"""

from __future__ import annotations

from deepnorm.analysis import stability_map


def keep_row(float16_max_depth: int):
    """float16 rows only up to ``float16_max_depth`` layers (0: no cap): XLA:CPU has no native
    float16 dots (d=64, two lanes, 100 layers: 1.5 s a step against 1.2 s in float32)."""
    def keep(row: stability_map.Row) -> bool:
        return row.dtype != "float16" or not float16_max_depth or row.depth <= float16_max_depth
    return keep


def run(base, s: dict, *, out, opt_config=None, data_config=None, log=print) -> list[dict]:
    """Every cell of the checked ``depth-sweep`` settings ``s`` (deepnorm.analysis.settings)."""
    return stability_map.run(
        base, out=out, schemes=s["residuals"], depths=s["depths"], lrs=s["lrs"],
        warmups=s["warmups"], dtypes=s["dtypes"], keep=keep_row(s["float16_max_depth"]),
        num_steps=s["steps"], batch_size=s["batch_size"], seq_len=s["seq_len"],
        seeds=range(s["seeds"]), opt_config=opt_config, data_config=data_config,
        max_loss=s["max_loss"], workers=s["workers"], log=log)


def summary(cells: list[dict]) -> list[dict]:
    """One record per (scheme, depth, dtype, warmup): the best final validation loss over its
    learning rates (None if every lane diverged) and at which rate, how many lanes diverged and
    the earliest divergence step."""
    rows: dict[tuple, list[dict]] = {}
    for c in cells:
        key = (c["residual"], c["num_layers"], c["dtype"], c["warmup_steps"])
        rows.setdefault(key, []).append(c)
    records = []
    for (scheme, depth, dtype, warmup), lanes in rows.items():
        alive = [c for c in lanes if not c["diverged"]]
        best = min(alive, key=lambda c: c["final_loss"]) if alive else None
        steps = [c["diverged_at_step"] for c in lanes if c["diverged_at_step"] is not None]
        records.append({
            "residual": scheme, "num_layers": depth, "dtype": dtype, "warmup_steps": warmup,
            "num_steps": lanes[0]["num_steps"],
            "best_loss": None if best is None else best["final_loss"],
            "best_lr": None if best is None else best["peak_lr"],
            "lrs": sorted({c["peak_lr"] for c in lanes}),
            "diverged_lanes": len(lanes) - len(alive), "lanes": len(lanes),
            "first_divergence_step": min(steps) if steps else None,
            "overflow_steps": sum(c["overflow_steps"] or 0 for c in lanes),
            "row_seconds": lanes[0]["row_seconds"],
        })
    return records
