"""The CPU kernel's two paths for 8-bit moments, each bit for bit against fastopt.reference
(tests/lockstep.py): AVX-512 registers (csrc/cpu/adamw_avx512.h, taken where the CPU has
AVX-512 F, BW, DQ and VL) and the portable loops (FASTOPT_CPU_SIMD=0, and every other CPU).
The other lockstep tests run whichever path this CPU takes by default; these run each one.
"""

from __future__ import annotations

import os
import re
import subprocess
import sysconfig
import zlib
from pathlib import Path

import pytest
import torch
from lockstep import INT8_VARIANTS, op_lockstep

ROOT = Path(__file__).resolve().parents[1]

# torch checks the same four AVX-512 subsets for its own AVX512 kernels.
HAS_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"

PATHS = [
    "portable",
    pytest.param("avx512", marks=pytest.mark.skipif(not HAS_AVX512, reason="no AVX-512 here")),
]

# Tails of every length around a 16-lane vector and a 32-element block, a group of 8 blocks
# (256) and a 64 Ki-element chunk, and more than one tensor per call.
SHAPES = [(1,), (15,), (16,), (17,), (31,), (33,), (255,), (257,), (3, 70), (65536 + 33,)]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch) -> str:
    monkeypatch.setenv("FASTOPT_CPU_SIMD", "0" if request.param == "portable" else "1")
    return request.param


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.mark.parametrize("variant", list(INT8_VARIANTS.values()), ids=list(INT8_VARIANTS))
def test_every_8bit_variant_matches_the_reference(path, variant, gen):
    op_lockstep("cpu", "cpu", SHAPES, gen, steps=3, decades=True, weight_decay=0.1,
                **variant)  # fmt: skip


@pytest.mark.parametrize("amsgrad", [False, True])
def test_shards_whose_indices_cross_two_to_the_32_match_the_reference(path, amsgrad, gen):
    # The crossing inside a block, inside a group, and in a tensor's second chunk.
    op_lockstep("cpu", "cpu", [(300,), (64,), (70000,)], gen, steps=2, sr=True,
                p_dtype=torch.bfloat16, amsgrad=amsgrad,
                first_indices=[2**32 - 50, 2**33 + 7, 2**32 - 65536 - 40])  # fmt: skip


def test_overflowing_and_skipped_steps_match_the_reference(path, gen):
    # Gradients of 1e25 square to inf in the second moment: the NaN codes; every other step
    # is skipped and must leave every byte alone.
    op_lockstep("cpu", "cpu", [(100,), (33,)], gen, steps=4, grad_magnitude=1e25,
                skip_every=2, amsgrad=True, master=True, p_dtype=torch.bfloat16)  # fmt: skip


def test_the_cpu_kernels_build_without_x86_simd(tmp_path):
    # ARM hosts (Grace) build the portable loops alone: the x86-64 target clones and the
    # AVX-512 path must compile away, leaving no reference to the AVX-512 kernel.
    from torch.utils.cpp_extension import include_paths

    version = re.search(r'TORCH_TARGET_VERSION = "(0x[0-9a-f]+)"', (ROOT / "setup.py").read_text())
    flags = ["-std=c++20", "-O0", "-fvisibility=hidden", "-Wno-psabi", "-DFASTOPT_PORTABLE_CPU",
             f"-DTORCH_TARGET_VERSION={version.group(1)}",
             *[f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"]]]]  # fmt: skip
    for source in ("csrc/cpu/adamw.cpp", "csrc/cpu/reduce.cpp"):
        obj = tmp_path / (Path(source).stem + ".o")
        cmd = [os.environ.get("CXX", "c++"), "-c", *flags, str(ROOT / source), "-o", str(obj)]
        run = subprocess.run(cmd, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
        symbols = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
        assert "adamw_chunk_q8" not in symbols and "x86-64-v4" not in symbols
        assert "adamw_" in symbols or "norm_" in symbols  # the kernels themselves are there
