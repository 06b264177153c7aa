"""Run metrics: one JSON object per line in ``metrics.jsonl``, optionally TensorBoard too.

Rows carry ``step`` and whatever was measured at that step: ``train_loss``, ``lr``,
``grad_norm``, ``skipped_steps``, ``micro_batch_size`` and the telemetry
(:mod:`fastopt.train.telemetry`: rates, per-group gradient norms, update ratios, ...) on
logging steps and ``val_loss`` on evaluation steps. Only rank 0 writes. Rows also go to
TensorBoard (``tensorboard: true``) and to a tracker (``tracking: mlflow``) when asked.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .checkpoint import write_atomic
from .config import ConfigError

__all__ = ["MetricsLogger", "read_metrics"]

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    # JSON has no inf/NaN: write them as strings so every line stays valid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` file, or of ``DIR/metrics.jsonl`` for a run folder."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a line cut short by a crash: everything before it is intact
    return rows


class MetricsLogger:
    """Appends rows to ``out/metrics.jsonl`` (and TensorBoard scalars when asked)."""

    def __init__(
        self,
        out: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = False,
        tracking: str = "none",
        params: dict[str, Any] | None = None,
    ) -> None:
        from .tracking import open_tracker

        self.path = Path(out) / METRICS_FILE
        self.enabled = enabled
        self.tracker = open_tracker(tracking, Path(out), params or {}) if enabled else None
        self._file = None
        self._writer = None
        self._summary_writer = None
        if enabled and tensorboard:  # checked now, before the run starts; the writer is lazy
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError(
                    "config key 'tensorboard' is true but TensorBoard is not installed "
                    f"({e}); pip install tensorboard, or set tensorboard: false"
                ) from None
            self._summary_writer = SummaryWriter

    def truncate_after(self, step: int) -> None:
        """Drops rows past ``step`` (logged after the checkpoint a run resumes from)."""
        if not self.enabled or not self.path.is_file():
            return
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        write_atomic("".join(json.dumps(r) + "\n" for r in rows).encode(), self.path)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
            if self._summary_writer is not None:
                self._writer = self._summary_writer(log_dir=str(self.path.parent / "tensorboard"))
        row = {k: _clean(v) for k, v in row.items() if v is not None}
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        except OSError as e:  # disk full: the error alone would not say which file
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        if self._writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, row["step"])
        if self.tracker is not None:
            self.tracker.log(row)

    def artifacts(self, paths: list[Path]) -> None:
        """Hands the run's plots to the tracker, if any."""
        if self.tracker is not None and paths:
            self.tracker.artifacts(paths)

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
