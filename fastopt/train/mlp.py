"""The ``mlp`` job (``--job mlp``), the fastest smoke test: an MLP classifier on generated data.

The data are made from the seed, nothing is downloaded: inputs ``x ~ N(0, I)`` labelled by
the arg-max of a fixed random "teacher" network (one tanh layer, class scores standardised so
the classes are roughly balanced). The student is a wider MLP with dropout; on a 2-core CPU
the default config takes the validation loss from about 2.08 (ln 8, chance) to about 0.3.

``data.path`` replaces the generated data with a ``.pt`` or ``.npz`` file holding ``x``
(N, features) and ``y`` (N,) class indices; ``data.val_fraction`` of it is held out.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from .errors import ConfigError
from .jobs.job_data import JobData

__all__ = ["build_dataset", "build_model"]

TEACHER_HIDDEN = 32
# Offset between the seeds of the data and of the model's init, so that changing one
# config seed moves both without the two streams coinciding.
DATA_SEED_OFFSET = 1_000_003


def _generated(n_train: int, n_val: int, d: int, c: int, seed: int):
    g = torch.Generator().manual_seed(seed + DATA_SEED_OFFSET)
    x = torch.randn(n_train + n_val, d, generator=g)
    w1 = torch.randn(d, TEACHER_HIDDEN, generator=g) / math.sqrt(d)
    b1 = 0.3 * torch.randn(TEACHER_HIDDEN, generator=g)
    w2 = torch.randn(TEACHER_HIDDEN, c, generator=g) / math.sqrt(TEACHER_HIDDEN)
    scores = torch.tanh(x @ w1 + b1) @ w2
    y = ((scores - scores.mean(0)) / scores.std(0)).argmax(1)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def _from_file(path: str, d: int, c: int, val_fraction: float, seed: int):
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config key 'data.path': no file at {str(file)!r}")
    if file.suffix == ".npz":
        import numpy as np

        with np.load(file) as f:
            arrays = {k: torch.from_numpy(f[k]) for k in f.files}
    elif file.suffix == ".pt":
        arrays = torch.load(file, map_location="cpu", weights_only=True)
    else:
        raise ConfigError(f"config key 'data.path': expected a .npz or .pt file, got {path!r}")
    if not isinstance(arrays, dict) or not {"x", "y"} <= set(arrays):
        raise ConfigError(f"data file {path!r} must hold arrays named 'x' and 'y'")
    x, y = torch.as_tensor(arrays["x"]).float(), torch.as_tensor(arrays["y"]).long()
    if x.dim() != 2 or y.dim() != 1 or len(x) != len(y):
        raise ConfigError(
            f"data file {path!r}: x must be (N, features) and y (N,), "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[1] != d or y.min() < 0 or y.max() >= c:
        raise ConfigError(
            f"data file {path!r} has {x.shape[1]} features and labels in "
            f"[{int(y.min())}, {int(y.max())}]; set data.n_features and data.n_classes to match"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"config key 'data.val_fraction' must be in (0, 1), got {val_fraction}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(val_fraction * len(x))))
    val, train = perm[:n_val], perm[n_val:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


def build_dataset(
    path: str | None = None,
    n_train: int = 131072,
    n_val: int = 8192,
    n_features: int = 32,
    n_classes: int = 8,
    val_fraction: float = 0.2,
    *,
    seed: int,
):
    """Train and validation sets: generated from ``seed``, or read from ``path`` (``x`` and
    ``y``) and split by ``seed``. ``val_fraction``: with ``path``, the share held out."""
    # n_val >= 1: the job evaluates on the validation set (an empty one has no loss), and
    # early stopping and the plateau schedule watch val_loss by default.
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_features", n_features),
                        ("n_classes", n_classes)):  # fmt: skip
        if value < 1:
            raise ConfigError(f"config key 'data.{name}' must be >= 1, got {value}")
    if path is not None:
        train, val = _from_file(path, n_features, n_classes, val_fraction, seed)
    else:
        train, val = _generated(n_train, n_val, n_features, n_classes, seed)
    return JobData(train, val, model_args={"n_features": n_features, "n_classes": n_classes})


def build_model(
    n_features: int, n_classes: int, hidden: int = 512, depth: int = 3, dropout: float = 0.1
) -> nn.Module:
    """``depth`` blocks of Linear, GELU and Dropout, then a linear classifier."""
    if hidden < 1 or depth < 1 or not 0.0 <= dropout < 1.0:
        raise ConfigError(
            "config keys 'model.hidden' and 'model.depth' must be >= 1 and "
            f"'model.dropout' in [0, 1), got hidden={hidden}, depth={depth}, dropout={dropout}"
        )
    layers: list[nn.Module] = []
    width = n_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
        width = hidden
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)
