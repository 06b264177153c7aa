"""What a dataset factory returns (a module of its own: the built-in jobs' data modules,
which :mod:`fastopt.train.jobs` imports by name, import it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["JobData"]


@dataclass
class JobData:
    """What a dataset factory returns. ``test``: evaluated once at the end. ``model_args``:
    keyword arguments for the model factory. ``decode`` (token ids to text) and ``prompt``
    (1-D token ids): with both, and a model with a ``generate(ids, n)`` method, the end of the
    run prints a sample. ``baseline``: a loss to compare with (default: ln of
    ``model_args["vocab_size"]``, a uniform guess)."""

    train: Dataset
    val: Dataset | None = None
    test: Dataset | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    decode: Callable[[Any], str] | None = None
    prompt: torch.Tensor | None = None
    baseline: float | None = None
