"""Loads the compiled extension fastopt._C once, and remembers why when it cannot."""

from __future__ import annotations

import importlib
import warnings

import torch

__all__ = ["extension_error", "has_kernel", "load"]

_loaded: bool | None = None
_error: str | None = None


def load() -> bool:
    """Imports fastopt._C (registering torch.ops.fastopt.*); True on success.

    A missing or broken extension never breaks ``import fastopt``: it warns once and every
    op falls back to the reference backend.
    """
    global _loaded, _error
    if _loaded is None:
        try:
            importlib.import_module("fastopt._C")
            _loaded = True
        except (ImportError, OSError) as exc:
            _loaded = False
            _error = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"fastopt: the compiled extension fastopt._C could not be loaded ({_error}); "
                "the 'cpu' and 'cuda' backends are unavailable and 'auto' uses the reference "
                "or Triton backend. Rebuild with `pip install --no-build-isolation -e .`.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _loaded


def extension_error() -> str | None:
    """Why fastopt._C failed to load, or None."""
    load()
    return _error


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether fastopt._C registered ``fastopt::op`` for ``dispatch_key`` ("CPU", "CUDA")."""
    return load() and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastopt::{op}", dispatch_key)
