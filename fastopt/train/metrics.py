"""Run metrics: one JSON object per line in ``metrics.jsonl``, optionally TensorBoard too.

Rows carry ``step`` and whatever was measured at that step: ``train_loss``, ``lr``,
``grad_norm``, ``skipped_steps``, ``micro_batch_size`` and the telemetry
(:mod:`fastopt.train.telemetry`: rates, per-group gradient norms, update ratios, ...) on
logging steps and ``val_loss`` on evaluation steps. Only rank 0 writes. Rows also go to
TensorBoard (``tensorboard: true``) and to a tracker (``tracking: mlflow``) when asked.

Tracking besides ``metrics.jsonl`` is MLflow's local file store (``tracking: mlflow``), no
server needed. The run's config goes in as params, every logged row as metrics,
the plots as artifacts, into ``out/mlruns`` (``mlflow ui --backend-store-uri out/mlruns``
shows them). A resumed run goes on in the same MLflow run: its id is kept in
``out/mlflow_run_id``. MLflow is an extra: ``pip install 'fastopt[mlflow]'``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .checkpoint import write_atomic
from .errors import ConfigError

__all__ = ["MetricsLogger", "MlflowTracker", "open_tracker", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "mlflow_run_id"
EXPERIMENT = "fastopt"
MAX_PARAM_LENGTH = 500  # MLflow refuses longer param values (6000 in recent versions, 500 before)


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


# -- tracking -------------------------------------------------------------------------------
class MlflowTracker:
    def __init__(self, out: Path, params: dict[str, Any]) -> None:
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise ConfigError(
                f"config key 'tracking' is 'mlflow' but MLflow is not installed ({e}); "
                "pip install 'fastopt[mlflow]', or set tracking: none"
            ) from None
        # Checked now, before the run starts; the store is opened at the first row, once the
        # run folder is the run's.
        self._metric, self._param, self._client_class = Metric, Param, MlflowClient
        self.out, self.params = out, params
        self.client = self.run_id = None

    def _open(self) -> None:
        # MLflow 3 put its file store in maintenance mode: 3.17.2 refuses it unless this is
        # set. It is still the one store that needs neither a server nor a database package.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self._start()
        except Exception as e:  # MlflowException and what the store raises: one line
            line = (str(e).splitlines() or [""])[0]
            raise ConfigError(
                f"MLflow cannot open its store in {self.out / 'mlruns'}: {type(e).__name__}: {line}"
            ) from None

    def _start(self) -> None:
        self.client = self._client_class(tracking_uri=(self.out / "mlruns").resolve().as_uri())
        id_file = self.out / RUN_ID_FILE
        if id_file.is_file():  # a resumed run: go on in its MLflow run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(EXPERIMENT)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=self.out.name).info.run_id
        id_file.write_text(self.run_id + "\n")
        params = sorted(self.params.items())
        self.client.log_batch(
            self.run_id, params=[self._param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params]
        )

    def log(self, row: dict[str, Any]) -> None:
        if self.client is None:
            self._open()
        now = int(time.time() * 1000)
        # The file store keeps a metric per file named by its key: "grad_norm/decay" would be
        # a file inside a folder "grad_norm", where the file "grad_norm" already is.
        metrics = [
            self._metric(k.replace("/", "."), float(v), now, int(row["step"]))
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def artifacts(self, paths: list[Path]) -> None:
        if self.client is None:
            self._open()
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def close(self) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id)


def open_tracker(kind: str, out: Path, params: dict[str, Any]) -> MlflowTracker | None:
    """The tracker ``tracking`` names, or None for "none"."""
    if kind == "none":
        return None
    if kind == "mlflow":
        return MlflowTracker(out, params)
    raise ConfigError(f"config key 'tracking' must be 'none' or 'mlflow', got {kind!r}")
