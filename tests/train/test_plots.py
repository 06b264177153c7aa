"""The run's plots, read from the figures' artists: every line in the legend, plain group
labels, readable log-scale ticks, and the clipping threshold on the gradient norms."""

import math

import pytest
from matplotlib.lines import Line2D

from fastopt.train.plots import _clip_threshold, _log_ticks, grad_norm_figure, loss_figure


def _rows(steps=60):
    """A loss falling from about 4.2 to 1.6 (less than a decade) and gradient norms."""
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "train_loss": 1.6 + 2.6 * math.exp(-step / 15), "lr": 1e-3,
               "grad_norm": 0.5 + 2 / step, "grad_norm/decay": 0.4 + 1.5 / step,
               "grad_norm/no_decay": 0.1 + 0.5 / step}  # fmt: skip
        if step % 10 == 0:
            row["val_loss"] = row["train_loss"] + 0.1
        rows.append(row)
    return rows


def _legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _tick_labels(fig, ax) -> list[str]:
    """The y tick labels drawn inside the axes' range."""
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    return [t.get_text() for t in ax.get_yticklabels()
            if t.get_text() and lo <= t.get_position()[1] <= hi]  # fmt: skip


def test_the_loss_legend_names_every_line():
    fig = loss_figure(_rows())
    (ax,) = fig.axes
    labelled = [line.get_label() for line in ax.get_lines()]
    assert labelled == ["train loss", "train loss (moving average)", "validation loss"]
    assert _legend(ax) == labelled


def test_a_log_loss_axis_less_than_a_decade_high_has_readable_ticks():
    fig = loss_figure(_rows())
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    labels = _tick_labels(fig, ax)
    assert len(labels) >= 4, labels
    assert all(float(text) > 0 for text in labels), labels  # plain numbers, not 10^x


@pytest.mark.parametrize(
    "lo, hi, expected",
    [(0.01, 100.0, [0.01, 0.1, 1.0, 10.0, 100.0]), (1.0, 20.0, [1, 2, 5, 10, 20])],
    ids=["decades", "one-two-five"],
)
def test_log_ticks(lo, hi, expected):
    assert _log_ticks(lo, hi) == expected


def test_log_ticks_within_a_decade():
    ticks = _log_ticks(1.6, 4.3)
    assert len(ticks) >= 4 and all(1.6 <= t <= 4.3 for t in ticks), ticks


def test_gradient_norms_have_plain_group_labels_and_the_clipping_threshold():
    fig = grad_norm_figure(_rows(), clip=1.0)
    (ax,) = fig.axes
    legend = _legend(ax)
    assert legend == [
        "global",
        "parameters with weight decay",
        "parameters without weight decay",
        "clipping threshold (1)",
    ]
    (threshold,) = [line for line in ax.get_lines() if line.get_label().startswith("clipping")]
    assert isinstance(threshold, Line2D) and set(threshold.get_ydata()) == {1.0}
    assert threshold.get_linestyle() == "--"


def test_no_threshold_line_without_clipping():
    fig = grad_norm_figure(_rows(), clip=None)
    (ax,) = fig.axes
    assert not [line for line in ax.get_lines() if "clipping" in line.get_label()]
    assert grad_norm_figure([{"step": 1, "train_loss": 1.0}]) is None


@pytest.mark.parametrize("max_grad_norm", [0.5, None], ids=["clipping", "no-clipping"])
def test_the_run_folder_says_where_the_threshold_is(train_toy, tmp_path, max_grad_norm):
    result = train_toy(plots=True, max_steps=10, optimizer={"max_grad_norm": max_grad_norm})
    assert [p.name for p in result.plots] == ["loss.png", "lr.png", "grad_norm.png"]
    assert _clip_threshold(tmp_path / "run") == max_grad_norm


def test_a_metrics_file_alone_plots_without_the_threshold(tmp_path):
    assert _clip_threshold(tmp_path) is None  # no run.json
    (tmp_path / "run.json").write_text("{")
    assert _clip_threshold(tmp_path) is None
