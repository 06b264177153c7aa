"""The CPU kernel's paths for 8-bit and 16-bit states, each bit for bit against
fastopt.reference (tests/lockstep.py): AVX-512 registers (csrc/cpu/adamw_avx512.h and
adamw_avx512_16.h, taken where the CPU has AVX-512 F, BW, DQ and VL), AVX2 registers
(adamw_avx2_8.h and adamw_avx2_16.h, taken where the CPU has AVX2 alone, or with
FASTOPT_CPU_SIMD=avx2) and the portable loops (FASTOPT_CPU_SIMD=0, and every other CPU). The
other lockstep tests run whichever path this CPU takes by default; these run each one.
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
from lockstep import (
    INT8_VARIANTS,
    STATE_KEYS,
    adamw_step,
    assert_same_state,
    op_lockstep,
    op_snapshot,
    optimizer_lockstep,
    to_device,
)

from fastopt import quant, reference
from fastopt.rounding import split_master

ROOT = Path(__file__).resolve().parents[1]

# torch checks the same four AVX-512 subsets for its own AVX512 kernels.
HAS_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"


# Tails of every length around a 16-lane vector and a 32-element block, a group of 8 blocks
# (256) and a 64 Ki-element chunk, and more than one tensor per call.
SHAPES = [(1,), (15,), (16,), (17,), (31,), (33,), (255,), (257,), (3, 70), (65536 + 33,)]


HAS_AVX2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


# The 16-bit AVX-512 path rounds to nearest with AVX512-BF16's vcvtne2ps2bf16 where the CPU
# has it, and without it where asked (FASTOPT_CPU_SIMD=avx512) or it has not.
def _has_avx512_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return HAS_AVX512 and cpuinfo.exists() and "avx512_bf16" in cpuinfo.read_text(errors="replace")


HAS_AVX512_BF16 = _has_avx512_bf16()

# An AVX-512 CPU takes the AVX2 paths when FASTOPT_CPU_SIMD=avx2.
PATHS = [
    "portable",
    pytest.param("avx512", marks=pytest.mark.skipif(not HAS_AVX512, reason="no AVX-512 here")),
    pytest.param("avx512-no-bf16",
                 marks=pytest.mark.skipif(not HAS_AVX512_BF16,
                                          reason="no AVX512-BF16 here: 'avx512' runs this")),
    pytest.param("avx2", marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2 here")),
]  # fmt: skip

_SIMD_ENV = {"portable": "0", "avx512": "1", "avx512-no-bf16": "avx512", "avx2": "avx2"}


@pytest.fixture(params=PATHS)
def path(request, monkeypatch) -> str:
    monkeypatch.setenv("FASTOPT_CPU_SIMD", _SIMD_ENV[request.param])
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


@pytest.mark.parametrize("amsgrad", [False, True])
def test_every_code_at_every_extreme_scale_matches_the_reference(path, amsgrad, gen):
    # Each of the 256 codes of each moment under scales from kScaleMin (-100) to kScaleMax
    # (120): decoded codes that overflow to inf, the NaN codes, -0 and the subnormal codes, and
    # gradients from 1e-30 to 1e30 that re-encode into every range. 8 sweeps of the 256 codes
    # over blocks whose scales rotate, so each code meets each scale.
    sweep, scales = 256, torch.tensor([-100, -99, -50, -1, 0, 57, 119, 120], dtype=torch.int8)
    n = sweep * len(scales)
    codes = torch.arange(n) % sweep
    rows = 3 if amsgrad else 2
    blocks = torch.arange(n // 32)
    state = {key: [] for key in STATE_KEYS}
    state["params"].append(torch.randn(n, generator=gen))
    state["exp_avgs"].append(codes.to(torch.uint8))
    state["exp_avg_sqs"].append(((codes * 37 + 11) % sweep).to(torch.uint8))
    if amsgrad:
        state["max_exp_avg_sqs"].append(((codes * 101 + 7) % sweep).to(torch.uint8))
    # Block b of sweep s takes scale (b + s) % 8 of a row, each row shifted.
    turn = blocks % 8 + blocks // 8
    state["scales"].append(torch.stack([scales[(turn + r) % 8] for r in range(rows)]))
    state["state_steps"].append(torch.tensor(3.0))
    grad = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-30, 31, (n,), generator=gen)
    grad[::97] = 0.0
    ref = to_device(state, "cpu")
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=amsgrad,
              maximize=False, grad_factor=1.0, stochastic_rounding=False, seed=5,
              positions=[0], first_indices=[])  # fmt: skip
    adamw_step("cpu", state, [grad], **kw)
    adamw_step("reference", ref, [grad], **kw)
    assert_same_state(op_snapshot(state), op_snapshot(ref), f"{path} amsgrad={amsgrad}")


def test_subnormal_codes_that_a_carry_would_change_match_the_reference(path, gen):
    # Below 2**-6 a code is floor((trunc(a * 2**(22 + kMant)) + noise) / 2**16). Each crafted
    # moment a (beta1 = beta2 = 0, so m = g and the stored root is |g|) has 2**-29 digits past
    # that truncation that are all ones and then some, and an element's own noise that puts
    # the sum one below a multiple of 2**16: any rounding up of those digits on the way (the
    # AVX-512 path adds 2**-6 rounded toward zero) carries into the code.
    blocks, n = 16, 16 * 32
    step = torch.tensor(0.0)
    kw = dict(lr=0.0, beta1=0.0, beta2=0.0, eps=1e-8, weight_decay=0.0, amsgrad=False,
              maximize=False, grad_factor=1.0, stochastic_rounding=False, seed=9,
              positions=[0], first_indices=[])  # fmt: skip
    _, n_m, _, n_v = reference._noise(True, kw["seed"], 0, 0, step + 1, torch.empty(n))
    i = torch.arange(n)
    # Targets: exp_avg's code (E4M3: 4 spare digits) in even elements, exp_avg_sq's (E4M4: 3)
    # in odd ones; t = trunc(a * 2**25) with (t + 1 + noise) a multiple of 2**16 either way.
    t = torch.where(i % 2 == 0, (-1 - n_m) % 2**16, 0)
    t = torch.where((i % 2 == 1) & (n_v % 2 == 0), ((-2 - n_v) % 2**16) // 2, t)
    t = t + 2**16 * torch.randint(0, 2, (n,), generator=gen)  # a below 2**-8
    grad = (16 * t.double() + 15.75) * 2.0**-29  # exact in fp32: at most 23 significant bits
    grad[i % 32 == 0] = 128.0  # each block's largest: its scale 2**0
    grad = torch.where(torch.rand(n, generator=gen) < 0.5, grad, -grad).float()
    state = {key: [] for key in STATE_KEYS}
    state["params"].append(torch.randn(n, generator=gen))
    state["exp_avgs"].append(torch.zeros(n, dtype=torch.uint8))
    state["exp_avg_sqs"].append(torch.zeros(n, dtype=torch.uint8))
    state["scales"].append(torch.zeros(2, blocks, dtype=torch.int8))
    state["state_steps"].append(step)
    ref = to_device(state, "cpu")
    adamw_step("cpu", state, [grad], **kw)
    adamw_step("reference", ref, [grad], **kw)
    assert_same_state(op_snapshot(state), op_snapshot(ref), path)
    assert (ref["scales"][0] == 0).all()  # the crafted scale held


def _lean16_variants() -> dict:
    """Every 16-bit variant adamw_avx512_16.h serves: fp32 params with bf16 moments, and bf16
    params (rounded to nearest, with masters, or stochastically) with fp32 or bf16 moments, bf16
    or fp32 grads, with and without amsgrad."""
    out = {}
    for ams in (False, True):
        out["float32-bf16m" + ("-amsgrad" if ams else "")] = dict(
            dtype=torch.float32, state_dtype=torch.bfloat16, amsgrad=ams
        )
        for moments, m_name in ((torch.float32, "fp32m"), (torch.bfloat16, "bf16m")):
            for kind in ("nearest", "master", "sr"):
                for fp32_grads in (False, True):
                    name = "-".join(["bfloat16", m_name, kind] + ["fp32_grads"] * fp32_grads
                                    + ["amsgrad"] * ams)  # fmt: skip
                    out[name] = dict(dtype=torch.bfloat16, state_dtype=moments, amsgrad=ams,
                                     master_weights=kind == "master",
                                     stochastic_rounding=kind == "sr",
                                     fp32_grads=fp32_grads)  # fmt: skip
    return out


LEAN16_VARIANTS = _lean16_variants()

# Around a 16-lane vector, a 32-element group and a pair of groups (the pipelined loop's
# step), and a 64 Ki-element chunk plus a tail.
LEAN16_SIZES = [1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 95, 97, 65536 + 33]


@pytest.mark.parametrize("variant", list(LEAN16_VARIANTS.values()), ids=list(LEAN16_VARIANTS))
def test_every_16bit_variant_matches_the_reference(path, variant, gen):
    init = [torch.randn(n, generator=gen) for n in LEAN16_SIZES]

    def grads_at(step):
        return [torch.randn(n, generator=gen) * 10.0 ** (step % 3 - 1) for n in LEAN16_SIZES]

    optimizer_lockstep("cpu", "cpu", init, grads_at, steps=3, lr=3e-2, betas=(0.8, 0.95),
                       weight_decay=0.05, seed=1234, **variant)  # fmt: skip


def _lean_state(n: int, gen: torch.Generator, *, kind: str, amsgrad: bool, fmt: str) -> dict:
    """One tensor's state at the op level: bf16 params (fp32 for kind "fp32"; with int16
    remainders for "master"), bf16 or 8-bit moments (fmt), and a step count of 3."""
    p32 = torch.randn(n, generator=gen)
    state = {key: [] for key in STATE_KEYS}
    if kind == "master":
        param, remainder = split_master(p32)
        state["params"].append(param)
        state["masters"].append(remainder)
    else:
        state["params"].append(p32 if kind == "fp32" else p32.bfloat16())
    keys = ("exp_avgs", "exp_avg_sqs") + (("max_exp_avg_sqs",) if amsgrad else ())
    scales = []
    for key in keys:
        x = torch.randn(n, generator=gen) * 0.1
        if fmt == "int8":  # exp_avg's codes, or those of the others' square roots
            quantize = quant.quantize_m if key == "exp_avgs" else quant.quantize_v
            codes, scale = quantize(x if key == "exp_avgs" else x.abs())
            state[key].append(codes)
            scales.append(scale)
        else:
            state[key].append((x * x if key != "exp_avgs" else x).bfloat16())
    if scales:
        state["scales"].append(torch.stack(scales))
    state["state_steps"].append(torch.tensor(3.0))
    return state


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("kind", ["fp32", "nearest", "master", "sr"])
def test_nans_and_exact_master_ties_match_the_reference(path, kind, amsgrad, fmt, gen):
    # The rare groups the 16-bit SIMD paths hand to the scalar stores, and lanes the 8-bit
    # ones handle in registers: a NaN in any bf16 result (with fp32 params and bf16 moments, in
    # the moments alone), and a master whose low half is exactly 0x8000 (an int16 remainder of
    # -32768; split_master moves such a tie one ulp). With lr = 0 and
    # no decay the masters come out as they went in, so each crafted tie reaches the split.
    # 300 elements: ties and NaNs in some groups of 32, none in others, and in the tail.
    n = 300
    state = _lean_state(n, gen, kind=kind, amsgrad=amsgrad, fmt=fmt)
    if kind == "master":
        ties = torch.tensor([0, 1, 40, 97, 130, 131, 299])
        state["masters"][0][ties] = -0x8000
    grad = torch.randn(n, generator=gen).to(state["params"][0].dtype)
    grad[[5, 70, 298]] = float("nan")
    grad[[8, 200]] = -float("nan")  # sign bit set: the rounding alone would keep it
    grad[[6, 71]] = float("inf")
    ref = to_device(state, "cpu")
    kw = dict(lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=amsgrad,
              maximize=False, grad_factor=1.0, stochastic_rounding=kind == "sr", seed=3,
              positions=[0], first_indices=[2**32 - 100])  # fmt: skip
    adamw_step("cpu", state, [grad], **kw)
    adamw_step("reference", ref, [grad], **kw)
    assert_same_state(op_snapshot(state), op_snapshot(ref), f"{path} {kind} {fmt}")
    if kind == "master":  # the crafted ties went through the split, not around it
        assert (state["masters"][0][ties] != -0x8000).all()


@pytest.mark.parametrize("lr", [0.0, 1e-3])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("kind", ["fp32", "nearest", "master", "sr"])
def test_denormal_params_and_moments_match_the_reference(path, kind, amsgrad, lr, gen):
    # AVX512-BF16's conversion, which the 16-bit path rounds to nearest with where the CPU has
    # it, reads denormals as zero; bf16 keeps them (its exponent range is fp32's). Denormal
    # params (and masters), moments and gradients in some groups of 32 and the tail; with lr = 0
    # the params are stored as they went in.
    n = 300
    state = _lean_state(n, gen, kind=kind, amsgrad=amsgrad, fmt="bf16")
    tiny = torch.tensor([1e-39, -3e-40, 5e-41, 2e-45, -1.1e-38, 7e-39, 9e-42])
    where = torch.tensor([0, 1, 40, 97, 130, 131, 299])
    if kind != "fp32":
        state["params"][0][where] = tiny.bfloat16()
    if kind == "master":
        state["masters"][0][where] = torch.tensor([1234, -77, 0, 5, -30000, 32767, 1],
                                                  dtype=torch.int16)  # fmt: skip
    for key in ("exp_avgs", "exp_avg_sqs") + (("max_exp_avg_sqs",) if amsgrad else ()):
        state[key][0][where] = tiny.abs().bfloat16() if key != "exp_avgs" else tiny.bfloat16()
    grad = torch.randn(n, generator=gen).to(state["params"][0].dtype)
    grad[where] = tiny.to(grad.dtype)
    ref = to_device(state, "cpu")
    kw = dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=amsgrad,
              maximize=False, grad_factor=1.0, stochastic_rounding=kind == "sr", seed=3,
              positions=[0], first_indices=[0])  # fmt: skip
    adamw_step("cpu", state, [grad], **kw)
    adamw_step("reference", ref, [grad], **kw)
    assert_same_state(op_snapshot(state), op_snapshot(ref), f"{path} {kind}")
    stored = state["params"][0] if kind != "fp32" else state["exp_avgs"][0]
    assert (stored[where].float().abs() < 1.2e-38).any()  # denormals were stored


REFUSALS = {
    "simd avx512bf16": (
        {"FASTOPT_CPU_SIMD": "avx512bf16"},
        {},
        "FASTOPT_CPU_SIMD must be .* got 'avx512bf16'$",
    ),
    "simd off": ({"FASTOPT_CPU_SIMD": "off"}, {}, "FASTOPT_CPU_SIMD must be .* got 'off'$"),
    "lr_tensor of 2": ({}, {"lr": torch.ones(2)}, "lr_tensor must be a one-element float32"),
    "grad_scale of 2": (
        {},
        {"grad_scale": torch.ones(2)},
        "grad_scale must be a one-element float32",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refused_step_writes_nothing(monkeypatch, case, gen):
    # Checked before the step counts advance: a step the op refuses leaves every byte.
    env, given, message = REFUSALS[case]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    state = _lean_state(40, gen, kind="fp32", amsgrad=False, fmt="int8")
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
              maximize=False, grad_factor=1.0, stochastic_rounding=False, seed=1,
              positions=[0], first_indices=[])  # fmt: skip
    kw.update(given)
    before = op_snapshot(to_device(state, "cpu"))
    with pytest.raises(RuntimeError, match=message):
        adamw_step("cpu", state, [torch.randn(40, generator=gen)], **kw)
    assert_same_state(op_snapshot(state), before, case)


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
        assert "adamw_chunk_q8" not in symbols and "adamw_chunk_16" not in symbols
        assert "x86-64-v4" not in symbols
        assert "adamw_" in symbols or "norm_" in symbols  # the kernels themselves are there
