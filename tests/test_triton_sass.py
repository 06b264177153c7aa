"""The machine code of the Triton AdamW kernel: 128-bit global loads and no register spills.

No GPU needed: the kernel is compiled for an sm_90 target with the ptxas Triton ships, and
the cubin disassembled with its cuobjdump. Compiling needs Triton's real backend, not the
interpreter this test process may have selected (tests/conftest.py), so it runs in a
subprocess with TRITON_INTERPRET unset.

The negative control (the same kernel without the ALIGNED hint) must lose the 128-bit loads:
proof that the check reads real content and that the hint is what vectorises the table's
pointers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
from collections import Counter

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from fastopt.kernels import _table
from fastopt.kernels.adamw import adamw_kernel

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# The runtime arguments' types as the launcher passes them (dummy pointers are the int64
# table). A kernel argument missing here fails loudly rather than compiling something else.
RUNTIME = {
    "table": "*i64", "n_tensors": "i32", "lr_ptr": "*i64", "lr_bits": "i64", "wd_bits": "i64",
    "log2_beta1_bits": "i64", "log2_beta2_bits": "i64", "lerp_coef": "fp32",
    "beta2": "fp32", "one_minus_beta2": "fp32", "eps": "fp32", "grad_scale_ptr": "*fp32",
    "found_inf_ptr": "*fp32", "grad_norm_ptr": "*fp32", "max_grad_norm": "fp32",
    "grad_factor": "fp32", "seed32": "i64",
}
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "u8": tl.uint8}


def compile_adamw(p_dtype, g_dtype, amsgrad, aligned, s_dtype=None, master=0, sr=False):
    launch = _table.launch_heuristics("adamw", 4 if p_dtype == "fp32" else 2)
    constexprs = dict(
        P_DTYPE=DTYPES[p_dtype], G_DTYPE=DTYPES[g_dtype], S_DTYPE=DTYPES[s_dtype or p_dtype],
        MASTER=master, SR=sr, AMSGRAD=amsgrad, MAXIMIZE=False,
        HAS_LR_TENSOR=False, HAS_SCALE=True, HAS_FOUND_INF=True, HAS_CLIP=True, LERP_FROM_M=True,
        # after the pointer rows: steps, then (SR) positions, or (8-bit) scales, positions and
        # first indices
        ALIGNED=aligned, BLOCK=launch.block,
        MAP_ROW=2 + 5 + amsgrad + (master != 0) + (3 if s_dtype == "u8" else sr),
        CHUNK=launch.chunk,
    )
    names = adamw_kernel.arg_names
    expected = set(RUNTIME) | set(constexprs)
    assert set(names) == expected, f"kernel arguments changed: {set(names) ^ expected}"
    signature = {n: "constexpr" if n in constexprs else RUNTIME[n] for n in names}
    # As the launcher's arguments: torch allocations (the table, the scalars) are 16-aligned.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if signature[n].startswith("*")}
    src = triton.compiler.ASTSource(adamw_kernel, signature, constexprs, attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": launch.num_warps, "enable_fp_fusion": False})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "adamw.cubin")
        with open(cubin, "wb") as f:
            f.write(kernel.asm["cubin"])
        run = lambda *a: subprocess.run([os.path.join(BIN, "cuobjdump"), *a, cubin],
                                        capture_output=True, text=True, check=True).stdout
        sass, usage = run("--dump-sass"), run("--dump-resource-usage")
    ops = Counter(re.findall(r"\b((?:LDG|STG|LDL|STL)(?:\.[A-Z0-9]+)*)", sass))
    usage = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    return {"ops": dict(ops), **{k.lower(): int(v) for k, v in usage.items()}}


cases = {
    "fp32": ("fp32", "fp32", False, True),
    "fp32-amsgrad": ("fp32", "fp32", True, True),
    "bf16-fp32grads-amsgrad": ("bf16", "fp32", True, True),
    "fp32-unaligned": ("fp32", "fp32", False, False),
    # Lean precision: bf16 params with an int16 remainder and bf16 moments; stochastic rounding.
    "bf16-master-bf16moments": ("bf16", "bf16", False, True, "bf16", 1, False),
    "bf16-sr-bf16moments-amsgrad": ("bf16", "bf16", True, True, "bf16", 0, True),
    # 8-bit moments
    "int8-fp32": ("fp32", "fp32", False, True, "u8"),
    "int8-fp32-amsgrad": ("fp32", "fp32", True, True, "u8"),
    "int8-bf16-master-amsgrad": ("bf16", "bf16", True, True, "u8", 1),
    "int8-bf16-sr": ("bf16", "bf16", False, True, "u8", 0, True),
}
print(json.dumps({name: compile_adamw(*args) for name, args in cases.items()}))
"""


@pytest.fixture(scope="module")
def sass() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"compiling for sm_90 failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _count(ops: dict, prefix: str) -> int:
    return sum(n for op, n in ops.items() if op == prefix or op.startswith(prefix + "."))


@pytest.mark.parametrize(
    "case,streams",
    [("fp32", (4, 3)), ("fp32-amsgrad", (5, 4))],
    ids=["fp32", "fp32-amsgrad"],
)
def test_adamw_fp32_full_blocks_use_128_bit_accesses(sass, case, streams):
    """8 fp32 per thread per iteration: two 128-bit loads per streamed tensor (p, g, m, v
    and vmax), two 128-bit stores per written one."""
    loads, stores = streams
    ops = sass[case]["ops"]
    assert ops.get("LDG.E.128", 0) >= 2 * loads, ops
    assert ops.get("STG.E.128", 0) >= 2 * stores, ops


@pytest.mark.parametrize("case", ["fp32", "fp32-amsgrad", "bf16-fp32grads-amsgrad"])
def test_adamw_does_not_spill(sass, case):
    info = sass[case]
    assert _count(info["ops"], "STL") == 0 and _count(info["ops"], "LDL") == 0, info["ops"]
    assert info["local"] == 0, info
    # Headroom for 4 resident 4-warp programs per SM (65536 registers): a regression to the
    # 241 registers of 16 bf16 elements per thread would halve the memory parallelism.
    assert info["reg"] <= 128, info


@pytest.mark.parametrize(
    "case,loads,stores", [("bf16-master-bf16moments", 5, 4), ("bf16-sr-bf16moments-amsgrad", 5, 4)]
)
def test_lean_adamw_vectorises_every_16_bit_stream_and_does_not_spill(sass, case, loads, stores):
    """8 elements per thread: one 128-bit access per 16-bit stream (param, remainder, grad and
    the bf16 moments; with stochastic rounding param, grad, m, v, vmax), no local memory, and
    the register headroom of the plain kernels."""
    info = sass[case]
    ops = info["ops"]
    assert ops.get("LDG.E.128", 0) >= loads, ops
    assert ops.get("STG.E.128", 0) >= stores, ops
    assert _count(ops, "STL") == 0 and _count(ops, "LDL") == 0 and info["local"] == 0, info
    assert info["reg"] <= 128, info


def test_adamw_bf16_params_with_fp32_grads_vectorise_both(sass):
    ops = sass["bf16-fp32grads-amsgrad"]["ops"]
    # fp32 grads: two 128-bit loads per thread; p, m, v, vmax in bf16: one each.
    assert ops.get("LDG.E.128", 0) >= 2 + 4, ops
    assert ops.get("STG.E.128", 0) >= 4, ops


def test_without_the_alignment_hint_the_loads_are_not_vectorised(sass):
    """The negative control: the pointers come from memory, so without ALIGNED the compiler
    cannot vectorise. If this fails, the checks above prove nothing about the hint."""
    ops = sass["fp32-unaligned"]["ops"]
    assert ops.get("LDG.E.128", 0) == 0, ops
    assert ops.get("LDG.E", 0) > 0, ops


@pytest.mark.parametrize(
    "case", ["int8-fp32", "int8-fp32-amsgrad", "int8-bf16-master-amsgrad", "int8-bf16-sr"]
)
def test_8bit_kernel_keeps_wide_accesses_and_does_not_spill(sass, case):
    """8-bit moments, full tiles of 8 elements per thread: each code stream in one 64-bit store
    (8 bytes), fp32 params and grads in two 128-bit loads each and the param in two 128-bit
    stores; no local memory. The table's own int64 reads are 64-bit loads too, hence "at
    least"."""
    info = sass[case]
    ops = info["ops"]
    assert _count(ops, "STL") == 0 and _count(ops, "LDL") == 0, ops
    assert info["local"] == 0 and info["stack"] == 0, info
    assert ops.get("STG.E.64", 0) >= (3 if "amsgrad" in case else 2), ops
    if case.startswith("int8-fp32"):
        assert ops.get("LDG.E.128", 0) >= 4 and ops.get("STG.E.128", 0) >= 2, ops
    # 168 registers still fit three resident 4-warp programs per SM (65536 / (3 * 128) =
    # 170); the 8-bit tile measured 128 (fp32) and 160 (fp32, amsgrad) on sm_90.
    assert info["reg"] <= 168, info
