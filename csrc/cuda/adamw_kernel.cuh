// The AdamW kernel: one template over the storage of params, grads and moments, where the fp32
// master lives, stochastic rounding and amsgrad. adamw.cu checks a call and picks the params'
// storage type; adamw_float.cu, adamw_bfloat16.cu and adamw_half.cu each instantiate the
// variants of one (csrc/adamw_dispatch.h lists them), so they compile in parallel.
//
// No host synchronisation: found_inf, grad_scale, grad_norm, lr_tensor and the step counts
// are read by the kernel from device memory, so the launch can be captured in a CUDA graph.
#pragma once

#include <span>
#include <type_traits>
#include <vector>

#include "../adamw_dispatch.h"
#include "../adamw_math.h"
#include "../checks.h"
#include "multi_tensor.cuh"

namespace fastopt::cuda {


// Everything but the tensor table, by value.
struct AdamWScalars {
  const float* lr_tensor;   // overrides lr when not null
  const float* grad_scale;  // nullable
  const float* found_inf;   // nullable; non-zero skips the whole update
  const float* grad_norm;   // nullable
  double lr;
  double beta1;
  double beta2;
  double weight_decay;
  double eps;
  float max_grad_norm;
  float grad_factor;
  uint32_t seed32;  // the stochastic-rounding seed, folded (seed_key)
  bool maximize;
};

// The table's streams: param, grad, exp_avg, exp_avg_sq, then max_exp_avg_sq (amsgrad), then
// the master (its int16 remainder or fp32 copy); positions with stochastic rounding.
constexpr int adamw_depth(bool amsgrad, Master master) {
  return 4 + (amsgrad ? 1 : 0) + (master != Master::kNone ? 1 : 0);
}

template <bool kAmsgrad, Master kM, bool kSR>
using AdamWMeta = TensorListMeta<adamw_depth(kAmsgrad, kM), /*kWithStep=*/true, kSR>;

static_assert(sizeof(AdamWMeta<false, Master::kNone, false>) + sizeof(AdamWScalars) <=
              kMaxKernelParamBytes);
static_assert(sizeof(AdamWMeta<true, Master::kRemainder, true>) + sizeof(AdamWScalars) <=
              kMaxKernelParamBytes);

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

// One chunk of one tensor: P, G, S the storage of params, grads and moments; kM where the
// fp32 master lives; kSR stochastic rounding of bf16 stores.
template <typename P, typename G, typename S, Master kM, bool kSR, bool kAmsgrad>
struct AdamWOp {
  using M = master_storage_t<kM, P>;
  static constexpr bool kHasMaster = kM != Master::kNone;
  static constexpr int kVec = vector_elems<P, G, S, M>();
  static constexpr int kUnroll = unroll_for(kVec, adamw_depth(kAmsgrad, kM));

  struct Frag {
    float p[kVec], g[kVec], m[kVec], v[kVec], vmax[kAmsgrad ? kVec : 1];
  };

  P* __restrict__ param;
  const G* __restrict__ grad;
  S* __restrict__ exp_avg;
  S* __restrict__ exp_avg_sq;
  S* __restrict__ max_exp_avg_sq;
  M* __restrict__ master;
  AdamWCoeffs c;
  // The noise (kSR): the low word of the chunk's first element's index in the whole param,
  // the keys of that index's high word, and what turns them into the next high word's keys
  // (key ^ mix32(high) is the high word's key, so one word serves both streams), for the
  // elements past a multiple of 2**32 (only a shard's chunk can cross one).
  uint32_t base;
  uint32_t key1, key2, next_high;

  // The fp32 master: the bf16 param and its remainder joined, the fp32 copy (the fp16 param
  // itself is not read), or the param.
  template <bool kAligned>
  __device__ __forceinline__ void load(int e, Frag& f) const {
    if constexpr (kM == Master::kRemainder) {
      P bits[kVec];
      M rem[kVec];
      load_raw<kVec, kAligned>(param + e, bits);
      load_raw<kVec, kAligned>(master + e, rem);
#pragma unroll
      for (int j = 0; j < kVec; ++j) f.p[j] = join_master(bits[j].x, rem[j]);
    } else if constexpr (kM == Master::kCopy) {
      load_n<kVec, kAligned>(master + e, f.p);
    } else {
      load_n<kVec, kAligned>(param + e, f.p);
    }
    load_n<kVec, kAligned>(grad + e, f.g);
    load_n<kVec, kAligned>(exp_avg + e, f.m);
    load_n<kVec, kAligned>(exp_avg_sq + e, f.v);
    if constexpr (kAmsgrad) load_n<kVec, kAligned>(max_exp_avg_sq + e, f.vmax);
  }
  __device__ __forceinline__ void load_partial(int e, int count, Frag& f) const {
    if constexpr (kM == Master::kRemainder) {
      P bits[kVec];
      M rem[kVec];
      load_raw_partial<kVec>(param + e, count, bits);
      load_raw_partial<kVec>(master + e, count, rem);
#pragma unroll
      for (int j = 0; j < kVec; ++j) f.p[j] = join_master(bits[j].x, rem[j]);
    } else if constexpr (kM == Master::kCopy) {
      load_n_partial<kVec>(master + e, count, f.p);
    } else {
      load_n_partial<kVec>(param + e, count, f.p);
    }
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
  // each hold only their own words: param (and master) with exp_avg, then exp_avg_sq with
  // max_exp_avg_sq. Each pass draws one noise word per element (rounding.element_noise):
  // word 1 rounds the param (high half) and exp_avg (low), word 2 exp_avg_sq (high) and
  // max_exp_avg_sq (low). kFull: all kVec elements; else the first `count`.
  template <bool kFull, bool kAligned>
  __device__ __forceinline__ void encode_store(int e, int count, const Frag& f) const {
    {
      P p[kVec];
      M w[kHasMaster ? kVec : 1];
      S m[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const uint32_t index = base + static_cast<uint32_t>(e + j);
        const uint32_t w1 = kSR ? mix32(key1 ^ (index < base ? next_high : 0u) ^ index) : 0u;
        if constexpr (kM == Master::kRemainder) {
          uint16_t bits;
          split_master(f.p[j], bits, w[j]);
          p[j].x = bits;
        } else if constexpr (kM == Master::kCopy) {
          w[j] = f.p[j];
          p[j] = from_float<P>(f.p[j]);
        } else {
          p[j] = rounded<P, kSR>(f.p[j], w1 >> 16);
        }
        m[j] = rounded<S, kSR>(f.m[j], w1 & 0xFFFFu);
      }
      store_words<kFull, kAligned>(param + e, count, p);
      if constexpr (kHasMaster) store_words<kFull, kAligned>(master + e, count, w);
      store_words<kFull, kAligned>(exp_avg + e, count, m);
    }
    S v[kVec], vmax[kAmsgrad ? kVec : 1];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const uint32_t index = base + static_cast<uint32_t>(e + j);
      const uint32_t w2 = kSR ? mix32(key2 ^ (index < base ? next_high : 0u) ^ index) : 0u;
      v[j] = rounded<S, kSR>(f.v[j], w2 >> 16);
      if constexpr (kAmsgrad) vmax[j] = rounded<S, kSR>(f.vmax[j], w2 & 0xFFFFu);
    }
    store_words<kFull, kAligned>(exp_avg_sq + e, count, v);
    if constexpr (kAmsgrad) store_words<kFull, kAligned>(max_exp_avg_sq + e, count, vmax);
  }
  template <bool kFull, bool kAligned, typename T>
  __device__ __forceinline__ static void store_words(T* __restrict__ p, int count,
                                                     const T (&in)[kVec]) {
    if constexpr (kFull) {
      store_raw<kVec, kAligned>(p, in);
    } else {
      store_raw_partial<kVec>(p, count, in);
    }
  }
  template <bool kAligned>
  __device__ __forceinline__ void store(int e, const Frag& f) const {
    encode_store<true, kAligned>(e, kVec, f);
  }
  __device__ __forceinline__ void store_partial(int e, int count, const Frag& f) const {
    encode_store<false, false>(e, count, f);
  }
};

// What thread 0 hands the block for one chunk.
struct ChunkPlan {
  AdamWCoeffs c;
  uint32_t base, key1, key2, next_high;
  int tensor;
  int64_t local_chunk;  // the chunk's number within its tensor
};

template <typename P, typename G, typename S, Master kM, bool kSR, bool kAmsgrad>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    adamw_kernel(const AdamWMeta<kAmsgrad, kM, kSR> meta, const AdamWScalars s) {
  using Op = AdamWOp<P, G, S, kM, kSR, kAmsgrad>;
  constexpr int kDepth = adamw_depth(kAmsgrad, kM);
  // A skipped step returns before touching params, masters or moments.
  if (s.found_inf != nullptr && *s.found_inf != 0.f) return;

  // Thread 0 computes the tensor, the coefficients (bias corrections in double) and the noise
  // keys of each chunk, once per tensor, and hands them over through shared memory. Two
  // slots, alternated per iteration, need one barrier per chunk: a slot is rewritten two
  // iterations later, after every thread has passed the barrier of the iteration in between.
  // What thread 0 keeps between chunks is in shared memory too: in registers it cost every
  // thread those registers, and the widest variants spilled.
  struct Kept {
    AdamWCoeffs coeffs;  // of `tensor`
    double lr;
    float coef;
    int tensor;
  };
  __shared__ ChunkPlan plan[2];
  __shared__ Kept kept;
  if (threadIdx.x == 0) {
    kept.coef = grad_coefficient(s.grad_scale, s.grad_norm, s.max_grad_norm, s.grad_factor);
    kept.lr = s.lr_tensor != nullptr ? static_cast<double>(*s.lr_tensor) : s.lr;
    kept.tensor = -1;
  }

  int slot = 0;
  for (int64_t chunk = blockIdx.x; chunk < meta.num_chunks; chunk += gridDim.x, slot ^= 1) {
    if (threadIdx.x == 0) {
      const int t = find_tensor(meta, chunk);
      const float step = *meta.step[t];
      if (t != kept.tensor) {
        kept.coeffs = adamw_coeffs(kept.lr, s.beta1, s.beta2, s.weight_decay, s.eps,
                                   static_cast<double>(step), kept.coef, s.maximize);
        kept.tensor = t;
      }
      const int64_t local = chunk - chunk_start(meta, t);
      plan[slot].c = kept.coeffs;
      if constexpr (kSR) {
        const auto count = static_cast<uint32_t>(step);
        const auto index0 = static_cast<uint64_t>(meta.first_index[t] + local * kChunk);
        const auto high = static_cast<uint32_t>(index0 >> 32);
        const uint32_t k1 = noise_key(s.seed32, meta.position[t], count, kStreamParamMoment1);
        const uint32_t k2 = noise_key(s.seed32, meta.position[t], count, kStreamMoments2);
        plan[slot].base = static_cast<uint32_t>(index0);
        plan[slot].key1 = noise_key_for_high_word(k1, high);
        plan[slot].key2 = noise_key_for_high_word(k2, high);
        plan[slot].next_high = mix32(high) ^ mix32(high + 1);  // mix32(0) is 0
      }
      plan[slot].tensor = t;
      plan[slot].local_chunk = local;
    }
    __syncthreads();
    const int t = plan[slot].tensor;
    const int64_t begin = plan[slot].local_chunk * kChunk;
    const int len = static_cast<int>(std::min<int64_t>(kChunk, meta.numel[t] - begin));

    Op op;
    op.param = static_cast<P*>(meta.ptr[0][t]) + begin;
    op.grad = static_cast<const G*>(meta.ptr[1][t]) + begin;
    op.exp_avg = static_cast<S*>(meta.ptr[2][t]) + begin;
    op.exp_avg_sq = static_cast<S*>(meta.ptr[3][t]) + begin;
    op.max_exp_avg_sq = kAmsgrad ? static_cast<S*>(meta.ptr[4][t]) + begin : nullptr;
    op.master = Op::kHasMaster ? static_cast<typename Op::M*>(meta.ptr[kDepth - 1][t]) + begin
                               : nullptr;
    op.c = plan[slot].c;
    op.base = plan[slot].base;
    op.key1 = plan[slot].key1;
    op.key2 = plan[slot].key2;
    op.next_high = plan[slot].next_high;
    // Chunk starts are multiples of kChunk elements, so the base pointers decide alignment.
    bool aligned = true;
#pragma unroll
    for (int d = 0; d < kDepth; ++d) aligned = aligned && aligned16(meta.ptr[d][t]);
    process_chunk<Op::kVec, Op::kUnroll>(op, len, aligned);
  }
}

template <typename P, typename G, typename S, Master kM, bool kSR, bool kAmsgrad>
void launch_adamw(const AdamWInputs& in, std::span<const int64_t> positions,
                  std::span<const int64_t> first_indices, const AdamWScalars& s,
                  cudaStream_t stream, int device) {
  constexpr int kDepth = adamw_depth(kAmsgrad, kM);
  std::array<InfoList, kDepth> lists;
  lists[0] = in.params;
  lists[1] = in.grads;
  lists[2] = in.exp_avgs;
  lists[3] = in.exp_avg_sqs;
  if constexpr (kAmsgrad) lists[4] = in.max_exp_avg_sqs;
  if constexpr (kM != Master::kNone) lists[kDepth - 1] = in.masters;
  std::vector<int64_t> all(in.params.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
  constexpr auto kernel = adamw_kernel<P, G, S, kM, kSR, kAmsgrad>;
  multi_tensor_apply<kDepth, true, kSR>(
      lists, in.steps, all,
      [&](const AdamWMeta<kAmsgrad, kM, kSR>& meta, int64_t /*first_chunk*/) {
        const int grid = persistent_grid<kernel>(meta.num_chunks, device);
        kernel<<<grid, kBlockThreads, 0, stream>>>(meta, s);
        STD_CUDA_KERNEL_LAUNCH_CHECK();
      },
      positions, first_indices);
}

// One call's launches for params of storage type P.
template <typename P>
void launch_adamw_for(const AdamWInputs& in, Master master, bool stochastic_rounding,
                      bool amsgrad, std::span<const int64_t> positions,
                      std::span<const int64_t> first_indices, const AdamWScalars& s,
                      cudaStream_t stream, int device) {
  dispatch_adamw_for<P>(in.grads[0].dtype, in.state_dtype, master, stochastic_rounding,
                        [&](auto /*p*/, auto g_tag, auto s_tag, auto kind, auto sr) {
    using G = typename decltype(g_tag)::type;
    using S = typename decltype(s_tag)::type;
    constexpr Master kM = decltype(kind)::value;
    constexpr bool kSR = decltype(sr)::value;
    if (amsgrad) {
      launch_adamw<P, G, S, kM, kSR, true>(in, positions, first_indices, s, stream, device);
    } else {
      launch_adamw<P, G, S, kM, kSR, false>(in, positions, first_indices, s, stream, device);
    }
  });
}

#define FASTOPT_ADAMW_FOR(P)                                                                   \
  template void launch_adamw_for<P>(const AdamWInputs&, Master, bool, bool,                   \
                                    std::span<const int64_t>, std::span<const int64_t>,         \
                                    const AdamWScalars&, cudaStream_t, int)
extern FASTOPT_ADAMW_FOR(float);
extern FASTOPT_ADAMW_FOR(BFloat16);
extern FASTOPT_ADAMW_FOR(Half);

}  // namespace fastopt::cuda
