"""Telemetry in metrics.jsonl, checked against what it claims to measure: the per-group
gradient norms add up to the optimizer's own global norm, the update ratios are those of the
checkpointed weights, updates that round to nothing are counted; rates, memory, the
optimizer's share of the step, the gradient-norm plot; MLflow tracking, and its missing
package in one line."""

import math
import sys
import types

import pytest
import torch
import toy
from torch import nn

from fastopt.train import ConfigError, fit, load_checkpoint, read_metrics

OPTIMIZERS = ["fastopt.AdamW", "torch.optim.AdamW"]


def _run(tmp_path, name="run", **overrides):
    cfg = toy.config(tmp_path, name, **{"log_every": 1, "max_steps": 6, **overrides})
    model = toy.model(dropout=0.0)
    fit(model, nn.functional.cross_entropy, *toy.loaders(), cfg)
    return model, read_metrics(cfg.out)


@pytest.mark.parametrize("accum", [1, 2], ids=["no-accumulation", "accumulation"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_group_norms_add_up_to_the_global_norm(tmp_path, optimizer, accum):
    """grad_norm is the optimizer step's own (fastopt's fused norm pass, or torch's
    get_total_norm); the groups' norms, computed by the telemetry from the gradients it reads
    (fastopt's fp32 accumulation buffers times their factor, or .grad), must add up to it."""
    _, rows = _run(tmp_path, grad_accum_steps=accum, optimizer={"name": optimizer})
    for r in rows:
        parts = r["grad_norm/decay"] ** 2 + r["grad_norm/no_decay"] ** 2
        assert math.sqrt(parts) == pytest.approx(r["grad_norm"], rel=1e-5)
        assert r["grad_norm/decay"] > 0 and r["grad_norm/no_decay"] > 0


def test_layer_norms_add_up_to_the_global_norm(tmp_path):
    _, rows = _run(tmp_path, telemetry={"per": "layer"})
    layers = sorted(k for k in rows[0] if k.startswith("grad_norm/"))
    assert layers == ["grad_norm/0", "grad_norm/3"]  # the two Linear layers of the Sequential
    for r in rows:
        assert math.sqrt(sum(r[k] ** 2 for k in layers)) == pytest.approx(r["grad_norm"], rel=1e-5)
    assert {"update_ratio/0", "update_ratio/3"} <= set(rows[0])


def test_update_ratios_are_those_of_the_checkpointed_weights(tmp_path):
    cfg_overrides = {"checkpoint_every": 1, "keep_last": 10}
    _, rows = _run(tmp_path, **cfg_overrides)
    ckpts = tmp_path / "run" / "checkpoints"
    decay = {"0.weight", "3.weight"}  # matrices; the biases are the no_decay group
    for r in rows[1:]:
        before = load_checkpoint(ckpts / f"step_{r['step'] - 1:08d}.pt")["model"]
        after = load_checkpoint(ckpts / f"step_{r['step']:08d}.pt")["model"]
        for group, names in (("decay", decay), ("no_decay", set(before) - decay)):
            delta = math.sqrt(sum(float((after[n] - before[n]).pow(2).sum()) for n in names))
            weight = math.sqrt(sum(float(before[n].pow(2).sum()) for n in names))
            assert r[f"update_ratio/{group}"] == pytest.approx(delta / weight, rel=1e-5)
        assert r["zero_updates"] == 0  # fp32 weights and an lr of 3e-3: every update lands


def test_updates_that_round_to_nothing_are_counted(tmp_path):
    """An lr of 1e-12 moves fp32 weights of ~0.1 by far less than half an ulp (~4e-9)."""
    model, rows = _run(tmp_path, optimizer={"lr": 1e-12, "weight_decay": 0.0})
    n = sum(p.numel() for p in model.parameters())
    assert all(0.99 * n <= r["zero_updates"] <= n for r in rows), [r["zero_updates"] for r in rows]


def test_rates_memory_and_the_optimizer_share(tmp_path):
    _, rows = _run(tmp_path, plots=True)
    for r in rows:
        assert r["tokens_per_sec"] == pytest.approx(r["samples_per_sec"])  # one label a sample
        assert 0 < r["optimizer_time_fraction"] < 1
        assert r["peak_memory_mb"] > 10  # this process's peak RSS: torch alone is more
        assert "micro_batch_size" not in r  # null (whole batches) is left out of the rows
    assert (tmp_path / "run" / "grad_norm.png").read_bytes()[:4] == b"\x89PNG"
    _, off = _run(tmp_path, "off", telemetry={"enabled": False})
    assert not any(k.startswith(("grad_norm/", "update_ratio/", "tokens")) for k in off[0])
    assert "samples_per_sec" in off[0] and "grad_norm" in off[0]


def test_telemetry_does_not_change_the_run(tmp_path):
    on, _ = _run(tmp_path, "on")
    off, _ = _run(tmp_path, "off", telemetry={"enabled": False})
    for a, b in zip(on.parameters(), off.parameters()):
        assert torch.equal(a, b)


def test_mlflow_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    cfg = toy.config(tmp_path, tracking="mlflow")
    with pytest.raises(ConfigError) as e:
        fit(toy.model(), nn.functional.cross_entropy, *toy.loaders(), cfg)
    assert "MLflow is not installed" in str(e.value)
    assert "pip install 'fastopt[mlflow]'" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()  # checked before anything was written


class _FakeClient:
    """Records what the trainer asks of MLflow's client (the real one is an extra)."""

    calls: list = []

    def __init__(self, tracking_uri):
        self.calls.append(("uri", tracking_uri))

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name):
        self.calls.append(("experiment", name))
        return "1"

    def create_run(self, experiment_id, run_name):
        self.calls.append(("run", experiment_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id="abc123"))

    def update_run(self, run_id, status):
        self.calls.append(("update", run_id, status))

    def log_batch(self, run_id, metrics=(), params=()):
        self.calls.append(("batch", run_id, list(metrics), list(params)))

    def log_artifact(self, run_id, path):
        self.calls.append(("artifact", run_id, path))

    def set_terminated(self, run_id):
        self.calls.append(("end", run_id))


def _fake_mlflow(monkeypatch):
    mlflow = types.ModuleType("mlflow")
    tracking = types.ModuleType("mlflow.tracking")
    entities = types.ModuleType("mlflow.entities")
    tracking.MlflowClient = _FakeClient
    entities.Metric = lambda key, value, timestamp, step: (key, value, step)
    entities.Param = lambda key, value: (key, value)
    for name, module in (("mlflow", mlflow), ("mlflow.tracking", tracking),
                         ("mlflow.entities", entities)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    _FakeClient.calls = []


def test_mlflow_gets_params_metrics_and_plots(tmp_path, monkeypatch):
    _fake_mlflow(monkeypatch)
    constant = {"name": "constant"}  # no horizon: the resumed run below may extend it
    cfg = toy.config(tmp_path, tracking="mlflow", plots=True, max_steps=10, schedule=constant)
    fit(toy.model(), nn.functional.cross_entropy, *toy.loaders(), cfg)
    calls = _FakeClient.calls
    assert calls[0] == ("uri", (tmp_path / "run" / "mlruns").resolve().as_uri())
    assert ("run", "1", "run") in calls and calls[-1] == ("end", "abc123")
    params = dict(next(c[3] for c in calls if c[0] == "batch" and c[3]))
    assert params["optimizer.lr"] == "0.003" and params["max_steps"] == "10"
    metrics = [m for c in calls if c[0] == "batch" for m in c[2]]
    rows = read_metrics(cfg.out)
    assert [(k, v, s) for k, v, s in metrics if k == "train_loss"] == [
        ("train_loss", r["train_loss"], r["step"]) for r in rows
    ]
    assert any(k == "grad_norm.decay" for k, _, _ in metrics)  # "/" would be a folder there
    artifacts = sorted(c[2].rsplit("/", 1)[1] for c in calls if c[0] == "artifact")
    assert artifacts == ["grad_norm.png", "loss.png", "lr.png"]
    assert (tmp_path / "run" / "mlflow_run_id").read_text() == "abc123\n"
    # a resumed run goes on in the same MLflow run
    _FakeClient.calls = []
    more = toy.config(tmp_path, tracking="mlflow", plots=True, max_steps=15, schedule=constant)
    fit(toy.model(), nn.functional.cross_entropy, *toy.loaders(), more, resume=True)
    assert ("update", "abc123", "RUNNING") in _FakeClient.calls
    assert not any(c[0] == "run" for c in _FakeClient.calls)
