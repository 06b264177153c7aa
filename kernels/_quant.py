"""8-bit moments in the Triton kernels: fastopt/quant.py is the oracle and explains the
format; these are csrc/adamw_math.h's "8-bit moments" functions, operation for operation
(integer operations and exact power-of-two scalings only, so every backend stores the same
bytes). kernels/adamw.py calls them on (rows, QUANT_BLOCK) tiles, one block a row.
"""

from __future__ import annotations

from operator import attrgetter

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastopt.quant import SCALE_MAX, SCALE_MIN

from ._table import QUANT_BLOCK, on_device

__all__ = ["check_scales", "decode_m", "decode_v", "pow2", "store_quantized"]

_dtype = attrgetter("dtype")

_SCALE_MIN = tl.constexpr(SCALE_MIN)
_SCALE_MAX = tl.constexpr(SCALE_MAX)
_CODE_NAN_M = tl.constexpr(0x7F)  # with either sign bit
_CODE_NAN_V = tl.constexpr(0xFF)
_F32_NAN = tl.constexpr(0x7FC00000)


@triton.jit
def pow2(e):
    """2**e as fp32 for int32 e in [-126, 127], exactly."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _magnitude_bits(x, mask):
    """|x|'s bits, NaN and (``mask``) elements past the tensor's end as 0: uint32 order is
    float order for non-negative floats, so a block's maximum is an integer maximum."""
    b = x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    b = tl.where(b > 0x7F800000, 0, b)
    if mask is not None:
        b = tl.where(mask, b, 0)
    return b


@triton.jit
def _block_scale(max_bits):
    """A block's scale exponent from its largest magnitude bits: floor(log2(max)) - 7, clamped."""
    e = (max_bits >> 23).to(tl.int32) - (127 + 7)
    return tl.minimum(tl.maximum(e, _SCALE_MIN), _SCALE_MAX)


@triton.jit
def _encode_unsigned(a, noise16, MANT: tl.constexpr):
    """Non-negative finite ``a`` (at most 256) to the unsigned code of 4 exponent bits (bias 7)
    and MANT mantissa bits, rounded up with probability (distance from the code below) / step."""
    normal = ((a.to(tl.uint32, bitcast=True) + (noise16 << (7 - MANT))) >> (23 - MANT)) - (
        (127 - 7) << MANT)  # fmt: skip
    # Below 2**-6 the subnormal codes k * 2**-(6 + MANT): a * 2**(22 + MANT) is exact and under
    # 2**20, truncated, plus the noise, over 2**16. The minimum changes no selected lane; it
    # keeps the unselected ones inside int32 (an out-of-range float-to-int is undefined).
    fixed = (tl.minimum(a, 0.015625) * (1 << (22 + MANT))).to(tl.int32).to(tl.uint32, bitcast=True)
    sub = (fixed + noise16) >> 16
    return tl.where(a < 0.015625, sub, normal)


@triton.jit
def _decode_unsigned(code, MANT: tl.constexpr):
    """The magnitude of an unsigned uint32 ``code`` (_encode_unsigned's inverse on codes)."""
    exponent = code >> MANT
    mantissa = code & ((1 << MANT) - 1)
    normal = (((exponent + (127 - 7)) << 23) | (mantissa << (23 - MANT))).to(
        tl.float32, bitcast=True
    )
    sub = mantissa.to(tl.float32) * (1.0 / (1 << (6 + MANT)))  # a power of two: exact
    return tl.where(exponent == 0, sub, normal)


@triton.jit
def _nan_like(x):
    return tl.full(x.shape, _F32_NAN, tl.uint32).to(tl.float32, bitcast=True)


@triton.jit
def decode_m(code, scale):
    """exp_avg from its uint32 E4M3 ``code`` and its block's 2**scale."""
    magnitude = _decode_unsigned(code & 0x7F, 3)
    value = tl.where((code & 0x80) != 0, -magnitude, magnitude)
    return tl.where((code & 0x7F) == _CODE_NAN_M, _nan_like(value), value) * scale


@triton.jit
def decode_v(code, scale):
    """exp_avg_sq from its uint32 E4M4 ``code``: the restored square root, squared."""
    root = _decode_unsigned(code, 4)
    root = tl.where(code == _CODE_NAN_V, _nan_like(root), root) * scale
    return root * root


@triton.jit
def store_quantized(code_ptr, scale_ptr, x, noise16, mask, row_mask, SIGNED: tl.constexpr):
    """A tile of x (rows of QUANT_BLOCK) into codes and one scale per row: exp_avg's E4M3
    (SIGNED) or the E4M4 of a root of exp_avg_sq; inf and NaN to the NaN code."""
    scale = _block_scale(tl.max(_magnitude_bits(x, mask), axis=1))
    tl.store(scale_ptr, scale.to(tl.int8), mask=row_mask)
    y = x * pow2(-scale)[:, None]  # exact: a power of two, no subnormal
    bits = y.to(tl.uint32, bitcast=True)
    ok = (bits & 0x7FFFFFFF) < 0x7F800000  # finite
    if SIGNED:
        a = tl.where(ok, (bits & 0x7FFFFFFF).to(tl.float32, bitcast=True), 0.0)
        code = tl.where(ok, ((bits >> 31) << 7) | _encode_unsigned(a, noise16, 3), _CODE_NAN_M)
    else:
        code = tl.where(ok, _encode_unsigned(tl.where(ok, y, 0.0), noise16, 4), _CODE_NAN_V)
    tl.store(code_ptr, code.to(tl.uint8), mask=mask)


def check_scales(scales: list[Tensor], numels: tuple[int, ...], rows: int,
                  p_dtype: torch.dtype, device: torch.device) -> None:  # fmt: skip
    """One contiguous int8 tensor of rows x blocks per param on ``device`` (8-bit moments)."""
    if p_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"uint8 (8-bit) exp_avgs need float32, bfloat16 or float16 params, "
                         f"got {p_dtype}")  # fmt: skip
    if len(scales) != len(numels):
        raise ValueError(f"scales has {len(scales)} tensors, expected {len(numels)} "
                         "(uint8 exp_avgs need one per param)")  # fmt: skip
    wants = [rows * triton.cdiv(n, QUANT_BLOCK) for n in numels]
    # C-level passes for the common case, as check_lists does; the loop only explains.
    if (set(map(_dtype, scales)) <= {torch.int8} and on_device(scales, device)
            and all(map(Tensor.is_contiguous, scales))
            and list(map(Tensor.numel, scales)) == wants):  # fmt: skip
        return
    for i, (s, n, want) in enumerate(zip(scales, numels, wants)):
        if s.dtype != torch.int8 or s.device != device or not s.is_contiguous():
            raise ValueError(f"scales[{i}] must be a contiguous int8 tensor on {device}, "
                             f"got {s.dtype} on {s.device}")  # fmt: skip
        if s.numel() != want:
            raise ValueError(f"scales[{i}] must hold {rows} rows of {triton.cdiv(n, QUANT_BLOCK)} "
                             f"block scales ({want} elements), got {s.numel()}")  # fmt: skip
