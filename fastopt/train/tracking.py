"""Experiment tracking besides ``metrics.jsonl``: MLflow's local file store (``tracking:
mlflow``), no server needed. The run's config goes in as params, every logged row as metrics,
the plots as artifacts, into ``out/mlruns`` (``mlflow ui --backend-store-uri out/mlruns``
shows them). A resumed run goes on in the same MLflow run: its id is kept in
``out/mlflow_run_id``. MLflow is an extra: ``pip install 'fastopt[mlflow]'``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .config import ConfigError

__all__ = ["MlflowTracker", "open_tracker"]

RUN_ID_FILE = "mlflow_run_id"
EXPERIMENT = "fastopt"
MAX_PARAM_LENGTH = 500  # MLflow refuses longer param values (6000 in recent versions, 500 before)


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
