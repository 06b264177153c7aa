"""``python -m fastopt train --resume`` continues the run as its run.json records it: the
README's example with real processes and a real Ctrl-C, options that would change the result
refused, the others taken, and a larger ``--max-steps`` extending a run whose schedule then
holds its last value."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import toy
import yaml

from fastopt.train import read_metrics
from fastopt.train.cli import main

LR = 3e-3  # the default optimizer.lr: schedules multiply it
# A schedule with a visible end: warm-up, linear decay to 0.2 of the peak at max_steps.
DECAY = "schedule: {name: warmup_linear, warmup_steps: 4, final_ratio: 0.2}\nplots: false\n"


def _fastopt(args, cwd, log):
    env = {**os.environ, "PYTHONPATH": str(toy.ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fastopt", *args],
        cwd=cwd,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def test_the_readme_resume_example(tmp_path):
    """README: ``python -m fastopt train --out runs/a --max-steps 500 --precision bf16``,
    Ctrl-C, then ``python -m fastopt train --out runs/a --resume``: no option repeated (it
    exited 2: "max_steps: 500 there, 3000 now; precision: 'bf16' there, 'fp32' now"). The
    resume command is the one the interrupted run prints. The default job is shrunk to a
    small config and 150 steps (the first run must outlast the wait for its step 10)."""
    cfg = toy.small(tmp_path)
    out, first_log, resume_log = tmp_path / "runs" / "a", tmp_path / "a.log", tmp_path / "b.log"
    first = _fastopt(
        ["train", "--config", cfg, "--out", "runs/a", "--max-steps", "150", "--precision", "bf16"],
        tmp_path,
        first_log,
    )
    try:
        toy.wait_for_step(out, 10, first)
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 128 + signal.SIGINT, first_log.read_text()
    finally:
        if first.poll() is None:
            first.kill()
    hint = re.search(r"Continue with: (.*)", first_log.read_text()).group(1)
    assert hint == "python -m fastopt train --out runs/a --resume"
    stopped_at = read_metrics(out)[-1]["step"]

    resumed = _fastopt(shlex.split(hint)[3:], tmp_path, resume_log)
    assert resumed.wait(timeout=300) == 0, resume_log.read_text()
    rows = read_metrics(out)
    last = rows[-1]["step"]  # 150, or earlier if early stopping ended the run
    assert f"step {last}: train loss" in resume_log.read_text() and last > stopped_at
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})  # none twice
    config = json.loads((out / "run.json").read_text())["config"]
    assert (config["max_steps"], config["precision"], config["model"]["hidden"]) == (
        150,
        "bf16",
        64,
    )


def test_a_larger_max_steps_extends_a_finished_run(tmp_path, capsys):
    """The schedule stays the run's (its horizon, the old max_steps, is in run.json): past it
    the lr holds the schedule's last value. The result is the run configured that way from
    the start."""
    out = tmp_path / "r"
    cfg = toy.small(tmp_path, extra=DECAY)
    assert main(["train", "--config", cfg, "--out", str(out), "--max-steps", "20"]) == 0
    before = toy.metric_rows(out)
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "30"]) == 0
    assert "step 30: train loss" in capsys.readouterr().out
    rows = toy.metric_rows(out)
    assert rows[: len(before)] == before and [r["step"] for r in rows][-2:] == [25, 30]
    assert [r["lr"] for r in rows if r["step"] > 20] == pytest.approx([LR * 0.2] * 2, rel=1e-12)
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["max_steps"] == 30 and config["schedule"]["total_steps"] == 20
    assert main(["train", "--out", str(out), "--resume"]) == 0  # now a finished run of 30
    assert toy.metric_rows(out) == rows

    data = yaml.safe_load(Path(cfg).read_text())
    data["schedule"]["total_steps"] = 20
    pinned = tmp_path / "pinned.yaml"
    pinned.write_text(yaml.safe_dump({**data, "max_steps": 30}))
    assert main(["train", "--config", str(pinned), "--out", str(tmp_path / "fresh")]) == 0
    assert toy.metric_rows(tmp_path / "fresh") == rows


def test_resume_refuses_what_would_change_the_result_and_takes_the_rest(tmp_path, capsys):
    out = str(tmp_path / "r")
    cfg = toy.small(tmp_path, extra=DECAY)
    assert main(["train", "--config", cfg, "--out", out, "--max-steps", "20"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", out, "--resume", "--precision", "bf16", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "differences: precision: 'fp32' there, 'bf16' now; seed: 0 there, 3 now" in err, err
    assert main(["train", "--out", out, "--resume", "--max-steps", "10"]) == 2
    assert "holds a run of max_steps 20: a resumed run may extend it, not shorten it to 10" in (
        capsys.readouterr().err
    )
    changes_lr = tmp_path / "lr.yaml"
    changes_lr.write_text("optimizer: {lr: 0.01}\n")
    assert main(["train", "--out", out, "--resume", "--config", str(changes_lr)]) == 2
    assert "optimizer.lr: 0.003 there, 0.01 now" in capsys.readouterr().err

    # The run's config, updated by what changes only how it is logged and kept.
    assert main(["train", "--out", out, "--resume", "--print-config"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["max_steps"], shown["model"]["hidden"], shown["log_every"]) == (20, 64, 5)
    logging = tmp_path / "logging.yaml"
    logging.write_text("log_every: 2\nkeep_last: 1\noptimizer: {lr: 0.003}\n")
    args = ["train", "--out", out, "--resume", "--config", str(logging), "--max-steps", "24"]
    assert main(args) == 0
    assert [r["step"] for r in toy.metric_rows(out)][-3:] == [20, 22, 24]
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == ["best.pt", "step_00000024.pt"]
