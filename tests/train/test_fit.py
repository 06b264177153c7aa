"""fastopt.train.fit: learning, bit-exact resume after a signal, accumulation normalisation,
skipped steps and the schedule, mixed precision, early stopping, run-folder identity."""

import json
import math
import signal
from pathlib import Path

import pytest
import torch
import toy
from torch import nn
from torch.utils.data import DataLoader

import fastopt
from fastopt.train import (
    ConfigError,
    WarmupLinear,
    fit,
    load_checkpoint,
    make_loader,
    read_metrics,
)


def test_default_run_learns_and_logs(tmp_path):
    cfg = toy.config(tmp_path, plots=True, optimizer={"lr": 1e-2})
    result = fit(toy.model(), nn.functional.cross_entropy, *toy.loaders(), cfg)
    rows = toy.metric_rows(cfg.out)
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    for r in rows:
        assert {"step", "train_loss", "lr", "grad_norm", "skipped_steps", "epoch"} <= set(r)
        assert ("val_loss" in r) == (r["step"] % 10 == 0)
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert vals[-1] < 0.7 * vals[0] and result.val_loss == vals[-1] and result.step == 40
    assert set(read_metrics(cfg.out)[0]) >= {"samples_per_sec", "step_time"}
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["optimizer_class"] == "fastopt.adamw.AdamW"  # the default optimizer
    for png in ("loss.png", "lr.png", "grad_norm.png"):
        assert (tmp_path / "run" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000040.pt")["step"] == 40


@pytest.mark.parametrize("optimizer", ["fastopt.AdamW", "torch.optim.AdamW"])
def test_resume_after_sigterm_is_bit_exact(tmp_path, optimizer):
    """A plain shuffled DataLoader and dropout: the data order and the dropout masks must
    both continue exactly where they were."""
    train = lambda: DataLoader(toy.data(), batch_size=24, shuffle=True)  # noqa: E731 (480/24: epochs end mid-step)
    val = DataLoader(toy.data(256, seed=1), batch_size=100)
    opt = {"name": optimizer, "lr": 1e-2}
    full_cfg = toy.config(tmp_path, "full", grad_accum_steps=3, optimizer=opt, checkpoint_every=7)
    fit(toy.model(), nn.functional.cross_entropy, train(), val, full_cfg)

    cfg = toy.config(tmp_path, "cut", grad_accum_steps=3, optimizer=opt, checkpoint_every=7)
    # loss calls: 3 per step, 3 more for the evaluation at step 10; the 50th is in step 16,
    # which the trainer finishes before it saves and returns
    cut = fit(toy.model(), toy.SignalAt(50), train(), val, cfg)
    assert cut.interrupted == "SIGTERM" and cut.step == 16
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "step_00000016.pt")["step"] == 16
    resumed = fit(toy.model(seed=123), nn.functional.cross_entropy, train(), val, cfg, resume=True)
    assert resumed.step == 40 and resumed.interrupted is None
    assert toy.metric_rows(cfg.out) == toy.metric_rows(full_cfg.out)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "step_00000040.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "step_00000040.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


@pytest.mark.parametrize("optimizer", ["fastopt.AdamW", "torch.optim.SGD"])
def test_accumulation_weights_micro_batches_by_size(tmp_path, optimizer):
    """Micro-batches of 16 and 8 samples accumulate to the gradient of the 24 together: each
    micro-batch's mean loss is weighted by its sample count, the sum divided by 24."""
    x, y = toy.data(24).tensors
    opt = {"name": optimizer, "lr": 0.1, "max_grad_norm": None}
    common = {"max_steps": 1, "eval_every": 1, "optimizer": opt, "schedule": {"name": "constant"}}
    split = toy.model(dropout=0.0)
    fit(
        split,
        nn.functional.cross_entropy,
        [(x[:16], y[:16]), (x[16:], y[16:])],
        None,
        toy.config(tmp_path, "split", grad_accum_steps=2, **common),
    )
    whole = toy.model(dropout=0.0)
    fit(
        whole,
        nn.functional.cross_entropy,
        [(x, y)],
        None,
        toy.config(tmp_path, "whole", grad_accum_steps=1, **common),
    )
    moved = 0.0
    for p, q, p0 in zip(
        split.parameters(), whole.parameters(), toy.model(dropout=0.0).parameters()
    ):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        moved += (p - p0).abs().sum().item()
    assert moved > 1e-3  # the step did something


@pytest.mark.parametrize("optimizer", ["fastopt.AdamW", "torch.optim.AdamW"])
def test_accumulated_grad_norm_matches_one_big_batch(tmp_path, optimizer):
    """Normalisation through the whole run: 2 x 16 accumulated == 1 x 32 (same samples, no
    dropout); the logged pre-clip gradient norms agree."""
    opt = {"name": optimizer, "lr": 1e-2, "max_grad_norm": 0.5}
    runs = {}
    for name, batch, accum in (("acc", 16, 2), ("big", 32, 1)):
        cfg = toy.config(tmp_path, name, grad_accum_steps=accum, log_every=1, optimizer=opt)
        train = make_loader(toy.data(), batch, train=True, seed=0)
        fit(toy.model(dropout=0.0), nn.functional.cross_entropy, train, None, cfg)
        runs[name] = [r["grad_norm"] for r in toy.metric_rows(cfg.out)]
    assert len(runs["acc"]) == 40
    assert runs["acc"] == pytest.approx(runs["big"], rel=1e-4)
    assert max(runs["acc"]) > 0.5  # clipping was active at least once


class _NanAt:
    """Cross-entropy whose ``at``-th call returns NaN (so that step's gradients are NaN)."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, output, target):
        self.calls += 1
        loss = nn.functional.cross_entropy(output, target)
        return loss * math.nan if self.calls == self.at else loss


@pytest.mark.parametrize(
    "optimizer, precision, clip",
    [
        ("fastopt.AdamW", "fp32", 1.0),  # skipped inside the fused step
        ("fastopt.AdamW", "fp32", None),  # the same: fit gives it max_grad_norm=inf
        ("fastopt.AdamW", "bf16", None),
        ("fastopt.AdamW", "fp16", None),  # skipped through fastopt.LossScaler
        ("torch.optim.AdamW", "fp32", 1.0),  # skipped by the trainer's finite check
        ("torch.optim.AdamW", "fp16", 1.0),  # skipped by LossScaler after unscale_
    ],
)
def test_a_skipped_step_does_not_advance_the_schedule(tmp_path, optimizer, precision, clip):
    cfg = toy.config(
        tmp_path,
        max_steps=12,
        log_every=1,
        eval_every=100,
        grad_accum_steps=2,
        precision=precision,
        schedule={"name": "warmup_linear", "warmup_steps": 8},
        optimizer={"name": optimizer, "lr": 1e-2, "max_grad_norm": clip},
    )
    model = toy.model()
    result = fit(model, _NanAt(9), *toy.loaders(), cfg)  # call 9 is in step 5
    assert result.skipped_steps == 1
    schedule = WarmupLinear(total_steps=12, warmup_steps=8)
    applied = [0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10]  # steps applied before each step
    rows = toy.metric_rows(cfg.out)
    assert [r["lr"] for r in rows] == pytest.approx(
        [1e-2 * schedule(a) for a in applied], rel=1e-12
    )
    assert [r["skipped_steps"] for r in rows] == [0] * 4 + [1] * 8
    assert all(torch.isfinite(p).all() for p in model.parameters())
    norms = [r.get("grad_norm") for r in rows]  # logged on every step, "nan" on the skipped
    assert norms[4] == "nan" and all(isinstance(n, float) and n > 0 for n in norms[:4] + norms[5:])


@pytest.mark.parametrize("given", [False, True], ids=["built", "given"])
def test_fastopt_without_clipping_skips_nan_steps_and_never_clips(tmp_path, given):
    """max_grad_norm null: fastopt.AdamW, built from the config or given with
    max_grad_norm=None, skips the step with NaN gradients and clips nothing: it logs the
    gradient norms torch.optim.AdamW's run logs (all above 1) and ends with its weights."""
    common = {"max_steps": 12, "log_every": 1, "eval_every": 100, "grad_accum_steps": 1}
    # One group with weight decay on every param, as the optimizer given below has.
    opt = {"lr": 3e-2, "max_grad_norm": None, "decay_matrices_only": False}

    def loss_fn(nan_at):  # x10: gradient norms well above the default clip of 1
        return lambda output, target: 10.0 * nan_at(output, target)

    reference = toy.model(dropout=0.0)
    torch_cfg = toy.config(
        tmp_path, "torch", optimizer={**opt, "name": "torch.optim.AdamW"}, **common
    )
    fit(reference, loss_fn(_NanAt(5)), *toy.loaders(), torch_cfg)
    model = toy.model(dropout=0.0)
    given_opt = fastopt.AdamW(model.parameters(), lr=3e-2, max_grad_norm=None) if given else None
    cfg = toy.config(tmp_path, "fastopt", optimizer=opt, **common)
    result = fit(model, loss_fn(_NanAt(5)), *toy.loaders(), cfg, optimizer=given_opt)
    assert result.skipped_steps == 1
    expected = [r["grad_norm"] for r in toy.metric_rows(torch_cfg.out)]
    norms = [r["grad_norm"] for r in toy.metric_rows(cfg.out)]
    assert norms[4] == expected[4] == "nan" and min(expected[:4] + expected[5:]) > 1.0
    assert norms[:4] + norms[5:] == pytest.approx(expected[:4] + expected[5:], rel=1e-4)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_trains(tmp_path):
    cfg = toy.config(tmp_path, precision="bf16", optimizer={"lr": 1e-2})
    fit(toy.model(), nn.functional.cross_entropy, *toy.loaders(), cfg)
    vals = [r["val_loss"] for r in toy.metric_rows(cfg.out) if "val_loss" in r]
    assert all(math.isfinite(v) for v in vals) and vals[-1] < 0.8 * vals[0]


def test_early_stopping_stops_restores_best_and_stays_stopped(tmp_path):
    """Validation labels are the training labels shifted by one class, so fitting the training
    set makes the validation loss worse after the first evaluations."""
    cfg = toy.config(
        tmp_path,
        max_steps=200,
        eval_every=4,
        checkpoint_every=50,
        optimizer={"lr": 3e-2},
        early_stopping={"patience": 3},
    )
    model = toy.model()
    val = make_loader(toy.data(256, seed=1, shift=1), 128, train=False)
    result = fit(model, nn.functional.cross_entropy, toy.loaders()[0], val, cfg)
    assert "did not improve" in result.stop_reason
    assert result.step == result.best_step + 3 * 4 < 200
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["step"] == result.best_step
    for key, value in model.state_dict().items():  # the best weights were put back
        assert torch.equal(value, best["model"][key]), key
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / f"step_{result.step:08d}.pt")
    assert not all(torch.equal(last["model"][k], v) for k, v in best["model"].items())
    again = fit(toy.model(), nn.functional.cross_entropy, toy.loaders()[0], val, cfg, resume=True)
    assert again.step == result.step and again.stop_reason == result.stop_reason


def test_torch_plateau_scheduler_and_optimizer_are_accepted(tmp_path):
    model = toy.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=0)
    cfg = toy.config(tmp_path, eval_every=5, optimizer={"max_grad_norm": None})
    val = make_loader(toy.data(256, seed=1, shift=1), 128, train=False)  # gets worse: reduces
    fit(
        model,
        nn.functional.cross_entropy,
        toy.loaders()[0],
        val,
        cfg,
        optimizer=opt,
        schedule=plateau,
    )
    lrs = [r["lr"] for r in toy.metric_rows(cfg.out)]
    assert lrs[0] == 0.5 and lrs[-1] < 0.5 * 1e-1


def test_run_folder_identity(tmp_path):
    cfg = toy.config(tmp_path, max_steps=8)
    fit(toy.model(), nn.functional.cross_entropy, *toy.loaders(), cfg)
    with pytest.raises(ConfigError, match="already holds a run"):
        fit(toy.model(), nn.functional.cross_entropy, *toy.loaders(), cfg)
    other = toy.config(tmp_path, max_steps=8, optimizer={"lr": 0.5})
    with pytest.raises(ConfigError, match=r"different run.*optimizer\.lr: 0\.003 there, 0\.5 now"):
        fit(toy.model(), nn.functional.cross_entropy, *toy.loaders(), other, resume=True)
    with pytest.raises(ConfigError, match="different run.*model_signature"):
        fit(
            nn.Linear(toy.N_FEATURES, toy.N_CLASSES),
            nn.functional.cross_entropy,
            *toy.loaders(),
            cfg,
            resume=True,
        )
    with pytest.raises(ConfigError, match="nothing to resume"):
        fit(
            toy.model(),
            nn.functional.cross_entropy,
            *toy.loaders(),
            toy.config(tmp_path, "empty"),
            resume=True,
        )


def test_fastopt_optimizer_must_agree_with_the_config_on_clipping(tmp_path):
    model = toy.model()
    with pytest.raises(ConfigError, match="max_grad_norm"):
        fit(
            model,
            nn.functional.cross_entropy,
            *toy.loaders(),
            toy.config(tmp_path),
            optimizer=fastopt.AdamW(model.parameters()),
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_trains_on_the_gpu(tmp_path, precision):
    cfg = toy.config(tmp_path, device="cuda", precision=precision, optimizer={"lr": 1e-2})
    model = toy.model()
    result = fit(model, nn.functional.cross_entropy, *toy.loaders(), cfg)
    vals = [r["val_loss"] for r in toy.metric_rows(cfg.out) if "val_loss" in r]
    assert next(model.parameters()).is_cuda and result.skipped_steps < cfg.max_steps // 4
    assert all(math.isfinite(v) for v in vals) and vals[-1] < 0.8 * vals[0]


def test_tensorboard_is_optional_and_checked_before_the_run(tmp_path):
    cfg = toy.config(tmp_path, tensorboard=True, max_steps=8)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="TensorBoard is not installed"):
            fit(toy.model(), nn.functional.cross_entropy, *toy.loaders(), cfg)
        assert not (tmp_path / "run").exists()  # nothing was started
    else:
        fit(toy.model(), nn.functional.cross_entropy, *toy.loaders(), cfg)
        assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_sigint_checkpoints_too_and_the_handlers_are_put_back(tmp_path):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    class _InterruptAt(toy.SignalAt):
        def __call__(self, output, target):
            self.calls += 1
            if self.calls == self.at:
                signal.raise_signal(signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt mid-step
            return nn.functional.cross_entropy(output, target)

    result = fit(toy.model(), _InterruptAt(7), *toy.loaders(), toy.config(tmp_path))
    assert result.interrupted == "SIGINT" and result.step == 4
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004.pt")["step"] == 4
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_an_overlapped_offload_run_equals_the_plain_run_and_resumes_exactly(tmp_path):
    """optimizer.offload + overlap: the host update runs beside the next forward; the metrics
    and checkpoints are the plain run's bit for bit, a SIGTERM-cut run resumes to the same,
    and the checkpoints (model and state) are read after the update finished."""
    train = lambda: DataLoader(toy.data(), batch_size=24, shuffle=True)  # noqa: E731
    val = DataLoader(toy.data(256, seed=1), batch_size=100)
    lean = {"lr": 1e-2, "state_dtype": "int8", "min_8bit_size": 0}
    plain = toy.config(tmp_path, "plain", optimizer=lean, checkpoint_every=7)
    fit(toy.model(), nn.functional.cross_entropy, train(), val, plain)
    over = {**lean, "offload": True, "overlap": True}
    cfg = toy.config(tmp_path, "over", optimizer=over, checkpoint_every=7)
    cut = fit(toy.model(), toy.SignalAt(33), train(), val, cfg)  # 2 calls a step, 3 to evaluate
    assert cut.interrupted == "SIGTERM" and cut.step == 15
    fit(toy.model(seed=123), nn.functional.cross_entropy, train(), val, cfg, resume=True)
    assert toy.metric_rows(cfg.out) == toy.metric_rows(plain.out)
    for step in (35, 40):
        name = f"checkpoints/step_{step:08d}.pt"
        a, b = (load_checkpoint(Path(c.out) / name) for c in (plain, cfg))
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), key
        for k, entry in a["optimizer"]["state"].items():
            for name, value in entry.items():
                assert torch.equal(value, b["optimizer"]["state"][k][name]), name


def test_a_run_may_switch_offload_and_overlap_when_resumed(train_toy):
    """Where the update runs is not what it computes: the fingerprint and the resume check
    leave optimizer.offload and optimizer.overlap out, and the steps are the same."""
    schedule = {"name": "warmup_cosine", "warmup_steps": 5, "total_steps": 20}
    whole = train_toy("whole", max_steps=20, schedule=schedule)
    train_toy("switched", max_steps=10, checkpoint_every=10, schedule=schedule)
    lean = {"offload": True, "overlap": True}
    switched = train_toy("switched", resume=True, max_steps=20, schedule=schedule,
                         optimizer=lean)  # fmt: skip
    assert switched.step == 20
    assert toy.metric_rows(switched.out) == toy.metric_rows(whole.out)
