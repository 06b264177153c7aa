"""Fixtures the trainer's tests share; the toy task, model and configs they train are in
``toy.py`` (plain functions, imported by the test modules)."""

from __future__ import annotations

import pytest
import toy
from torch import nn

from fastopt.train import fit


@pytest.fixture
def train_toy(tmp_path):
    """``train_toy(name="run", resume=False, **overrides)`` fits :func:`toy.model` on
    :func:`toy.loaders` with ``toy.config(tmp_path, name, **overrides)``; returns the
    FitResult."""

    def train(name: str = "run", *, resume: bool = False, **overrides):
        cfg = toy.config(tmp_path, name, **overrides)
        return fit(toy.model(), nn.functional.cross_entropy, *toy.loaders(), cfg, resume=resume)

    return train
