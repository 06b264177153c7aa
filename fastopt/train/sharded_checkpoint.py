"""Sharded checkpoints (``parallel: fsdp2``): one ``torch.distributed.checkpoint`` folder per
step, so that a run saved on N ranks resumes on M (DCP reshards on load).

``step_XXXXXXXX/`` holds the model's and optimizer's shards (every rank writes its own
``__<rank>_0.distcp``, fsync'ed, and rank 0 the ``.metadata`` that maps them to the whole
tensors) and ``state.pt``, written by rank 0: the rest of the run's state (step, schedule,
scaler, early stopping, micro-batch size, data position, every rank's RNG states), a small
:func:`~fastopt.train.checkpoint.save_atomic` file whose zip CRC-32s are checked on load.
The shards' files carry no checksum of their own: a truncated or missing one fails to load,
changed bytes inside one would not be seen.

As the ``.pt`` files, a folder appears whole or not at all: the ranks write into
``.tmp-step_XXXXXXXX/``, and once every rank has finished rank 0 renames it. Replacing a
folder that exists (``best/``, or a step written again after a damaged one) takes two
renames; a crash between them leaves the old one as ``.old-<name>``, removed on the next
save (a missing ``best/`` is restored from the best step's folder on resume). ``best/`` is
made of hard links to the step folder's files where the file system has them. The outcome of
every write is shared by all ranks, so a failure on one stops every rank with the same
:class:`~fastopt.train.checkpoint.AtomicWriteError`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_map

from . import distributed as D
from .checkpoint import (
    AtomicWriteError,
    CheckpointError,
    Rotation,
    _fsync_dir,
    _os_error,
    load_checkpoint,
    save_atomic,
    share_outcome,
)

__all__ = ["ShardedCheckpointManager"]

_SHARDED = ("model", "optimizer")  # what DCP writes; the rest goes into state.pt
STATE_FILE = "state.pt"
_TMP, _OLD = ".tmp-", ".old-"


def _write_error(e: BaseException, path: Path) -> AtomicWriteError | None:
    """The OSError behind a failed write (DCP wraps each rank's in a CheckpointException),
    as an :class:`AtomicWriteError` naming the folder."""
    cause = _os_error(e)
    if cause is None:  # DCP's CheckpointException holds {rank: exception}
        failures = getattr(e, "failures", None) or {}
        cause = next((c for c in map(_os_error, failures.values()) if c is not None), None)
    if cause is None:
        return None
    return AtomicWriteError(cause.errno, cause.strerror or str(cause), str(path))


def _swap_in(tmp: Path, path: Path) -> None:
    """Renames the folder ``tmp`` to ``path``, moving an existing ``path`` aside first."""
    old = path.with_name(f"{_OLD}{path.name}")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _link_tree(src: Path, dst: Path) -> None:
    """``dst``, a new folder of hard links to ``src``'s files (copies where links fail)."""
    dst.mkdir()
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)
    _fsync_dir(dst)


class ShardedCheckpointManager(Rotation):
    """``step_*/`` folders in ``directory``: the newest ``keep_last`` are kept, and ``best/``.
    ``template()`` gives the model's and optimizer's state dicts as this run shards them (the
    layout a checkpoint is loaded into, whatever the world size it was saved on). Every rank
    calls every method."""

    every_rank = True

    def __init__(
        self, directory: str | os.PathLike, *, keep_last: int, template: Callable[[], dict]
    ) -> None:
        super().__init__(directory, keep_last)
        self.template = template

    def _is_entry(self, path: Path) -> bool:
        return path.is_dir()

    # -- writing ----------------------------------------------------------------------------
    def _write(self, state: dict[str, Any], path: Path) -> None:
        """Every rank's shards and rank 0's state.pt into a temporary folder, renamed to
        ``path`` once all have written; a failure anywhere raises on every rank."""
        import torch.distributed.checkpoint as dcp

        tmp = path.with_name(f"{_TMP}{path.name}")
        error = None
        if D.rank() == 0:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
                for stale in self.directory.glob(f"{_TMP}*"):  # left by a crash mid-write
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
            except OSError as e:
                error = AtomicWriteError(e.errno, e.strerror or str(e), str(path))
        share_outcome(error)  # the folder exists before any rank writes into it
        try:
            dcp.save({k: state[k] for k in _SHARDED}, checkpoint_id=tmp)
        except Exception as e:  # every rank gets DCP's gathered failures
            error = _write_error(e, path)
            if error is None:
                raise
        if error is None and D.rank() == 0:
            try:
                extras = {k: v for k, v in state.items() if k not in _SHARDED}
                save_atomic(extras, tmp / STATE_FILE)
                _swap_in(tmp, path)
            except OSError as e:
                error = _write_error(e, path)
                shutil.rmtree(tmp, ignore_errors=True)
        share_outcome(error)

    def save(self, state: dict[str, Any], step: int, *, is_best: bool = False) -> Path:
        """Writes the checkpoint of ``step`` (and makes it ``best/`` too when ``is_best``),
        then removes step folders beyond the newest ``keep_last``."""
        path = self.step_path(step)
        self._write(state, path)
        if is_best:
            self.restore_best(step)
        if D.rank() == 0:
            self._rotate(lambda old: shutil.rmtree(old, ignore_errors=True))
        return path

    def save_best(self, state: dict[str, Any]) -> Path:
        """Writes ``best/`` alone (a new best between regular checkpoints)."""
        self._write(state, self.best_path)
        return self.best_path

    def restore_best(self, step: int) -> Path:
        """Makes ``best/`` the checkpoint of ``step`` again."""
        error = None
        if D.rank() == 0:
            tmp = self.directory / f"{_TMP}{self.best_path.name}"
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                _link_tree(self.step_path(step), tmp)
                _swap_in(tmp, self.best_path)
            except OSError as e:
                error = AtomicWriteError(e.errno, e.strerror or str(e), str(self.best_path))
        share_outcome(error)
        return self.best_path

    # -- reading ----------------------------------------------------------------------------
    def load(self, path: str | os.PathLike) -> dict[str, Any]:
        """A checkpoint folder's state, its model and optimizer resharded to this run's
        layout. FileNotFoundError when there is none, :class:`CheckpointError` when it does
        not load (on every rank alike: they read the same files)."""
        import torch.distributed.checkpoint as dcp

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"no checkpoint at {path}")
        state = load_checkpoint(path / STATE_FILE) if (path / STATE_FILE).is_file() else None
        if state is None:
            raise CheckpointError(f"checkpoint {path} does not load (no {STATE_FILE})")
        # Copies: the template's tensors are the live parameters and optimizer state, and
        # loading best/ must not overwrite them.
        sharded = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v,
                           self.template())  # fmt: skip
        try:
            dcp.load(sharded, checkpoint_id=path)
        except Exception as e:
            detail = f"{type(e).__name__}: {e}".splitlines()[0]
            raise CheckpointError(f"checkpoint {path} does not load ({detail})") from e
        return {**state, **sharded}
