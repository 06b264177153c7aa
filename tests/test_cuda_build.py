"""The CUDA kernels' library, fastopt._C_cuda: what machine code it carries, read with
cuobjdump, and what it registers.

Runs without a GPU (it reads the shared library, it launches nothing). Skipped only when this
build has no CUDA kernels; a missing cuobjdump is a failure, not a skip.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fastopt import _C
from fastopt._build import build_info

# Mangled-name fragments of the kernels (template arguments P, G, S, Master, stochastic
# rounding, amsgrad): adamw_kernel<float, float, float, Master::kNone, false, false> is the fp32
# fast path; <bf16, bf16, bf16, Master::kRemainder, false, false> the lean one (bf16 params with
# exact masters and bf16 moments); <float, float, uint8_t, Master::kNone, false, false> fp32
# params with 8-bit moments.
FP32_ADAMW = "adamw_kernelIfffLNS_6MasterE0ELb0ELb0E"
LEAN_ADAMW = "adamw_kernelIN3c108BFloat16ES3_S3_LNS_6MasterE1ELb0ELb0E"
INT8_ADAMW = "adamw_kernelIffhLNS_6MasterE0ELb0ELb0E"
ADAMW = "adamw_kernel"
MULTI_TENSOR_KERNELS = ("adamw_kernel", "norm_chunk_kernel", "accumulate_kernel")
ARCH = "sm_90"
_LOAD128 = r"\bLDG\.E(?:\.[A-Z0-9_]+)*\.128\b"
_STORE128 = r"\bSTG\.E(?:\.[A-Z0-9_]+)*\.128\b"


def _adamw_variants() -> int:
    """How many AdamW instantiations csrc/adamw_dispatch.h asks for: grads of the params' dtype
    or fp32, moments of the params' dtype, fp32, bf16 or 8-bit codes (u8, neither a bf16 nor
    an fp16 store), a remainder (bf16 params) or an fp32 copy (fp16) or no master, stochastic
    rounding where some store is bf16 and none fp16, and amsgrad or not."""
    count = 0
    for p in ("f32", "bf16", "f16"):
        masters = {"f32": ["none"], "bf16": ["none", "remainder"], "f16": ["none", "copy"]}[p]
        for _grad in {p, "f32"}:
            for s in {p, "f32", "bf16", "u8"}:
                for master in masters:
                    stores = {s} | ({p} if master == "none" else set())
                    count += 2 if "bf16" in stores and "f16" not in stores else 1
    return 2 * count


pytestmark = pytest.mark.skipif(
    _C._cuda_version is None, reason="fastopt was built without CUDA kernels (no fastopt._C_cuda)"
)


def _cuobjdump() -> str:
    candidates = [shutil.which("cuobjdump")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "cuobjdump"))
    candidates.append("/usr/local/cuda/bin/cuobjdump")
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidates.append(os.path.join(root, "backends", "nvidia", "bin", "cuobjdump"))
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    pytest.fail("cuobjdump not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, Triton's bin)")


@pytest.fixture(scope="module")
def so_path() -> str:
    # Found, not imported: fastopt/_ext.py loads it only with a GPU, and cuobjdump needs none.
    spec = importlib.util.find_spec("fastopt._C_cuda")
    assert spec is not None, "this build has CUDA kernels but no fastopt._C_cuda"
    path = spec.origin
    assert path and Path(path).is_file(), path
    return path


def _run(*args: str) -> str:
    out = subprocess.run([_cuobjdump(), *args], capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"cuobjdump {' '.join(args)} failed:\n{out.stderr}"
    return out.stdout


@functools.cache  # one dump per run: 84 AdamW variants take cuobjdump a while
def _sass_by_function(so: str) -> dict[str, str]:
    """Mangled kernel name -> its sm_90 SASS."""
    text = _run("--dump-sass", "--gpu-architecture", ARCH, so)
    functions: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            functions[name] = ""
        elif name is not None:
            functions[name] += line + "\n"
    return functions


def _resources(so: str) -> dict[str, dict[str, int]]:
    """Mangled kernel name -> {'REG': .., 'STACK': .., 'LOCAL': .., ...} for sm_90."""
    text = _run("--dump-resource-usage", "--gpu-architecture", ARCH, so)
    usage: dict[str, dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):\s*$", line)
        if m:
            name = m.group(1)
            continue
        if name is not None and "REG:" in line:
            usage[name] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            name = None
    return usage


def _archs(listing: str, kind: str) -> set[str]:
    """{"sm_80", ...} from cuobjdump's --list-elf (kind "cubin") or --list-ptx ("ptx")."""
    return set(re.findall(rf"\.(sm_\d+a?)\.{kind}\b", listing))


def _built_for() -> tuple[set[str], set[str]]:
    """The machine code and the PTX this build was asked for, from its TORCH_CUDA_ARCH_LIST
    ("8.0;9.0;10.0;12.0+PTX": sm_80, sm_90, sm_100, sm_120, and PTX of 12.0)."""
    cubins, ptx = set(), set()
    for entry in re.split(r"[;\s]+", build_info()["cuda_archs"].strip()):
        arch = "sm_" + entry.removesuffix("+PTX").replace(".", "")
        cubins.add(arch)
        if entry.endswith("+PTX"):
            ptx.add(arch)
    return cubins, ptx


def test_carries_machine_code_and_ptx_for_every_architecture(so_path):
    cubins, ptx = _built_for()
    assert ARCH in cubins, f"the SASS tests below read {ARCH}, which this build lacks"
    elves = _archs(_run("--list-elf", so_path), "cubin")
    assert elves == cubins, f"machine code for {sorted(elves)}, asked for {sorted(cubins)}"
    ptxs = _archs(_run("--list-ptx", so_path), "ptx")
    assert ptxs == ptx, f"PTX for {sorted(ptxs)}, asked for {sorted(ptx)}"


def test_every_kernel_is_built(so_path):
    names = list(_sass_by_function(so_path))
    for kernel in MULTI_TENSOR_KERNELS + ("norm_finalize_kernel", "update_scale_kernel"):
        assert any(kernel in n for n in names), f"{kernel} missing from the sm_90 SASS: {names}"
    adamw = [n for n in names if ADAMW in n]
    assert len(adamw) == _adamw_variants() == 84, adamw


def test_adamw_fp32_uses_128_bit_loads_and_stores(so_path):
    sass = _sass_by_function(so_path)
    fp32 = [n for n in sass if FP32_ADAMW in n]
    assert len(fp32) == 1, list(sass)
    body = sass[fp32[0]]
    loads, stores = re.findall(_LOAD128, body), re.findall(_STORE128, body)
    # The full-chunk fp32 body: 4 vectors x (param, grad, exp_avg, exp_avg_sq) per thread.
    assert len(loads) >= 16, f"{len(loads)} 128-bit loads in {fp32[0]}"
    assert len(stores) >= 12, f"{len(stores)} 128-bit stores in {fp32[0]}"
    # Every AdamW variant has a 16-byte path.
    for name, body in sass.items():
        if ADAMW in name:
            assert re.search(_LOAD128, body), name


def test_adamw_lean_uses_128_bit_loads_and_stores(so_path):
    """bf16 params with an int16 remainder and bf16 moments: 8 elements a vector, each of the
    five streams (param, remainder, grad, exp_avg, exp_avg_sq) one 16-byte load, the four
    written back one 16-byte store each."""
    sass = _sass_by_function(so_path)
    lean = [n for n in sass if LEAN_ADAMW in n]
    assert len(lean) == 1, [n for n in sass if ADAMW in n]
    body = sass[lean[0]]
    loads, stores = re.findall(_LOAD128, body), re.findall(_STORE128, body)
    assert len(loads) >= 5, f"{len(loads)} 128-bit loads in {lean[0]}"
    assert len(stores) >= 4, f"{len(stores)} 128-bit stores in {lean[0]}"


def test_adamw_int8_uses_128_bit_loads_and_stores(so_path):
    """fp32 params with 8-bit moments: 16 elements a vector, so a thread's param and grad are
    four 16-byte loads each and each moment's codes one; the param goes back in four 16-byte
    stores and each moment's codes in one. The block scales are bytes."""
    sass = _sass_by_function(so_path)
    int8 = [n for n in sass if INT8_ADAMW in n]
    assert len(int8) == 1, [n for n in sass if ADAMW in n]
    body = sass[int8[0]]
    loads, stores = re.findall(_LOAD128, body), re.findall(_STORE128, body)
    assert len(loads) >= 4 + 4 + 2, f"{len(loads)} 128-bit loads in {int8[0]}"
    assert len(stores) >= 4 + 2, f"{len(stores)} 128-bit stores in {int8[0]}"
    assert re.search(r"\bLDG\.E\.S8\b", body), "the scales are loaded as signed bytes"
    assert re.search(r"\bSTG\.E\.U8\b", body), "the scales are stored as bytes"
    # The block's maximum crosses the two lanes holding it.
    assert re.search(r"\bSHFL\.BFLY\b", body), "no shuffle: how was the block max reduced?"


def test_multi_tensor_kernels_do_not_spill(so_path):
    usage = _resources(so_path)
    sass = _sass_by_function(so_path)
    kernels = [n for n in usage if any(k in n for k in MULTI_TENSOR_KERNELS)]
    assert len([n for n in kernels if ADAMW in n]) == _adamw_variants(), list(usage)
    for name in kernels:
        res = usage[name]
        assert res.get("STACK", -1) == 0, f"{name} uses a stack frame (spills?): {res}"
        assert res.get("LOCAL", -1) == 0, f"{name} uses local memory: {res}"
        assert not re.search(r"\b(?:STL|LDL)\b", sass[name]), f"{name} spills to local memory"


def test_cuda_registrations_match_cpu():
    # Imported directly: loading needs a CUDA build of torch, not a GPU.
    importlib.import_module("fastopt._C_cuda")
    for op in ("adamw_", "multi_tensor_norm", "accumulate_", "update_scale_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastopt::{op}", "CUDA"), op


def test_grid_setting_reaches_the_cuda_library():
    """_C._set_grid_blocks_per_sm steers the launches in the other library (via a capsule)."""
    cuda = importlib.import_module("fastopt._C_cuda")
    assert cuda._grid_blocks_per_sm() == 0
    previous = _C._set_grid_blocks_per_sm(7)
    try:
        assert cuda._grid_blocks_per_sm() == 7
    finally:
        _C._set_grid_blocks_per_sm(previous)
    assert cuda._grid_blocks_per_sm() == previous
