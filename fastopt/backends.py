"""Which implementation runs an op: the one place that decides.

Backends: 'reference' (plain PyTorch, any device), 'cpu' (the C++ kernel, fastopt._C), 'cuda'
(the CUDA kernels, fastopt._C_cuda), 'triton' (the Triton kernels; on CPU tensors only under
TRITON_INTERPRET=1). 'auto' picks, for CUDA tensors, cuda, then triton, then reference; for CPU
tensors, cpu, then reference; for float64 tensors, reference, which computes in float64 as torch
does.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

from . import _ext

__all__ = [
    "BACKENDS",
    "KERNEL_DTYPES",
    "availability",
    "backend_ops",
    "select_backend",
]

BACKENDS = ("reference", "cpu", "cuda", "triton")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


@functools.cache
def _triton_error() -> str | None:
    try:
        importlib.import_module("fastopt.kernels")
    except ImportError as exc:
        return f"Triton kernels failed to import: {exc}"
    return None


def availability(backend: str, device_type: str) -> tuple[bool, str]:
    """Whether ``backend`` can run on tensors of ``device_type``, and why not if it cannot."""
    if backend == "reference":
        return True, "plain PyTorch"
    if backend == "cpu":
        if device_type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, not {device_type}"
        if not _ext.has_kernel("adamw_", "CPU"):
            return False, f"fastopt._C is not loaded: {_ext.extension_error()}"
        return True, "C++ kernel in fastopt._C"
    if backend == "cuda":
        if device_type != "cuda":
            return False, f"the cuda backend runs on CUDA tensors, not {device_type}"
        if not _ext.has_kernel("adamw_", "CUDA"):
            return False, _ext.cuda_error() or "fastopt._C_cuda registered no CUDA kernels"
        return True, "CUDA kernels in fastopt._C_cuda"
    if backend == "triton":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if device_type == "cpu" and not interpret:
            return False, "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return False, f"Triton does not run on {device_type} tensors"
        error = _triton_error()
        if error is not None:
            return False, error
        return True, "Triton kernels (interpreter)" if device_type == "cpu" else "Triton kernels"
    raise ValueError(f"unknown backend {backend!r}; expected 'auto' or one of {BACKENDS}")


# The storage dtypes the compiled and Triton kernels take (their math is fp32). float64
# tensors (and complex128, as pairs of float64) run on the reference backend, in float64.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def select_backend(
    requested: str, device: torch.device | str, dtype: torch.dtype | None = None
) -> str:
    """The backend that runs ops on ``device`` (for tensors of ``dtype``, when given) for a
    request of ``requested`` (or 'auto').

    An explicit request that cannot run raises RuntimeError with the reason: never a silent
    switch to another implementation.
    """
    device_type = torch.device(device).type
    if dtype is not None and dtype not in KERNEL_DTYPES and requested != "reference":
        if requested == "auto":
            return "reference"
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}; expected 'auto' or one of {BACKENDS}")
        raise RuntimeError(
            f"fastopt backend {requested!r} does not support {dtype} tensors (its kernels take "
            "float32, bfloat16 and float16); use backend='auto' or 'reference', which run "
            f"{dtype} in {dtype}"
        )
    if requested == "auto":
        for candidate in _AUTO_ORDER.get(device_type, ("reference",)):
            if availability(candidate, device_type)[0]:
                return candidate
        return "reference"
    ok, reason = availability(requested, device_type)
    if not ok:
        raise RuntimeError(
            f"fastopt backend {requested!r} is unavailable on {device_type}: {reason}"
        )
    return requested


def backend_ops(backend: str) -> ModuleType:
    """The module implementing the four ops (the signatures of fastopt.reference)."""
    if backend == "reference":
        from . import reference

        return reference
    if backend in ("cpu", "cuda"):
        from . import _ops

        return _ops
    if backend == "triton":
        return importlib.import_module("fastopt.kernels")
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
