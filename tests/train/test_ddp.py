"""DDP on two CPU processes (gloo, torch.multiprocessing spawn).

Two ranks with micro-batches of 16 see, micro-batch by micro-batch, the same 32 samples as
one process with micro-batches of 32 (DistributedSampler deals the shuffled indices out in
turn), so without dropout both must take the same steps: that checks no_sync, the
all-reduce of fastopt's fp32 accumulation buffers and the loss normalisation. Also: early
stopping agreed by both ranks, rank 0 alone writing, and an interrupted DDP run (a signal on
rank 1 only) resuming bit-exactly.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import toy
from torch import nn

from fastopt.train import fit, load_checkpoint, make_loader, read_metrics

WORLD = 2


def _config(out, **overrides):
    settings = {"max_steps": 24, "eval_every": 6, "log_every": 1,
                "schedule": {"name": "warmup_cosine", "warmup_steps": 4}}  # fmt: skip
    return toy.config(Path(out).parent, Path(out).name, **{**settings, **overrides})


SCENARIOS = {
    "fastopt": {"optimizer": {"name": "fastopt.AdamW", "lr": 1e-2, "max_grad_norm": 0.5}},
    "sgd": {"optimizer": {"name": "torch.optim.SGD", "lr": 0.1, "max_grad_norm": 0.5}},
    "overlap": {
        "optimizer": {
            "name": "fastopt.AdamW",
            "lr": 1e-2,
            "max_grad_norm": 0.5,
            "offload": True,
            "overlap": True,
        }
    },  # fmt: skip
}


def _train(
    out,
    batch,
    scenario,
    loss_fn=nn.functional.cross_entropy,
    dropout=0.0,
    resume=False,
    val_shift=0,
    **overrides,
):
    model = toy.model(dropout)
    train = make_loader(toy.data(512, seed=0), batch, train=True, seed=0)
    val = make_loader(toy.data(200, seed=1, shift=val_shift), 64, train=False)
    cfg = _config(out, **{**SCENARIOS[scenario], **overrides})
    result = fit(model, loss_fn, train, val, cfg, resume=resume)
    return model, result


class _SignalOnRank1:
    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, output, target):
        self.calls += 1
        if self.calls == self.at and dist.get_rank() == 1:
            signal.raise_signal(signal.SIGTERM)
        return nn.functional.cross_entropy(output, target)


def _worker(rank, tmp):
    torch.set_num_threads(1)  # two ranks on two cores
    # a file rendezvous: no port to pick and race for
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD
    )
    report = {}
    try:
        for name in SCENARIOS:
            model, result = _train(os.path.join(tmp, f"ddp_{name}"), 16, name)
            report[name] = {
                "params": [p.detach().flatten().tolist() for p in model.parameters()],
                "val_loss": result.val_loss,
            }
        _, result = _train(
            os.path.join(tmp, "ddp_stop"),
            16,
            "fastopt",
            max_steps=200,
            eval_every=3,
            val_shift=1,
            early_stopping={"patience": 2},
            optimizer={"lr": 3e-2, "max_grad_norm": 1.0},
        )  # fastopt.AdamW
        report["stop"] = {"step": result.step, "reason": result.stop_reason}
        # interrupted on rank 1 only, resumed; against an uninterrupted run (with dropout)
        _train(os.path.join(tmp, "ddp_full"), 16, "fastopt", dropout=0.2)
        cut = _train(
            os.path.join(tmp, "ddp_cut"), 16, "fastopt", dropout=0.2, loss_fn=_SignalOnRank1(21)
        )[1]
        report["cut"] = {"step": cut.step, "interrupted": cut.interrupted}
        model, _ = _train(os.path.join(tmp, "ddp_cut"), 16, "fastopt", dropout=0.2, resume=True)
        report["resumed"] = [p.detach().flatten().tolist() for p in model.parameters()]
    finally:
        dist.destroy_process_group()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    # As the CLI does (see fastopt.train.cli): DDP keeps the gloo group alive past
    # destroy_process_group and its threads can abort the interpreter's shutdown.
    os._exit(0)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp),), nprocs=WORLD, join=True)
    reports = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return tmp, reports


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_step_like_one_process(ddp_run, tmp_path, scenario):
    tmp, reports = ddp_run
    model, result = _train(tmp_path / "single", 32, scenario)
    ddp_rows, single_rows = read_metrics(tmp / f"ddp_{scenario}"), read_metrics(tmp_path / "single")
    assert [r["step"] for r in ddp_rows] == list(range(1, 25))  # rank 0 alone wrote the rows
    for key in ("grad_norm", "train_loss", "lr"):
        assert [r[key] for r in ddp_rows] == pytest.approx([r[key] for r in single_rows], rel=1e-4)
    assert reports[0][scenario]["val_loss"] == pytest.approx(result.val_loss, rel=1e-5)
    for rank in range(WORLD):
        for got, want in zip(reports[rank][scenario]["params"], model.parameters()):
            torch.testing.assert_close(
                torch.tensor(got), want.detach().flatten(), rtol=1e-4, atol=1e-5
            )
    assert reports[0][scenario]["params"] == reports[1][scenario]["params"]  # ranks in step


def test_an_overlapped_offload_steps_as_without_under_ddp(ddp_run):
    _, reports = ddp_run
    for rank in range(WORLD):
        assert reports[rank]["overlap"]["params"] == reports[rank]["fastopt"]["params"]
        assert reports[rank]["overlap"]["val_loss"] == reports[rank]["fastopt"]["val_loss"]


def test_early_stopping_is_agreed_by_both_ranks(ddp_run):
    _, reports = ddp_run
    assert reports[0]["stop"] == reports[1]["stop"]
    assert reports[0]["stop"]["step"] < 200 and "did not improve" in reports[0]["stop"]["reason"]


def test_signal_on_one_rank_checkpoints_all_and_resumes_exactly(ddp_run):
    tmp, reports = ddp_run
    # call 21 on rank 1 is in step 10 (2 per step, 2 val batches per rank at step 6)
    assert reports[0]["cut"]["step"] == reports[1]["cut"]["step"] == 10
    assert reports[1]["cut"]["interrupted"] == "SIGTERM"
    assert reports[0]["cut"]["interrupted"] is not None
    state = load_checkpoint(tmp / "ddp_cut" / "checkpoints" / "step_00000010.pt")
    assert len(state["rng"]) == WORLD and not torch.equal(
        state["rng"][0]["torch"], state["rng"][1]["torch"]
    )
    full = load_checkpoint(tmp / "ddp_full" / "checkpoints" / "step_00000024.pt")
    cut = load_checkpoint(tmp / "ddp_cut" / "checkpoints" / "step_00000024.pt")
    for key in full["model"]:
        assert torch.equal(full["model"][key], cut["model"][key]), key
    assert reports[0]["resumed"] == reports[1]["resumed"]
    assert toy.metric_rows(tmp / "ddp_cut") == toy.metric_rows(tmp / "ddp_full")


def test_the_cli_runs_unchanged_under_torchrun(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "job: mlp\ndevice: cpu\nmax_steps: 30\neval_every: 10\nplots: false\n"
        "schedule: {name: constant, warmup_steps: 5}\n"
        "data: {n_train: 2048, n_val: 512, batch_size: 32}\nmodel: {hidden: 32, depth: 1}\n"
    )
    root = toy.ROOT
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(WORLD), "-m", "fastopt", "train", "--config", str(config), "--out", str(out),
           "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("step 30: train loss") == 1  # rank 0 alone reports
    assert [r["step"] for r in read_metrics(out)] == list(range(10, 31, 10))  # and logs
    assert json.loads((out / "run.json").read_text())["world_size"] == WORLD
    assert load_checkpoint(out / "checkpoints" / "step_00000030.pt")["step"] == 30
