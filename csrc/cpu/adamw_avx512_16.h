// AdamW with 16-bit storage in AVX-512 registers: bf16 params (rounded to nearest, rounded
// stochastically, or with their fp32 master's int16 remainder), bf16 or fp32 grads, bf16 or
// fp32 moments. The portable kernel (adamw.cpp) runs these through fp32 scratch rows, each
// conversion a loop of its own, and those loops' cost adds to the math's.
//
// What bounds the step (2-core AMD EPYC, one thread, in L1): the fp32 step runs at the
// throughput of its division and square root, 16 cycles per 16 lanes; the conversions alone
// take 11. Two things let them hide under the division instead of adding to it:
// - No narrowing stores or widening shifts. A bf16 vector is the high halves of two fp32
//   vectors, so a store takes one two-source word permute per 32 elements (vpermt2w), and a
//   load one permute per 16 that puts each word above a zero word. The rounding is done on
//   the fp32 words (an add and a masked add) before the permute picks their high halves.
//   With vpmovdw, the narrowing store, a one-pass loop was slower than the scratch rows.
// - Software pipelining: a group's rounding and stores run after the next group's loads and
//   math, so they are independent of the division in flight and fill its idle cycles.
// - Where the CPU has AVX512-BF16, rounding to nearest is one vcvtne2ps2bf16 per 32 elements
//   (nearest_pair) instead of two roundings and a permute: bf16 + master + bf16 moments 0.54-0.56
//   -> 0.49-0.50 ns per element (one thread, in cache; bench/RESULTS.md).
// NaNs and a master's exact ties (low half 0x8000, about one in 65,536) take the scalar code
// of csrc/adamw_math.h for their group, as do denormals where vcvtne2ps2bf16 rounds: rare, so
// the common path carries no select for them.
// bf16 + master + bf16 moments in a standalone loop, one thread, in L1: 0.74 ns per element in
// one pass with vpmovdw, 0.52 with the permutes, 0.45 pipelined; the fp32 step 0.29.
//
// Each vector operation mirrors its scalar counterpart in csrc/adamw_math.h, so both paths
// give the same bits; tests/test_cpu_simd.py holds each path to the reference on every variant.
#pragma once

#include <cstdint>
#include <type_traits>

#include "adamw_avx512.h"

#if FASTOPT_X86_SIMD

namespace fastopt::cpu::avx512 {

template <typename T>
constexpr bool kWord = std::is_same_v<T, float> || std::is_same_v<T, BFloat16>;

// Whether this path serves params P, grads G and moments S with master kM: fp32 or bf16 each,
// a bf16 param's remainder or no master, and not all fp32 (that loop GCC vectorises at the
// division's throughput already).
template <typename P, typename G, typename S, Master kM>
constexpr bool kServes16 =
    kWord<P> && kWord<G> && kWord<S> && kM != Master::kCopy &&
    !(std::is_same_v<P, float> && std::is_same_v<G, float> && std::is_same_v<S, float>);

// Word permutes between two fp32 vectors (words 0-31: a's, 32-63: b's) and one bf16 vector.
struct WordIndex {
  alignas(64) uint16_t high[32];     // the high words of a then b: 32 bf16s in order
  alignas(64) uint16_t low[32];      // the low words: 32 remainders in order
  alignas(64) uint16_t widen[2][32]; // bf16s 0-15 (16-31) of a above zero words of b
  alignas(64) uint16_t join[2][32];  // remainders of a below params of b, elements 0-15 (16-31)
};

constexpr WordIndex make_word_index() {
  WordIndex w{};
  for (int i = 0; i < 32; ++i) {
    w.high[i] = static_cast<uint16_t>(2 * i + 1);
    w.low[i] = static_cast<uint16_t>(2 * i);
    for (int h = 0; h < 2; ++h) {
      const int element = 16 * h + i / 2;
      w.widen[h][i] = static_cast<uint16_t>(i % 2 == 0 ? 32 : element);
      w.join[h][i] = static_cast<uint16_t>(i % 2 == 0 ? element : 32 + element);
    }
  }
  return w;
}

inline constexpr WordIndex kWordIndex = make_word_index();

// The permutes' index vectors, loaded once per call.
struct Words {
  I high, low, widen0, widen1, join0, join1;
};

FASTOPT_AVX512 Words load_words() {
  const WordIndex& w = kWordIndex;
  return {_mm512_load_si512(w.high),      _mm512_load_si512(w.low),
          _mm512_load_si512(w.widen[0]),  _mm512_load_si512(w.widen[1]),
          _mm512_load_si512(w.join[0]),   _mm512_load_si512(w.join[1])};
}

// 32 elements, 0-15 in x[0] and 16-31 in x[1]; k: the live ones (all when kFull).
template <bool kFull, typename T>
FASTOPT_AVX512 void load32(const T* p, __mmask32 k, const Words& w, F x[2]) {
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (kFull) {
      x[0] = _mm512_loadu_ps(p);
      x[1] = _mm512_loadu_ps(p + 16);
    } else {
      x[0] = _mm512_maskz_loadu_ps(static_cast<__mmask16>(k), p);
      x[1] = _mm512_maskz_loadu_ps(static_cast<__mmask16>(k >> 16), p + 16);
    }
  } else {
    const I words = kFull ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(k, p);
    const I zero = _mm512_setzero_si512();
    x[0] = from_bits(_mm512_permutex2var_epi16(words, w.widen0, zero));
    x[1] = from_bits(_mm512_permutex2var_epi16(words, w.widen1, zero));
  }
}

// bf16 params and their int16 remainders joined into fp32 masters (join_master): the
// remainder is added with its sign, so a negative one borrows one from the param's word.
template <bool kFull>
FASTOPT_AVX512 void load_masters32(const BFloat16* param, const int16_t* rem, __mmask32 k,
                                   const Words& w, F x[2]) {
  const I hi = kFull ? _mm512_loadu_si512(param) : _mm512_maskz_loadu_epi16(k, param);
  const I lo = kFull ? _mm512_loadu_si512(rem) : _mm512_maskz_loadu_epi16(k, rem);
  const I borrowed = _mm512_add_epi16(hi, _mm512_srai_epi16(lo, 15));
  x[0] = from_bits(_mm512_permutex2var_epi16(lo, w.join0, borrowed));
  x[1] = from_bits(_mm512_permutex2var_epi16(lo, w.join1, borrowed));
}

template <bool kFull>
FASTOPT_AVX512 void store_words(void* p, __mmask32 k, I words) {
  if constexpr (kFull) {
    _mm512_storeu_si512(p, words);
  } else {
    _mm512_mask_storeu_epi16(p, k, words);
  }
}

// fp32 words whose high halves are the bf16s rounded to nearest even (store in cpu_common.h):
// b + 0x7FFF + (bit 16 of b). NaN lanes are left to the caller.
FASTOPT_AVX512 I nearest_high(F x) {
  const I b = bits(x);
  const I t = _mm512_add_epi32(b, u32(0x7FFFu));
  return _mm512_mask_add_epi32(t, _mm512_test_epi32_mask(b, u32(0x10000u)), t, u32(1));
}

// 32 bf16s rounded to nearest even, a's 16 then b's, in one instruction of AVX512-BF16
// (vcvtne2ps2bf16; Cooper Lake, Sapphire Rapids, Zen 4 and later): in place of two
// nearest_high and a word permute. Written as assembly, so that the functions using it need no
// target attribute of their own and one template serves CPUs with and without it. It treats
// denormal inputs as zero (and quiets NaNs its own way): groups holding either take the scalar
// stores (store_group).
FASTOPT_AVX512 I nearest_pair(F a, F b) {
  I out;
  asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(out) : "v"(b), "v"(a));
  return out;
}

// Lanes holding a denormal (vfpclassps category 0x20).
FASTOPT_AVX512 __mmask16 denormal(F x) { return _mm512_fpclass_ps_mask(x, 0x20); }

// Whether this CPU has vcvtne2ps2bf16 (AVX512-BF16).
inline bool has_bf16_conversion() {
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
}

// Rounded stochastically by the 16 noise bits in each lane (bf16_stochastic).
FASTOPT_AVX512 I stochastic_high(F x, I noise16) { return _mm512_add_epi32(bits(x), noise16); }

// Whether any lane of a or b is NaN.
FASTOPT_AVX512 bool any_nan(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q) != 0; }

// The noise of 32 elements from the low words of their indices (base + 0..31): word 1 (param,
// exp_avg) and word 2 (exp_avg_sq, max_exp_avg_sq), as in the portable loops.
struct Noise {
  I w1[2], w2[2];
};

// One group's stores of the updated p, m, v (and vmax): bf16 rounded in registers, fp32 as
// they are. A NaN in any bf16 result or an exact tie in a master sends the group to the scalar
// stores instead, and with kCvt (rounding to nearest by nearest_pair) a denormal too.
template <typename P, typename S, Master kM, bool kSR, bool kAmsgrad, bool kCvt, bool kFull,
          typename M>
FASTOPT_AVX512 void store_group(P* param, M* master, S* exp_avg, S* exp_avg_sq,
                                S* max_exp_avg_sq, int64_t j, __mmask32 k, const Words& w,
                                const F p[2], const F m[2], const F v[2], const F vm[2],
                                const Noise& noise) {
  constexpr bool kP16 = std::is_same_v<P, BFloat16>;
  constexpr bool kS16 = std::is_same_v<S, BFloat16>;
  bool rare = false;
  if constexpr (kP16) rare = any_nan(p[0], p[1]);
  if constexpr (kS16) {
    rare = rare || any_nan(m[0], m[1]) || any_nan(v[0], v[1]);
    if constexpr (kAmsgrad) rare = rare || any_nan(vm[0], vm[1]);
  }
  // What nearest_pair rounds (a bf16 param unless rounded stochastically without a master, bf16
  // moments unless rounded stochastically) must hold no denormal.
  constexpr bool kCvtParam = kCvt && kP16 && (kM == Master::kRemainder || !kSR);
  constexpr bool kCvtMoments = kCvt && kS16 && !kSR;
  if constexpr (kCvtParam || kCvtMoments) {
    __mmask16 sub = 0;
    if constexpr (kCvtParam) sub |= denormal(p[0]) | denormal(p[1]);
    if constexpr (kCvtMoments) {
      sub |= denormal(m[0]) | denormal(m[1]) | denormal(v[0]) | denormal(v[1]);
    }
    rare = rare || sub != 0;
  }
  I remainders;
  if constexpr (kM == Master::kRemainder) {
    remainders = _mm512_permutex2var_epi16(bits(p[0]), w.low, bits(p[1]));
    rare = rare || _mm512_cmpeq_epi16_mask(remainders, _mm512_set1_epi16(-0x8000)) != 0;
  }
  if (__builtin_expect(rare, 0)) {
    alignas(64) float ps[32], ms[32], vs[32], vms[32];
    for (int h = 0; h < 2; ++h) {
      _mm512_store_ps(ps + 16 * h, p[h]);
      _mm512_store_ps(ms + 16 * h, m[h]);
      _mm512_store_ps(vs + 16 * h, v[h]);
      _mm512_store_ps(vms + 16 * h, vm[h]);
    }
    alignas(64) uint32_t w1[32], w2[32];
    for (int h = 0; h < 2; ++h) {
      _mm512_store_si512(w1 + 16 * h, noise.w1[h]);
      _mm512_store_si512(w2 + 16 * h, noise.w2[h]);
    }
    const int len = kFull ? 32 : __builtin_popcount(k);
    for (int i = 0; i < len; ++i) {
      store_element<kM, kSR, kAmsgrad>(param + j, master + j, exp_avg + j, exp_avg_sq + j,
                                       max_exp_avg_sq + j, i, ps[i], ms[i], vs[i], vms[i], w1[i],
                                       w2[i]);
    }
    return;
  }
  // A pair of fp32 vectors stored as they are, or as the high halves of their rounded words.
  auto put = [&](auto* out, const F x[2], auto round) FASTOPT_AVX512_LAMBDA {
    using T = std::remove_pointer_t<decltype(out)>;
    if constexpr (std::is_same_v<T, float>) {
      if constexpr (kFull) {
        _mm512_storeu_ps(out + j, x[0]);
        _mm512_storeu_ps(out + j + 16, x[1]);
      } else {
        _mm512_mask_storeu_ps(out + j, static_cast<__mmask16>(k), x[0]);
        _mm512_mask_storeu_ps(out + j + 16, static_cast<__mmask16>(k >> 16), x[1]);
      }
    } else {
      store_words<kFull>(out + j, k, _mm512_permutex2var_epi16(round(0), w.high, round(1)));
    }
  };
  // Rounded to nearest: by nearest_pair where kCvt and the words are bf16 (fp32 ones are
  // stored as they are).
  auto put_nearest = [&](auto* out, const F x[2]) FASTOPT_AVX512_LAMBDA {
    if constexpr (kCvt && std::is_same_v<std::remove_pointer_t<decltype(out)>, BFloat16>) {
      store_words<kFull>(out + j, k, nearest_pair(x[0], x[1]));
    } else {
      put(out, x, [&](int h) FASTOPT_AVX512_TARGET { return nearest_high(x[h]); });
    }
  };
  const I low16 = u32(0xFFFFu);
  if constexpr (kM == Master::kRemainder) {
    // split_master away from ties: the bf16 rounded to nearest, the low half as it is.
    put_nearest(param, p);
    store_words<kFull>(master + j, k, remainders);
  } else if constexpr (kSR && kP16) {
    put(param, p, [&](int h) FASTOPT_AVX512_TARGET {
      return stochastic_high(p[h], _mm512_srli_epi32(noise.w1[h], 16));
    });
  } else {
    put_nearest(param, p);
  }
  if constexpr (kSR && kS16) {
    put(exp_avg, m, [&](int h) FASTOPT_AVX512_TARGET {
      return stochastic_high(m[h], _mm512_and_si512(noise.w1[h], low16));
    });
    put(exp_avg_sq, v, [&](int h) FASTOPT_AVX512_TARGET {
      return stochastic_high(v[h], _mm512_srli_epi32(noise.w2[h], 16));
    });
    if constexpr (kAmsgrad) {
      put(max_exp_avg_sq, vm, [&](int h) FASTOPT_AVX512_TARGET {
        return stochastic_high(vm[h], _mm512_and_si512(noise.w2[h], low16));
      });
    }
  } else {
    put_nearest(exp_avg, m);
    put_nearest(exp_avg_sq, v);
    if constexpr (kAmsgrad) {
      put(max_exp_avg_sq, vm, [&](int h) FASTOPT_AVX512_TARGET { return nearest_high(vm[h]); });
    }
  }
}

// One piece [begin, end) of one tensor: adamw_chunk's 16-bit case, with the same arguments
// (key1, key2: the noise keys of the high word the piece's indices share; first: the index of
// the tensor's element 0 in the whole param). kCvt: round to nearest with vcvtne2ps2bf16
// (only where has_bf16_conversion()).
template <typename P, typename G, typename S, Master kM, bool kSR, bool kAmsgrad, bool kCvt,
          typename M>
FASTOPT_AVX512_TARGET void adamw_chunk_16(P* __restrict__ param, const G* __restrict__ grad,
                                          S* __restrict__ exp_avg, S* __restrict__ exp_avg_sq,
                                          S* __restrict__ max_exp_avg_sq, M* __restrict__ master,
                                          int64_t begin, int64_t end, const AdamWCoeffs& coeffs,
                                          uint32_t key1, uint32_t key2, uint64_t first) {
  constexpr bool kNoise1 = kSR && (std::is_same_v<P, BFloat16> || std::is_same_v<S, BFloat16>);
  constexpr bool kNoise2 = kSR && std::is_same_v<S, BFloat16>;
  const Coeffs c = broadcast(coeffs);
  const Words w = load_words();
  const I iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const I k1 = u32(key1), k2 = u32(key2);
  // Group j's loads and math: its p, m, v, vmax and noise.
  struct Group {
    F p[2], m[2], v[2], vm[2];
    Noise noise;
  };
  auto compute = [&](auto full, int64_t j, __mmask32 k, Group& out) FASTOPT_AVX512_LAMBDA {
    constexpr bool kFull = decltype(full)::value;
    if constexpr (kM == Master::kRemainder) {
      load_masters32<kFull>(param + j, master + j, k, w, out.p);
    } else {
      load32<kFull>(param + j, k, w, out.p);
    }
    F g[2];
    load32<kFull>(grad + j, k, w, g);
    load32<kFull>(exp_avg + j, k, w, out.m);
    load32<kFull>(exp_avg_sq + j, k, w, out.v);
    if constexpr (kAmsgrad) load32<kFull>(max_exp_avg_sq + j, k, w, out.vm);
    for (int h = 0; h < 2; ++h) {
      F root;
      if constexpr (!kAmsgrad) out.vm[h] = out.v[h];
      math<kAmsgrad>(out.p[h], g[h], out.m[h], out.v[h], out.vm[h], c, root);
      const I index = _mm512_add_epi32(u32(static_cast<uint32_t>(first + j) + 16u * h), iota);
      out.noise.w1[h] = kNoise1 ? mix32(_mm512_xor_si512(k1, index)) : _mm512_setzero_si512();
      out.noise.w2[h] = kNoise2 ? mix32(_mm512_xor_si512(k2, index)) : _mm512_setzero_si512();
    }
  };
  auto store = [&](auto full, int64_t j, __mmask32 k, const Group& g) FASTOPT_AVX512_LAMBDA {
    store_group<P, S, kM, kSR, kAmsgrad, kCvt, decltype(full)::value>(
        param, master, exp_avg, exp_avg_sq, max_exp_avg_sq, j, k, w, g.p, g.m, g.v, g.vm,
        g.noise);
  };
  using Full = std::true_type;
  constexpr __mmask32 kAll = ~__mmask32{0};
  // A group's stores follow the next group's math; two groups a loop, so that neither is
  // copied (a copy went through the stack).
  Group a, b;
  int64_t j = begin;
  bool b_pending = false;  // b holds group j - 32, not stored yet
  for (; j + 64 <= end; j += 64) {
    compute(Full{}, j, kAll, a);
    if (b_pending) store(Full{}, j - 32, kAll, b);
    compute(Full{}, j + 32, kAll, b);
    store(Full{}, j, kAll, a);
    b_pending = true;
  }
  if (b_pending) store(Full{}, j - 32, kAll, b);
  if (j + 32 <= end) {
    compute(Full{}, j, kAll, a);
    store(Full{}, j, kAll, a);
    j += 32;
  }
  if (j < end) {
    const auto k = static_cast<__mmask32>((uint64_t{1} << (end - j)) - 1u);
    compute(std::false_type{}, j, k, a);
    store(std::false_type{}, j, k, a);
  }
}

}  // namespace fastopt::cpu::avx512

#else  // no x86-64 SIMD: every chunk takes the portable loops

namespace fastopt::cpu::avx512 {

template <typename P, typename G, typename S, Master kM>
constexpr bool kServes16 = false;

inline bool has_bf16_conversion() { return false; }

// Declared for the call that `if constexpr (kServes16<...>)` discards; never defined.
template <typename P, typename G, typename S, Master kM, bool kSR, bool kAmsgrad, bool kCvt,
          typename M>
void adamw_chunk_16(P* param, const G* grad, S* exp_avg, S* exp_avg_sq, S* max_exp_avg_sq,
                    M* master, int64_t begin, int64_t end, const AdamWCoeffs& coeffs,
                    uint32_t key1, uint32_t key2, uint64_t first);

}  // namespace fastopt::cpu::avx512

#endif
