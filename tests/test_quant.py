"""fastopt.quant, the 8-bit moments' oracle: every code round-trips, rounding is to nearest
even, and the error stays within the bounds the format implies, on hostile blocks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastopt import quant

B = quant.BLOCK


def _heavy(n, seed, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen) * spread)


def _block_max(x):
    rows = quant._pad(x.reshape(-1).abs(), B)
    return rows.amax(1, keepdim=True).expand_as(rows).reshape(-1)[: x.numel()]


@pytest.mark.parametrize("kind", ["m", "v"])
def test_every_code_round_trips(kind):
    """Each finite code's value below 256 (the largest, 256, is a block's maximum rounded up;
    it comes back as 128 at the next scale), in blocks whose largest element fixes the scale
    at 0, quantizes back to that code."""
    if kind == "m":
        codes = torch.tensor([c for c in range(256) if (c & 0x7F) <= 119], dtype=torch.uint8)
        decode, encode = quant.dequantize_m, quant.quantize_m
    else:
        codes = torch.arange(0, 240, dtype=torch.uint8)
        decode, encode = quant.dequantize_v, lambda x: quant.quantize_v(x.sqrt())
    # One code per block beside 192 (its scale: floor(log2 192) - 7 = 0).
    blocks = torch.zeros(codes.numel(), B, dtype=torch.uint8)
    blocks[:, 0] = codes
    blocks[:, 1] = 0x74 if kind == "m" else 0xE8  # 192: 1.5 * 2**7 in E4M3 and in E4M4
    zero_scale = torch.zeros(codes.numel(), dtype=torch.int8)
    values = decode(blocks.reshape(-1), zero_scale)
    assert values.view(-1, B)[:, 1].eq(192.0 if kind == "m" else 192.0**2).all()
    again, scale = encode(values)
    assert torch.equal(scale, zero_scale)
    assert torch.equal(again, blocks.reshape(-1))


def test_values_are_monotonic_and_ties_round_to_even():
    codes = torch.arange(0, 121, dtype=torch.uint8)
    block = torch.zeros(codes.numel(), B, dtype=torch.uint8)
    block[:, 0] = codes
    block[:, 1] = 0x74
    values = quant.dequantize_m(block.reshape(-1), torch.zeros(codes.numel(), dtype=torch.int8))
    values = values.view(-1, B)[:, 0]
    assert (values[1:] > values[:-1]).all()
    # The midpoints between neighbours go to the even code (the lower one when it is even).
    mids = (values[1:] + values[:-1]) / 2
    probe = torch.zeros(mids.numel(), B)
    probe[:, 0] = mids
    probe[:, 1] = 200.0
    got, _ = quant.quantize_m(probe.reshape(-1))
    got = got.view(-1, B)[:, 0].long()
    lower = torch.arange(0, 120)
    assert torch.equal(got, torch.where(lower % 2 == 0, lower, lower + 1))


@settings(max_examples=60)
@given(n=st.integers(1, 3 * B + 5), seed=st.integers(0, 2**31 - 1),
       spread=st.floats(0.0, 6.0), magnitude=st.floats(-30, 30))  # fmt: skip
def test_error_within_the_format_bounds(n, seed, spread, magnitude):
    """exp_avg: relative error <= 2**-4 within 2**13 of its block's largest, absolute error
    <= half the smallest subnormal step below; sqrt(exp_avg_sq): 2**-5 likewise."""
    x = _heavy(n, seed, spread) * 2.0**magnitude
    top = _block_max(x)
    scale = 2.0 ** (torch.floor(torch.log2(top.clamp_min(2.0**-93))) - 7)
    m = quant.dequantize_m(*quant.quantize_m(x))
    normal = x.abs() >= top * 2.0**-13
    assert ((m - x).abs() <= 2.0**-4 * x.abs())[normal].all()
    assert ((m - x).abs() <= 2.0**-10 * scale)[~normal].all()
    root = x.abs()
    v = quant.dequantize_v(*quant.quantize_v(root))
    assert ((v.sqrt() - root).abs() <= 2.0**-5 * root)[normal].all()
    assert ((v.sqrt() - root).abs() <= 2.0**-11 * scale)[~normal].all()


def test_hostile_blocks():
    x = torch.zeros(5 * B + 3)
    x[0] = 1e30  # a block of one huge value: the rest of it keeps what the range allows
    x[1:B] = 1e30 * 2.0**-16
    x[B : 2 * B] = 0.0  # a block of zeros
    x[2 * B] = -math.inf
    x[2 * B + 1] = 1.0
    x[3 * B] = math.nan
    x[3 * B + 1] = -2.5
    x[4 * B :] = 1e-35  # below the scale's range: flushed to the smallest, still finite
    codes, scales = quant.quantize_m(x)
    assert codes.dtype == torch.uint8 and scales.dtype == torch.int8
    assert scales.numel() == 6
    back = quant.dequantize_m(codes, scales)
    assert back[0] == pytest.approx(1e30, rel=2**-4)
    assert (back[1:B] != 0).all()  # 2**-16 of the block's largest is still non-zero
    assert (back[B : 2 * B] == 0).all()
    assert math.isnan(back[2 * B])  # a non-finite moment stays non-finite
    assert math.isnan(back[3 * B]) and back[3 * B + 1] == -2.5
    assert torch.isfinite(back[4 * B :]).all() and int(scales[4]) == quant.SCALE_MIN


def test_a_small_v_beside_a_large_one_does_not_flush():
    """A v just above 2**-36 of its block's largest (its square root just above 2**-18)
    restores non-zero, so its update is not m / eps."""
    root = torch.ones(B)
    root[1] = 2.0**-17.9
    v = quant.dequantize_v(*quant.quantize_v(root))
    assert v[1] > 0 and v[0] == 1.0


@pytest.mark.parametrize("n", [1, B - 1, B, B + 1, 4093, 4096, 4097])
def test_sizes(n):
    x = _heavy(n, n)
    codes, scales = quant.quantize_m(x.view(-1, 1) if n > 1 else x)
    assert codes.numel() == n and scales.numel() == -(-n // B)
    assert quant.dequantize_m(codes, scales).shape == codes.shape


def _by_arithmetic(x, mant_bits):
    """The same rounding by float arithmetic: scale 2**(floor(log2 max) - 7) per block, then
    x rounded to a multiple of its binade's quantum (subnormals below 2**-6), ties to even."""
    rows = quant._pad(x, B)
    top = rows.abs().amax(1, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(top.clamp_min(2.0**-93))) - 7)
    y = rows / scale
    e = torch.floor(torch.log2(y.abs().clamp_min(2.0**-126))).clamp_min(-6)
    quantum = torch.exp2(e - mant_bits)
    return (torch.round(y / quantum) * quantum * scale).reshape(-1)[: x.numel()]


@settings(max_examples=40)
@given(n=st.integers(1, 4 * B), seed=st.integers(0, 2**31 - 1), spread=st.floats(0.0, 6.0),
       magnitude=st.floats(-60, 60))  # fmt: skip
def test_bit_operations_agree_with_float_arithmetic(n, seed, spread, magnitude):
    x = _heavy(n, seed, spread) * 2.0**magnitude
    assert torch.equal(quant.dequantize_m(*quant.quantize_m(x)), _by_arithmetic(x, 3))
    root = x.abs()
    v = quant.dequantize_v(*quant.quantize_v(root))
    assert torch.equal(v, _by_arithmetic(root, 4) ** 2)


def _stochastic_by_arithmetic(x, mant_bits, noise16):
    """Stochastic rounding by arithmetic: the value in units of its binade's quantum, resolved
    to 2**-16 of a unit (truncated), plus the noise, floored."""
    rows = quant._pad(x, B)
    top = rows.abs().amax(1, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(top.clamp_min(2.0**-93))) - 7)
    y = rows / scale
    e = torch.floor(torch.log2(y.abs().clamp_min(2.0**-126))).clamp_min(-6)
    quantum = torch.exp2(e - mant_bits)
    units = torch.floor(y.abs() / quantum * 2.0**16).long()
    steps = (units + quant._pad(noise16, B).long()) >> 16
    value = steps.double() * quantum.double() * scale.double()
    return (torch.sign(y) * value.float()).reshape(-1)[: x.numel()]


@settings(max_examples=40)
@given(n=st.integers(1, 4 * B), seed=st.integers(0, 2**31 - 1), spread=st.floats(0.0, 6.0),
       magnitude=st.floats(-60, 60))  # fmt: skip
def test_stochastic_codes_agree_with_float_arithmetic(n, seed, spread, magnitude):
    x = _heavy(n, seed, spread) * 2.0**magnitude
    noise = torch.randint(0, 2**16, (n,), generator=torch.Generator().manual_seed(seed))
    got = quant.dequantize_m(*quant.quantize_m(x, noise16=noise))
    assert torch.equal(got, _stochastic_by_arithmetic(x, 3, noise))
    root = x.abs()
    v = quant.dequantize_v(*quant.quantize_v(root, noise16=noise))
    assert torch.equal(v, _stochastic_by_arithmetic(root, 4, noise) ** 2)


@pytest.mark.parametrize("value", [1.3, 0.7071, 2.0**-7 * 1.37, 100.0])
def test_stochastic_codes_are_unbiased(value):
    """10**5 copies of a value between two codes (beside 200, which fixes the scale), each
    with its own noise: their mean is the value within 5 standard deviations (the spread of
    a two-point variable between codes a step apart: at most step / 2 / sqrt(n)), and more
    than 2**-16 of a step from it only by that."""
    n = 100_000
    x = torch.full((n, B), 0.0)
    x[:, 0] = value
    x[:, 1] = 200.0
    noise = torch.randint(0, 2**16, (n, B), generator=torch.Generator().manual_seed(1))
    back = quant.dequantize_m(*quant.quantize_m(x.reshape(-1), noise16=noise.reshape(-1)))
    back = back.view(n, B)[:, 0]
    lo, hi = back.min(), back.max()
    assert lo < value < hi  # two neighbouring codes drawn
    step = float(hi - lo)
    assert abs(float(back.double().mean()) - value) < 5 * step / 2 / math.sqrt(n) + step * 2**-16
    nearest = quant.dequantize_m(*quant.quantize_m(x.reshape(-1))).view(n, B)[:, 0]
    assert nearest.unique().numel() == 1  # rounded to nearest, every copy alike
