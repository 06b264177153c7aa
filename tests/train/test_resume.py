"""Resuming a run whose folder is not as a clean stop leaves it: a crash before the first
checkpoint, a crash between writing a best step's checkpoint and linking best.pt to it, a
damaged newest checkpoint or best.pt, and settings that may change on resume."""

import random
import signal

import pytest
import torch
import toy

from fastopt.train import ConfigError, ResumeWarning, fit, load_checkpoint
from fastopt.train import checkpoint as ckpt

# The validation loss at each evaluation (every 2 steps): new bests at steps 2, 4 and 6, none
# after, so early stopping (patience 3) ends the run at step 12 and puts step 6 back.
VAL_LOSS = {2: 1.0, 4: 0.9, 6: 0.8, 8: 0.85, 10: 0.86, 12: 0.87, 14: 0.88, 16: 0.89}
BEST_STEP, LAST_STEP = 6, 12
# Only the first evaluation is a best: the run ends at step 8 and puts step 2 back.
FIRST_ONLY = {2: 1.0, 4: 1.1, 6: 1.2, 8: 1.3}


class _Scripted:
    """Cross-entropy for training (one micro-batch per step); the scripted ``VAL_LOSS`` of
    the step for evaluation (or of ``val_loss``). ``start``: the step a resumed run continues
    from; ``stop_at``: SIGTERM during that step; ``fail_at``: raise during that step (a crash)."""

    def __init__(self, start=0, stop_at=None, fail_at=None, val_loss=VAL_LOSS):
        self.step, self.stop_at, self.fail_at = start, stop_at, fail_at
        self.val_loss = val_loss

    def __call__(self, output, target):
        if not torch.is_grad_enabled():  # evaluation
            return torch.tensor(self.val_loss[self.step])
        self.step += 1
        if self.step == self.fail_at:
            raise _Crash(f"crash in step {self.step}")
        if self.step == self.stop_at:
            signal.raise_signal(signal.SIGTERM)
        return torch.nn.functional.cross_entropy(output, target)


class _Crash(Exception):
    pass


def _cfg(tmp_path, name, **overrides):
    settings = {
        "max_steps": 16,
        "eval_every": 2,
        "log_every": 2,
        "checkpoint_every": 2,
        "keep_last": 2,
        "grad_accum_steps": 1,
        "optimizer": {"lr": 1e-2},
        "schedule": {"name": "constant"},
        "early_stopping": {"patience": 3},
        **overrides,
    }
    return toy.config(tmp_path, name, **settings)


def _reference(tmp_path, val_loss=VAL_LOSS, best_and_last=(BEST_STEP, LAST_STEP)):
    """A run never interrupted: its result, rows and final weights."""
    cfg = _cfg(tmp_path, "reference")
    model = toy.model()
    result = fit(model, _Scripted(val_loss=val_loss), *toy.loaders(), cfg)
    assert (result.best_step, result.step) == best_and_last  # the script holds
    return result, toy.metric_rows(cfg.out), model.state_dict()


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "val_loss, crash_step, last_step, best_pt_before",
    [(FIRST_ONLY, 2, 8, None), (VAL_LOSS, BEST_STEP, LAST_STEP, 4)],
    ids=["best.pt-missing", "best.pt-older"],
)
def test_crash_before_best_pt_is_linked_keeps_the_best_weights(
    tmp_path, monkeypatch, val_loss, crash_step, last_step, best_pt_before
):
    """The step checkpoint of a new best is written, then the process dies before best.pt is
    linked to it: best.pt is missing (first best) or holds the previous best. No later
    evaluation improves, so only the resumed run can put those weights back: it takes them
    from that step checkpoint and restores best.pt."""
    ref, ref_rows, ref_weights = _reference(tmp_path, val_loss, (crash_step, last_step))
    cfg = _cfg(tmp_path, "crashed")
    link = ckpt._link_atomic

    def crash_before_linking(src, dst):
        if src.name == f"step_{crash_step:08d}.pt":
            raise _Crash("killed before best.pt was linked")
        link(src, dst)

    monkeypatch.setattr(ckpt, "_link_atomic", crash_before_linking)
    with pytest.raises(_Crash):
        fit(toy.model(), _Scripted(val_loss=val_loss), *toy.loaders(), cfg)
    monkeypatch.undo()
    best_pt = cfg.out + "/checkpoints/best.pt"
    if best_pt_before is None:
        assert not (tmp_path / "crashed" / "checkpoints" / "best.pt").exists()
    else:
        assert load_checkpoint(best_pt)["step"] == best_pt_before

    model = toy.model(seed=1)
    with pytest.warns(ResumeWarning, match=f"the best step is {crash_step}: restored best.pt"):
        scripted = _Scripted(start=crash_step, val_loss=val_loss)
        result = fit(model, scripted, *toy.loaders(), cfg, resume=True)
    assert (result.step, result.best_step, result.stop_reason) == (
        ref.step,
        ref.best_step,
        ref.stop_reason,
    )
    assert toy.metric_rows(cfg.out) == ref_rows
    _assert_same_weights(model.state_dict(), ref_weights)  # the best weights were put back
    assert load_checkpoint(best_pt)["step"] == crash_step
    _assert_same_weights(load_checkpoint(best_pt)["model"], ref_weights)


def _damage(path, how):
    """Replaces ``path`` with a damaged copy: a new file, as best.pt is a hard link to the
    step checkpoint it was made from and must not be damaged with it. ``changed``: 4 KiB of
    random bytes over the middle, the size unchanged (torch.load alone loads that file)."""
    data = bytearray(path.read_bytes())
    path.unlink()
    middle = len(data) // 2
    if how == "empty":
        data = b""
    elif how == "truncated":
        data = data[:middle]
    else:
        data[middle - 2048 : middle + 2048] = random.Random(path.name).randbytes(4096)
    path.write_bytes(bytes(data))


def _interrupted(tmp_path, name="cut", stop_at=8, **overrides):
    """A run stopped by SIGTERM in step ``stop_at`` (checkpoints of steps 6 and 8 kept)."""
    cfg = _cfg(tmp_path, name, **overrides)
    cut = fit(toy.model(), _Scripted(stop_at=stop_at), *toy.loaders(), cfg)
    assert cut.interrupted == "SIGTERM" and cut.step == stop_at
    return cfg


@pytest.mark.parametrize("how", ["truncated", "empty", "changed"])
def test_resume_passes_over_a_damaged_newest_checkpoint(tmp_path, how):
    _, ref_rows, ref_weights = _reference(tmp_path)
    cfg = _interrupted(tmp_path)
    checkpoints = tmp_path / "cut" / "checkpoints"
    _damage(checkpoints / "step_00000008.pt", how)
    model = toy.model(seed=1)
    with pytest.warns(
        ResumeWarning, match=r"resuming from .*step_00000006\.pt.*step_00000008\.pt does not load"
    ):
        result = fit(model, _Scripted(start=6), *toy.loaders(), cfg, resume=True)
    assert result.step == LAST_STEP and toy.metric_rows(cfg.out) == ref_rows
    _assert_same_weights(model.state_dict(), ref_weights)

    _damage(checkpoints / "step_00000012.pt", how)
    _damage(checkpoints / "step_00000010.pt", how)
    with pytest.raises(
        ConfigError,
        match=r"cannot resume .*no checkpoint in .* loads: checkpoint .*step_00000012\.pt does "
        r"not load .*; checkpoint .*step_00000010\.pt does not load",
    ):
        fit(toy.model(), _Scripted(start=LAST_STEP), *toy.loaders(), cfg, resume=True)


def test_a_damaged_best_pt_is_restored_from_the_best_step_checkpoint(tmp_path):
    _, ref_rows, ref_weights = _reference(tmp_path)
    cfg = _interrupted(tmp_path)
    best_pt = tmp_path / "cut" / "checkpoints" / "best.pt"
    _damage(best_pt, "truncated")
    model = toy.model(seed=1)
    with pytest.warns(
        ResumeWarning, match=r"best\.pt does not load .*restored best\.pt from .*step_00000006\.pt"
    ):
        fit(model, _Scripted(start=8), *toy.loaders(), cfg, resume=True)
    assert toy.metric_rows(cfg.out) == ref_rows
    _assert_same_weights(model.state_dict(), ref_weights)
    _assert_same_weights(load_checkpoint(best_pt)["model"], ref_weights)


def test_a_damaged_best_pt_without_its_step_checkpoint_does_not_block_resume(tmp_path):
    cfg = _interrupted(tmp_path, keep_last=1)  # step 6's checkpoint is gone
    _damage(tmp_path / "cut" / "checkpoints" / "best.pt", "empty")
    with pytest.warns(ResumeWarning, match=r"weights of the best step so far \(6\) are lost"):
        result = fit(toy.model(), _Scripted(start=8), *toy.loaders(), cfg, resume=True)
    assert (result.step, result.best_step) == (LAST_STEP, BEST_STEP)


def test_resume_before_the_first_checkpoint_starts_from_step_0(tmp_path):
    """A run that crashed before its first step checkpoint (it wrote run.json, metrics rows
    and best.pt): resuming starts it over in its folder."""
    _, ref_rows, ref_weights = _reference(tmp_path)
    cfg = _cfg(tmp_path, "crashed", checkpoint_every=0)
    with pytest.raises(_Crash):
        fit(toy.model(), _Scripted(fail_at=5), *toy.loaders(), cfg)
    assert toy.metric_rows(cfg.out) and not list(
        (tmp_path / "crashed" / "checkpoints").glob("step_*")
    )
    model = toy.model()
    with pytest.warns(ResumeWarning, match="holds no checkpoint yet: starting its run from step 0"):
        result = fit(model, _Scripted(), *toy.loaders(), cfg, resume=True)
    assert result.step == LAST_STEP and toy.metric_rows(cfg.out) == ref_rows
    _assert_same_weights(model.state_dict(), ref_weights)


def test_resume_may_change_logging_and_checkpointing(tmp_path):
    """log_every, checkpoint_every and keep_last do not change what a run computes."""
    _, _, ref_weights = _reference(tmp_path)
    cfg = _interrupted(tmp_path, stop_at=5)
    changed = _cfg(tmp_path, "cut", log_every=1, checkpoint_every=3, keep_last=4)
    model = toy.model(seed=1)
    result = fit(model, _Scripted(start=5), *toy.loaders(), changed, resume=True)
    assert result.step == LAST_STEP and [r["step"] for r in toy.metric_rows(cfg.out)][-3:] == [
        10,
        11,
        12,
    ]
    _assert_same_weights(model.state_dict(), ref_weights)
    kept = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("step_*"))
    assert kept == ["step_00000005.pt", "step_00000006.pt", "step_00000009.pt", "step_00000012.pt"]
