"""Checkpoints: atomic writes, the last ``k`` kept plus the best, and RNG state capture.

A checkpoint is written to a temporary file in the same folder, flushed and fsync'ed, then
renamed over its final name with ``os.replace`` (atomic on POSIX) and the folder fsync'ed: a
crash at any point leaves either the previous file or the new one, never a torn one (the run
folder's ``run.json`` is written the same way, with :func:`write_atomic`). A write that fails
(disk full, file-size limit) raises :class:`AtomicWriteError` naming the file and leaves the
previous one. Files are ``step_XXXXXXXX.pt`` (the newest ``keep_last`` are kept) and
``best.pt``. Everything in them is tensors and plain Python values, so they load with
``torch.load(weights_only=True)``; loading first checks the zip archive's CRC-32s.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed as D

__all__ = [
    "AtomicWriteError",
    "CheckpointError",
    "CheckpointManager",
    "Rotation",
    "capture_rng",
    "load_checkpoint",
    "restore_rng",
    "save_atomic",
    "share_outcome",
    "write_atomic",
]

_TMP_PREFIX = ".tmp-"


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory (Windows)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicWriteError(OSError):
    """A file that could not be written (disk full, file-size limit, no permission). The file
    at its name, if any, is the previous one, untouched."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def _os_error(e: BaseException) -> OSError | None:
    # torch.save reports a failed write as a RuntimeError ("unexpected pos ...") raised while
    # handling the OSError: the OSError is what says why.
    if not isinstance(e, Exception):  # KeyboardInterrupt, SystemExit: not a write error
        return None
    for candidate in (e, e.__cause__, e.__context__):
        if isinstance(candidate, OSError):
            return candidate
    return None


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``. Once the body has written and fsync'ed it,
    it replaces ``path`` atomically and the folder is fsync'ed; if the body fails, it is
    removed and ``path`` is left as it was (an OS error becomes an :class:`AtomicWriteError`
    naming ``path``, not the temporary file)."""
    tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{path.name}")
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = _os_error(e)
        if cause is None or isinstance(e, AtomicWriteError):
            raise
        raise AtomicWriteError(cause.errno, cause.strerror or str(cause), str(path)) from e
    _fsync_dir(path.parent)


def share_outcome(error: AtomicWriteError | None) -> None:
    """Raises on every rank the write error of the first rank that had one (a no-op when
    none did). Under torchrun a rank whose write failed stops, and the others would wait for
    it at their next collective forever: they stop with it, with the same one-line error."""
    if not D.is_distributed():
        if error is not None:
            raise error
        return
    shared = None if error is None else (error.errno, error.strerror, error.filename)
    for found in D.all_gather_objects(shared):
        if found is not None:
            raise AtomicWriteError(*found)


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` so that ``path`` is never seen half written."""
    path = Path(path)
    with _replacing(path) as tmp:
        _write_synced(tmp, lambda f: torch.save(obj, f))
    return path


def write_atomic(data: bytes, path: str | os.PathLike) -> Path:
    """Writes ``data`` to ``path`` so that ``path`` is never seen half written."""
    path = Path(path)
    with _replacing(path) as tmp:
        _write_synced(tmp, lambda f: f.write(data))
    return path


def _link_atomic(src: Path, dst: Path) -> None:
    """Makes ``dst`` the same file as ``src`` atomically: a hard link when the file system has
    them (no second write), else a full fsync'ed copy."""
    with _replacing(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as fin:
                _write_synced(tmp, lambda fout: shutil.copyfileobj(fin, fout))


class CheckpointError(RuntimeError):
    """A checkpoint file that is there but does not load (truncated, empty, bytes changed, not
    a checkpoint). The writes here are atomic, so this is damage from outside: a disk or
    file-system fault, a copy or sync cut short."""


def _damaged_member(path: Path) -> str | None:
    """The first member of the zip archive at ``path`` whose CRC-32 does not match, or None.
    torch.load does not check them: bytes changed inside a tensor would load as weights."""
    with zipfile.ZipFile(path) as archive:
        return archive.testzip()  # reads it all once more; torch.load then reads the cache


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint onto the CPU (tensors and plain values only) once its zip CRC-32s
    check out. Raises FileNotFoundError when there is no file and :class:`CheckpointError`
    when it does not load."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        damaged = _damaged_member(path)
        if damaged is None:
            return torch.load(path, map_location="cpu", weights_only=True)
        error, detail = None, f"the CRC-32 of {damaged} does not match: its bytes were changed"
    # BadZipFile, EOFError, OSError, RuntimeError, UnpicklingError: none names the file
    except Exception as e:
        error, detail = e, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    raise CheckpointError(
        f"checkpoint {path} does not load ({path.stat().st_size} bytes; {detail})"
    ) from error


class Rotation:
    """What both checkpoint managers share: ``step_XXXXXXXX`` entries (files ending in
    ``suffix``, or folders) in ``directory``, of which the newest ``keep_last`` are kept, and
    ``best``; the newest that loads found by trying them newest first. Subclasses write and
    load an entry."""

    suffix = ""
    every_rank = False  # whether every rank calls every method (else rank 0 alone)

    def __init__(self, directory: str | os.PathLike, keep_last: int = 2) -> None:
        if not (isinstance(keep_last, int) and keep_last >= 1):
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last
        self._pattern = re.compile(rf"^step_(\d{{8,}}){re.escape(self.suffix)}$")

    def step_path(self, step: int) -> Path:
        return self.directory / f"step_{step:08d}{self.suffix}"

    @property
    def best_path(self) -> Path:
        return self.directory / f"best{self.suffix}"

    def _is_entry(self, path: Path) -> bool:
        """Whether a path named like a step checkpoint is one (a file or a folder)."""
        return True

    def steps(self) -> list[int]:
        """The steps that have a checkpoint, oldest first."""
        if not self.directory.is_dir():
            return []
        found = ((self._pattern.match(p.name), p) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m, p in found if m and self._is_entry(p))

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        raise NotImplementedError

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.step_path(steps[-1]) if steps else None

    def load_newest(self) -> tuple[Path, dict[str, Any], list[str]] | None:
        """The newest step checkpoint that loads: (its path, its state, why each newer one did
        not load). None when there is no step checkpoint; :class:`CheckpointError` listing them
        all when none loads."""
        failures = []
        for step in reversed(self.steps()):
            path = self.step_path(step)
            try:
                return path, self.load(path), failures
            except CheckpointError as e:
                failures.append(str(e))
        if failures:
            raise CheckpointError(f"no checkpoint in {self.directory} loads: {'; '.join(failures)}")
        return None

    def _rotate(self, remove) -> None:
        """``remove``s the step checkpoints beyond the newest ``keep_last``."""
        for old in self.steps()[: -self.keep_last]:
            remove(self.step_path(old))


class CheckpointManager(Rotation):
    """``step_*.pt`` files in ``directory``: the newest ``keep_last`` are kept, and ``best.pt``."""

    suffix = ".pt"
    every_rank = False  # written by rank 0 alone (every rank holds the whole state)

    def _ensure_dir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in self.directory.glob(f"{_TMP_PREFIX}*"):  # left by a crash mid-write
            stale.unlink(missing_ok=True)

    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        return load_checkpoint(path)

    def save(self, state: dict[str, Any], step: int, *, is_best: bool = False) -> Path:
        """Writes the checkpoint of ``step`` (and makes it ``best.pt`` too when ``is_best``),
        then removes step files beyond the newest ``keep_last``."""
        self._ensure_dir()
        path = save_atomic(state, self.step_path(step))
        if is_best:
            _link_atomic(path, self.best_path)
        self._rotate(lambda old: old.unlink(missing_ok=True))
        return path

    def save_best(self, state: dict[str, Any]) -> Path:
        """Writes ``best.pt`` alone (a new best between regular checkpoints)."""
        self._ensure_dir()
        return save_atomic(state, self.best_path)

    def restore_best(self, step: int) -> Path:
        """Makes ``best.pt`` the checkpoint of ``step`` again (after a crash between writing
        that checkpoint and linking it, or when ``best.pt`` is damaged)."""
        self._ensure_dir()
        _link_atomic(self.step_path(step), self.best_path)
        return self.best_path


# -- random number generator states -------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """torch, CUDA (when initialised), numpy and Python RNG states, as checkpointable values."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Restores what :func:`capture_rng` captured."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
