"""Fused multi-tensor AdamW: one launch updates every tensor of the lists.

Per element this is csrc/adamw_math.h's ``adamw_math`` operation for operation, so the Triton,
C++ and CUDA backends agree to the last bit in fp32 wherever the hardware rounds alike:

* fp32 math whatever the storage dtype; one rounding back to storage at the store;
* ``tl.div_rn``/``tl.sqrt_rn``: Triton's plain ``/`` and ``tl.sqrt`` on fp32 are the
  approximate PTX instructions (2 ulp), the header's ``/`` and ``sqrtf`` are IEEE;
* launched with ``enable_fp_fusion=False``: no multiply-add contraction, as the CPU kernel is
  built with ``-ffp-contract=off`` (a contracted ``v * beta2 + (1 - beta2) * g * g`` rounds
  differently). The update is memory-bound, so the extra instructions cost nothing measurable;
* the per-tensor constants (bias corrections, step size, decay) in float64 as in
  ``adamw_coeffs``, computed on the device from the tensor's step count: no host sync;
* 8-bit moments (uint8 exp_avgs, fastopt/quant.py's format) are the same kernel with
  ``S_DTYPE=tl.uint8``: tiles of (BLOCK // 32, 32) elements, one quantization block a row, so
  a block's maximum is a row reduction and no block leaves its program.
"""

from __future__ import annotations

import math
import struct
from operator import attrgetter

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastopt.rounding import seed_key
from fastopt.step_args import PLAIN, Hyper, Lean

from ._quant import check_scales, decode_m, decode_v, pow2, store_quantized
from ._table import (
    QUANT_BLOCK,
    ROW_FIRST_POINTER,
    ROW_NUMEL,
    check_lists,
    chunk_coords,
    get_table,
    launch_heuristics,
    on_device,
    tensor_ptr,
    tl_dtype,
    to_storage,
)

__all__ = ["adamw_step"]

# fastopt.reference.CLIP_EPS (torch.nn.utils.clip_grad_norm_'s), as the header's kClipEps.
CLIP_EPS = tl.constexpr(1e-6)

# Pointer rows of the table, in this order (see _table.py); the step counts come next, after
# max_exp_avg_sqs when amsgrad. (tl.constexpr: the only kind of global a kernel may read.)
_P = tl.constexpr(0)
_G = tl.constexpr(1)
_M = tl.constexpr(2)
_V = tl.constexpr(3)
_VMAX = tl.constexpr(4)


def f64_bits(x: float) -> int:
    """``x`` as the int64 holding its IEEE float64 bits.

    Triton passes Python floats to kernels as fp32, which would round beta2 = 0.999 before
    1 - beta2**step is formed (the header's comment: 1.3e-5 relative error at step 1).
    """
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def _f64(bits):
    """The float64 whose bits :func:`f64_bits` packed."""
    # tl.cast, not .to(): under the interpreter a small int argument arrives as int32.
    return tl.cast(tl.cast(bits, tl.int64), tl.float64, bitcast=True)


@triton.jit
def _grad_coef(grad_factor, grad_scale_ptr, grad_norm_ptr, max_grad_norm, HAS_SCALE: tl.constexpr,
               HAS_CLIP: tl.constexpr, MAXIMIZE: tl.constexpr):  # fmt: skip
    """The header's grad_coefficient in fp32, negated for maximize (exact: -(g*c) == g*(-c))."""
    coef = grad_factor  # an fp32 kernel argument
    if HAS_SCALE:
        coef = tl.div_rn(coef, tl.load(grad_scale_ptr).to(tl.float32))
    if HAS_CLIP:
        norm = tl.load(grad_norm_ptr).to(tl.float32)
        clip = tl.div_rn(max_grad_norm, norm * coef + CLIP_EPS)
        coef = tl.where(clip < 1.0, coef * clip, coef)
    if MAXIMIZE:
        coef = -coef
    return coef


# ---- Rounding into 16-bit storage: fastopt/rounding.py is the oracle and explains why. ----
_MIX1 = tl.constexpr(0x7FEB352D)
_MIX2 = tl.constexpr(0x846CA68B)


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 (rounding.mix32)."""
    x = x ^ (x >> 16)
    x = x * _MIX1
    x = x ^ (x >> 15)
    x = x * _MIX2
    return x ^ (x >> 16)


@triton.jit
def _store_bf16_stochastic(ptr, x, noise16, mask):
    """rounding.round_bf16_stochastic: 16 noise bits added to the fp32 bits, then truncated."""
    top = (x.to(tl.uint32, bitcast=True) + noise16) >> 16
    top = tl.where(x != x, 0x7FC0, top)
    tl.store(ptr, top.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)


@triton.jit
def _store(ptr, x, noise16, mask, SR: tl.constexpr):
    """x into ptr's dtype: stochastically rounded into bf16 when SR, else to nearest even."""
    if SR and ptr.dtype.element_ty == tl.bfloat16:
        _store_bf16_stochastic(ptr, x, noise16, mask)
    else:
        tl.store(ptr, to_storage(x, ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, master_ptr, scale_ptr, n_blocks, offs, rows,
            mask, row_mask, coef, decay, lerp_coef, beta2, one_minus_beta2, step_size,
            inv_bc2_sqrt, eps, index0, key1, key2, next_high, AMSGRAD: tl.constexpr,
            LERP_FROM_M: tl.constexpr, MASTER: tl.constexpr, SR: tl.constexpr,
            QUANT: tl.constexpr):  # fmt: skip
    """adamw_math on one block; ``mask`` is None for full blocks (unmasked 128-bit accesses).
    MASTER: 0 none, 1 an int16 remainder of bf16 params, 2 an fp32 copy. ``index0``: the low
    word of the chunk's first element's index in the whole param (the noise's counter); key1
    and key2 the keys of its high word, ``next_high`` what turns them into the next high
    word's, for elements past a multiple of 2**32 (only a shard's chunk can cross one).
    QUANT: the moments are 8-bit codes, ``offs`` a (rows, QUANT_BLOCK) tile whose row r is the
    block of scale ``rows[r]`` counted from ``scale_ptr`` (exp_avg's; exp_avg_sq's and
    max_exp_avg_sq's follow, ``n_blocks`` apart); ``row_mask`` None or the rows to store."""
    if MASTER == 1:
        bits = tl.load(p_ptr + offs, mask=mask).to(tl.uint16, bitcast=True).to(tl.uint32)
        rem = tl.load(master_ptr + offs, mask=mask).to(tl.int32).to(tl.uint32, bitcast=True)
        p = ((bits << 16) + rem).to(tl.float32, bitcast=True)
    elif MASTER == 2:
        p = tl.load(master_ptr + offs, mask=mask)
    else:
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * coef
    if QUANT:
        scale_m = pow2(tl.load(scale_ptr + rows, mask=row_mask).to(tl.int32))
        scale_v = pow2(tl.load(scale_ptr + n_blocks + rows, mask=row_mask).to(tl.int32))
        m = decode_m(tl.load(m_ptr + offs, mask=mask).to(tl.uint32), scale_m[:, None])
        v = decode_v(tl.load(v_ptr + offs, mask=mask).to(tl.uint32), scale_v[:, None])
    else:
        m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    p = p * decay
    # torch's lerp(m, g, 1 - beta1) in its two forms (the header's AdamWCoeffs explains why)
    if LERP_FROM_M:
        m = m + lerp_coef * (g - m)
    else:
        m = g + lerp_coef * (g - m)
    v = v * beta2 + one_minus_beta2 * (g * g)
    second = v
    if AMSGRAD:
        if QUANT:
            scale_vmax = pow2(tl.load(scale_ptr + 2 * n_blocks + rows, mask=row_mask)
                               .to(tl.int32))  # fmt: skip
            vmax = decode_v(tl.load(vmax_ptr + offs, mask=mask).to(tl.uint32),
                             scale_vmax[:, None])  # fmt: skip
        else:
            vmax = tl.load(vmax_ptr + offs, mask=mask).to(tl.float32)
        vmax = tl.where(vmax > v, vmax, v)  # the header's ternary (NaN in v propagates)
        second = vmax
    root = tl.sqrt_rn(second)  # 8-bit codes store it: no second square root without amsgrad
    denom = root * inv_bc2_sqrt + eps
    p = p - step_size * tl.div_rn(m, denom)
    # Two noise words per element (rounding.element_noise): (param | exp_avg) and
    # (exp_avg_sq | max_exp_avg_sq), 16 bits each. 8-bit codes always round stochastically,
    # with the halves of the 16-bit stores they replace; the param only when SR.
    w1 = tl.zeros(offs.shape, tl.uint32)
    w2 = tl.zeros(offs.shape, tl.uint32)
    if SR or QUANT:
        index = index0 + offs.to(tl.uint32)
        fold = tl.where(index < index0, next_high, 0)
        w1 = _mix32(key1 ^ fold ^ index)
        w2 = _mix32(key2 ^ fold ^ index)
    if MASTER == 1:
        b = p.to(tl.uint32, bitcast=True)
        tie = (b & 0xFFFF) == 0x8000
        up = ((b >> 16) & 1) != 0
        b = tl.where(tie, tl.where(up, b + 1, b - 1), b)
        top = (b + 0x8000) >> 16
        nan = p != p
        rem = tl.where(nan, 0, (b - (top << 16)) & 0xFFFF)
        top = tl.where(nan, 0x7FC0, top)
        tl.store(p_ptr + offs, top.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
        tl.store(master_ptr + offs, rem.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    elif MASTER == 2:
        tl.store(master_ptr + offs, p, mask=mask)
        tl.store(p_ptr + offs, to_storage(p, p_ptr.dtype.element_ty), mask=mask)
    else:
        _store(p_ptr + offs, p, w1 >> 16, mask, SR)
    if QUANT:
        store_quantized(m_ptr + offs, scale_ptr + rows, m, w1 & 0xFFFF, mask, row_mask, True)
        v_root = root
        if AMSGRAD:
            v_root = tl.sqrt_rn(v)
            store_quantized(vmax_ptr + offs, scale_ptr + 2 * n_blocks + rows, root,
                             w2 & 0xFFFF, mask, row_mask, False)  # fmt: skip
        store_quantized(v_ptr + offs, scale_ptr + n_blocks + rows, v_root, w2 >> 16, mask,
                         row_mask, False)  # fmt: skip
    else:
        _store(m_ptr + offs, m, w1 & 0xFFFF, mask, SR)
        _store(v_ptr + offs, v, w2 >> 16, mask, SR)
        if AMSGRAD:
            _store(vmax_ptr + offs, vmax, w2 & 0xFFFF, mask, SR)


@triton.jit
def _tile(first, BLOCK: tl.constexpr, QUANT: tl.constexpr):
    """The offsets of the block from ``first``: 1-D, or for 8-bit moments a (BLOCK // 32, 32)
    tile, one quantization block a row, with the rows' block numbers from the chunk's first."""
    if QUANT:
        # int32 (first < CHUNK; tl.cast: the interpreter passes a Python int): with 64-bit
        # offsets the tile took 146 registers on sm_90, not 128 (fp32), and spilled (amsgrad)
        rows = tl.cast(first // QUANT_BLOCK, tl.int32) + tl.arange(0, BLOCK // QUANT_BLOCK)
        offs = rows[:, None] * QUANT_BLOCK + tl.arange(0, QUANT_BLOCK)[None, :]
    else:
        offs = first + tl.arange(0, BLOCK)
        rows = offs
    return offs, rows


# Every runtime int is exempt from Triton's value specialisation (== 1, % 16): a new tensor
# count or learning rate must never compile a new kernel.
_RUNTIME_INTS = ["n_tensors", "lr_bits", "wd_bits", "log2_beta1_bits", "log2_beta2_bits", "seed32"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def adamw_kernel(
    table, n_tensors,  # the multi-tensor table (_table.py) and its tensor count T
    lr_ptr, lr_bits: tl.int64, wd_bits: tl.int64, log2_beta1_bits: tl.int64,
    log2_beta2_bits: tl.int64,  # float64 bit patterns (f64_bits)
    lerp_coef, beta2, one_minus_beta2, eps,  # fp32, rounded from float64 on the host
    grad_scale_ptr, found_inf_ptr, grad_norm_ptr, max_grad_norm, grad_factor,
    seed32: tl.int64,  # rounding.seed_key(seed), for stochastic rounding and 8-bit codes
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, MASTER: tl.constexpr,
    SR: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr, LERP_FROM_M: tl.constexpr, ALIGNED: tl.constexpr,
    MAP_ROW: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    # uint8 moments are 8-bit codes: a flag derived from their dtype, not one more argument.
    QUANT: tl.constexpr = S_DTYPE == tl.uint8
    t, start, n_here = chunk_coords(table, n_tensors, MAP_ROW, CHUNK)
    if HAS_FOUND_INF:
        # A skipped step touches nothing: this program gets no elements.
        n_here = tl.where(tl.load(found_inf_ptr).to(tl.float32) != 0, 0, n_here)

    p_ptr = tensor_ptr(table, n_tensors, _P, t, start, P_DTYPE, ALIGNED)
    g_ptr = tensor_ptr(table, n_tensors, _G, t, start, G_DTYPE, ALIGNED)
    m_ptr = tensor_ptr(table, n_tensors, _M, t, start, S_DTYPE, ALIGNED)
    v_ptr = tensor_ptr(table, n_tensors, _V, t, start, S_DTYPE, ALIGNED)
    vmax_ptr = v_ptr
    if AMSGRAD:
        vmax_ptr = tensor_ptr(table, n_tensors, _VMAX, t, start, S_DTYPE, ALIGNED)
    # Rows after the moments: the masters (when MASTER), the step counts, the block scales
    # (QUANT), then (SR or QUANT) the positions and the first elements' indices in their whole
    # params.
    master_row: tl.constexpr = _VMAX + AMSGRAD
    step_row: tl.constexpr = master_row + (MASTER != 0)
    value_row: tl.constexpr = step_row + 1 + QUANT
    master_ptr = p_ptr
    if MASTER == 1:
        master_ptr = tensor_ptr(table, n_tensors, master_row, t, start, tl.int16, ALIGNED)
    elif MASTER == 2:
        master_ptr = tensor_ptr(table, n_tensors, master_row, t, start, tl.float32, ALIGNED)
    step_ptr = tensor_ptr(table, n_tensors, step_row, t, 0, tl.float32, False)
    # The scales: an int8 (rows, n_blocks) tensor per param, blocks counted from its element 0;
    # a chunk is whole blocks (launch_heuristics), so its first is block start // QUANT_BLOCK.
    scale_ptr = step_ptr
    n_blocks = start
    if QUANT:
        scale_ptr = tensor_ptr(table, n_tensors, step_row + 1, t, 0, tl.int8, False)
        n_blocks = tl.cdiv(tl.load(table + ROW_NUMEL * n_tensors + t), QUANT_BLOCK)
        scale_ptr += start // QUANT_BLOCK

    # adamw_coeffs: float64 from the step count, rounded to fp32 once.
    if HAS_LR_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = _f64(lr_bits)
    # The count before this step, plus one (every program of the tensor reads it before the
    # launch after this one advances it: adamw_step's _count_steps).
    step32 = tl.load(step_ptr) + 1.0
    step = step32.to(tl.float64)
    # The noise keys (rounding.noise_key) from the seed, the param's position and the step,
    # the high word of the chunk's first index folded in (mix32(0) is 0).
    key1 = tl.zeros((), tl.uint32)
    key2 = tl.zeros((), tl.uint32)
    index0 = tl.zeros((), tl.uint32)
    next_high = tl.zeros((), tl.uint32)
    if SR or QUANT:
        position = tl.load(table + (ROW_FIRST_POINTER + value_row) * n_tensors + t)
        first = tl.load(table + (ROW_FIRST_POINTER + value_row + 1) * n_tensors + t)
        k = _mix32(seed32.to(tl.uint32) ^ position.to(tl.uint32))
        k = _mix32(k ^ step32.to(tl.uint32))
        start_index = first + start
        high = (start_index >> 32).to(tl.uint32)
        fold = _mix32(high)
        key1 = _mix32(k ^ 0) ^ fold
        key2 = _mix32(k ^ 1) ^ fold
        next_high = fold ^ _mix32(high + 1)
        index0 = (start_index & 0xFFFFFFFF).to(tl.uint32)
    bias_correction1 = 1.0 - tl.exp2(step * _f64(log2_beta1_bits))  # 1 - beta1**step
    bias_correction2 = 1.0 - tl.exp2(step * _f64(log2_beta2_bits))
    step_size = (lr / bias_correction1).to(tl.float32)
    inv_bc2_sqrt = (1.0 / tl.sqrt(bias_correction2)).to(tl.float32)
    decay = (1.0 - lr * _f64(wd_bits)).to(tl.float32)
    coef = _grad_coef(grad_factor, grad_scale_ptr, grad_norm_ptr, max_grad_norm,
                      HAS_SCALE, HAS_CLIP, MAXIMIZE)  # fmt: skip

    # Full blocks unmasked (a mask from a runtime length would split the 128-bit accesses),
    # then at most one masked tail block.
    n_full = n_here // BLOCK
    for i in range(0, n_full):
        offs, rows = _tile(i * BLOCK, BLOCK, QUANT)
        _update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, master_ptr, scale_ptr, n_blocks, offs,
                rows, None, None, coef, decay, lerp_coef, beta2, one_minus_beta2, step_size,
                inv_bc2_sqrt, eps, index0, key1, key2, next_high, AMSGRAD, LERP_FROM_M, MASTER,
                SR, QUANT)  # fmt: skip
    offs, rows = _tile(n_full * BLOCK, BLOCK, QUANT)
    if n_full * BLOCK < n_here:
        # Past the end: no load counts, no store lands (a row's block may be partly inside).
        mask = offs < n_here
        row_mask = rows * QUANT_BLOCK < n_here
        _update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, master_ptr, scale_ptr, n_blocks, offs,
                rows, mask, row_mask, coef, decay, lerp_coef, beta2, one_minus_beta2,
                step_size, inv_bc2_sqrt, eps, index0, key1, key2, next_high, AMSGRAD,
                LERP_FROM_M, MASTER, SR, QUANT)  # fmt: skip


def _lerp_coef(beta1: float) -> tuple[float, bool]:
    """The header's lerp_coef and lerp_from_m: w = fp32(1 - beta1), then w or w - 1 (exact)."""
    w = struct.unpack("<f", struct.pack("<f", 1.0 - beta1))[0]
    return (w, True) if w < 0.5 else (w - 1.0, False)


def _log2(beta: float) -> float:
    """log2(beta), with beta = 0 (no momentum) giving -inf: beta**step = exp2(-inf) = 0."""
    return math.log2(beta) if beta > 0 else -math.inf


_dtype = attrgetter("dtype")


def _check_steps(state_steps: list[Tensor], n: int, device: torch.device) -> None:
    """One-element float32 step counts on ``device`` (C-level passes; a loop only to explain)."""
    ok = (
        len(state_steps) == n
        and set(map(Tensor.numel, state_steps)) <= {1}
        and set(map(_dtype, state_steps)) <= {torch.float32}
        and on_device(state_steps, device)
    )
    if ok:
        return
    if len(state_steps) != n:
        raise ValueError(f"state_steps has {len(state_steps)} tensors, expected {n}")
    for i, s in enumerate(state_steps):
        if s.numel() != 1 or s.dtype != torch.float32 or s.device != device:
            raise ValueError(
                f"state_steps[{i}] must be a one-element float32 tensor on {device}, "
                f"got {tuple(s.shape)} {s.dtype} on {s.device}"
            )


def _scalar_on(t: Tensor | None, device: torch.device) -> Tensor | None:
    """A 0-dim scalar tensor on ``device``, copied there (non_blocking) when it lives elsewhere,
    as the reference accepts; a CPU tensor's copy may wait for the stream, so keep scalars on
    the device for a sync-free step."""
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)


@torch.no_grad()
def adamw_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hyper: Hyper,
    lean: Lean = PLAIN,
) -> None:
    """fastopt.reference.adamw_step's contract, in one kernel launch and without host syncs."""
    lr, beta1, beta2, weight_decay, eps = (hyper.lr, hyper.beta1, hyper.beta2,
                                           hyper.weight_decay, hyper.eps)  # fmt: skip
    amsgrad, maximize, max_grad_norm = hyper.amsgrad, hyper.maximize, hyper.max_grad_norm
    grad_factor = hyper.grad_factor
    grad_scale, found_inf, grad_norm = hyper.grad_scale, hyper.found_inf, hyper.grad_norm
    masters, stochastic_rounding, seed = lean.masters, lean.stochastic_rounding, lean.seed
    positions, first_indices, scales = lean.positions, lean.first_indices, lean.scales
    if not params:
        return
    device = params[0].device
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    if masters:
        lists["masters"] = list(masters)
    numels = check_lists(lists, device)
    p_dtype, g_dtype, s_dtype = params[0].dtype, grads[0].dtype, exp_avgs[0].dtype
    p_tl = tl_dtype(p_dtype, "params")
    if g_dtype not in (p_dtype, torch.float32):
        raise ValueError(f"grads must be {p_dtype} (as params) or float32, got {g_dtype}")
    quant = s_dtype == torch.uint8
    if s_dtype not in (p_dtype, torch.float32, torch.bfloat16, torch.uint8):
        raise ValueError(f"exp_avgs must be {p_dtype} (as params), float32, bfloat16 or uint8 "
                         f"(8-bit codes), got {s_dtype}")  # fmt: skip
    for name in ("exp_avg_sqs", "max_exp_avg_sqs"):
        if name in lists and lists[name][0].dtype != s_dtype:
            raise ValueError(f"{name} must be {s_dtype} (as exp_avgs), got {lists[name][0].dtype}")
    master = 0
    if masters:
        want = {torch.bfloat16: torch.int16, torch.float16: torch.float32}.get(p_dtype)
        if want is None or masters[0].dtype != want:
            raise ValueError(f"masters of {p_dtype} params must be {want}, got {masters[0].dtype}")
        master = 1 if p_dtype == torch.bfloat16 else 2
    if quant:
        check_scales(scales, numels, 3 if amsgrad else 2, p_dtype, device)
    elif scales:
        raise ValueError(f"scales go with uint8 (8-bit) exp_avgs, got {s_dtype} exp_avgs")
    sr = bool(stochastic_rounding)
    # 8-bit codes always round stochastically, so they draw noise even without sr.
    noise = sr or quant
    if (sr or (quant and positions)) and len(positions) != len(params):
        raise ValueError(f"positions has {len(positions)} entries, expected {len(params)}")
    if sr:
        if s_dtype == torch.float16 or (p_dtype == torch.float16 and not master):
            raise ValueError("stochastic rounding rounds bfloat16 stores only, and this step "
                             "stores float16")  # fmt: skip
    _check_steps(state_steps, len(params), device)

    launch = launch_heuristics("adamw", p_dtype.itemsize)
    values = ()
    if noise:
        firsts = tuple(int(i) for i in first_indices) if first_indices else (0,) * len(params)
        if len(firsts) != len(params):
            raise ValueError(f"first_indices has {len(firsts)} entries, expected {len(params)}")
        places = tuple(int(i) & 0xFFFFFFFF for i in positions) if positions else (0,) * len(params)
        values = (places, firsts)
    # The scales are read a row per block, not streamed: pointer rows whose alignment does not
    # matter, like the step counts'.
    scalar_lists = (state_steps, list(scales)) if quant else (state_steps,)
    table = get_table(list(lists.values()), launch.chunk, device, scalar_lists, numels, values)
    found_inf = _scalar_on(found_inf, device)
    if table.n_chunks == 0:  # only empty tensors: counted all the same
        _count_steps(state_steps, found_inf)
        return

    lr_tensor = _scalar_on(lr, device) if isinstance(lr, Tensor) else None
    grad_scale = _scalar_on(grad_scale, device)
    clip = grad_norm is not None and max_grad_norm > 0
    grad_norm = _scalar_on(grad_norm, device) if clip else None
    lerp_coef, lerp_from_m = _lerp_coef(beta1)
    dummy = table.data  # stands in for absent pointers; never read (its HAS_ flag is off)
    adamw_kernel[(table.n_chunks,)](
        table.data, table.n_tensors,
        dummy if lr_tensor is None else lr_tensor, f64_bits(0.0 if lr_tensor is not None else lr),
        f64_bits(weight_decay), f64_bits(_log2(beta1)), f64_bits(_log2(beta2)),
        lerp_coef, float(beta2), float(1.0 - beta2), float(eps),
        dummy if grad_scale is None else grad_scale, dummy if found_inf is None else found_inf,
        dummy if grad_norm is None else grad_norm, float(max_grad_norm), float(grad_factor),
        seed_key(int(seed)) if noise else 0,
        P_DTYPE=p_tl, G_DTYPE=tl_dtype(g_dtype, "grads"),
        S_DTYPE=tl.uint8 if quant else tl_dtype(s_dtype, "exp_avgs"),
        MASTER=master, SR=sr, AMSGRAD=bool(amsgrad),
        MAXIMIZE=bool(maximize), HAS_LR_TENSOR=lr_tensor is not None,
        HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, HAS_CLIP=clip,
        LERP_FROM_M=lerp_from_m, ALIGNED=table.aligned, MAP_ROW=table.map_row,
        BLOCK=launch.block, CHUNK=launch.chunk,
        num_warps=launch.num_warps, enable_fp_fusion=False,
    )  # fmt: skip
    _count_steps(state_steps, found_inf)


def _count_steps(state_steps: list[Tensor], found_inf: Tensor | None) -> None:
    """Each count one higher, unless found_inf is non-zero: a launch after the update, whose
    programs all read the count before it (they compute with the count plus one)."""
    if found_inf is None:
        torch._foreach_add_(state_steps, 1.0)
    else:  # the list form: the one-tensor form cannot be captured in a CUDA graph
        increment = (found_inf == 0).to(torch.float32)
        torch._foreach_add_(state_steps, [increment] * len(state_steps))
