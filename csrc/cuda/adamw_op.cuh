// What the two AdamW ops share (adamw_float_moments.cuh: moments stored as floats;
// adamw_8bit_moments.cuh: as 8-bit codes with block scales): the chunk's streams, the fp32
// master's load, the param's store, and the stochastic-rounding noise. The update rule itself is
// csrc/adamw_math.h's, for both.
#pragma once

#include <type_traits>

#include "../adamw_dispatch.h"
#include "../adamw_inputs.h"
#include "../adamw_math.h"
#include "multi_tensor.cuh"

namespace fastopt::cuda {

// 8-bit moments are a property of the moments' storage type: uint8_t holds codes, and each
// tensor brings its block scales (csrc/adamw_math.h, fastopt/quant.py).
template <typename S>
inline constexpr bool kQuantized = std::is_same_v<S, uint8_t>;

// The table's streams: param, grad, exp_avg, exp_avg_sq, then max_exp_avg_sq (amsgrad), then
// the master (its int16 remainder or fp32 copy), then the int8 scales (8-bit moments);
// positions and first indices with stochastic rounding or 8-bit moments (whose codes always
// round stochastically).
constexpr int adamw_depth(bool amsgrad, Master master, bool quantized) {
  return 4 + (amsgrad ? 1 : 0) + (master != Master::kNone ? 1 : 0) + (quantized ? 1 : 0);
}

// x into T's storage: stochastically rounded from 16 noise bits when kSR and T is bf16, else
// rounded to nearest even.
template <typename T, bool kSR>
__device__ __forceinline__ T rounded(float x, uint32_t noise16) {
  if constexpr (kSR && std::is_same_v<T, BFloat16>) {
    T r;
    r.x = bf16_stochastic(x, noise16);
    return r;
  } else {
    return from_float<T>(x);
  }
}

// The N elements of a vector into storage at p: all of them (kFull), else the first `count`.
template <bool kFull, bool kAligned, typename T, int N>
__device__ __forceinline__ void store_vector(T* __restrict__ p, int count, const T (&in)[N]) {
  if constexpr (kFull) {
    store_raw<N, kAligned>(p, in);
  } else {
    store_raw_partial<N>(p, count, in);
  }
}

// One chunk of one tensor, as both ops see it: P, G, S the storage of params, grads and
// moments; kM where the fp32 master lives; kSR stochastic rounding of bf16 stores. The kernel
// fills in the pointers (at the chunk's first element), the coefficients and the noise's keys.
template <typename P, typename G, typename S, Master kM, bool kSR>
struct AdamWStreams {
  using M = master_storage_t<kM, P>;
  static constexpr bool kHasMaster = kM != Master::kNone;

  P* __restrict__ param;
  const G* __restrict__ grad;
  S* __restrict__ exp_avg;
  S* __restrict__ exp_avg_sq;
  S* __restrict__ max_exp_avg_sq;
  M* __restrict__ master;
  AdamWCoeffs c;
  // The noise: the low word of the chunk's first element's index in the whole param, the keys
  // of that index's high word, and what turns them into the next high word's keys (key ^
  // mix32(high) is the high word's key, so one word serves both streams), for the elements
  // past a multiple of 2**32 (only a shard's chunk can cross one).
  uint32_t base;
  uint32_t key1, key2, next_high;

  // The noise word of `key` for element i of the chunk (rounding.element_noise): key1's word
  // rounds the param (high half) and exp_avg (low), key2's exp_avg_sq (high) and
  // max_exp_avg_sq (low).
  __device__ __forceinline__ uint32_t noise(uint32_t key, int i) const {
    const uint32_t index = base + static_cast<uint32_t>(i);
    return mix32(key ^ (index < base ? next_high : 0u) ^ index);
  }

  // The fp32 master of the N elements from element e: the bf16 param and its remainder
  // joined, the fp32 copy (the fp16 param itself is not read), or the param.
  template <bool kAligned, int N>
  __device__ __forceinline__ void load_master(int e, float (&p)[N]) const {
    if constexpr (kM == Master::kRemainder) {
      P bits[N];
      M rem[N];
      load_raw<N, kAligned>(param + e, bits);
      load_raw<N, kAligned>(master + e, rem);
#pragma unroll
      for (int j = 0; j < N; ++j) p[j] = join_master(bits[j].x, rem[j]);
    } else if constexpr (kM == Master::kCopy) {
      load_n<N, kAligned>(master + e, p);
    } else {
      load_n<N, kAligned>(param + e, p);
    }
  }
  // The first `count` (< N, maybe <= 0) of them, zeros after.
  template <int N>
  __device__ __forceinline__ void load_master_partial(int e, int count, float (&p)[N]) const {
    if constexpr (kM == Master::kRemainder) {
      P bits[N];
      M rem[N];
      load_raw_partial<N>(param + e, count, bits);
      load_raw_partial<N>(master + e, count, rem);
#pragma unroll
      for (int j = 0; j < N; ++j) p[j] = join_master(bits[j].x, rem[j]);
    } else if constexpr (kM == Master::kCopy) {
      load_n_partial<N>(master + e, count, p);
    } else {
      load_n_partial<N>(param + e, count, p);
    }
  }

  // The new param x into its storage (and the master's): split into bf16 and remainder, an
  // fp32 copy and its fp16 rounding, or the param rounded (stochastically from word 1's high
  // half with kSR).
  __device__ __forceinline__ static void round_param(float x, uint32_t w1, P& p, M& w) {
    if constexpr (kM == Master::kRemainder) {
      uint16_t bits;
      split_master(x, bits, w);
      p.x = bits;
    } else if constexpr (kM == Master::kCopy) {
      w = x;
      p = from_float<P>(x);
    } else {
      p = rounded<P, kSR>(x, w1 >> 16);
    }
  }
};

}  // namespace fastopt::cuda
