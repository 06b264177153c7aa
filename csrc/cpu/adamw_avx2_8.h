// adamw_avx512.h's 8-bit path for CPUs with AVX2 and no AVX-512 (AMD Zen 2 and 3, Intel before
// Skylake-SP): 8-lane vectors, groups of 8 scale blocks (32 vectors) taken stage by stage, the
// codes decoded through F16C's half-precision conversion as there. What AVX2 lacks changes the
// rest: no rounding mode per instruction, so the encode keeps the scalar code's two formulas
// (normal and subnormal codes) and a blend; no masked stores of bytes or words, so a chunk's
// last group, when shorter than a whole one, runs on zero-padded copies of its elements
// (zeros leave every block's maximum as it is) and only its own elements are copied back.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "adamw_avx2_16.h"
#include "adamw_avx512.h"

namespace fastopt::cpu::avx2 {

// The same params, grads and masters as the AVX-512 8-bit path (none on builds without x86
// SIMD, where that is false too).
template <typename P, typename G, Master kM>
constexpr bool kServes8 = avx512::kServes<P, G, kM>;

}  // namespace fastopt::cpu::avx2

#if FASTOPT_X86_SIMD

namespace fastopt::cpu::avx2 {

#define FASTOPT_AVX2_8_TARGET __attribute__((target("avx2,f16c")))
#define FASTOPT_AVX2_8 FASTOPT_AVX2_8_TARGET inline __attribute__((always_inline))
#define FASTOPT_AVX2_8_LAMBDA FASTOPT_AVX2_8_TARGET __attribute__((always_inline))

using H8 = __m128i;  // 8 lanes of 16 bits

// The AVX-512 path's groups of scale blocks, in 8-lane vectors.
using avx512::kGroup;
using avx512::kGroupBlocks;
constexpr int kGroupVectors8 = kGroupBlocks * kQuantBlock / 8;

FASTOPT_AVX2_8 H8 u16(uint16_t x) { return _mm_set1_epi16(static_cast<short>(x)); }

// x * 2**e from x * 2**-8: both products exact, or the second overflowing as the scalar
// code's x * pow2(e) does (adamw_avx512.h's decode_m has why).
FASTOPT_AVX2_8 F times_pow2(F x_over_256, int e) {
  return _mm256_mul_ps(_mm256_mul_ps(x_over_256, f32(pow2(e))), f32(256.f));
}

// Codes as halves worth their value times 2**-8 (adamw_avx512.h's decode_m and decode_v).
FASTOPT_AVX2_8 F decode_m(const uint8_t* p, int e) {
  const H8 c = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const H8*>(p)));
  const H8 h = _mm_and_si128(_mm_slli_epi16(c, 7), u16(0xBF80));
  const H8 nan = _mm_cmpeq_epi16(_mm_or_si128(c, u16(0xFF80)), u16(0xFFFF));
  return times_pow2(_mm256_cvtph_ps(_mm_blendv_epi8(h, u16(0x7E00), nan)), e);
}

FASTOPT_AVX2_8 F decode_v(const uint8_t* p, int e) {
  const H8 c = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const H8*>(p)));
  const H8 nan = _mm_cmpeq_epi16(c, u16(kCodeNanV));
  const F root = times_pow2(_mm256_cvtph_ps(_mm_blendv_epi8(_mm_slli_epi16(c, 6),
                                                           u16(0x7E00), nan)), e);
  return _mm256_mul_ps(root, root);
}

// The low bytes of 8 lanes, stored in order.
FASTOPT_AVX2_8 void store_codes(uint8_t* p, I codes) {
  const I picked = _mm256_shuffle_epi8(
      codes, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4,
                              8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
  const I joined = _mm256_permutevar8x32_epi32(picked, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
  _mm_storel_epi64(reinterpret_cast<H8*>(p), _mm256_castsi256_si128(joined));
}

FASTOPT_AVX2_8 I select(I if_false, I if_true, F mask) {
  return _mm256_castps_si256(_mm256_blendv_ps(from_bits(if_false), from_bits(if_true), mask));
}

FASTOPT_AVX2_8 F not_finite(F y) {
  return from_bits(_mm256_cmpeq_epi32(_mm256_and_si256(bits(y), u32(0x7F800000u)),
                                      u32(0x7F800000u)));
}

// encode_unsigned, as the scalar code writes it.
template <int kMant>
FASTOPT_AVX2_8 I encode_unsigned(F a, I noise16) {
  const I normal = _mm256_sub_epi32(
      _mm256_srli_epi32(_mm256_add_epi32(bits(a), _mm256_slli_epi32(noise16, 7 - kMant)),
                        23 - kMant),
      u32(uint32_t{127 - 7} << kMant));
  const I fixed = _mm256_cvttps_epi32(_mm256_mul_ps(a, f32(static_cast<float>(1 << (22 + kMant)))));
  const I sub = _mm256_srli_epi32(_mm256_add_epi32(fixed, noise16), 16);
  return select(normal, sub, _mm256_cmp_ps(a, f32(0.015625f), _CMP_LT_OQ));
}

FASTOPT_AVX2_8 I encode_m(F m, F inv_scale, I noise16) {
  const F y = _mm256_mul_ps(m, inv_scale);
  const F bad = not_finite(y);
  const F a = _mm256_andnot_ps(bad, from_bits(_mm256_and_si256(bits(y), u32(0x7FFFFFFFu))));
  const I sign = _mm256_slli_epi32(_mm256_srli_epi32(bits(y), 31), 7);
  return select(_mm256_or_si256(sign, encode_unsigned<3>(a, noise16)), u32(kCodeNanM), bad);
}

FASTOPT_AVX2_8 I encode_v(F root, F inv_scale, I noise16) {
  const F y = _mm256_mul_ps(root, inv_scale);
  const F bad = not_finite(y);
  return select(encode_unsigned<4>(_mm256_andnot_ps(bad, y), noise16), u32(kCodeNanV), bad);
}

// block_scale of a block's four vectors: |x| with NaN as 0 (vmaxps returns its second operand
// when the first is NaN), then the largest lane.
FASTOPT_AVX2_8 int block_scale_of(const F* x) {
  const F magnitude = from_bits(u32(0x7FFFFFFFu));
  F most = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) most = _mm256_max_ps(_mm256_and_ps(x[i], magnitude), most);
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(most), _mm256_extractf128_ps(most, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  r = _mm_max_ss(r, _mm_shuffle_ps(r, r, 1));
  return block_scale(static_cast<int32_t>(_mm_cvtsi128_si32(_mm_castps_si128(r))));
}

// Lanes of 16-bit storage as the fp32 words they widen to (bf16: the high half).
FASTOPT_AVX2_8 I load_words(const void* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const H8*>(p)));
}

template <typename T>
FASTOPT_AVX2_8 F load8(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(p);
  } else {
    return from_bits(_mm256_slli_epi32(load_words(p), 16));
  }
}

// The low words of 8 lanes (values in [0, 65535], or [-32768, 32767] with kSigned), in order.
template <bool kSigned = false>
FASTOPT_AVX2_8 void store_words(void* p, I x) {
  const I packed = kSigned ? _mm256_packs_epi32(x, x) : _mm256_packus_epi32(x, x);
  _mm_storeu_si128(static_cast<H8*>(p),
                   _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08)));
}

FASTOPT_AVX2_8 F nan_lanes(F x) { return _mm256_cmp_ps(x, x, _CMP_UNORD_Q); }

// split_master (adamw_math.h): the bf16 bits and the int16 remainder, as adamw_avx512.h's.
FASTOPT_AVX2_8 void split_master(F x, I& param_bits, I& remainder) {
  const I b = bits(x);
  const I top = nearest_top(x);
  const I rest = _mm256_sub_epi32(b, _mm256_slli_epi32(top, 16));
  const I clamped = _mm256_min_epi32(_mm256_max_epi32(rest, u32(static_cast<uint32_t>(-0x7FFF))),
                                     u32(0x7FFFu));
  const F nan = nan_lanes(x);
  param_bits = select(top, u32(0x7FC0u), nan);
  remainder = _mm256_andnot_si256(_mm256_castps_si256(nan), clamped);
}

FASTOPT_AVX2_8 I bf16_rounded(F x, I noise16, bool stochastic) {
  const I top = stochastic ? stochastic_top(x, noise16) : nearest_top(x);
  return select(top, u32(0x7FC0u), nan_lanes(x));
}

// One whole group (len == kGroup) at `g0` of the pointers given, its indices from row0:
// adamw_avx512.h's adamw_chunk_q8 at 8 lanes. The scales are the group's own 8 per row.
template <typename P, typename G, Master kMaster, bool kSR, bool kAmsgrad, typename M>
FASTOPT_AVX2_8_TARGET void group_q8(P* __restrict__ param, const G* __restrict__ grad,
                                    uint8_t* __restrict__ exp_avg,
                                    uint8_t* __restrict__ exp_avg_sq,
                                    uint8_t* __restrict__ max_exp_avg_sq,
                                    M* __restrict__ master, int8_t* __restrict__ e_m,
                                    int8_t* __restrict__ e_v, int8_t* __restrict__ e_vm,
                                    const Coeffs& c, uint32_t raw1, uint32_t raw2, uint64_t row0) {
  const I iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const auto high = static_cast<uint32_t>(row0 >> 32);
  const I key1 = u32(noise_key_for_high_word(raw1, high));
  const I key2 = u32(noise_key_for_high_word(raw2, high));
  const I next1 = u32(noise_key_for_high_word(raw1, high + 1));
  const I next2 = u32(noise_key_for_high_word(raw2, high + 1));
  const I base = u32(static_cast<uint32_t>(row0));
  // Lanes past a multiple of 2**32 (their low word wrapped below base's) take the next key.
  auto noise = [&](I key, I next, int i) FASTOPT_AVX2_8_LAMBDA {
    const I index = _mm256_add_epi32(base, _mm256_add_epi32(iota, u32(8 * i)));
    const I wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(base, u32(0x80000000u)),
                                         _mm256_xor_si256(index, u32(0x80000000u)));
    return mix32(_mm256_xor_si256(select(key, next, _mm256_castsi256_ps(wrapped)), index));
  };
  alignas(32) F m[kGroupVectors8], root_v[kGroupVectors8], root_vm[kGroupVectors8];
  for (int i = 0; i < kGroupVectors8; ++i) {
    const int j = 8 * i;
    const int b = i / 4;
    F p;
    if constexpr (kMaster == Master::kRemainder) {
      const I hi = _mm256_slli_epi32(load_words(param + j), 16);
      const I rem = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const H8*>(master + j)));
      p = from_bits(_mm256_add_epi32(hi, rem));
    } else {
      p = load8(param + j);
    }
    F v = decode_v(exp_avg_sq + j, e_v[b]);
    F vm = v;
    if constexpr (kAmsgrad) vm = decode_v(max_exp_avg_sq + j, e_vm[b]);
    m[i] = decode_m(exp_avg + j, e_m[b]);
    F root;
    math<kAmsgrad>(p, load8(grad + j), m[i], v, vm, c, root);
    if constexpr (kAmsgrad) {
      root_v[i] = _mm256_sqrt_ps(v);
      root_vm[i] = root;
    } else {
      root_v[i] = root;
    }
    if constexpr (kMaster == Master::kRemainder) {
      I top, rem;
      split_master(p, top, rem);
      store_words(param + j, top);
      store_words<true>(master + j, rem);
    } else if constexpr (std::is_same_v<P, float>) {
      _mm256_storeu_ps(param + j, p);
    } else if constexpr (kSR) {
      store_words(param + j, bf16_rounded(p, _mm256_srli_epi32(noise(key1, next1, i), 16), true));
    } else {
      store_words(param + j, bf16_rounded(p, u32(0), false));
    }
  }
  for (int b = 0; b < kGroupBlocks; ++b) {
    e_m[b] = static_cast<int8_t>(block_scale_of(m + 4 * b));
    e_v[b] = static_cast<int8_t>(block_scale_of(root_v + 4 * b));
    if constexpr (kAmsgrad) e_vm[b] = static_cast<int8_t>(block_scale_of(root_vm + 4 * b));
  }
  const I low16 = u32(0xFFFFu);
  for (int i = 0; i < kGroupVectors8; ++i) {
    const int j = 8 * i;
    const int b = i / 4;
    const I w1 = noise(key1, next1, i);
    const I w2 = noise(key2, next2, i);
    store_codes(exp_avg + j, encode_m(m[i], f32(pow2(-e_m[b])), _mm256_and_si256(w1, low16)));
    store_codes(exp_avg_sq + j,
                encode_v(root_v[i], f32(pow2(-e_v[b])), _mm256_srli_epi32(w2, 16)));
    if constexpr (kAmsgrad) {
      store_codes(max_exp_avg_sq + j,
                  encode_v(root_vm[i], f32(pow2(-e_vm[b])), _mm256_and_si256(w2, low16)));
    }
  }
}

// adamw_avx512::adamw_chunk_q8's contract, on this path: whole groups in place, a last shorter
// one on zero-padded copies.
template <typename P, typename G, Master kMaster, bool kSR, bool kAmsgrad, typename M>
FASTOPT_AVX2_8_TARGET void adamw_chunk_q8(P* __restrict__ param, const G* __restrict__ grad,
                                          uint8_t* __restrict__ exp_avg,
                                          uint8_t* __restrict__ exp_avg_sq,
                                          uint8_t* __restrict__ max_exp_avg_sq,
                                          M* __restrict__ master, int64_t begin, int64_t end,
                                          const AdamWCoeffs& coeffs, uint32_t raw1,
                                          uint32_t raw2, uint64_t first,
                                          int8_t* __restrict__ scales, int64_t blocks) {
  const Coeffs c = broadcast(coeffs);
  int8_t* e_m = scales;
  int8_t* e_v = scales + blocks;
  int8_t* e_vm = scales + 2 * blocks;
  int64_t g0 = begin;
  for (; g0 + kGroup <= end; g0 += kGroup) {
    const int64_t q0 = g0 / kQuantBlock;
    group_q8<P, G, kMaster, kSR, kAmsgrad, M>(
        param + g0, grad + g0, exp_avg + g0, exp_avg_sq + g0,
        kAmsgrad ? max_exp_avg_sq + g0 : nullptr, kMaster == Master::kNone ? nullptr : master + g0,
        e_m + q0, e_v + q0, e_vm + q0, c, raw1, raw2, first + static_cast<uint64_t>(g0));
  }
  if (g0 == end) return;
  const auto len = static_cast<size_t>(end - g0);
  const int64_t q0 = g0 / kQuantBlock;
  const auto n_blocks = static_cast<size_t>((len + kQuantBlock - 1) / kQuantBlock);
  alignas(32) P p[kGroup] = {};
  alignas(32) G g[kGroup] = {};
  alignas(32) M mw[kGroup] = {};
  alignas(32) uint8_t codes[3][kGroup] = {};
  alignas(32) int8_t s[3][kGroupBlocks] = {};
  uint8_t* rows[3] = {exp_avg + g0, exp_avg_sq + g0, kAmsgrad ? max_exp_avg_sq + g0 : nullptr};
  int8_t* scale_rows[3] = {e_m + q0, e_v + q0, e_vm + q0};
  const int n_rows = kAmsgrad ? 3 : 2;
  std::memcpy(p, param + g0, len * sizeof(P));
  std::memcpy(g, grad + g0, len * sizeof(G));
  if constexpr (kMaster != Master::kNone) std::memcpy(mw, master + g0, len * sizeof(M));
  for (int r = 0; r < n_rows; ++r) {
    std::memcpy(codes[r], rows[r], len);
    std::memcpy(s[r], scale_rows[r], n_blocks);
  }
  group_q8<P, G, kMaster, kSR, kAmsgrad, M>(p, g, codes[0], codes[1], codes[2], mw, s[0], s[1],
                                            s[2], c, raw1, raw2, first + static_cast<uint64_t>(g0));
  std::memcpy(param + g0, p, len * sizeof(P));
  if constexpr (kMaster != Master::kNone) std::memcpy(master + g0, mw, len * sizeof(M));
  for (int r = 0; r < n_rows; ++r) {
    std::memcpy(rows[r], codes[r], len);
    std::memcpy(scale_rows[r], s[r], n_blocks);
  }
}

// Whether this CPU runs the instructions above.
inline bool available_8() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
}

}  // namespace fastopt::cpu::avx2

#else  // no x86-64 SIMD: every chunk takes the portable loops

namespace fastopt::cpu::avx2 {

inline bool available_8() { return false; }

// For the call that `if constexpr (kServes8<...>)` discards: adamw_avx512.h's declaration.
using avx512::adamw_chunk_q8;

}  // namespace fastopt::cpu::avx2

#endif
