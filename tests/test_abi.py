"""What the compiled libraries import and export: from torch only its stable C shim, from Python
only the limited API. That is what lets one build load into every torch from 2.10 and every
CPython from 3.10 (a cp310-abi3 wheel).

Reads the shared libraries with binutils' nm (a missing nm is a failure, not a skip), so it
runs without a GPU; fastopt._C_cuda is inspected when this build has it, never loaded here.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch

from fastopt import _C

TORCH_LIB = Path(torch.__file__).parent / "lib"
# The libraries the CUDA module links besides libtorch_cpu (their C++ symbols are ATen/c10's).
TORCH_LIBS = ("libtorch_cpu.so", "libc10.so", "libtorch.so", "libtorch_cuda.so", "libc10_cuda.so")

# Python C-API names the modules use. Each is in the stable ABI of CPython 3.10
# (Doc/data/stable_abi.dat; _Py_Dealloc, _Py_NoneStruct, _Py_TrueStruct and _Py_FalseStruct
# are what Py_DECREF, Py_None, Py_True and Py_False expand to there). A new name belongs here
# only once checked against that list (abi3audit does it: see
# test_abi3audit_finds_no_violation).
LIMITED_API = {
    "PyBool_FromLong",
    "PyCapsule_Import",
    "PyCapsule_New",
    "PyDict_Next",
    "PyDict_Size",
    "PyErr_Format",
    "PyErr_Occurred",
    "PyExc_TypeError",
    "PyExc_ValueError",
    "PyList_GetItem",
    "PyList_New",
    "PyList_SetItem",
    "PyList_Size",
    "PyLong_AsLong",
    "PyLong_AsLongLong",
    "PyLong_FromLong",
    "PyModule_AddObjectRef",
    "PyModule_Create2",
    "PyObject_GetAttr",
    "PyObject_RichCompareBool",
    "PyTuple_GetItem",
    "PyTuple_Pack",
    "PyTuple_Size",
    "PyType_GetFlags",
    "PyUnicode_FromFormat",
    "PyUnicode_InternFromString",
    "_Py_Dealloc",
    "_Py_FalseStruct",
    "_Py_NoneStruct",
    "_Py_TrueStruct",
}


def _libraries() -> list[tuple[str, str]]:
    """(module, path) of each compiled module of this build."""
    found = [("_C", _C.__file__)]
    cuda = importlib.util.find_spec("fastopt._C_cuda")
    if _C._cuda_version is not None and cuda is not None:
        found.append(("_C_cuda", cuda.origin))
    return found


LIBRARIES = _libraries()
IDS = [name for name, _ in LIBRARIES]


def _nm(*args: str) -> list[str]:
    nm = shutil.which("nm")
    if nm is None:
        pytest.fail("nm (binutils) not found on PATH")
    out = subprocess.run([nm, "-D", *args], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def _undefined(path: str) -> set[str]:
    # "U name@VERSION" or "w name": the symbol, without its version.
    return {line.split()[-1].split("@")[0] for line in _nm("--undefined-only", path)}


@cache
def _defined_by_torch() -> frozenset[str]:
    names = set()
    for lib in TORCH_LIBS:
        if (TORCH_LIB / lib).exists():
            names |= {
                line.split()[-1].split("@")[0]
                for line in _nm("--defined-only", str(TORCH_LIB / lib))
            }
    return frozenset(names)


def _demangle(names: set[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        pytest.fail("c++filt (binutils) not found on PATH")
    ordered = sorted(names)
    out = subprocess.run([cxxfilt], input="\n".join(ordered), capture_output=True, text=True,
                         check=True).stdout.splitlines()  # fmt: skip
    return dict(zip(ordered, out))


def _is_shim(name: str) -> bool:
    return name.startswith(("aoti_torch_", "torch_"))


@pytest.mark.parametrize("module,path", LIBRARIES, ids=IDS)
def test_is_an_abi3_module(module, path):
    assert Path(path).name == f"{module}.abi3.so", path


@pytest.mark.parametrize("module,path", LIBRARIES, ids=IDS)
def test_imports_no_aten_or_c10_symbol(module, path):
    """No C++ symbol of libtorch (at::, c10::, torch::, caffe2::), not even as a template
    argument of a std:: one: their layout and mangling are what changes between releases."""
    mangled = {n for n in _undefined(path) if n.startswith("_Z")}
    torch_cxx = re.compile(r"\b(?:at|c10|torch|caffe2)::")
    bad = sorted(d for d in _demangle(mangled).values() if torch_cxx.search(d))
    assert not bad, f"{Path(path).name} imports libtorch C++ symbols: {bad}"


@pytest.mark.parametrize("module,path", LIBRARIES, ids=IDS)
def test_imports_only_the_stable_c_shim_from_torch(module, path):
    """Of what the module takes from torch's libraries, all is the C shim (aoti_torch_*,
    torch_*), but for std:: template instantiations that libc10 happens to export too."""
    from_torch = _undefined(path) & _defined_by_torch()
    cxx = _demangle({n for n in from_torch if n.startswith("_Z")})
    bad = sorted(
        n for n in from_torch if not _is_shim(n) and not cxx.get(n, "").startswith("std::")
    )
    assert not bad, f"{Path(path).name} imports non-shim symbols from torch: {bad}"
    shim = {n for n in _undefined(path) if _is_shim(n)}
    # With lazy binding a shim this torch lacks would fail at its first call, not at load.
    assert shim <= _defined_by_torch(), f"not in torch {torch.__version__}: {shim - from_torch}"
    # The stable library, the boxed Tensor[] arguments and the 2.10 data pointers, at least.
    assert {"torch_library_impl", "torch_list_get_item", "aoti_torch_get_numel"} <= shim, shim
    if module == "_C":
        assert "torch_parallel_for" in shim  # the CPU loops run on torch's thread pool
    else:
        assert {"aoti_torch_get_current_cuda_stream", "torch_c10_cuda_check_msg"} <= shim


@pytest.mark.parametrize("module,path", LIBRARIES, ids=IDS)
def test_uses_only_the_limited_python_api(module, path):
    python = {n for n in _undefined(path) if re.match(r"_?Py", n)}
    assert python <= LIMITED_API, f"not known to be limited API: {sorted(python - LIMITED_API)}"
    exported = {line.split()[-1] for line in _nm("--defined-only", "--extern-only", path)}
    cxx = _demangle({n for n in exported if n.startswith("_Z")})
    # libstdc++'s templates (and their vtables and typeinfo) keep default visibility.
    std = re.compile(
        r"(?:(?:typeinfo name|typeinfo|vtable|VTT|guard variable) for )?(?:std|__gnu_cxx)::"
    )
    others = sorted(n for n in exported if not std.match(cxx.get(n, "")))
    assert others == [f"PyInit_{module}"], others


@pytest.mark.parametrize("module,path", LIBRARIES, ids=IDS)
def test_names_its_sources_without_the_build_path(module, path):
    """__FILE__ (in torch's CUDA error checks) and the debug info say csrc/..., never the build
    machine's directory: a wheel would show that path to its users."""
    data = Path(path).read_bytes()
    # An absolute path (a / not inside a name) to a file under a csrc/: ours, or torch's headers.
    found = re.findall(rb"(?<![\w.+-])/[\w./+-]*/csrc/[\w./-]+", data)
    absolute = sorted({m.decode() for m in found})
    assert not absolute, f"{Path(path).name} names sources by absolute path: {absolute[:5]}"
    assert re.search(rb"csrc/(?:cpu|cuda)/\w+\.(?:cpp|cu)", data), "no source name at all?"


def test_abi3audit_finds_no_violation():
    pytest.importorskip("abi3audit", reason="abi3audit is not installed (pip install abi3audit)")
    paths = [path for _, path in LIBRARIES]
    out = subprocess.run(
        [sys.executable, "-m", "abi3audit", "--strict", "--assume-minimum-abi3", "3.10",
         "--summary", *paths],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 ABI version mismatches and 0" in re.sub(r"\s+", " ", out.stdout + out.stderr)


# manylinux_2_28's ceiling (RHEL 8's glibc; torch's wheels need the same), and GCC 8's
# libstdc++ and C++ runtime there. csrc/glibc_compat.h keeps a build on a newer glibc under it.
SYMBOL_CEILING = {"GLIBC": (2, 28), "GLIBCXX": (3, 4, 25), "CXXABI": (1, 3, 11)}


@pytest.mark.parametrize("module,path", LIBRARIES, ids=IDS)
def test_needs_no_glibc_or_libstdcxx_newer_than_manylinux_2_28(module, path):
    versions = set()
    for line in _nm("--undefined-only", path):
        match = re.search(r"@(GLIBC|GLIBCXX|CXXABI)_([\d.]+)$", line.split()[-1])
        if match:
            versions.add((match.group(1), tuple(int(x) for x in match.group(2).split("."))))
    assert versions, "no versioned symbol at all?"
    newer = sorted(
        f"{lib}_{'.'.join(map(str, v))}" for lib, v in versions if v > SYMBOL_CEILING[lib]
    )
    assert not newer, f"{Path(path).name} needs {newer}: it would not load on glibc 2.28"
