"""Checkpoints: atomic writes (also under a real SIGKILL), last-k and best, RNG round trip."""

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from fastopt.train import CheckpointManager, load_checkpoint, save_atomic
from fastopt.train import checkpoint as ckpt


def test_save_atomic_round_trip(tmp_path):
    obj = {"w": torch.arange(5.0), "step": 3, "nested": {"t": (1, 2), "none": None}}
    save_atomic(obj, tmp_path / "a.pt")
    back = load_checkpoint(tmp_path / "a.pt")
    assert (
        torch.equal(back["w"], obj["w"]) and back["step"] == 3 and back["nested"] == obj["nested"]
    )
    assert os.listdir(tmp_path) == ["a.pt"]


def test_a_failed_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_atomic({"step": 1, "w": torch.ones(1000)}, path)

    def torn_save(obj, f):  # writes half a file, then the "crash"
        f.write(b"\x80\x02garbage" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"step": 2}, path)
    assert load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]  # the temporary file is gone too


def test_sigkill_mid_write_never_corrupts_the_file(tmp_path):
    """A writer rewriting a ~16 MB checkpoint in a loop is SIGKILLed at some point mid-way: the
    file at the final name always loads, and holds one complete version."""
    path = tmp_path / "latest.pt"
    script = textwrap.dedent(f"""
        import sys, torch
        from fastopt.train.checkpoint import save_atomic
        w = torch.zeros(4 * 1024 * 1024)
        for step in range(1, 100000):
            save_atomic({{"step": step, "w": w.fill_(step)}}, {str(path)!r})
            if step == 1:
                print("ready", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.4)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    state = load_checkpoint(path)
    assert state["step"] >= 1 and bool((state["w"] == state["step"]).all())
    # a crash leaves at most a temporary file, which the manager cleans up and ignores
    manager = CheckpointManager(tmp_path)
    assert manager.latest() is None  # "latest.pt" is not a step file
    manager.save({"step": 7}, 7)
    assert sorted(os.listdir(tmp_path)) == ["latest.pt", "step_00000007.pt"]


def test_keep_last_and_best(tmp_path):
    manager = CheckpointManager(tmp_path / "ck", keep_last=2)
    assert manager.latest() is None and manager.steps() == []
    for step in range(1, 6):
        manager.save({"step": step}, step, is_best=step == 3)
    assert manager.steps() == [4, 5]
    assert manager.latest() == tmp_path / "ck" / "step_00000005.pt"
    assert load_checkpoint(manager.best_path)["step"] == 3  # survives pruning of step 3
    manager.save_best({"step": 6})
    assert load_checkpoint(manager.best_path)["step"] == 6 and manager.steps() == [4, 5]
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep_last=0)


@pytest.mark.parametrize("size", [0, 1, 2000], ids=["empty", "1-byte", "truncated"])
def test_a_damaged_checkpoint_is_named_in_the_error(tmp_path, size):
    """torch.load's own errors (EOFError, OSError 'Invalid argument', ...) name no file."""
    path = tmp_path / "step_00000003.pt"
    save_atomic({"step": 3, "w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:size])
    message = rf"checkpoint {re.escape(str(path))} does not load \({size} bytes"
    with pytest.raises(ckpt.CheckpointError, match=message):
        load_checkpoint(path)


def test_stale_temporary_files_are_ignored_and_removed(tmp_path):
    stale = tmp_path / ".tmp-99999-step_00000009.pt"
    stale.write_bytes(b"half a checkpoint")
    manager = CheckpointManager(tmp_path)
    manager.save({"step": 2}, 2)
    assert manager.steps() == [2] and not stale.exists()


def test_rng_capture_and_restore(tmp_path):
    state = ckpt.capture_rng()
    save_atomic({"rng": state}, tmp_path / "r.pt")
    first = (torch.rand(4), np.random.rand(3), np.random.normal(), random.random())
    ckpt.restore_rng(load_checkpoint(tmp_path / "r.pt")["rng"])
    again = (torch.rand(4), np.random.rand(3), np.random.normal(), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert first[2:] == again[2:]
