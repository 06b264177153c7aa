"""PNG plots of a run from its ``metrics.jsonl``: losses, the learning-rate schedule and the
gradient norms (global, and per group or layer as the telemetry logged them).

Drawn with matplotlib's object API on the Agg canvas: no pyplot, no display, no global
backend switch, so it is safe in a headless job and inside a program that uses matplotlib.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import ConfigError
from .metrics import METRICS_FILE, read_metrics

__all__ = ["plot_run"]

LOSS_PNG = "loss.png"
LR_PNG = "lr.png"
GRAD_NORM_PNG = "grad_norm.png"
EMA_WEIGHT = 0.9  # smoothing of the noisy per-step training loss line


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def _ema(values: list[float]) -> list[float]:
    # Debiased (as Adam's moments): the first points are not dragged toward the first value.
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = EMA_WEIGHT * avg + (1 - EMA_WEIGHT) * v
        out.append(avg / (1 - EMA_WEIGHT**i))
    return out


def plot_run(out: str | os.PathLike) -> list[Path]:
    """Writes ``loss.png`` (training and validation loss vs step), ``lr.png`` (learning
    rate vs step) and ``grad_norm.png`` (gradient norms vs step, when they were logged) into
    the run folder ``out``; returns their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    if out.exists() and not out.is_dir():  # read_metrics would read it as a metrics file
        raise ConfigError(f"{out} is a file, not a run folder (one that holds {METRICS_FILE})")
    rows = read_metrics(out)
    if not rows:  # a ConfigError (a ValueError): the CLI reports bad input without a traceback
        raise ConfigError(f"{out / 'metrics.jsonl'} has no rows to plot")
    written = []

    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps, train = _series(rows, "train_loss")
    if steps:
        ax.plot(steps, train, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, _ema(train), color="tab:blue", label="train loss (EMA)")
    steps, val = _series(rows, "val_loss")
    if steps:
        ax.plot(steps, val, "o-", color="tab:orange", markersize=3.5, label="validation loss")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    if all(v > 0 for v in train + val) and train + val:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / LOSS_PNG)
    written.append(out / LOSS_PNG)

    fig = Figure(figsize=(7, 3.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps, lr = _series(rows, "lr")
    ax.plot(steps, lr, color="tab:green")
    ax.set(xlabel="step", ylabel="learning rate", title="Learning-rate schedule")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / LR_PNG)
    written.append(out / LR_PNG)

    steps, norms = _series(rows, "grad_norm")
    if steps:
        fig = Figure(figsize=(7, 3.2), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(steps, norms, color="tab:red", label="global")
        parts = sorted({k for r in rows for k in r if k.startswith("grad_norm/")})
        for key in parts:
            part_steps, values = _series(rows, key)
            ax.plot(part_steps, values, linewidth=0.9, alpha=0.8, label=key.split("/", 1)[1])
        ax.set(xlabel="step", ylabel="gradient norm", title="Gradient norm (before clipping)")
        if all(v > 0 for v in norms):
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if len(parts) <= 12:  # per layer there can be dozens: the lines alone then
            ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(out / GRAD_NORM_PNG)
        written.append(out / GRAD_NORM_PNG)
    return written
