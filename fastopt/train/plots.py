"""PNG plots of a run from its ``metrics.jsonl``: losses, the learning-rate schedule and the
gradient norms (global, and per group or layer as the telemetry logged them).

Drawn with matplotlib's object API on the Agg canvas: no pyplot, no display, no global
backend switch, so it is safe in a headless job and inside a program that uses matplotlib.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .errors import ConfigError
from .metrics import METRICS_FILE, read_metrics

__all__ = ["grad_norm_figure", "loss_figure", "lr_figure", "plot_run"]

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


# The per-group gradient norms' labels (the groups are fastopt.train.components.param_groups').
GROUP_LABELS = {
    "decay": "parameters with weight decay",
    "no_decay": "parameters without weight decay",
    "all": "all parameters",
}


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis over [lo, hi]: powers of ten, then 1-2-5, then finer steps
    within each decade, the coarsest that gives at least four, else the finest (matplotlib's
    default labels only the powers of ten, which a loss falling from 4 to 1.5 does not reach)."""
    steps = (
        (1,),
        (1, 2, 5),
        (1, 1.5, 2, 3, 5, 7),
        (1, 1.2, 1.4, 1.6, 1.8, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9),
        tuple(i / 10 for i in range(10, 100)),
    )
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    ticks: list[float] = []
    for subs in steps:
        ticks = [float(f"{s * 10.0**k:.6g}") for k in decades for s in subs]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) >= 4:
            break
    return ticks


def _log_axis(ax) -> None:
    """A log y axis labelled with plain numbers at :func:`_log_ticks` over its range."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ax.set_yscale("log")
    lo, hi = ax.get_ylim()  # the data's range and matplotlib's margins
    ticks = _log_ticks(lo, hi)
    if len(ticks) >= 2:
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(lo, hi)


def _figure(height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def loss_figure(rows: list[dict]):
    """Training loss (each logged value, and their moving average) and validation loss."""
    fig, ax = _figure(4.2)
    steps, train = _series(rows, "train_loss")
    if steps:
        ax.plot(steps, train, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss")
        ax.plot(steps, _ema(train), color="tab:blue", label="train loss (moving average)")
    steps, val = _series(rows, "val_loss")
    if steps:
        ax.plot(steps, val, "o-", color="tab:orange", markersize=3.5, label="validation loss")
    ax.set(xlabel="step", ylabel="loss", title="Loss")
    if all(v > 0 for v in train + val) and train + val:
        _log_axis(ax)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def lr_figure(rows: list[dict]):
    fig, ax = _figure(3.2)
    steps, lr = _series(rows, "lr")
    ax.plot(steps, lr, color="tab:green")
    ax.set(xlabel="step", ylabel="learning rate", title="Learning-rate schedule")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def grad_norm_figure(rows: list[dict], clip: float | None = None):
    """The global gradient norm, per group or layer as logged, and the clipping threshold
    ``clip`` (None: nothing was clipped). None when no gradient norm was logged."""
    steps, norms = _series(rows, "grad_norm")
    if not steps:
        return None
    fig, ax = _figure(3.8)
    ax.plot(steps, norms, color="tab:red", label="global")
    parts = sorted({k for r in rows for k in r if k.startswith("grad_norm/")})
    for key in parts:
        part_steps, values = _series(rows, key)
        name = key.split("/", 1)[1]
        ax.plot(part_steps, values, linewidth=0.9, alpha=0.8, label=GROUP_LABELS.get(name, name))
    if clip is not None:
        ax.axhline(clip, color="black", linestyle="--", linewidth=1.0,
                   label=f"clipping threshold ({clip:g})")  # fmt: skip
    ax.set(xlabel="step", ylabel="gradient norm", title="Gradient norm (before clipping)")
    if all(v > 0 for v in norms):
        _log_axis(ax)
    ax.grid(True, which="both", alpha=0.3)
    if len(parts) <= 12:  # per layer there can be dozens: the lines alone then
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _clip_threshold(out: Path) -> float | None:
    """The run's ``optimizer.max_grad_norm`` as its ``run.json`` records it; None when it does
    not clip, or when nothing says (a metrics file alone plots without the line)."""
    try:
        value = json.loads((out / "run.json").read_text())["config"]["optimizer"]["max_grad_norm"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) and value > 0 else None


def plot_run(out: str | os.PathLike) -> list[Path]:
    """Writes ``loss.png`` (training and validation loss vs step), ``lr.png`` (learning
    rate vs step) and ``grad_norm.png`` (gradient norms vs step, when they were logged, with
    the clipping threshold) into the run folder ``out``; returns their paths."""
    out = Path(out)
    if out.exists() and not out.is_dir():  # read_metrics would read it as a metrics file
        raise ConfigError(f"{out} is a file, not a run folder (one that holds {METRICS_FILE})")
    rows = read_metrics(out)
    if not rows:  # a ConfigError (a ValueError): the CLI reports bad input without a traceback
        raise ConfigError(f"{out / 'metrics.jsonl'} has no rows to plot")
    figures = {
        LOSS_PNG: loss_figure(rows),
        LR_PNG: lr_figure(rows),
        GRAD_NORM_PNG: grad_norm_figure(rows, _clip_threshold(out)),
    }
    written = []
    for name, fig in figures.items():
        if fig is not None:
            fig.savefig(out / name)
            written.append(out / name)
    return written
