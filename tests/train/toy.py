"""What the trainer's tests share: a small classification task, its model and a CPU config for
:func:`fastopt.train.fit`, the ``mlp`` job shrunk to a second or two for the CLI, and a run's
metrics without what is timed."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fastopt.train import TrainConfig, config_from_dict, make_loader, read_metrics

ROOT = Path(__file__).resolve().parents[2]  # the repository

N_FEATURES, N_CLASSES = 8, 4


def data(n: int = 512, seed: int = 0, shift: int = 0) -> TensorDataset:
    """``n`` samples of a linearly separable task; ``shift`` relabels them (another task)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g)
    w = torch.randn(N_FEATURES, N_CLASSES, generator=torch.Generator().manual_seed(99))
    return TensorDataset(x, ((x @ w).argmax(1) + shift) % N_CLASSES)


def model(dropout: float = 0.1, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(N_FEATURES, 32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, N_CLASSES)
    )


# A config that trains :func:`model` in a second on the CPU, with nothing drawn or printed.
CONFIG = {
    "max_steps": 40,
    "eval_every": 10,
    "log_every": 5,
    "checkpoint_every": 0,
    "progress": False,
    "plots": False,
    "grad_accum_steps": 2,
    "schedule": {"name": "warmup_cosine", "warmup_steps": 5},
    "early_stopping": {"enabled": False},
    "device": "cpu",  # bit-exact comparisons are a CPU promise
}


def config(tmp_path, name: str = "run", **overrides) -> TrainConfig:
    """:data:`CONFIG` writing to ``tmp_path/name``, top-level keys replaced by ``overrides``."""
    return config_from_dict({**CONFIG, "out": str(tmp_path / name), **overrides})


def loaders(batch: int = 32):
    return make_loader(data(), batch, train=True, seed=0), make_loader(
        data(256, seed=1), 128, train=False
    )


class SignalAt:
    """A loss function that sends this process SIGTERM on its ``at``-th call."""

    def __init__(self, at):
        self.at, self.calls = at, 0

    def __call__(self, output, target):
        self.calls += 1
        if self.calls == self.at:
            signal.raise_signal(signal.SIGTERM)
        return nn.functional.cross_entropy(output, target)


# The mlp job shrunk to a second or two.
SMALL = """\
job: mlp
device: cpu
max_steps: {steps}
eval_every: 20
log_every: 5
checkpoint_every: 50
schedule: {{name: warmup_cosine, warmup_steps: 10, min_ratio: 0.1}}
data: {{n_train: 4096, n_val: 1024, batch_size: 64}}
model: {{hidden: {hidden}, depth: 2}}
"""


def small(tmp_path, steps=60, hidden=64, extra="") -> str:
    """:data:`SMALL` written to ``tmp_path/small.yaml`` (``extra``: more lines); its path."""
    path = tmp_path / "small.yaml"
    path.write_text(SMALL.format(steps=steps, hidden=hidden) + extra)
    return str(path)


# The metrics.jsonl keys that are measured, not computed: they differ from run to run.
TIMING_KEYS = (
    "samples_per_sec",
    "step_time",
    "tokens_per_sec",
    "optimizer_time_fraction",
    "peak_memory_mb",
)


def metric_rows(out) -> list[dict]:
    """A run folder's metrics.jsonl rows without the timing keys, to compare two runs."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(out)]


def wait_for_step(out: Path, step: int, proc, timeout=120.0):
    """Waits until the run in ``out`` has logged ``step`` or ``proc`` has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return
        try:
            if any(r["step"] >= step for r in read_metrics(out)):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"no step {step} in {out} after {timeout} s")
