"""Loads the compiled extensions once, and remembers why when one cannot be loaded.

fastopt._C holds the op schemas and the CPU kernels and loads into any torch it was built for
(every torch from 2.10: it uses only PyTorch's stable ABI). fastopt._C_cuda holds the CUDA
kernels; it is loaded on first need, and only into a CUDA build of torch of the CUDA major it
was built for, with a GPU visible.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from operator import attrgetter, is_

import torch

from ._build import build_info, version_tuple

__all__ = [
    "cuda_error",
    "drop_adamw_plan",
    "extension_error",
    "has_kernel",
    "load",
    "load_cuda",
    "plan_checks",
]

_loaded: bool | None = None
_error: str | None = None
_cuda_loaded: bool | None = None
_cuda_error: str | None = None

_REBUILD = "pip install --no-build-isolation -e ."
_BUILD_INFO = "fastopt/_build_info.json"


def load() -> bool:
    """Imports fastopt._C (registering torch.ops.fastopt.* and the CPU kernels); True on success.

    A missing or broken extension never breaks ``import fastopt``: it warns once and every
    op falls back to the reference backend.
    """
    global _loaded, _error
    if _loaded is None:
        try:
            _check_torch_version()
            module = importlib.import_module("fastopt._C")
            if not hasattr(module, "_cuda_version"):
                # Python prefers fastopt/_C.cpython-3XX-*.so, as earlier builds named it, to
                # the current _C.abi3.so beside it.
                stale = getattr(module, "__file__", module.__name__)
                raise ImportError(f"{stale} is left from an older build; delete it")
            _check_build_info(module)
            _loaded = True
        except (ImportError, OSError) as exc:
            _loaded = False
            _error = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"fastopt: the compiled extension fastopt._C could not be loaded ({_error}); "
                "the 'cpu' and 'cuda' backends are unavailable and 'auto' uses the reference "
                f"or Triton backend. Rebuild with `{_REBUILD}`.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _loaded


def _check_torch_version() -> None:
    """The running torch is at least the one the stable-ABI build targets (else the libraries
    would fail on a missing shim function, at load or at the first call)."""
    info = build_info()
    if info is None:
        return  # no build: importing fastopt._C fails and says so
    target = info["stable_abi_target"]
    if version_tuple(torch.__version__) < version_tuple(target):
        raise ImportError(
            f"fastopt {info['version']} needs torch >= {target}, found torch {torch.__version__}"
        )


def _check_build_info(module) -> None:
    """fastopt/_build_info.json describes the fastopt._C that was imported."""
    info = build_info()
    if info is None:
        raise ImportError(
            f"{module.__file__} has no {_BUILD_INFO} beside it: it is left from an older build"
        )
    if info["cuda"] != module._cuda_version:
        raise ImportError(
            f"{_BUILD_INFO} says CUDA {info['cuda']} and {module.__file__} CUDA "
            f"{module._cuda_version}: they are from different builds"
        )


def extension_error() -> str | None:
    """Why fastopt._C failed to load, or None."""
    load()
    return _error


def _built_cuda_version() -> str | None:
    """The CUDA version ("13.0") fastopt._C_cuda was built for; None if this build has none."""
    return build_info()["cuda"]  # load() checked it is there and matches fastopt._C


def _major(version: str) -> str:
    return version.split(".")[0]


def _try_load_cuda() -> tuple[bool, str | None, str | None]:
    """(loaded, why not, a warning to give) for fastopt._C_cuda."""
    if not load():
        return False, f"fastopt._C is not loaded: {_error}", None
    built = _built_cuda_version()
    if built is None:
        return False, "fastopt was built without CUDA kernels", None
    torch_cuda = torch.version.cuda
    if torch_cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build", None
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible (torch.cuda.is_available() is False)", None
    sides = (
        f"fastopt's CUDA kernels (fastopt._C_cuda) are built for CUDA {built}, and torch "
        f"{torch.__version__} uses CUDA {torch_cuda}"
    )
    major = _major(torch_cuda)
    remedy = (
        f"install fastopt built for CUDA {major} (a release's wheel for it: `pip install "
        f"--index-url <release folder>/cu{major}/simple fastopt`; or rebuild against this "
        f"torch with `{_REBUILD}`); until then the 'cuda' backend is unavailable and 'auto' "
        "uses the Triton or reference backend"
    )
    if _major(built) != _major(torch_cuda):
        why = f"{sides}: the CUDA majors differ"
        return False, why, f"{why}; {remedy}."
    try:
        importlib.import_module("fastopt._C_cuda")
    except (ImportError, OSError) as exc:
        why = f"fastopt._C_cuda could not be loaded ({type(exc).__name__}: {exc})"
        return False, why, f"{why}; {sides}; {remedy}."
    return True, None, None


def load_cuda() -> bool:
    """Imports fastopt._C_cuda (registering the CUDA kernels) where they can run; True then.

    Not attempted, silently, without a GPU or CUDA kernels in this build; a CUDA major other
    than torch's, or a library that fails to load, warns once. Either way the 'cuda' backend
    reports why it is unavailable (cuda_error()).
    """
    global _cuda_loaded, _cuda_error
    if _cuda_loaded is None:
        _cuda_loaded, _cuda_error, warning = _try_load_cuda()
        if warning is not None:
            warnings.warn(warning, RuntimeWarning, stacklevel=3)
    return _cuda_loaded


def cuda_error() -> str | None:
    """Why fastopt._C_cuda is not loaded, or None when it is."""
    load_cuda()
    return _cuda_error


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether fastopt registered ``fastopt::op`` for ``dispatch_key`` ("CPU", "CUDA")."""
    loaded = load_cuda() if dispatch_key == "CUDA" else load()
    return loaded and torch._C._dispatch_has_kernel_for_dispatch_key(f"fastopt::{op}", dispatch_key)


def drop_adamw_plan(plan: int) -> None:
    """Releases the tensors of an AdamW plan (fastopt._ops.AdamWPlan) that fastopt._C holds."""
    importlib.import_module("fastopt._C")._drop_adamw_plan(plan)


def _same_objects(a, b) -> bool:
    return len(a) == len(b) and all(map(is_, a, b))


def _entries_are(entries, keys, values) -> bool:
    k = len(keys)
    if len(values) != k * len(entries):
        return False
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or len(entry) != k:
            return False
        for j, (key, value) in enumerate(entry.items()):
            if value is not values[i * k + j] or (key is not keys[j] and key != keys[j]):
                return False
    return True


def _grads(params) -> tuple[list, int]:
    grads = list(map(attrgetter("grad"), params))
    return grads, sum(g is None for g in grads)


_python_checks = (_same_objects, _entries_are, _grads)
_checks: tuple[Callable, ...] | None = None


def plan_checks() -> tuple[Callable, ...]:
    """(same_objects, entries_are, grads), what a step checks to reuse a plan
    (fastopt/_plan.py): ``same_objects(a, b)``, whether two lists hold the same objects in
    order; ``entries_are(entries, keys, values)``, whether each dict of ``entries`` holds
    exactly ``keys`` in order, the i-th one's j-th value being ``values[i * len(keys) + j]``;
    ``grads(params)``, the list of their ``.grad`` and how many are None.
    fastopt._C's loops (csrc/plan_checks.h), or these Python passes where it is not loaded."""
    global _checks
    if _checks is None:
        if load():
            module = importlib.import_module("fastopt._C")
            _checks = (module._same_objects, module._entries_are, module._grads)
        else:
            _checks = _python_checks
    return _checks
