"""What a run prints while it trains: a bar on a terminal, a plain line per logged step off
one (a log file, a cluster job, CI), nothing when ``progress`` is false; and which step and
checkpoint a resumed run goes on from."""

import re
import sys

LINE = re.compile(
    r"^step (\d+)/40: train loss \d+\.\d{4}(, val loss \d+\.\d{4})?, lr [0-9.e+-]+, \d+\.\d s$"
)


def test_off_a_terminal_a_line_per_logged_step(train_toy, capsys):
    train_toy(progress=None)  # the default: decided by the terminal
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 8, lines  # log_every 5 of 40 steps
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [int(m.group(1)) for m in matches] == list(range(5, 41, 5))
    assert [m.group(2) is not None for m in matches] == [s % 10 == 0 for s in range(5, 41, 5)]


def _as_a_terminal(monkeypatch):
    """capsys's stderr (in place while the test runs) as a terminal."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


def test_on_a_terminal_a_bar_and_no_lines(train_toy, capsys, monkeypatch):
    _as_a_terminal(monkeypatch)
    train_toy(progress=None)
    err = capsys.readouterr().err
    assert "40/40" in err and "step/s" in err, err  # tqdm's bar
    assert not any(LINE.match(line) for line in err.splitlines()), err


def test_progress_false_prints_nothing(train_toy, capsys):
    train_toy(progress=False)
    assert capsys.readouterr().err == ""


def test_progress_false_prints_nothing_on_a_terminal_either(train_toy, capsys, monkeypatch):
    _as_a_terminal(monkeypatch)
    train_toy(progress=False)
    assert capsys.readouterr().err == ""


def test_a_resumed_run_says_where_it_goes_on_from(train_toy, tmp_path, capsys):
    constant = {"name": "constant"}  # no horizon: a resumed run may go on past max_steps
    train_toy(max_steps=20, checkpoint_every=10, schedule=constant)
    assert capsys.readouterr().err == ""
    result = train_toy(max_steps=40, checkpoint_every=10, schedule=constant, resume=True)
    err = capsys.readouterr().err
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000020.pt"
    assert f"resuming from step 20 ({checkpoint})" in err, err
    assert result.step == 40
