"""The trainer under FSDP2 (``parallel: fsdp2``) on two CPU processes (gloo, spawn), against
one process holding the whole model.

Two ranks with batches of 16 see, step by step, the same 32 samples as one process with
batches of 32 (DistributedSampler deals the shuffled indices out in turn), so without dropout
both take the same steps up to fp32 rounding (the sums are ordered differently): that checks
the sharded forward and backward, the gradients summed in the sharded .grad over four
micro-batches, the clip with the whole model's norm and the per-group telemetry summed over
the shards. A run stopped at step 6 resumes from its torch.distributed.checkpoint folder on
two ranks (bit for bit) and on one (to fp32 rounding; the loader batch is then 32). A
checkpoint write failing on rank 0 stops both ranks with the same error, under DDP and FSDP2.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import toy
from torch import nn

from fastopt.train import ConfigError, fit, make_loader, read_metrics
from fastopt.train.checkpoint import AtomicWriteError
from fastopt.train.cli import main

WORLD = 2
STEPS, CUT = 12, 6
# fastopt.AdamW's lean settings (the toy model's params are fp32: masters would change nothing),
# each with a setting of the loop untested under fsdp2 before.
LEAN = {
    "int8": ({"state_dtype": "int8", "min_8bit_size": 0}, {"precision": "bf16"}),
    "bf16_sr": ({"state_dtype": "bfloat16", "stochastic_rounding": True},
                {"micro_batch_size": "auto"}),
}  # fmt: skip


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(toy.N_FEATURES, 32), nn.GELU(), nn.Linear(32, toy.N_CLASSES))


def _config(out, **overrides):
    settings = {
        "max_steps": STEPS,
        "eval_every": 3,
        "log_every": 1,
        "micro_batch_size": 8,  # four micro-batches a step on each rank
        "schedule": {"name": "warmup_cosine", "warmup_steps": 3, "total_steps": STEPS},
    }
    # fastopt.AdamW; clips most steps
    optimizer = {"lr": 1e-2, "max_grad_norm": 0.5, **overrides.pop("optimizer", {})}
    return toy.config(Path(out).parent, Path(out).name,
                      **{**settings, **overrides, "optimizer": optimizer})  # fmt: skip


def _train(out, batch, resume=False, opt=None, **overrides):
    model = _model()
    train = make_loader(toy.data(512, seed=0), batch, train=True, seed=0)
    # 129 samples: rank 0 gets 65 (three batches of 32), rank 1 64 (two), and the sharded
    # forward must still run in lockstep.
    val = make_loader(toy.data(129, seed=1), 32, train=False)
    result = fit(model, nn.functional.cross_entropy, train, val, _config(out, **overrides),
                 optimizer=opt, resume=resume)  # fmt: skip
    return model, result


def _params(model):
    return [p.full_tensor().flatten().tolist() for p in model.parameters()]


def _error(call):
    try:
        call()
    except (ConfigError, OSError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _failing_write(rank, save_atomic):
    """``save_atomic`` failing on rank 0 as on a full disk, from its second call on."""
    calls = [0]

    def save(obj, path):
        calls[0] += 1
        if rank == 0 and calls[0] > 1:
            raise AtomicWriteError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return save_atomic(obj, path)

    return save


def _worker(rank, tmp):
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD
    )
    import fastopt.train.checkpoint as ckpt
    import fastopt.train.sharded_checkpoint as sharded
    from fastopt.train.strategy import choose_strategy

    report = {}
    # Checkpoints at 4, 8 and 12 (not a change to the result): the oldest is removed.
    model, _ = _train(f"{tmp}/full", 16, parallel="fsdp2", checkpoint_every=4)
    report["full"] = _params(model)
    model, _ = _train(f"{tmp}/sgd", 16, parallel="fsdp2", optimizer={"name": "torch.optim.SGD"})
    report["sgd"] = _params(model)
    _train(f"{tmp}/cut", 16, parallel="fsdp2", max_steps=CUT)
    dist.barrier()
    if rank == 0:
        shutil.copytree(f"{tmp}/cut", f"{tmp}/cut1")  # resumed on one rank by test_one_rank
    dist.barrier()
    model, _ = _train(f"{tmp}/cut", 16, parallel="fsdp2", resume=True)
    report["resumed"] = _params(model)
    for name, (optimizer, loop) in LEAN.items():
        settings = dict(parallel="fsdp2", optimizer=optimizer, **loop)
        model, _ = _train(f"{tmp}/{name}", 16, checkpoint_every=4, **settings)
        report[name] = _params(model)
        _train(f"{tmp}/{name}_cut", 16, max_steps=CUT, **settings)
        dist.barrier()
        if rank == 0:
            shutil.copytree(f"{tmp}/{name}_cut", f"{tmp}/{name}_cut1")
        dist.barrier()
        model, _ = _train(f"{tmp}/{name}_cut", 16, resume=True, **settings)
        report[f"{name}_resumed"] = _params(model)

    report["single_under_torchrun"] = _error(lambda: choose_strategy("single"))
    early = torch.optim.SGD(_model().parameters(), lr=0.1)  # on the unsharded params
    report["early_optimizer"] = _error(
        lambda: _train(f"{tmp}/early", 16, parallel="fsdp2", opt=early)
    )
    # checkpoint_every 2: step 2's checkpoint is written, step 3's best fails on rank 0.
    save_atomic = ckpt.save_atomic
    ckpt.save_atomic = _failing_write(rank, save_atomic)
    report["ddp_write"] = _error(
        lambda: _train(f"{tmp}/ddp_full_disk", 16, parallel="ddp", checkpoint_every=2)
    )
    ckpt.save_atomic = save_atomic
    sharded.save_atomic = _failing_write(rank, save_atomic)
    report["fsdp2_write"] = _error(
        lambda: _train(f"{tmp}/fsdp2_full_disk", 16, parallel="fsdp2", checkpoint_every=2)
    )
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
    # As the CLI does (see fastopt.train.cli): gloo's threads can abort the shutdown.
    os._exit(0)


def _one_rank(rank, tmp):
    """In a process of its own: fsdp2 in one process starts a process group of one, which
    stays for the model's life."""
    torch.set_num_threads(1)
    report = {"wrong_batch": _error(lambda: _train(f"{tmp}/cut1", 16, parallel="fsdp2",
                                                   resume=True))}  # fmt: skip
    model, _ = _train(f"{tmp}/cut1", 32, parallel="fsdp2", resume=True)
    report["resumed"] = _params(model)
    for name, (optimizer, loop) in LEAN.items():
        model, _ = _train(f"{tmp}/{name}_cut1", 32, resume=True, parallel="fsdp2",
                          optimizer=optimizer, **loop)  # fmt: skip
        report[f"{name}_resumed"] = _params(model)
    with open(os.path.join(tmp, "one_rank.json"), "w") as f:
        json.dump(report, f)
    os._exit(0)


def _spawn(fn, tmp, nprocs, timeout=120):
    """Runs ``fn`` on ``nprocs`` processes; fails (rather than hanging) past ``timeout``."""
    context = mp.spawn(fn, args=(str(tmp),), nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} did not finish in {timeout} s (a rank hangs)")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp2")
    _spawn(_worker, tmp, WORLD)
    reports = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return tmp, reports


def _approx(values):
    """pytest.approx over a column of metrics rows that is None on some (val_loss)."""
    return [v if v is None else pytest.approx(v, rel=1e-5) for v in values]


def _assert_close(got, model):
    for g, want in zip(got, model.parameters()):
        torch.testing.assert_close(torch.tensor(g), want.detach().flatten(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["fastopt.AdamW", "torch.optim.SGD"])
def test_two_ranks_step_like_one_process(fsdp_run, tmp_path, optimizer):
    tmp, reports = fsdp_run
    name = "full" if optimizer == "fastopt.AdamW" else "sgd"
    model, result = _train(tmp_path / "single", 32, optimizer={"name": optimizer})
    sharded, single = read_metrics(tmp / name), read_metrics(tmp_path / "single")
    assert [r["step"] for r in sharded] == list(range(1, STEPS + 1))  # rank 0 alone wrote
    keys = ["train_loss", "lr", "grad_norm", "val_loss", "grad_norm/decay", "grad_norm/no_decay",
            "update_ratio/decay", "update_ratio/no_decay"]  # fmt: skip
    assert max(r["grad_norm"] for r in single) > 0.5  # so the clip is exercised
    for key in keys:
        assert [r.get(key) for r in sharded] == _approx(r.get(key) for r in single), key
    assert [r["zero_updates"] for r in sharded] == [r["zero_updates"] for r in single]
    for rank in range(WORLD):
        _assert_close(reports[rank][name], model)


def test_resumed_on_two_ranks_ends_as_the_uninterrupted_run(fsdp_run):
    tmp, reports = fsdp_run
    kept = lambda run: sorted(p.name for p in (tmp / run / "checkpoints").iterdir())  # noqa: E731
    assert kept("cut") == ["best", f"step_{CUT:08d}", f"step_{STEPS:08d}"]
    assert kept("full") == ["best", "step_00000008", f"step_{STEPS:08d}"]  # keep_last 2
    for rank in range(WORLD):
        assert reports[rank]["resumed"] == reports[rank]["full"]  # bit for bit on the CPU
    assert toy.metric_rows(tmp / "cut") == toy.metric_rows(tmp / "full")
    record = json.loads((tmp / "cut" / "run.json").read_text())
    assert record["world_size"] == WORLD and record["config"]["parallel"] == "fsdp2"


def test_resumed_on_one_rank_ends_as_the_uninterrupted_run(fsdp_run):
    tmp, reports = fsdp_run
    _spawn(_one_rank, tmp, 1)
    report = json.loads((tmp / "one_rank.json").read_text())
    assert "on 1 ranks it needs a loader batch_size of 32" in report["wrong_batch"]
    for got, want in zip(report["resumed"], reports[0]["full"]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
    full, resumed = toy.metric_rows(tmp / "full"), toy.metric_rows(tmp / "cut1")
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for key in ("train_loss", "grad_norm", "val_loss", "update_ratio/decay"):
        assert [r.get(key) for r in resumed] == _approx(r.get(key) for r in full), key
    # run.json keeps the world size the run started on: data.batch_size is per rank of it.
    assert json.loads((tmp / "cut1" / "run.json").read_text())["world_size"] == WORLD


def test_bad_combinations_are_one_line_errors(fsdp_run):
    _, reports = fsdp_run
    for report in reports:
        assert "use parallel 'ddp' or 'fsdp2'" in report["single_under_torchrun"]
        assert "build the optimizer on the model after fully_shard" in report["early_optimizer"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_a_write_failing_on_rank_0_stops_every_rank_with_its_error(fsdp_run, parallel):
    tmp, reports = fsdp_run
    errors = [report[f"{parallel}_write"] for report in reports]
    assert errors[0] == errors[1]  # the same error on both ranks: neither waits for the other
    assert errors[0].startswith("AtomicWriteError: cannot write ") and "No space left" in errors[0]
    checkpoints = tmp / f"{parallel}_full_disk" / "checkpoints"
    kept = sorted(p.name for p in checkpoints.iterdir())
    assert kept == ["step_00000002" + ("" if parallel == "fsdp2" else ".pt")]  # no torn file


def test_parallel_ddp_in_one_process_is_refused(tmp_path, capsys):
    code = main(["train", "--job", "mlp", "--parallel", "ddp", "--out", str(tmp_path / "r"),
                 "--max-steps", "2", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "parallel 'ddp' needs several processes: run it under torchrun" in err


def test_the_readme_commands(tmp_path, capsys):
    """torchrun's fsdp2 run stopped at step 8 and resumed in one process with the README's
    commands, against one process with the whole batch. Resuming it as a one-process run of
    .pt checkpoints is refused."""
    config = tmp_path / "c.yaml"
    config.write_text(
        "job: mlp\ndevice: cpu\nmax_steps: 12\neval_every: 4\nplots: false\nlog_every: 2\n"
        "schedule: {name: constant, warmup_steps: 2}\n"
        "data: {n_train: 512, n_val: 129, batch_size: 16}\n"
        "model: {hidden: 16, depth: 2, dropout: 0.0}\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{toy.ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           str(WORLD), "-m", "fastopt", "train", "--config", str(config), "--parallel", "fsdp2",
           "--out", str(out), "--max-steps", "8", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "checkpoints" / "step_00000008" / "state.pt").is_file()
    assert main(["train", "--out", str(out), "--resume", "--parallel", "single"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "parallel: 'fsdp2' there, 'single' now" in err
    cmd = [sys.executable, "-m", "fastopt", "train", "--out", str(out), "--resume",
           "--max-steps", "12", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step 12: train loss" in proc.stdout
    whole = tmp_path / "whole"
    text = config.read_text().replace("batch_size: 16", "batch_size: 32")
    (tmp_path / "c32.yaml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "c32.yaml"), "--out", str(whole),
                 "--no-progress"]) == 0  # fmt: skip
    got, want = toy.metric_rows(out), toy.metric_rows(whole)
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(2, 13, 2))
    for key in ("train_loss", "grad_norm", "val_loss"):
        assert [r.get(key) for r in got] == _approx(r.get(key) for r in want), key


@pytest.mark.parametrize("name", LEAN)
def test_lean_settings_resume_on_two_ranks_bit_for_bit_and_on_one_closely(fsdp_run, name):
    """fastopt.AdamW's 8-bit and bf16 moments (with stochastic rounding) under fsdp2: the
    checkpoint of step 6 (torch.distributed.checkpoint: codes and block scales, seed and
    counts) resumes on two ranks to the uninterrupted run's bits, and on one rank to within
    the rounding of the gradients' sums over ranks, as fp32 runs do; bf16 autocast and
    micro_batch_size auto run under fsdp2 with them."""
    tmp, reports = fsdp_run
    optimizer, _ = LEAN[name]
    assert (
        json.loads((tmp / name / "run.json").read_text())["config"]["optimizer"]["state_dtype"]
        == optimizer["state_dtype"]
    )
    for rank in range(WORLD):
        assert reports[rank][f"{name}_resumed"] == reports[rank][name]
    assert reports[0][name] != reports[0]["full"]  # the setting changed the run
    if not (tmp / "one_rank.json").exists():  # written by the one-rank test, when it ran
        _spawn(_one_rank, tmp, 1)
    one = json.loads((tmp / "one_rank.json").read_text())
    # 8-bit codes round stochastically: a gradient a rounding apart can round a code the other
    # way, so their bound is the codes' step (measured: 6.7e-4 at most); bf16 moments' noise
    # rounds values too far apart for that, and they end within fp32 rounding, as fp32 runs.
    tol = dict(rtol=2e-2, atol=2e-3) if name == "int8" else dict(rtol=1e-5, atol=1e-6)
    for got, want in zip(one[f"{name}_resumed"], reports[0][name]):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **tol)
