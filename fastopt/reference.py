"""The reference backend: the fused-step ops written in plain PyTorch.

This module is the oracle. Every other backend (the C++ CPU kernel, the CUDA kernels, the
Triton kernels) implements exactly these four functions with exactly these signatures, and
the tests step each one in lockstep against the functions here. It is also the fallback when
no compiled backend is available, so it must stay correct on any device and dtype.

The arithmetic contract every backend follows:

* Math is fp32 whatever the storage dtype: params, gradients and moments are loaded, upcast
  to fp32, updated, and rounded back to their own dtype once.
* The gradient each update sees is ``g = grad * coef`` with one fp32 coefficient per step:
  ``coef = grad_factor / grad_scale``, multiplied by the clip factor
  ``min(1, max_grad_norm / (grad_norm * coef + 1e-6))`` when clipping is on
  (:func:`grad_coefficient`). ``grad_norm`` is the norm of the gradients as stored, so the
  unscaled norm is ``grad_norm * coef``; the ``1e-6`` is torch's ``clip_grad_norm_``'s.
* ``found_inf`` non-zero means the whole update is skipped: params, moments and step counts
  are unchanged. Otherwise the op advances each of ``state_steps`` by 1 and updates with the
  new count: the caller never touches the counts (one tensor per param, none listed twice).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import torch
from torch import Tensor

from .quant import dequantize_m, dequantize_v, quantize_m, quantize_v
from .rounding import (
    STREAM_MOMENTS2,
    STREAM_PARAM_MOMENT1,
    element_noise,
    join_master,
    noise_key,
    round_bf16_nearest,
    round_bf16_stochastic,
    split_master,
)
from .step_args import PLAIN, Hyper, Lean

__all__ = [
    "CLIP_EPS",
    "accumulate_",
    "adamw_step",
    "adamw_step_exchanging",
    "grad_coefficient",
    "multi_tensor_norm",
    "update_scale_",
]

# torch.nn.utils.clip_grad_norm_ divides by (total_norm + 1e-6); we keep its constant so a
# clipped step matches torch's unscale_ -> clip_grad_norm_ -> step recipe.
CLIP_EPS = 1e-6


def grad_coefficient(
    grad_scale: Tensor | None,
    grad_norm: Tensor | None,
    max_grad_norm: float,
    grad_factor: float,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The factor every stored gradient is multiplied by before the update (0-dim): fp32, the
    kernels' math, or float64 for float64 params."""
    coef = torch.full((), grad_factor, dtype=dtype, device=device)
    if grad_scale is not None:
        coef = coef / grad_scale.to(device=device, dtype=dtype)
    if grad_norm is not None and max_grad_norm > 0:
        clip = max_grad_norm / (grad_norm.to(device=device, dtype=dtype) * coef + CLIP_EPS)
        coef = torch.where(clip < 1.0, coef * clip, coef)
    return coef


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the kernels' storage dtypes; float64 stays float64, as in torch's AdamW."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sqrt(x: Tensor) -> Tensor:
    """The correctly rounded square root, as the kernels' sqrtf: torch's fp32 sqrt on the CPU
    is not (about 0.7% of results 1 ulp off, torch 2.14). Through float64, whose rounding of
    the exact root to fp32 is exact for a square root."""
    if x.dtype != torch.float32:
        return x.sqrt()
    return x.to(torch.float64).sqrt_().to(torch.float32)


def _fp32(x: float) -> float:
    """x rounded to fp32, as the kernels take their scalar weights."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _lr_value(lr: float | Tensor) -> float:
    return lr.item() if isinstance(lr, Tensor) else float(lr)


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
    """One AdamW update (decoupled weight decay) of every tensor in ``params``, in place.

    ``hyper`` holds the step's scalars, ``lean`` the memory-lean settings (fastopt.step_args).
    ``grads`` may be the params' dtype or fp32 (accumulation buffers). ``state_steps`` hold
    the step counts *before* this step: each is advanced by 1, unless ``hyper.found_inf`` is
    non-zero (a skipped step), and the update uses the advanced count. ``max_exp_avg_sqs`` is
    empty unless ``hyper.amsgrad``. The moments may be stored in another dtype than the params
    (fp32, bf16); the math is fp32.

    ``lean.masters`` is empty or holds one tensor per param: the int16 remainder of a bf16
    param's fp32 master, or the fp32 master of a fp16 param (fastopt.rounding). The update then
    starts from the master, and the param is stored as the new master rounded to nearest.
    ``lean.stochastic_rounding``: every other store into bf16 rounds stochastically, with noise
    keyed by ``seed``, ``positions[i]`` (the param's place in the optimizer) and the step,
    one word per element by its index in the whole param: ``first_indices[i]`` is the index of
    params[i]'s first element there (non-zero for a shard; empty: all 0).

    8-bit moments (fastopt.quant): uint8 ``exp_avgs``, ``exp_avg_sqs`` and ``max_exp_avg_sqs``
    hold codes, and ``scales[i]`` is an int8 tensor of shape (2, or 3 with amsgrad, blocks):
    the block scales of params[i]'s moments in that order, blocks counted from params[i]'s
    first element. The codes always round stochastically, with the noise of the 16-bit
    stores they replace (so ``seed``, ``positions`` and ``first_indices`` are needed).
    """
    adamw_step_exchanging(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                          hyper, lean, None)  # fmt: skip


@torch.no_grad()
def adamw_step_exchanging(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hyper: Hyper,
    lean: Lean,
    exchange: Callable[[list[list[Tensor]]], list[list[Tensor]]] | None,
) -> None:
    """adamw_step, whose 8-bit codes are stored with the scales ``exchange`` returns when it is
    given: for tensors that each lie within one block of a larger whole (the pieces of a shard
    that a shard boundary cuts from the rest of their block), it receives this step's own
    scales as a list (per tensor) of lists (per moment) of one-element int8 tensors, and
    fastopt.blocks exchanges them for the whole blocks'."""
    if not params:
        return
    pending: list = []  # with exchange: the 8-bit stores, made once the scales are exchanged
    device = params[0].device
    math_dtype = _math_dtype(params[0].dtype)
    h = hyper
    coef = grad_coefficient(h.grad_scale, h.grad_norm, h.max_grad_norm, h.grad_factor, device,
                            math_dtype)  # fmt: skip
    if h.found_inf is not None and bool(h.found_inf.item() != 0):
        return  # skipped: the counts stay as they are
    lr, beta1, beta2, weight_decay, eps = h.lr, h.beta1, h.beta2, h.weight_decay, h.eps
    amsgrad, maximize = h.amsgrad, h.maximize
    masters, stochastic_rounding, seed = lean.masters, lean.stochastic_rounding, lean.seed
    positions, first_indices, scales = lean.positions, lean.first_indices, lean.scales
    for count in state_steps:
        count.add_(1)
    lr = _lr_value(lr)
    for i, param in enumerate(params):
        master = masters[i] if masters else None
        if master is None:
            p = param.to(math_dtype)
        elif master.dtype == torch.int16:
            p = join_master(param, master)
        else:
            p = master.to(torch.float32)
        g = grads[i].to(math_dtype) * coef
        if maximize:
            g = -g
        quantized = exp_avgs[i].dtype == torch.uint8
        if quantized:
            m = dequantize_m(exp_avgs[i], scales[i][0])
            v = dequantize_v(exp_avg_sqs[i], scales[i][1])
        else:
            m = exp_avgs[i].to(math_dtype)
            v = exp_avg_sqs[i].to(math_dtype)
        step = _lr_value(state_steps[i])
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)

        # Each operation a separate elementwise op, in csrc/adamw_math.h's order, so that no
        # torch kernel fuses a multiply-add (its lerp and addcdiv may): in fp32 this is the
        # compiled kernels' arithmetic to the bit, and stochastic rounding sees the same values.
        p.mul_(1 - lr * weight_decay)  # decoupled weight decay
        if math_dtype == torch.float32:  # m = lerp(m, g, 1 - beta1), in torch's two forms
            w = _fp32(1 - beta1)
            d = g - m
            m = m + d * w if w < 0.5 else g + d * (w - 1)
        else:
            m.lerp_(g, 1 - beta1)
        v.mul_(beta2).add_((g * g).mul_(1 - beta2))  # v = beta2 * v + (1 - beta2) * g^2
        second = v
        if amsgrad:
            vmax = (dequantize_v(max_exp_avg_sqs[i], scales[i][2]) if quantized
                    else max_exp_avg_sqs[i].to(math_dtype))  # fmt: skip
            # The kernels' `vmax > v ? vmax : v`: a NaN in v carries on (its own bits), a NaN
            # in vmax alone gives way to v. torch.maximum would differ only there (it also
            # carries vmax's NaN, as 0xFFFFFFFF in its vectorised lanes), in a state no step
            # from finite values reaches.
            second = torch.where(vmax > v, vmax, v)
        # Times the reciprocal where torch divides: one division per element in the kernels.
        root = _sqrt(second)
        denom = (root * (1 / bias_correction2_sqrt)).add_(eps)
        p.sub_((m / denom).mul_(lr / bias_correction1))

        # 16 noise bits per bf16 store: the param's, exp_avg's, exp_avg_sq's, max_exp_avg_sq's
        first = first_indices[i] if first_indices else 0
        n_p, n_m, n_v, n_vmax = _noise(stochastic_rounding or quantized, seed,
                                       positions[i] if positions else 0, first, state_steps[i],
                                       p)  # fmt: skip
        if not stochastic_rounding:
            n_p = None  # 8-bit codes round stochastically, the param only when asked to
        if master is None:
            _store(param, p, n_p)
        elif master.dtype == torch.int16:
            rounded, remainder = split_master(p)
            param.copy_(rounded)
            master.copy_(remainder)
        else:
            master.copy_(p)
            param.copy_(p)
        if quantized:
            v_root = _sqrt(v) if amsgrad else root
            moments = [(exp_avgs[i], m, n_m, quantize_m), (exp_avg_sqs[i], v_root, n_v, quantize_v)]
            if amsgrad:
                moments.append((max_exp_avg_sqs[i], root, n_vmax, quantize_v))
            if exchange is None:
                for row, (codes, value, noise16, quantize) in enumerate(moments):
                    _store_codes(codes, scales[i][row], *quantize(value, noise16=noise16))
            else:
                pending.append((scales[i], moments))
            continue
        _store(exp_avgs[i], m, n_m)
        _store(exp_avg_sqs[i], v, n_v)
        if amsgrad:
            _store(max_exp_avg_sqs[i], second, n_vmax)
    if exchange is not None:
        _store_exchanged(pending, exchange)


def _store_exchanged(pending: list, exchange) -> None:
    own = [[quantize(value, noise16=noise16)[1] for _, value, noise16, quantize in moments]
           for _, moments in pending]  # fmt: skip
    given = exchange(own)
    for (scale_rows, moments), scales in zip(pending, given):
        for row, (codes, value, noise16, quantize) in enumerate(moments):
            stored = quantize(value, noise16=noise16, scale=scales[row])
            _store_codes(codes, scale_rows[row], *stored)


def _noise(on: bool, seed: int, position: int, first: int, step: Tensor, like: Tensor):
    """The four 16-bit noise halves of every element of a param at this step (Nones when off):
    the high and low halves of two noise words."""
    if not on:
        return None, None, None, None
    step = int(_lr_value(step))
    halves = []
    for stream in (STREAM_PARAM_MOMENT1, STREAM_MOMENTS2):
        key = noise_key(seed, position, step, stream)
        word = element_noise(key, like.numel(), like.device, first).view(like.shape)
        halves += [word >> 16, word & 0xFFFF]
    return halves


def _store_codes(codes: Tensor, scale_row: Tensor, new_codes: Tensor, new_scales: Tensor) -> None:
    codes.copy_(new_codes.view(codes.shape))
    scale_row.copy_(new_scales)


def _store(dst: Tensor, value: Tensor, noise16: Tensor | None) -> None:
    """dst = value: stochastically rounded when noise is given and dst is bf16, else to
    nearest."""
    if dst.dtype == torch.bfloat16:
        dst.copy_(
            round_bf16_nearest(value) if noise16 is None else round_bf16_stochastic(value, noise16)
        )
    else:
        dst.copy_(value)


@torch.no_grad()
def multi_tensor_norm(tensors: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    """The global ``norm_type``-norm of all ``tensors`` and a non-finite flag, in fp32.

    Returns two 0-dim tensors on the tensors' device: the norm (fp32, or float64 when the
    tensors are float64), and an fp32 1.0 if any element is inf or NaN (else 0.0). An empty
    list gives (0, 0) on the CPU.
    """
    if not tensors:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, zero.clone()
    device = tensors[0].device
    # Empty tensors contribute nothing (and the inf-norm of an empty tensor is undefined).
    flat = [t.detach().reshape(-1).to(_math_dtype(t.dtype)) for t in tensors if t.numel() > 0]
    if not flat:  # the dtype of a norm of these tensors, as on a rank holding elements of them
        zero = torch.zeros((), dtype=_math_dtype(tensors[0].dtype), device=device)
        return zero, torch.zeros((), dtype=torch.float32, device=device)
    # p-norms other than 1, 2 and inf sum |x|^p in float64: fp32's range holds |x|^p only for
    # |x| within a few decades of 1 when p is large (fastopt.norm routes these p here).
    wide = norm_type not in (0.0, 1.0, 2.0, math.inf, -math.inf)
    acc = torch.float64 if wide else None
    norms = torch.stack([torch.linalg.vector_norm(t, norm_type, dtype=acc) for t in flat])
    out = torch.float64 if any(t.dtype == torch.float64 for t in flat) else torch.float32
    total = torch.linalg.vector_norm(norms, norm_type).to(out)
    nonfinite = torch.zeros((), dtype=torch.float32, device=device)
    for t in flat:
        nonfinite = torch.maximum(nonfinite, (~torch.isfinite(t)).any().float())
    return total, nonfinite


@torch.no_grad()
def accumulate_(accs: list[Tensor], grads: list[Tensor], alpha: float, overwrite: bool) -> None:
    """``acc = alpha * grad`` when ``overwrite`` (first micro-batch), else ``acc += alpha * grad``.

    ``accs`` are fp32 (float64 for float64 grads); ``grads`` any floating dtype, upcast
    before the multiply.
    """
    for acc, grad in zip(accs, grads, strict=True):
        g = grad.to(acc.dtype) * alpha
        if overwrite:
            acc.copy_(g)
        else:
            acc.add_(g)


@torch.no_grad()
def update_scale_(
    scale: Tensor,
    growth_tracker: Tensor,
    found_inf: Tensor,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
) -> None:
    """Dynamic loss-scale update, the rule of ``torch._amp_update_scale_``, in place.

    On a non-finite step the scale backs off and the tracker resets; otherwise the tracker
    counts up and the scale grows once it reaches ``growth_interval``. ``scale`` is fp32 and
    ``growth_tracker`` int32, both 0-dim on the same device as ``found_inf``.
    """
    inf = found_inf.to(scale.device) != 0
    grown = growth_tracker + 1 >= growth_interval
    grown_scale = scale * growth_factor
    # Like torch, never grow the scale past the fp32 range into inf.
    grown_scale = torch.where(torch.isfinite(grown_scale), grown_scale, scale)
    new_scale = torch.where(inf, scale * backoff_factor, torch.where(grown, grown_scale, scale))
    new_tracker = torch.where(inf | grown, torch.zeros_like(growth_tracker), growth_tracker + 1)
    scale.copy_(new_scale)
    growth_tracker.copy_(new_tracker)
