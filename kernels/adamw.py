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
  ``adamw_coeffs``, computed on the device from the tensor's step count: no host sync.
"""

from __future__ import annotations

import math
import struct
from operator import attrgetter

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._table import (
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


@triton.jit
def _update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, coef, decay, lerp_coef, beta2,
            one_minus_beta2, step_size, inv_bc2_sqrt, eps, AMSGRAD: tl.constexpr,
            LERP_FROM_M: tl.constexpr):  # fmt: skip
    """adamw_math on one block; ``mask`` is None for full blocks (unmasked 128-bit accesses)."""
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * coef
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
        vmax = tl.load(vmax_ptr + offs, mask=mask).to(tl.float32)
        vmax = tl.where(vmax > v, vmax, v)  # the header's ternary (NaN in v propagates)
        tl.store(vmax_ptr + offs, to_storage(vmax, vmax_ptr.dtype.element_ty), mask=mask)
        second = vmax
    denom = tl.sqrt_rn(second) * inv_bc2_sqrt + eps
    p = p - step_size * tl.div_rn(m, denom)
    tl.store(p_ptr + offs, to_storage(p, p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, to_storage(m, m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, to_storage(v, v_ptr.dtype.element_ty), mask=mask)


# Every runtime int is exempt from Triton's value specialisation (== 1, % 16): a new tensor
# count or learning rate must never compile a new kernel.
@triton.jit(
    do_not_specialize=["n_tensors", "lr_bits", "wd_bits", "log2_beta1_bits", "log2_beta2_bits"]
)
def adamw_kernel(
    table, n_tensors,  # the multi-tensor table (_table.py) and its tensor count T
    lr_ptr, lr_bits: tl.int64, wd_bits: tl.int64, log2_beta1_bits: tl.int64,
    log2_beta2_bits: tl.int64,  # float64 bit patterns (f64_bits)
    lerp_coef, beta2, one_minus_beta2, eps,  # fp32, rounded from float64 on the host
    grad_scale_ptr, found_inf_ptr, grad_norm_ptr, max_grad_norm, grad_factor,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_LR_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    HAS_CLIP: tl.constexpr, LERP_FROM_M: tl.constexpr, ALIGNED: tl.constexpr,
    MAP_ROW: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
):  # fmt: skip
    t, start, n_here = chunk_coords(table, n_tensors, MAP_ROW, CHUNK)
    if HAS_FOUND_INF:
        # A skipped step touches nothing: this program gets no elements.
        n_here = tl.where(tl.load(found_inf_ptr).to(tl.float32) != 0, 0, n_here)

    p_ptr = tensor_ptr(table, n_tensors, _P, t, start, P_DTYPE, ALIGNED)
    g_ptr = tensor_ptr(table, n_tensors, _G, t, start, G_DTYPE, ALIGNED)
    m_ptr = tensor_ptr(table, n_tensors, _M, t, start, P_DTYPE, ALIGNED)
    v_ptr = tensor_ptr(table, n_tensors, _V, t, start, P_DTYPE, ALIGNED)
    vmax_ptr = v_ptr
    if AMSGRAD:
        vmax_ptr = tensor_ptr(table, n_tensors, _VMAX, t, start, P_DTYPE, ALIGNED)
    step_ptr = tensor_ptr(table, n_tensors, _VMAX + AMSGRAD, t, 0, tl.float32, False)

    # adamw_coeffs: float64 from the step count, rounded to fp32 once.
    if HAS_LR_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = _f64(lr_bits)
    step = tl.load(step_ptr).to(tl.float64)
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
        offs = i * BLOCK + tl.arange(0, BLOCK)
        _update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, None, coef, decay, lerp_coef, beta2,
                one_minus_beta2, step_size, inv_bc2_sqrt, eps, AMSGRAD, LERP_FROM_M)  # fmt: skip
    offs = n_full * BLOCK + tl.arange(0, BLOCK)
    if n_full * BLOCK < n_here:
        mask = offs < n_here
        _update(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, offs, mask, coef, decay, lerp_coef, beta2,
                one_minus_beta2, step_size, inv_bc2_sqrt, eps, AMSGRAD, LERP_FROM_M)  # fmt: skip


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
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    grad_norm: Tensor | None = None,
    max_grad_norm: float = 0.0,
    grad_factor: float = 1.0,
) -> None:
    """fastopt.reference.adamw_step's contract, in one kernel launch and without host syncs."""
    if not params:
        return
    device = params[0].device
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    numels = check_lists(lists, device)
    p_dtype, g_dtype = params[0].dtype, grads[0].dtype
    p_tl = tl_dtype(p_dtype, "params")
    if g_dtype not in (p_dtype, torch.float32):
        raise ValueError(f"grads must be {p_dtype} (as params) or float32, got {g_dtype}")
    for name in lists:
        if name != "grads" and lists[name][0].dtype != p_dtype:
            raise ValueError(f"{name} must be {p_dtype} (as params), got {lists[name][0].dtype}")
    _check_steps(state_steps, len(params), device)

    launch = launch_heuristics("adamw", p_dtype.itemsize)
    table = get_table(list(lists.values()), launch.chunk, device, (state_steps,), numels)
    if table.n_chunks == 0:
        return  # only empty tensors

    lr_tensor = _scalar_on(lr, device) if isinstance(lr, Tensor) else None
    grad_scale = _scalar_on(grad_scale, device)
    found_inf = _scalar_on(found_inf, device)
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
        P_DTYPE=p_tl, G_DTYPE=tl_dtype(g_dtype, "grads"), AMSGRAD=bool(amsgrad),
        MAXIMIZE=bool(maximize), HAS_LR_TENSOR=lr_tensor is not None,
        HAS_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None, HAS_CLIP=clip,
        LERP_FROM_M=lerp_from_m, ALIGNED=table.aligned, MAP_ROW=table.map_row,
        BLOCK=launch.block, CHUNK=launch.chunk,
        num_warps=launch.num_warps, enable_fp_fusion=False,
    )  # fmt: skip
