"""``python -m fastopt train`` / ``plot``: the default job, bad input (exit code 2), and a run
stopped by a real SIGTERM that resumes to the same result as a run never stopped."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import toy

from fastopt.train import ConfigError, config_from_dict, load_checkpoint, load_config, read_metrics
from fastopt.train.cli import main


def test_train_writes_metrics_plots_and_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", toy.small(tmp_path), "--out", str(out), "--no-progress"]) == 0
    rows = read_metrics(out)
    assert rows[-1]["step"] == 60 and "val_loss" in rows[-1]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert vals[-1] < 0.8 * vals[0]
    assert sorted(os.listdir(out / "checkpoints")) == [
        "best.pt",
        "step_00000050.pt",
        "step_00000060.pt",
    ]
    for png in ("loss.png", "lr.png", "grad_norm.png"):
        assert (out / png).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "step 60: train loss" in printed
    assert f"wrote {out}/metrics.jsonl, loss.png, lr.png, grad_norm.png and checkpoints/" in printed
    assert "test loss" not in printed and "sample:" not in printed  # the mlp job has neither
    (out / "loss.png").unlink()
    assert main(["plot", "--out", str(out)]) == 0 and (out / "loss.png").is_file()


def test_print_config_round_trips(tmp_path, capsys):
    assert (
        main(["train", "--config", toy.small(tmp_path), "--max-steps", "77", "--print-config"]) == 0
    )
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    config = load_config(printed)
    assert config.max_steps == 77 and config.model["hidden"] == 64 and config.device == "cpu"
    assert config == load_config(toy.small(tmp_path), max_steps=77)


def test_max_steps_option_and_toml_config(tmp_path, capsys):
    toml = tmp_path / "c.toml"
    toml.write_text(
        'job = "mlp"\nmax_steps = 1000\neval_every = 5\nplots = false\n'
        "[data]\nn_train = 1024\nn_val = 256\n[model]\nhidden = 16\ndepth = 1\n"
    )
    out = tmp_path / "t"
    assert (
        main(
            [
                "train",
                "--config",
                str(toml),
                "--out",
                str(out),
                "--max-steps",
                "12",
                "--no-progress",
            ]
        )
        == 0
    )
    assert read_metrics(out)[-1]["step"] == 12
    assert not (out / "loss.png").exists()  # plots: false, and the summary does not claim them
    assert f"wrote {out}/metrics.jsonl and checkpoints/\n" in capsys.readouterr().out


def test_data_path(tmp_path):
    g = np.random.default_rng(0)
    x = g.standard_normal((600, 32)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"job: mlp\nmax_steps: 20\neval_every: 10\nplots: false\nmodel: {{hidden: 16, depth: 1}}\n"
        f"data: {{path: {tmp_path / 'd.npz'}, n_classes: 2, batch_size: 32}}\n"
    )
    out = tmp_path / "f"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert read_metrics(out)[-1]["step"] == 20


def test_data_file_that_does_not_fit_the_config(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", x=np.zeros((50, 16), np.float32), y=np.zeros(50, np.int64))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"job: mlp\ndata: {{path: {tmp_path / 'd.npz'}}}\n")  # n_features is 32
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "g")]) == 2
    assert "has 16 features" in capsys.readouterr().err
    np.savez(tmp_path / "e.npz", inputs=np.zeros((50, 32), np.float32))
    cfg.write_text(f"job: mlp\ndata: {{path: {tmp_path / 'e.npz'}}}\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "h")]) == 2
    assert "arrays named 'x' and 'y'" in capsys.readouterr().err


# Values of the right type out of range: each one used to fail mid-run (or, for n_train and
# n_val, to slice the wrong data) with a traceback, after run.json was written. The trainer's
# own keys fail when the config is read (so --print-config refuses them too); a job's data
# and model keys are its factories' to check, when the job is built, before run.json.
BAD_VALUES = [
    ("optimizer: {lr: -1.0}\n", "'optimizer.lr' must be a finite number >= 0, got -1.0"),
    ("optimizer: {betas: [0.9, 1.5]}\n", "'optimizer.betas' must be in [0, 1), got 1.5 at index 1"),
    ("optimizer: {eps: -1.0e-8}\n", "'optimizer.eps' must be >= 0, got -1e-08"),
    ("data: {num_workers: -1}\n", "'data.num_workers' must be >= 0, got -1"),
    ("seed: -1\n", "'seed' must be in [0, 2**32), got -1"),
]
JOB_VALUES = [
    ("job: mlp\ndata: {n_train: -5}\n", "'data.n_train' must be >= 1, got -5"),
    ("job: mlp\ndata: {n_val: 0}\n", "'data.n_val' must be >= 1, got 0"),
    ("data: {block_size: 0}\n", "'data.block_size' must be >= 1, got 0"),
    ("model: {n_embd: 100, n_head: 3}\n", "'model.n_embd' (100) must be a multiple of"),
]


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("max_step: 10\n", "unknown config key 'max_step'; valid keys: out, max_steps, seed"),
        ("job: cnn\n", "config key 'job' must be one of gpt, mlp, got 'cnn'"),
        (
            "model: {width: 3}\n",
            "unknown config key 'model.width' for model factory fastopt.train.gpt:build_model; "
            "valid keys: vocab_size, block_size, n_layer",
        ),
        ("model: {n_layer: two}\n", "'model.n_layer' must be int, got str 'two'"),
        (
            "optimizer: {lrate: 0.1}\n",
            "unknown config key 'optimizer.lrate' in section 'optimizer'; valid keys: name, lr",
        ),
        ("max_steps: ten\n", "'max_steps' must be int, got str 'ten'"),
        (
            "optimizer: {lr: 3e-3}\n",
            "'optimizer.lr' must be float, got str '3e-3' (YAML 1.1 reads 3e-3 as a string",
        ),
        ("precision: fp8\n", "'precision' must be 'fp32' or 'bf16' or 'fp16'"),
        ("early_stopping: {patience: 0}\n", "patience must be an int >= 1"),
        ("schedule: {name: step}\n", "'schedule.step_size' is required by schedule 'step'"),
        ("job: mlp\ndata: {path: /no/such.npz}\n", "'data.path': no file at '/no/such.npz'"),
        ("- 1\n- 2\n", "must hold a mapping"),
        *BAD_VALUES,
        *JOB_VALUES,
    ],
)
def test_bad_config_exits_2_with_a_clear_message(tmp_path, capsys, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "o").exists()  # nothing was started


@pytest.mark.parametrize("yaml_text, message", BAD_VALUES)
def test_print_config_refuses_bad_values_too(tmp_path, capsys, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    assert main(["train", "--config", str(path), "--print-config"]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and not captured.out


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_seed_out_of_range_on_the_command_line(tmp_path, capsys, seed):
    out = tmp_path / "o"
    assert main(["train", "--config", toy.small(tmp_path), "--out", str(out), "--seed", seed]) == 2
    assert f"'seed' must be in [0, 2**32), got {seed}" in capsys.readouterr().err
    assert not out.exists()  # run.json was not written: the folder stays free


def test_bad_command_line(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--max-steps", "x"]) == 2
    assert main(["train", "--precision", "fp8"]) == 2
    assert main(["plot", "--out", str(tmp_path / "nothing")]) == 2
    assert "no metrics file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert main(["plot", "--out", str(tmp_path / "empty")]) == 2
    assert "metrics.jsonl has no rows to plot" in capsys.readouterr().err


def test_resume_refuses_another_run_and_an_empty_folder(tmp_path, capsys):
    out = str(tmp_path / "r")
    cfg = toy.small(tmp_path, steps=12)
    assert main(["train", "--config", cfg, "--out", out, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", cfg, "--out", out, "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", "--config", cfg, "--out", out, "--resume", "--seed", "1"]) == 2
    assert (
        "holds a different run" in (err := capsys.readouterr().err)
        and "seed: 0 there, 1 now" in err
    )
    assert main(["train", "--config", cfg, "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    # resuming a finished run changes nothing and succeeds
    before = read_metrics(out)
    assert main(["train", "--config", cfg, "--out", out, "--resume", "--no-progress"]) == 0
    assert read_metrics(out) == before


def test_resume_of_a_run_without_checkpoints_starts_it_over(tmp_path, capsys):
    """A run that failed before its first checkpoint leaves run.json (and maybe metrics):
    --resume starts it from step 0 in its folder, says so, and ends as a fresh run does."""
    out = tmp_path / "r"
    cfg = toy.small(tmp_path, steps=12)
    assert main(["train", "--config", cfg, "--out", str(out), "--no-progress"]) == 0
    before = toy.metric_rows(out)
    shutil.rmtree(out / "checkpoints")
    capsys.readouterr()
    assert main(["train", "--config", cfg, "--out", str(out), "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {out} holds no checkpoint yet: starting its run from step 0" in err, err
    assert toy.metric_rows(out) == before  # the old rows were dropped, not kept twice


def test_config_api_raises_value_error():
    with pytest.raises(ValueError, match="unknown config key 'model.width'"):
        config_from_dict({"model": {"width": 3}})
    with pytest.raises(ValueError, match="unknown config key 'data.n_train'"):
        config_from_dict({"data": {"n_train": 3}})  # the mlp job's key: the default is gpt
    assert config_from_dict({"job": "mlp", "data": {"n_train": 3}}).data["n_train"] == 3
    with pytest.raises(ConfigError, match="'grad_accum_steps' must be >= 1"):
        load_config(None, grad_accum_steps=0)
    assert load_config(None, max_steps=7).max_steps == 7


def _start(args, log):
    # One thread each: the two runs go side by side on two cores without fighting (OpenMP
    # threads spin), and all three runs reduce in the same order.
    env = {
        **os.environ,
        "PYTHONPATH": f"{toy.ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "fastopt", "train", "--no-progress", *args],
        cwd=log.parent,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def test_sigterm_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    """Real processes, a real SIGTERM mid-epoch: the run writes a checkpoint and exits with
    128 + SIGTERM; ``--resume`` then ends with the same losses, bit for bit, as a run never
    stopped (started at the same time, on the other core)."""
    steps = 400
    cfg = toy.small(tmp_path, steps=steps, hidden=128)
    full, cut = tmp_path / "full", tmp_path / "cut"
    p_full = _start(["--config", cfg, "--out", str(full)], tmp_path / "full.log")
    p_cut = _start(["--config", cfg, "--out", str(cut)], tmp_path / "cut.log")
    try:
        toy.wait_for_step(cut, 70, p_cut)
        p_cut.send_signal(signal.SIGTERM)
        assert p_cut.wait(timeout=120) == 128 + signal.SIGTERM, (tmp_path / "cut.log").read_text()
        assert p_full.wait(timeout=300) == 0, (tmp_path / "full.log").read_text()
    finally:
        for p in (p_full, p_cut):
            if p.poll() is None:
                p.kill()
    assert "interrupted by SIGTERM" in (tmp_path / "cut.log").read_text()
    stopped_at = max(int(p.stem[5:]) for p in (cut / "checkpoints").glob("step_*.pt"))
    assert 70 <= stopped_at < steps

    p_resume = _start(["--config", cfg, "--out", str(cut), "--resume"], tmp_path / "resume.log")
    assert p_resume.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()
    rows = toy.metric_rows(cut)
    assert rows == toy.metric_rows(full)
    last = rows[-1]["step"]  # max_steps, or earlier if early stopping ended both runs
    assert last > stopped_at and "val_loss" in rows[-1]
    a = load_checkpoint(full / "checkpoints" / f"step_{last:08d}.pt")
    b = load_checkpoint(cut / "checkpoints" / f"step_{last:08d}.pt")
    assert a["val_loss"] == b["val_loss"] == rows[-1]["val_loss"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert json.loads((cut / "run.json").read_text())["fingerprint"] == b["fingerprint"]
