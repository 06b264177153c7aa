"""Rounding fp32 results into 16-bit storage, written once in plain PyTorch (the oracle).

csrc/adamw_math.h and kernels/rounding.py implement the same functions bit for bit; the
tests step every backend in lockstep with these.

**Exact fp32 master in 16 extra bits** (``master_weights=True`` for bf16 params). A bf16
param's bits are the top half of an fp32 word; the master is that word plus a signed 16-bit
remainder: ``master_bits = (param_bits << 16) + remainder`` (32-bit wrap-around). Rounding to
nearest in bits is rounding ``master_bits`` to a multiple of 2**16, so the remainder lies in
[-2**15, 2**15]: one value too many for 16 bits, the exact ties (low half 0x8000). A tie is
therefore broken before it is stored, by moving the master one fp32 ulp the way round-to-
nearest-even rounds it: the param is still the master rounded to nearest, bit for bit, and the
master is the fp32 result or one ulp from it once in 2**16 stores (well inside the fp32
update's own rounding).

**Stochastic rounding to bf16**: add 16 random bits to the fp32 bit pattern and truncate.
Within a binade that rounds |x| up with probability equal to its distance from the bf16 below,
in units of the bf16 ulp (unbiased); a carry into the exponent is the correct next value.
NaN stays NaN (the addition could wrap its bits round to zero).

**The noise** is a pure function of (seed, the param's position in the optimizer, the step
count, which store, the element's index in the whole param, also for a shard): a
counter-based hash, so every backend draws the same bits for the same element wherever and in
whatever order it runs it, however the param is sharded, and a resumed run draws what the
uninterrupted one would. ``mix32`` is Chris Wellons' "lowbias32" integer hash.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "MASK32",
    "STREAM_MOMENTS2",
    "STREAM_PARAM_MOMENT1",
    "element_noise",
    "join_master",
    "mix32",
    "mix32_int",
    "noise_key",
    "round_bf16_nearest",
    "round_bf16_stochastic",
    "seed_key",
    "split_master",
]

MASK32 = 0xFFFFFFFF
# Two noise words per element: the first gives the param's 16 bits (high half) and exp_avg's
# (low half), the second exp_avg_sq's (high) and max_exp_avg_sq's (low).
STREAM_PARAM_MOMENT1 = 0
STREAM_MOMENTS2 = 1
_MIX1, _MIX2 = 0x7FEB352D, 0x846CA68B


def mix32_int(x: int) -> int:
    """lowbias32 on a Python int (its low 32 bits): the per-tensor keys, on the host."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _MIX1) & MASK32
    x ^= x >> 15
    x = (x * _MIX2) & MASK32
    return x ^ (x >> 16)


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 tensors holding uint32 values: in two 16-bit halves of c so
    no product leaves int64's range."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def mix32(x: Tensor) -> Tensor:
    """lowbias32 elementwise on an int64 tensor of uint32 values."""
    x = x ^ (x >> 16)
    x = _mul32(x, _MIX1)
    x = x ^ (x >> 15)
    x = _mul32(x, _MIX2)
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """A 64-bit seed folded to the 32-bit word the per-tensor keys start from."""
    return mix32_int((seed & MASK32) ^ mix32_int(seed >> 32))


def noise_key(seed: int, position: int, step: int, stream: int) -> int:
    """The 32-bit key of one param's noise at one step: the kernels compute it per tensor from
    the same four numbers (the step is the count after this step, read from the state)."""
    k = mix32_int(seed_key(seed) ^ (position & MASK32))
    k = mix32_int(k ^ (step & MASK32))
    return mix32_int(k ^ stream)


def element_noise(key: int, numel: int, device: torch.device, first: int = 0) -> Tensor:
    """The noise word of each element first..first+numel-1 (int64 holding uint32):
    mix32(key ^ index), the index's high word folded into the key first (mix32(0) is 0, so
    nothing changes below 2**32). ``first``: the index of the tensor's first element in the
    whole param, for a shard (FSDP2), so that the noise does not depend on how it is sharded."""
    i = torch.arange(first, first + numel, dtype=torch.int64, device=device)
    k = torch.full_like(i, key)
    if first + numel > 1 << 32:
        k = k ^ mix32(i >> 32)
    return mix32(k ^ (i & MASK32))


def _bits(x: Tensor) -> Tensor:
    """fp32 -> its bit pattern as int64 in [0, 2**32)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & MASK32


def _from_bits(b: Tensor) -> Tensor:
    """int64 in [0, 2**32) -> the fp32 with those bits."""
    return torch.where(b >= 1 << 31, b - (1 << 32), b).to(torch.int32).view(torch.float32)


def _bf16_of_bits(top: Tensor) -> Tensor:
    """The bf16 whose bits are ``top`` (int64 in [0, 2**16)), built from the bits: torch's
    fp32-to-bf16 conversion writes a NaN as 0x7FC0 in its scalar code and as 0xFFFF in its
    AVX-512 code, while every fastopt kernel writes 0x7FC0."""
    return torch.where(top >= 1 << 15, top - (1 << 16), top).to(torch.int16).view(torch.bfloat16)


def round_bf16_nearest(x: Tensor) -> Tensor:
    """fp32 ``x`` to bf16, rounded to nearest even; NaN to 0x7FC0 (torch's rounding, with the
    kernels' NaN)."""
    b = _bits(x.float())
    top = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
    return _bf16_of_bits(torch.where(torch.isnan(x), torch.full_like(top, 0x7FC0), top))


def round_bf16_stochastic(x: Tensor, noise16: Tensor) -> Tensor:
    """fp32 ``x`` to bf16, rounded up in magnitude with probability (distance to the bf16
    below) / ulp, using ``noise16`` (int64, 0..65535) as the random bits."""
    b = (_bits(x.float()) + noise16) & MASK32
    top = (b >> 16) & 0xFFFF
    top = torch.where(torch.isnan(x), torch.full_like(top, 0x7FC0), top)
    return _bf16_of_bits(top)


def split_master(x: Tensor) -> tuple[Tensor, Tensor]:
    """An fp32 master into (bf16 param = x rounded to nearest even, int16 remainder), with the
    exact ties moved one ulp the way they round (see the module's docstring)."""
    b = _bits(x.float())
    tie = (b & 0xFFFF) == 0x8000
    up = ((b >> 16) & 1) == 1  # an odd top half rounds up at a tie, an even one down
    b = torch.where(tie, torch.where(up, b + 1, b - 1) & MASK32, b)
    top = ((b + 0x8000) >> 16) & 0xFFFF  # no ties left: round half up is round to nearest
    nan = torch.isnan(x)
    top = torch.where(nan, torch.full_like(top, 0x7FC0), top)
    rem = (b - (top << 16)) & 0xFFFF
    rem = torch.where(nan, torch.zeros_like(rem), rem)
    param = _bf16_of_bits(top)
    remainder = torch.where(rem >= 1 << 15, rem - (1 << 16), rem).to(torch.int16)
    return param, remainder


def join_master(param: Tensor, remainder: Tensor) -> Tensor:
    """The fp32 master of a bf16 param and its int16 remainder."""
    top = param.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    return _from_bits(((top << 16) + remainder.to(torch.int64)) & MASK32)
