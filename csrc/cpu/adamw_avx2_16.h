// adamw_avx512_16.h's path for CPUs with AVX2 and no AVX-512 (AMD Zen 2 and 3, Intel before
// Skylake-SP), in 8-lane vectors without mask registers or word permutes. A group of 16
// elements is two vectors in the order vpunpck{l,h}wd leaves 16 words in (load16), so bf16
// streams widen with one unpack per 8 elements and narrow with one vpackusdw per 16, in-lane;
// fp32 streams cross lanes instead (vperm2f128). No software pipeline: two groups in flight
// do not fit 16 vector registers (the pipelined loop spilled, and was slower). A tail of
// fewer than 16 elements, and a group with a NaN or an exact master tie, take the scalar code
// of csrc/adamw_math.h, as the portable loops do.
//
// What it gains is smaller than the AVX-512 path's (bench/RESULTS.md): on an AVX-512 CPU,
// forced with FASTOPT_CPU_SIMD=avx2, bf16 + master + bf16 moments ran at 0.77 ns per element
// against the portable loops' 0.85 (one thread, in cache).
#pragma once

#include <cstdint>
#include <type_traits>

#include "adamw_avx512_16.h"

#if FASTOPT_X86_SIMD

namespace fastopt::cpu::avx2 {

#define FASTOPT_AVX2_TARGET __attribute__((target("avx2")))
#define FASTOPT_AVX2 FASTOPT_AVX2_TARGET inline __attribute__((always_inline))
#define FASTOPT_AVX2_LAMBDA FASTOPT_AVX2_TARGET __attribute__((always_inline))

using F = __m256;
using I = __m256i;

FASTOPT_AVX2 I u32(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
FASTOPT_AVX2 F f32(float x) { return _mm256_set1_ps(x); }
FASTOPT_AVX2 I bits(F x) { return _mm256_castps_si256(x); }
FASTOPT_AVX2 F from_bits(I x) { return _mm256_castsi256_ps(x); }

FASTOPT_AVX2 I mix32(I x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, u32(0x7FEB352Du));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, u32(0x846CA68Bu));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

struct Coeffs {
  F decay, lerp_coef, beta2, one_minus_beta2, step_size, inv_bc2_sqrt, eps, grad_coef;
  bool lerp_from_m;
};

FASTOPT_AVX2 Coeffs broadcast(const AdamWCoeffs& c) {
  return {f32(c.decay),     f32(c.lerp_coef),    f32(c.beta2), f32(c.one_minus_beta2),
          f32(c.step_size), f32(c.inv_bc2_sqrt), f32(c.eps),   f32(c.grad_coef),
          c.lerp_from_m};
}

// adamw_math, lane by lane (the AVX-512 path's math, 8 lanes wide); root as there.
template <bool kAmsgrad>
FASTOPT_AVX2 void math(F& p, F grad, F& m, F& v, F& vmax, const Coeffs& c, F& root) {
  const F g = _mm256_mul_ps(grad, c.grad_coef);
  p = _mm256_mul_ps(p, c.decay);
  m = _mm256_add_ps(c.lerp_from_m ? m : g, _mm256_mul_ps(c.lerp_coef, _mm256_sub_ps(g, m)));
  v = _mm256_add_ps(_mm256_mul_ps(v, c.beta2),
                    _mm256_mul_ps(c.one_minus_beta2, _mm256_mul_ps(g, g)));
  F second = v;
  if constexpr (kAmsgrad) {
    vmax = _mm256_max_ps(vmax, v);  // vmax > v ? vmax : v, as the scalar code
    second = vmax;
  }
  root = _mm256_sqrt_ps(second);
  const F denom = _mm256_add_ps(_mm256_mul_ps(root, c.inv_bc2_sqrt), c.eps);
  p = _mm256_sub_ps(p, _mm256_mul_ps(c.step_size, _mm256_div_ps(m, denom)));
}

// 16 elements as two vectors: x[0] holds elements 0-3 and 8-11, x[1] 4-7 and 12-15.
template <typename T>
FASTOPT_AVX2 void load16(const T* p, F x[2]) {
  if constexpr (std::is_same_v<T, float>) {
    const F a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
    x[0] = _mm256_permute2f128_ps(a, b, 0x20);
    x[1] = _mm256_permute2f128_ps(a, b, 0x31);
  } else {
    const I words = _mm256_loadu_si256(reinterpret_cast<const I*>(p));
    const I zero = _mm256_setzero_si256();
    x[0] = from_bits(_mm256_unpacklo_epi16(zero, words));
    x[1] = from_bits(_mm256_unpackhi_epi16(zero, words));
  }
}

// join_master: the remainder added with its sign, so a negative one borrows one from the
// param's word.
FASTOPT_AVX2 void load_masters16(const BFloat16* param, const int16_t* rem, F x[2]) {
  const I hi = _mm256_loadu_si256(reinterpret_cast<const I*>(param));
  const I lo = _mm256_loadu_si256(reinterpret_cast<const I*>(rem));
  const I borrowed = _mm256_add_epi16(hi, _mm256_srai_epi16(lo, 15));
  x[0] = from_bits(_mm256_unpacklo_epi16(lo, borrowed));
  x[1] = from_bits(_mm256_unpackhi_epi16(lo, borrowed));
}

FASTOPT_AVX2 void store16(float* p, const F x[2]) {
  _mm256_storeu_ps(p, _mm256_permute2f128_ps(x[0], x[1], 0x20));
  _mm256_storeu_ps(p + 8, _mm256_permute2f128_ps(x[0], x[1], 0x31));
}

// The 16 low halves of the pair's words at p: vpackusdw's in-lane order is the pair's.
FASTOPT_AVX2 void store_low_words(void* p, I a, I b) {
  _mm256_storeu_si256(static_cast<I*>(p), _mm256_packus_epi32(a, b));
}

// The words whose high halves are the rounded bf16s (store in cpu_common.h, bf16_stochastic),
// shifted down for store_low_words.
FASTOPT_AVX2 I nearest_top(F x) {
  const I b = bits(x);
  const I odd = _mm256_and_si256(_mm256_srli_epi32(b, 16), u32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(b, u32(0x7FFFu)), odd), 16);
}

FASTOPT_AVX2 I stochastic_top(F x, I noise16) {
  return _mm256_srli_epi32(_mm256_add_epi32(bits(x), noise16), 16);
}

FASTOPT_AVX2 int nan_lanes(F a, F b) {
  return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_UNORD_Q));
}

// One element i of the scalar path: what the portable loops do for it.
template <typename P, typename G, typename S, Master kM, bool kSR, bool kAmsgrad, typename M>
FASTOPT_AVX2 void scalar_element(P* param, const G* grad, S* exp_avg, S* exp_avg_sq,
                                 S* max_exp_avg_sq, M* master, int64_t i, const AdamWCoeffs& c,
                                 uint32_t key1, uint32_t key2, uint32_t index) {
  float p;
  if constexpr (kM == Master::kRemainder) {
    p = join_master(param[i].x, master[i]);
  } else {
    p = load(param, i);
  }
  float m = load(exp_avg, i), v = load(exp_avg_sq, i);
  float vm = kAmsgrad ? load(max_exp_avg_sq, i) : 0.f;
  adamw_math<kAmsgrad>(p, load(grad, i), m, v, vm, c);
  const uint32_t w1 = kSR ? fastopt::mix32(key1 ^ index) : 0u;
  const uint32_t w2 = kSR ? fastopt::mix32(key2 ^ index) : 0u;
  store_element<kM, kSR, kAmsgrad>(param, master, exp_avg, exp_avg_sq, max_exp_avg_sq, i, p, m,
                                   v, vm, w1, w2);
}

// adamw_avx512_16.h's adamw_chunk_16, with the same arguments.
template <typename P, typename G, typename S, Master kM, bool kSR, bool kAmsgrad, typename M>
FASTOPT_AVX2_TARGET void adamw_chunk_16(P* __restrict__ param, const G* __restrict__ grad,
                                        S* __restrict__ exp_avg, S* __restrict__ exp_avg_sq,
                                        S* __restrict__ max_exp_avg_sq, M* __restrict__ master,
                                        int64_t begin, int64_t end, const AdamWCoeffs& coeffs,
                                        uint32_t key1, uint32_t key2, uint64_t first) {
  constexpr bool kP16 = std::is_same_v<P, BFloat16>;
  constexpr bool kS16 = std::is_same_v<S, BFloat16>;
  constexpr bool kNoise1 = kSR && (kP16 || kS16);
  constexpr bool kNoise2 = kSR && kS16;
  const Coeffs c = broadcast(coeffs);
  // Each lane's element in its group (load16's order).
  const I iota[2] = {_mm256_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11),
                     _mm256_setr_epi32(4, 5, 6, 7, 12, 13, 14, 15)};
  const I k1 = u32(key1), k2 = u32(key2);
  const auto first32 = static_cast<uint32_t>(first);
  // 16 elements: two vectors of each stream, updated, with their noise words.
  struct Group {
    F p[2], m[2], v[2], vm[2];
    I w1[2], w2[2];
  };
  auto compute = [&](int64_t j, Group& q) FASTOPT_AVX2_LAMBDA {
    if constexpr (kM == Master::kRemainder) {
      load_masters16(param + j, master + j, q.p);
    } else {
      load16(param + j, q.p);
    }
    F g[2];
    load16(grad + j, g);
    load16(exp_avg + j, q.m);
    load16(exp_avg_sq + j, q.v);
    if constexpr (kAmsgrad) load16(max_exp_avg_sq + j, q.vm);
    for (int h = 0; h < 2; ++h) {
      if constexpr (!kAmsgrad) q.vm[h] = q.v[h];
      F root;  // unused: 16-bit states store the second moment itself
      math<kAmsgrad>(q.p[h], g[h], q.m[h], q.v[h], q.vm[h], c, root);
      const I index = _mm256_add_epi32(u32(first32 + static_cast<uint32_t>(j)), iota[h]);
      q.w1[h] = kNoise1 ? mix32(_mm256_xor_si256(k1, index)) : _mm256_setzero_si256();
      q.w2[h] = kNoise2 ? mix32(_mm256_xor_si256(k2, index)) : _mm256_setzero_si256();
    }
  };
  // A pair stored as fp32, or as the high halves of its rounded words.
  auto put = [&](auto* out, int64_t j, const F x[2], auto round) FASTOPT_AVX2_LAMBDA {
    if constexpr (std::is_same_v<std::remove_pointer_t<decltype(out)>, float>) {
      store16(out + j, x);
    } else {
      store_low_words(out + j, round(0), round(1));
    }
  };
  auto store = [&](int64_t j, const Group& q) FASTOPT_AVX2_LAMBDA {
    int rare = 0;
    if constexpr (kP16) rare = nan_lanes(q.p[0], q.p[1]);
    if constexpr (kS16) {
      rare |= nan_lanes(q.m[0], q.m[1]) | nan_lanes(q.v[0], q.v[1]);
      if constexpr (kAmsgrad) rare |= nan_lanes(q.vm[0], q.vm[1]);
    }
    if constexpr (kM == Master::kRemainder) {
      for (int h = 0; h < 2; ++h) {
        const I low = _mm256_and_si256(bits(q.p[h]), u32(0xFFFFu));
        rare |= _mm256_movemask_epi8(_mm256_cmpeq_epi32(low, u32(0x8000u)));
      }
    }
    if (__builtin_expect(rare != 0, 0)) {  // the scalar stores, from the vectors' lanes
      alignas(32) float p[16], m[16], v[16], vm[16];
      alignas(32) uint32_t w1[16], w2[16];
      for (int h = 0; h < 2; ++h) {
        _mm256_store_ps(p + 8 * h, q.p[h]);
        _mm256_store_ps(m + 8 * h, q.m[h]);
        _mm256_store_ps(v + 8 * h, q.v[h]);
        _mm256_store_ps(vm + 8 * h, q.vm[h]);
        _mm256_store_si256(reinterpret_cast<I*>(w1 + 8 * h), q.w1[h]);
        _mm256_store_si256(reinterpret_cast<I*>(w2 + 8 * h), q.w2[h]);
      }
      // Lane l of vector h holds element 4 * h + l % 4 + 8 * (l / 4) of the group.
      for (int lane = 0; lane < 16; ++lane) {
        const int i = 4 * (lane / 8) + lane % 4 + 8 * ((lane % 8) / 4);
        store_element<kM, kSR, kAmsgrad>(param + j, master + j, exp_avg + j, exp_avg_sq + j,
                                         max_exp_avg_sq + j, i, p[lane], m[lane], v[lane],
                                         vm[lane], w1[lane], w2[lane]);
      }
      return;
    }
    const I low16 = u32(0xFFFFu);
    if constexpr (kM == Master::kRemainder) {  // split_master away from ties
      put(param, j, q.p, [&](int h) FASTOPT_AVX2_LAMBDA { return nearest_top(q.p[h]); });
      store_low_words(master + j, _mm256_and_si256(bits(q.p[0]), low16),
                      _mm256_and_si256(bits(q.p[1]), low16));
    } else if constexpr (kSR && kP16) {
      put(param, j, q.p, [&](int h) FASTOPT_AVX2_LAMBDA {
        return stochastic_top(q.p[h], _mm256_srli_epi32(q.w1[h], 16));
      });
    } else {
      put(param, j, q.p, [&](int h) FASTOPT_AVX2_LAMBDA { return nearest_top(q.p[h]); });
    }
    if constexpr (kSR && kS16) {
      put(exp_avg, j, q.m, [&](int h) FASTOPT_AVX2_LAMBDA {
        return stochastic_top(q.m[h], _mm256_and_si256(q.w1[h], low16));
      });
      put(exp_avg_sq, j, q.v, [&](int h) FASTOPT_AVX2_LAMBDA {
        return stochastic_top(q.v[h], _mm256_srli_epi32(q.w2[h], 16));
      });
      if constexpr (kAmsgrad) {
        put(max_exp_avg_sq, j, q.vm, [&](int h) FASTOPT_AVX2_LAMBDA {
          return stochastic_top(q.vm[h], _mm256_and_si256(q.w2[h], low16));
        });
      }
    } else {
      put(exp_avg, j, q.m, [&](int h) FASTOPT_AVX2_LAMBDA { return nearest_top(q.m[h]); });
      put(exp_avg_sq, j, q.v, [&](int h) FASTOPT_AVX2_LAMBDA { return nearest_top(q.v[h]); });
      if constexpr (kAmsgrad) {
        put(max_exp_avg_sq, j, q.vm,
            [&](int h) FASTOPT_AVX2_LAMBDA { return nearest_top(q.vm[h]); });
      }
    }
  };
  Group a;
  int64_t j = begin;
  for (; j + 16 <= end; j += 16) {
    compute(j, a);
    store(j, a);
  }
  for (; j < end; ++j) {
    scalar_element<P, G, S, kM, kSR, kAmsgrad>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq,
                                               master, j, coeffs, key1, key2,
                                               first32 + static_cast<uint32_t>(j));
  }
}

// Whether this CPU runs the instructions above.
inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx2");
  return ok;
}

}  // namespace fastopt::cpu::avx2

#else  // no x86-64 SIMD: every chunk takes the portable loops

namespace fastopt::cpu::avx2 {

inline bool available() { return false; }

// Declared for the call that `if constexpr (kServes16<...>)` discards; never defined.
template <typename P, typename G, typename S, Master kM, bool kSR, bool kAmsgrad, typename M>
void adamw_chunk_16(P* param, const G* grad, S* exp_avg, S* exp_avg_sq, S* max_exp_avg_sq,
                    M* master, int64_t begin, int64_t end, const AdamWCoeffs& coeffs,
                    uint32_t key1, uint32_t key2, uint64_t first);

}  // namespace fastopt::cpu::avx2

#endif
