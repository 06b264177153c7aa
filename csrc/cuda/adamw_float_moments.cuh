// The AdamW op of moments stored as floats (the params' dtype, fp32 or bf16): a vector of each
// stream loaded, adamw_math applied to each element, and the results stored, stochastically
// rounded where kSR asks.
#pragma once

#include "adamw_op.cuh"

namespace fastopt::cuda {

template <typename P, typename G, typename S, Master kM, bool kSR, bool kAmsgrad>
struct AdamWFloatOp : AdamWStreams<P, G, S, kM, kSR> {
  using Base = AdamWStreams<P, G, S, kM, kSR>;
  using Base::kHasMaster;
  using Base::master, Base::c, Base::key1, Base::key2;
  using Base::noise, Base::round_param;
  using Base::param, Base::grad, Base::exp_avg, Base::exp_avg_sq, Base::max_exp_avg_sq;
  using typename Base::M;

  static constexpr bool kNoise = kSR;
  static constexpr int kVec = vector_elems<P, G, S, M>();
  static constexpr int kUnroll = unroll_for(kVec, adamw_depth(kAmsgrad, kM, false));

  struct Frag {
    float p[kVec], g[kVec], m[kVec], v[kVec], vmax[kAmsgrad ? kVec : 1];
  };

  template <bool kAligned>
  __device__ __forceinline__ void load(int e, Frag& f) const {
    this->template load_master<kAligned>(e, f.p);
    load_n<kVec, kAligned>(grad + e, f.g);
    load_n<kVec, kAligned>(exp_avg + e, f.m);
    load_n<kVec, kAligned>(exp_avg_sq + e, f.v);
    if constexpr (kAmsgrad) load_n<kVec, kAligned>(max_exp_avg_sq + e, f.vmax);
  }
  __device__ __forceinline__ void load_partial(int e, int count, Frag& f) const {
    this->load_master_partial(e, count, f.p);
    load_n_partial<kVec>(grad + e, count, f.g);
    load_n_partial<kVec>(exp_avg + e, count, f.m);
    load_n_partial<kVec>(exp_avg_sq + e, count, f.v);
    if constexpr (kAmsgrad) load_n_partial<kVec>(max_exp_avg_sq + e, count, f.vmax);
  }

  __device__ __forceinline__ void compute(Frag& f, int /*u*/) const {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float unused = 0.f;
      adamw_math<kAmsgrad>(f.p[j], f.g[j], f.m[j], f.v[j], kAmsgrad ? f.vmax[j] : unused, c);
    }
  }

  // The computed vector starting at element e of the chunk, into storage, in two passes that
  // each hold only their own words: param (and master) with exp_avg, rounded from key1's noise
  // word, then exp_avg_sq with max_exp_avg_sq, from key2's. kFull: all kVec elements; else the
  // first `count`.
  template <bool kFull, bool kAligned>
  __device__ __forceinline__ void encode_store(int e, int count, const Frag& f) const {
    {
      P p[kVec];
      M w[kHasMaster ? kVec : 1];
      S m[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const uint32_t w1 = kSR ? noise(key1, e + j) : 0u;
        round_param(f.p[j], w1, p[j], w[kHasMaster ? j : 0]);
        m[j] = rounded<S, kSR>(f.m[j], w1 & 0xFFFFu);
      }
      store_vector<kFull, kAligned>(param + e, count, p);
      if constexpr (kHasMaster) store_vector<kFull, kAligned>(master + e, count, w);
      store_vector<kFull, kAligned>(exp_avg + e, count, m);
    }
    S v[kVec], vmax[kAmsgrad ? kVec : 1];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const uint32_t w2 = kSR ? noise(key2, e + j) : 0u;
      v[j] = rounded<S, kSR>(f.v[j], w2 >> 16);
      if constexpr (kAmsgrad) vmax[j] = rounded<S, kSR>(f.vmax[j], w2 & 0xFFFFu);
    }
    store_vector<kFull, kAligned>(exp_avg_sq + e, count, v);
    if constexpr (kAmsgrad) store_vector<kFull, kAligned>(max_exp_avg_sq + e, count, vmax);
  }
  template <bool kAligned>
  __device__ __forceinline__ void store(int e, const Frag& f) const {
    encode_store<true, kAligned>(e, kVec, f);
  }
  __device__ __forceinline__ void store_partial(int e, int count, const Frag& f) const {
    encode_store<false, false>(e, count, f);
  }
};

}  // namespace fastopt::cuda
