// AdamW with 8-bit moments in AVX-512 registers. The portable kernel (adamw.cpp) goes through
// fp32 scratch rows, because GCC vectorises a loop at the width of its narrowest type (16 code
// bytes, so four fp32 lanes); each value is stored and reloaded at every stage, and every
// block's scale spread to one float per element. Here the codes widen in registers, and a
// group of 8 scale blocks (16 vectors) goes through each stage before the next (see
// kGroupBlocks). Where time goes (fp32 params, one thread, in cache, on a 2-core AMD EPYC,
// timed standalone by leaving stages out): decode and update 0.46 ns per element (the fp32
// step alone 0.40: its divisions and square roots), block scales 0.14, encode 0.52, of which
// the noise words 0.20. Running a group's encode beside the next group's update was slower
// (1.22 ns against 1.11): the update leaves no vector pipe idle for it.
//
// The math and rounding mirror csrc/adamw_math.h operation for operation (same order, no
// fused multiply-adds); the codes go other ways to the same bits (fp16 conversions to decode,
// one formula to encode), each argued where it is written. tests/test_cpu_simd.py holds each
// path to the reference on every variant, every code under the extreme scales, and the
// encodings a carry would change.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../adamw_dispatch.h"
#include "../adamw_math.h"
#include "cpu_common.h"

#if FASTOPT_X86_SIMD
#include <immintrin.h>

namespace fastopt::cpu::avx512 {

#define FASTOPT_AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define FASTOPT_AVX512 FASTOPT_AVX512_TARGET inline __attribute__((always_inline))
// Lambdas inlined as the helpers are: GCC called some out of line, through the stack.
#define FASTOPT_AVX512_LAMBDA FASTOPT_AVX512_TARGET __attribute__((always_inline))

// Whether this path serves params of type P with grads G and master kM (8-bit moments): bf16
// and fp32 params and grads, a bf16 param's remainder; fp16 params take the portable path.
template <typename P, typename G, Master kM>
constexpr bool kServes = (std::is_same_v<P, float> || std::is_same_v<P, BFloat16>) &&
                         (std::is_same_v<G, float> || std::is_same_v<G, BFloat16>) &&
                         kM != Master::kCopy;

using F = __m512;
using I = __m512i;

FASTOPT_AVX512 I u32(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
FASTOPT_AVX512 F f32(float x) { return _mm512_set1_ps(x); }
FASTOPT_AVX512 I bits(F x) { return _mm512_castps_si512(x); }
FASTOPT_AVX512 F from_bits(I x) { return _mm512_castsi512_ps(x); }

FASTOPT_AVX512 I mix32(I x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, u32(0x7FEB352Du));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
  x = _mm512_mullo_epi32(x, u32(0x846CA68Bu));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// AdamWCoeffs broadcast to every lane.
struct Coeffs {
  F decay, lerp_coef, beta2, one_minus_beta2, step_size, inv_bc2_sqrt, eps, grad_coef;
  bool lerp_from_m;
};

FASTOPT_AVX512 Coeffs broadcast(const AdamWCoeffs& c) {
  return {f32(c.decay),     f32(c.lerp_coef),    f32(c.beta2), f32(c.one_minus_beta2),
          f32(c.step_size), f32(c.inv_bc2_sqrt), f32(c.eps),   f32(c.grad_coef),
          c.lerp_from_m};
}

// adamw_math, lane by lane.
template <bool kAmsgrad>
FASTOPT_AVX512 void math(F& p, F grad, F& m, F& v, F& vmax, const Coeffs& c, F& root) {
  const F g = _mm512_mul_ps(grad, c.grad_coef);
  p = _mm512_mul_ps(p, c.decay);
  m = _mm512_add_ps(c.lerp_from_m ? m : g, _mm512_mul_ps(c.lerp_coef, _mm512_sub_ps(g, m)));
  v = _mm512_add_ps(_mm512_mul_ps(v, c.beta2),
                    _mm512_mul_ps(c.one_minus_beta2, _mm512_mul_ps(g, g)));
  F second = v;
  if constexpr (kAmsgrad) {
    vmax = _mm512_max_ps(vmax, v);  // vmax > v ? vmax : v, as the scalar code
    second = vmax;
  }
  root = _mm512_sqrt_ps(second);
  const F denom = _mm512_add_ps(_mm512_mul_ps(root, c.inv_bc2_sqrt), c.eps);
  p = _mm512_sub_ps(p, _mm512_mul_ps(c.step_size, _mm512_div_ps(m, denom)));
}

FASTOPT_AVX512 __mmask16 is_nan(F x) { return _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q); }

// Lanes of 16-bit storage as the fp32 words they widen to (bf16: the high half).
FASTOPT_AVX512 I load_u16(const void* p, __mmask16 k) {
  return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
}

template <typename T>
FASTOPT_AVX512 F load(const T* p, __mmask16 k) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(k, p);
  } else {
    return from_bits(_mm512_slli_epi32(load_u16(p, k), 16));
  }
}

FASTOPT_AVX512 void store_u16(void* p, __mmask16 k, I x) {
  _mm256_mask_storeu_epi16(p, k, _mm512_cvtepi32_epi16(x));
}

// bf16 stores: rounded to nearest even (store in cpu_common.h) or stochastically
// (bf16_stochastic); NaN to the canonical NaN.
FASTOPT_AVX512 I bf16_nearest(F x) {
  const I b = bits(x);
  const I odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), u32(1));
  const I r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, u32(0x7FFFu)), odd), 16);
  return _mm512_mask_mov_epi32(r, is_nan(x), u32(0x7FC0u));
}

FASTOPT_AVX512 I bf16_stochastic(F x, I noise16) {
  const I r = _mm512_srli_epi32(_mm512_add_epi32(bits(x), noise16), 16);
  return _mm512_mask_mov_epi32(r, is_nan(x), u32(0x7FC0u));
}

// split_master: the bf16 bits and the int16 remainder of fp32 masters x. The scalar code moves
// an exact tie (low half 0x8000) one ulp the way it rounds first, which is the same as
// rounding b to nearest even and clamping the remainder, then +-0x8000, to +-0x7FFF; this way
// takes no mask logic.
FASTOPT_AVX512 void split_master(F x, I& param_bits, I& remainder) {
  const I b = bits(x);
  const I odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), u32(1));
  const I top = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, u32(0x7FFFu)), odd), 16);
  const I rest = _mm512_sub_epi32(b, _mm512_slli_epi32(top, 16));
  const I clamped = _mm512_min_epi32(_mm512_max_epi32(rest, u32(static_cast<uint32_t>(-0x7FFF))),
                                     u32(0x7FFFu));
  const __mmask16 nan = is_nan(x);
  param_bits = _mm512_mask_mov_epi32(top, nan, u32(0x7FC0u));
  remainder = _mm512_maskz_mov_epi32(static_cast<__mmask16>(~nan), clamped);
}

// Blocks per group. One block alone is a single chain of dependent steps (decode, update,
// block maximum, encode) longer than the core's reorder window can hide; the loop runs each
// step over a group's 16 vectors before the next step, so that they overlap. fp32 params with
// 8-bit moments, one thread, in cache, on a 2-core AMD EPYC (with an earlier, longer decode
// and encode): 1.71 ns per element a block at a time, 1.59 in groups of 4 blocks, 1.56 in
// groups of 8.
constexpr int kGroupBlocks = 8;
constexpr int kGroupVectors = 2 * kGroupBlocks;
constexpr int64_t kGroup = int64_t{kGroupBlocks} * kQuantBlock;

// ---- 8-bit codes (csrc/adamw_math.h has the format) ----

using H = __m256i;  // 16 lanes of 16 bits

FASTOPT_AVX512 H u16(uint16_t x) { return _mm256_set1_epi16(static_cast<short>(x)); }

// x * 2**e from x * 2**-8, rounded once as the scalar code's x * pow2(e) (see decode_m).
FASTOPT_AVX512 F times_pow2(F x_over_256, int e) {
  return _mm512_scalef_ps(x_over_256, f32(static_cast<float>(e + 8)));
}

// Decoding goes through IEEE half precision. An unsigned code's 4 exponent bits (bias 7) and
// kMant mantissa bits, placed at the top of a half's exponent and mantissa fields, are a half
// (bias 15) worth the code's value times 2**-8, subnormal codes included, which vcvtph2ps
// widens exactly; times_pow2 puts the 2**8 back with the block's scale. The product is exact
// as the scalar code's: a nonzero code is at least 2**-10 and a scale at least 2**-100.
FASTOPT_AVX512 F decode_m(const uint8_t* p, __mmask16 k, int e) {
  // Sign-extended and shifted by 7, the code's sign is at bit 15 (and 14, cleared) and its
  // magnitude at bits 7-13. The NaN code (low 7 bits set) becomes a half NaN.
  const H c = _mm256_cvtepi8_epi16(_mm_maskz_loadu_epi8(k, p));
  const H h = _mm256_and_si256(_mm256_slli_epi16(c, 7), u16(0xBF80));
  const __mmask16 nan = _mm256_cmpeq_epi16_mask(_mm256_or_si256(c, u16(0xFF80)), u16(0xFFFF));
  // 0x7E00 widens to the scalar code's NaN, 0x7FC00000, which times_pow2 keeps.
  return times_pow2(_mm512_cvtph_ps(_mm256_mask_mov_epi16(h, nan, u16(0x7E00))), e);
}

FASTOPT_AVX512 F decode_v(const uint8_t* p, __mmask16 k, int e) {
  const H c = _mm256_cvtepu8_epi16(_mm_maskz_loadu_epi8(k, p));
  const H h = _mm256_mask_mov_epi16(_mm256_slli_epi16(c, 6),
                                    _mm256_cmpeq_epi16_mask(c, u16(kCodeNanV)), u16(0x7E00));
  const F root = times_pow2(_mm512_cvtph_ps(h), e);
  return _mm512_mul_ps(root, root);
}

FASTOPT_AVX512 F pow2v(int e) { return f32(pow2(e)); }

FASTOPT_AVX512 void store_codes(uint8_t* p, __mmask16 k, I codes) {
  _mm_mask_storeu_epi8(p, k, _mm512_cvtepi32_epi8(codes));
}

// encode_unsigned for non-negative a, in one formula. Below 2**-6, a + 2**-6 rounded toward
// zero holds floor(a * 2**29) in its mantissa, and one exponent step down those bits continue
// the normal codes' below 2**-6: the normal formula then gives floor((floor(a * 2**29) +
// noise * 2**(7 - kMant)) / 2**(23 - kMant)), which is the scalar code's floor((trunc(a *
// 2**(22 + kMant)) + noise) / 2**16), as the dropped low bits of a * 2**29 are fewer than the
// noise's shift and never carry. Lanes whose a is not finite are the caller's to replace.
template <int kMant>
FASTOPT_AVX512 I encode_unsigned(F a, I noise16) {
  const F smallest_normal = f32(0.015625f);
  const __mmask16 sub = _mm512_cmp_ps_mask(a, smallest_normal, _CMP_LT_OQ);
  const F sum = _mm512_add_round_ps(a, smallest_normal, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const I b = _mm512_mask_sub_epi32(bits(a), sub, bits(sum), u32(1u << 23));
  const I rounded = _mm512_add_epi32(b, _mm512_slli_epi32(noise16, 7 - kMant));
  return _mm512_sub_epi32(_mm512_srli_epi32(rounded, 23 - kMant), u32(uint32_t{127 - 7} << kMant));
}

// NaN and both infinities (vfpclassps categories).
constexpr int kNotFinite = 0x01 | 0x08 | 0x10 | 0x80;

FASTOPT_AVX512 I encode_m(F m, F inv_scale, I noise16) {
  const F y = _mm512_mul_ps(m, inv_scale);
  const I magnitude = encode_unsigned<3>(from_bits(_mm512_and_si512(bits(y), u32(0x7FFFFFFFu))),
                                         noise16);
  // y's sign bit to bit 7 (a -0 keeps it, as in the scalar code), through a mask: no shift.
  const I code = _mm512_mask_or_epi32(magnitude, _mm512_movepi32_mask(bits(y)), magnitude,
                                      u32(0x80u));
  return _mm512_mask_mov_epi32(code, _mm512_fpclass_ps_mask(y, kNotFinite), u32(kCodeNanM));
}

FASTOPT_AVX512 I encode_v(F root, F inv_scale, I noise16) {
  const F y = _mm512_mul_ps(root, inv_scale);
  return _mm512_mask_mov_epi32(encode_unsigned<4>(y, noise16),
                               _mm512_fpclass_ps_mask(y, kNotFinite), u32(kCodeNanV));
}

// A block's largest magnitude_bits, as a float in every lane's place: |x| with NaN counted as
// 0 (vmaxps returns its second operand when the first is NaN; for non-negative floats, float
// order is integer order). Lanes past a tensor's end hold 0 (masked loads give zero moments).
FASTOPT_AVX512 F block_max(F x0, F x1) {
  const F magnitude = from_bits(u32(0x7FFFFFFFu));
  const F second = _mm512_max_ps(_mm512_and_ps(x1, magnitude), _mm512_setzero_ps());
  return _mm512_max_ps(_mm512_and_ps(x0, magnitude), second);
}

// block_scale of 8 blocks' maxima (x[b] has block b's in its 16 lanes), block b's in lane b.
// A transpose that halves the lanes per block at each level: 23 operations for all 8, where
// reducing one vector alone takes 9.
FASTOPT_AVX512 I block_scales(const F (&x)[kGroupBlocks]) {
  auto halves = [](F a, F b) FASTOPT_AVX512_LAMBDA {  // [a's 8 | b's 8]
    return _mm512_max_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  };
  auto quarters = [](F a, F b) FASTOPT_AVX512_LAMBDA {  // [4 | 4 | 4 | 4], blocks in order
    return _mm512_max_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  };
  const F low = quarters(halves(x[0], x[1]), halves(x[2], x[3]));   // blocks 0-3
  const F high = quarters(halves(x[4], x[5]), halves(x[6], x[7]));  // blocks 4-7
  // Per 128-bit lane j: [j, j, 4 + j, 4 + j], then each pair's maximum in both.
  F pairs = _mm512_max_ps(_mm512_shuffle_ps(low, high, 0x44), _mm512_shuffle_ps(low, high, 0xEE));
  pairs = _mm512_max_ps(pairs, _mm512_permute_ps(pairs, 0xB1));
  const I in_order = _mm512_permutexvar_epi32(
      _mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0), bits(pairs));
  const I e = _mm512_sub_epi32(_mm512_srli_epi32(in_order, 23), u32(127 + 7));
  return _mm512_min_epi32(_mm512_max_epi32(e, u32(static_cast<uint32_t>(kScaleMin))),
                          u32(kScaleMax));
}

// One chunk [begin, end) of one tensor, begin a multiple of kQuantBlock: adamw_chunk's 8-bit
// case, with the same arguments (raw1, raw2 the noise keys before folding in the high word).
template <typename P, typename G, Master kMaster, bool kSR, bool kAmsgrad, typename M>
FASTOPT_AVX512_TARGET void adamw_chunk_q8(P* __restrict__ param, const G* __restrict__ grad,
                                          uint8_t* __restrict__ exp_avg,
                                          uint8_t* __restrict__ exp_avg_sq,
                                          uint8_t* __restrict__ max_exp_avg_sq,
                                          M* __restrict__ master, int64_t begin, int64_t end,
                                          const AdamWCoeffs& coeffs, uint32_t raw1,
                                          uint32_t raw2, uint64_t first,
                                          int8_t* __restrict__ scales, int64_t blocks) {
  const Coeffs c = broadcast(coeffs);
  const I iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const I low16 = u32(0xFFFFu);
  int8_t* __restrict__ e_m = scales;
  int8_t* __restrict__ e_v = scales + blocks;
  int8_t* __restrict__ e_vm = scales + 2 * blocks;
  uint64_t keyed_high = ~uint64_t{0};
  I key1, key2, next1, next2;
  F m[kGroupVectors], root_v[kGroupVectors], root_vm[kGroupVectors];
  __mmask16 k[kGroupVectors];
  for (int64_t g0 = begin; g0 < end; g0 += kGroup) {
    const int64_t len = std::min(kGroup, end - g0);
    const int vectors = static_cast<int>((len + 15) / 16);
    const int group_blocks = (vectors + 1) / 2;
    const int64_t q0 = g0 / kQuantBlock;
    for (int i = 0; i < kGroupVectors; ++i) {
      const int64_t left = len - 16 * i;
      k[i] = static_cast<__mmask16>(left >= 16 ? 0xFFFFu : left > 0 ? (1u << left) - 1u : 0u);
    }
    // An element's noise words are mix32(key of its index's high word ^ its low word); a
    // group may cross a multiple of 2**32 (in a shard), whose lanes past it take the next key.
    const uint64_t row0 = first + static_cast<uint64_t>(g0);
    const uint64_t high = row0 >> 32;
    if (high != keyed_high) {
      const auto h = static_cast<uint32_t>(high);
      key1 = u32(noise_key_for_high_word(raw1, h));
      key2 = u32(noise_key_for_high_word(raw2, h));
      next1 = u32(noise_key_for_high_word(raw1, h + 1));
      next2 = u32(noise_key_for_high_word(raw2, h + 1));
      keyed_high = high;
    }
    const I base = u32(static_cast<uint32_t>(row0));
    auto index_of = [&](int i) FASTOPT_AVX512_TARGET {
      return _mm512_add_epi32(base, _mm512_add_epi32(iota, u32(16 * i)));
    };
    // Lanes past the multiple (their low word wrapped below base's) take the next key; only a
    // group that crosses one (crossing true) needs the test.
    auto noise = [&](I key, I next, I index, auto crossing) FASTOPT_AVX512_LAMBDA {
      if constexpr (decltype(crossing)::value) {
        key = _mm512_mask_mov_epi32(key, _mm512_cmplt_epu32_mask(index, base), next);
      }
      return mix32(_mm512_xor_si512(key, index));
    };
    const bool crosses = ((row0 + static_cast<uint64_t>(len) - 1) >> 32) != high;
    // Decode, update, store the param.
    for (int i = 0; i < vectors; ++i) {
      const int64_t j = g0 + 16 * i;
      const int64_t q = q0 + i / 2;
      F p;
      if constexpr (kMaster == Master::kRemainder) {
        const I hi = _mm512_slli_epi32(load_u16(param + j, k[i]), 16);
        const I rem = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(k[i], master + j));
        p = from_bits(_mm512_add_epi32(hi, rem));
      } else {
        p = load(param + j, k[i]);
      }
      const F g = load(grad + j, k[i]);
      m[i] = decode_m(exp_avg + j, k[i], e_m[q]);
      F v = decode_v(exp_avg_sq + j, k[i], e_v[q]);
      F vm = v;
      if constexpr (kAmsgrad) vm = decode_v(max_exp_avg_sq + j, k[i], e_vm[q]);
      F root;
      math<kAmsgrad>(p, g, m[i], v, vm, c, root);
      if constexpr (kAmsgrad) {
        root_v[i] = _mm512_sqrt_ps(v);
        root_vm[i] = root;
      } else {
        root_v[i] = root;
      }
      if constexpr (kMaster == Master::kRemainder) {
        I top, rem;
        split_master(p, top, rem);
        store_u16(param + j, k[i], top);
        store_u16(master + j, k[i], rem);
      } else if constexpr (std::is_same_v<P, float>) {
        _mm512_mask_storeu_ps(param + j, k[i], p);
      } else if constexpr (kSR) {
        const I w1 = noise(key1, next1, index_of(i), std::true_type{});
        store_u16(param + j, k[i], bf16_stochastic(p, _mm512_srli_epi32(w1, 16)));
      } else {
        store_u16(param + j, k[i], bf16_nearest(p));
      }
    }
    for (int i = vectors; i < kGroupVectors; ++i) {  // past the end of a last group
      m[i] = root_v[i] = root_vm[i] = _mm512_setzero_ps();
    }
    // The blocks' new scales, stored and kept (exponents in lanes) for the encode.
    const auto live = static_cast<__mmask16>((1u << group_blocks) - 1u);
    alignas(64) int32_t s_m[16], s_v[16], s_vm[16];
    auto rescale = [&](const F* x, int8_t* out, int32_t* kept) FASTOPT_AVX512_LAMBDA {
      F maxima[kGroupBlocks];
      for (int b = 0; b < kGroupBlocks; ++b) maxima[b] = block_max(x[2 * b], x[2 * b + 1]);
      const I e = block_scales(maxima);
      _mm_mask_storeu_epi8(out + q0, live, _mm512_cvtepi32_epi8(e));
      _mm512_store_si512(kept, e);
    };
    rescale(m, e_m, s_m);
    rescale(root_v, e_v, s_v);
    if constexpr (kAmsgrad) rescale(root_vm, e_vm, s_vm);
    // Encode.
    auto encode = [&](auto crossing) FASTOPT_AVX512_LAMBDA {
      for (int i = 0; i < vectors; ++i) {
        const int64_t j = g0 + 16 * i;
        const int b = i / 2;
        const I index = index_of(i);
        const I w1 = noise(key1, next1, index, crossing);
        const I w2 = noise(key2, next2, index, crossing);
        store_codes(exp_avg + j, k[i],
                    encode_m(m[i], pow2v(-s_m[b]), _mm512_and_si512(w1, low16)));
        store_codes(exp_avg_sq + j, k[i],
                    encode_v(root_v[i], pow2v(-s_v[b]), _mm512_srli_epi32(w2, 16)));
        if constexpr (kAmsgrad) {
          store_codes(max_exp_avg_sq + j, k[i],
                      encode_v(root_vm[i], pow2v(-s_vm[b]), _mm512_and_si512(w2, low16)));
        }
      }
    };
    if (crosses) {
      encode(std::true_type{});
    } else {
      encode(std::false_type{});
    }
  }
}

// Whether this CPU runs the instructions above (AVX-512 F, BW, DQ and VL: Skylake-SP, Zen 4
// and later).
inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return ok;
}

}  // namespace fastopt::cpu::avx512

#else  // no x86-64 SIMD: every chunk takes the portable loops

namespace fastopt::cpu::avx512 {

template <typename P, typename G, Master kM>
constexpr bool kServes = false;

inline bool available() { return false; }

// Declared for the call that `if constexpr (kServes<...>)` discards; never defined.
template <typename P, typename G, Master kMaster, bool kSR, bool kAmsgrad, typename M>
void adamw_chunk_q8(P* param, const G* grad, uint8_t* exp_avg, uint8_t* exp_avg_sq,
                    uint8_t* max_exp_avg_sq, M* master, int64_t begin, int64_t end,
                    const AdamWCoeffs& coeffs, uint32_t raw1, uint32_t raw2, uint64_t first,
                    int8_t* scales, int64_t blocks);

}  // namespace fastopt::cpu::avx512

#endif
