"""Checkpoints: atomic writes (also under a real SIGKILL), failed writes, damage found on
loading, last-k and best, RNG round trip."""

import errno
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


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG], ids=["ENOSPC", "EFBIG"])
def test_a_failed_write_names_the_file_and_the_os_error(tmp_path, monkeypatch, code):
    """What torch.save raises when a write fails is a RuntimeError ("unexpected pos") about
    no file; the OSError under it is what says why."""
    path = tmp_path / "step_00000002.pt"

    def failing_save(obj, f):
        try:
            f.write(b"PK\x03\x04" * 100)
            raise OSError(code, os.strerror(code))
        except OSError:  # torch leaves the OSError as the context, not the cause
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")  # noqa: B904

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(ckpt.AtomicWriteError) as info:
        save_atomic({"step": 2}, path)
    assert str(info.value) == f"cannot write {path}: {os.strerror(code)}"
    assert info.value.errno == code and info.value.filename == str(path)
    assert os.listdir(tmp_path) == []


def test_a_file_size_limit_is_reported_as_such(tmp_path):
    """The real failure: a process under RLIMIT_FSIZE (Python ignores SIGXFSZ, so the write
    fails with EFBIG) writing a checkpoint larger than the limit."""
    script = textwrap.dedent(f"""
        import resource, torch
        from fastopt.train.checkpoint import AtomicWriteError, save_atomic
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        try:
            save_atomic({{"w": torch.ones(100000)}}, {str(tmp_path / "big.pt")!r})
        except AtomicWriteError as e:
            print(e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout == f"cannot write {tmp_path / 'big.pt'}: File too large\n", done.stderr
    assert os.listdir(tmp_path) == []


def test_bytes_changed_inside_a_checkpoint_are_found(tmp_path):
    """torch.load reads a zip archive without checking its CRC-32s: 4 KiB of random bytes
    written over the middle of a weight tensor used to load as weights."""
    path = tmp_path / "step_00000003.pt"
    save_atomic({"step": 3, "w": torch.ones(100000)}, path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 2048 : middle + 2048] = random.Random(0).randbytes(4096)
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["step"] == 3  # torch alone does not notice
    message = rf"checkpoint {re.escape(str(path))} does not load .*CRC-32 of archive/data/0"
    with pytest.raises(ckpt.CheckpointError, match=message):
        load_checkpoint(path)


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
