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
#include "../adamw_inputs.h"
#include "../adamw_math.h"
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

template <typename S, bool kAmsgrad, Master kM, bool kSR>
using AdamWMeta = TensorListMeta<adamw_depth(kAmsgrad, kM, kQuantized<S>), /*kWithStep=*/true,
                                 kSR || kQuantized<S>>;

static_assert(sizeof(AdamWMeta<float, false, Master::kNone, false>) + sizeof(AdamWScalars) <=
              kMaxKernelParamBytes);
static_assert(sizeof(AdamWMeta<BFloat16, true, Master::kRemainder, true>) +
                  sizeof(AdamWScalars) <= kMaxKernelParamBytes);
// The widest table: 8-bit moments with amsgrad, a master and stochastic rounding.
static_assert(sizeof(AdamWMeta<uint8_t, true, Master::kRemainder, true>) +
                  sizeof(AdamWScalars) <= kMaxKernelParamBytes);

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
//
// S = uint8_t: 8-bit moments. A vector is then 16 elements (16 code bytes, one 16-byte load per
// moment; an fp32 param or grad takes four), so the kQuantBlock = 32 elements of a block are
// the vectors of kLanesPerBlock = 2 neighbouring lanes of one warp (thread t is vector t of
// its unroll slot, and blocks start at multiples of 32 elements of the chunk, which starts at
// a multiple of kChunk). A code needs its block's new scale, so the block's largest new value
// before any code: compute() runs the update for the maxima alone and reduces them across the
// block's lanes with shuffles; store() runs it again (the same arithmetic, so the same bits)
// and encodes each element at once. Holding a vector's new param and moments in registers
// from one to the other instead spilled (amsgrad: 212 bytes; 20 without). The first lane of a
// block writes its scale bytes.
template <typename P, typename G, typename S, Master kM, bool kSR, bool kAmsgrad>
struct AdamWOp {
  using M = master_storage_t<kM, P>;
  static constexpr bool kHasMaster = kM != Master::kNone;
  static constexpr bool kQuant = kQuantized<S>;
  // The noise words are drawn for stochastic rounding, and always for 8-bit codes.
  static constexpr bool kNoise = kSR || kQuant;
  // With a master as well, 16 elements a thread spilled (bf16 + remainder + amsgrad: 28
  // bytes), so those take 8: their codes move as 8-byte loads, params and masters still 16.
  static constexpr int kVec = kQuant && kHasMaster ? 8 : vector_elems<P, G, S, M>();
  static constexpr int kUnroll = unroll_for(kVec, adamw_depth(kAmsgrad, kM, kQuant));
  // The moments with codes and a row of scales: exp_avg, exp_avg_sq, max_exp_avg_sq.
  static constexpr int kMoments = kAmsgrad ? 3 : 2;
  static constexpr int kLanesPerBlock = kQuantBlock / kVec;
  static_assert(!kQuant || (kQuantBlock % kVec == 0 && 32 % kLanesPerBlock == 0 &&
                            kBlockThreads % kLanesPerBlock == 0 && kChunk % kQuantBlock == 0),
                "a block of 8-bit moments must be whole vectors of neighbouring lanes of one "
                "warp, and never straddle a chunk");

  struct FloatFrag {
    float p[kVec], g[kVec], m[kVec], v[kVec], vmax[kAmsgrad ? kVec : 1];
  };
  // 8-bit moments: the codes as loaded, decoded an element at a time, their block's scale
  // exponents, and the block's new ones (from compute()).
  // The codes stay packed four to a word until used: as bytes each took a register of its own.
  struct CodeFrag {
    float p[kVec], g[kVec];
    uint32_t code[kMoments][kVec / 4];
    int scale[kMoments], next_scale[kMoments];
  };
  using Frag = std::conditional_t<kQuant, CodeFrag, FloatFrag>;

  P* __restrict__ param;
  const G* __restrict__ grad;
  S* __restrict__ exp_avg;
  S* __restrict__ exp_avg_sq;
  S* __restrict__ max_exp_avg_sq;
  M* __restrict__ master;
  // 8-bit moments: exp_avg's block scales from the chunk's first block on, and the distance
  // to the next moment's row (one pointer and a stride: three pointers spilled with amsgrad).
  int8_t* __restrict__ scales;
  int64_t scale_row;
  AdamWCoeffs c;
  // The noise (kNoise): the low word of the chunk's first element's index in the whole param,
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
    if constexpr (kQuant) {
      load_codes<kAligned>(exp_avg + e, kVec, f.code[0]);
      load_codes<kAligned>(exp_avg_sq + e, kVec, f.code[1]);
      if constexpr (kAmsgrad) load_codes<kAligned>(max_exp_avg_sq + e, kVec, f.code[2]);
#pragma unroll
      for (int k = 0; k < kMoments; ++k) f.scale[k] = scales[k * scale_row + e / kQuantBlock];
    } else {
      load_n<kVec, kAligned>(exp_avg + e, f.m);
      load_n<kVec, kAligned>(exp_avg_sq + e, f.v);
      if constexpr (kAmsgrad) load_n<kVec, kAligned>(max_exp_avg_sq + e, f.vmax);
    }
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
    if constexpr (kQuant) {
      // Codes past the end are 0, which decode to 0 whatever the scale. A vector wholly past
      // the tensor's end (count <= 0) may lie in a block past it too, whose scale is not there
      // to read.
      load_codes<false>(exp_avg + e, count, f.code[0]);
      load_codes<false>(exp_avg_sq + e, count, f.code[1]);
      if constexpr (kAmsgrad) load_codes<false>(max_exp_avg_sq + e, count, f.code[2]);
#pragma unroll
      for (int k = 0; k < kMoments; ++k) {
        f.scale[k] = count > 0 ? scales[k * scale_row + e / kQuantBlock] : 0;
      }
    } else {
      load_n_partial<kVec>(exp_avg + e, count, f.m);
      load_n_partial<kVec>(exp_avg_sq + e, count, f.v);
      if constexpr (kAmsgrad) load_n_partial<kVec>(max_exp_avg_sq + e, count, f.vmax);
    }
  }
  // A vector's codes, packed; count < kVec (maybe <= 0): the first count, zeros after.
  template <bool kAligned>
  __device__ __forceinline__ static void load_codes(const uint8_t* __restrict__ p, int count,
                                                    uint32_t (&out)[kVec / 4]) {
    uint8_t bytes[kVec];
    if (count >= kVec) {
      load_raw<kVec, kAligned>(p, bytes);
    } else {
      load_raw_partial<kVec>(p, count, bytes);
    }
    memcpy(out, bytes, sizeof(bytes));
  }
  __device__ __forceinline__ static uint32_t code_at(const uint32_t (&words)[kVec / 4], int j) {
    return (words[j / 4] >> (8 * (j % 4))) & 0xFFu;
  }

  // Every thread of the block calls compute for every vector of a tile, past the tensor's end
  // too (chunk_tiles), which the shuffles of 8-bit moments need: all lanes of a warp take part.
  __device__ __forceinline__ void compute(Frag& f, int /*u*/) const {
    if constexpr (kQuant) {
      float factor[kMoments];
      scale_factors(f.scale, 1, factor);
      // The maxima of m, v and vmax; those of the roots the codes store are the roots of the
      // latter (sqrtf is correctly rounded, so monotonic), which leaves the square roots and
      // the division out of this pass.
      uint32_t top[kMoments] = {};
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        float p, moment[kMoments], root;
        update(f, j, factor, p, moment, root);  // p and root unused: not computed
#pragma unroll
        for (int k = 0; k < kMoments; ++k) top[k] = max(top[k], magnitude_bits(moment[k]));
      }
      // Elements past the tensor's end were loaded as zeros (codes 0), so their new m and v
      // are 0 (or NaN, when the gradient coefficient is inf or NaN), whose magnitude_bits are
      // 0: they cannot raise a block's maximum, which is that of the block's elements alone.
#pragma unroll
      for (int k = 0; k < kMoments; ++k) {
#pragma unroll
        for (int lanes = 1; lanes < kLanesPerBlock; lanes <<= 1) {
          top[k] = max(top[k], __shfl_xor_sync(0xFFFFFFFFu, top[k], lanes));
        }
        f.next_scale[k] = block_scale(k == 0 ? top[k] : magnitude_bits(sqrtf(bits_f32(top[k]))));
      }
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        float unused = 0.f;
        adamw_math<kAmsgrad>(f.p[j], f.g[j], f.m[j], f.v[j], kAmsgrad ? f.vmax[j] : unused, c);
      }
    }
  }
  // 2**(sign * scale) of each moment's block scale exponent.
  __device__ __forceinline__ static void scale_factors(const int (&scale)[kMoments], int sign,
                                                       float (&factor)[kMoments]) {
#pragma unroll
    for (int k = 0; k < kMoments; ++k) factor[k] = pow2(sign * scale[k]);
  }
  // 8-bit moments: element j's update from its codes (restored with `factor`, 2**scale): the
  // new param, the new m, v (and vmax), and the root of the one the denominator used.
  __device__ __forceinline__ void update(const CodeFrag& f, int j,
                                         const float (&factor)[kMoments], float& p,
                                         float (&moment)[kMoments], float& root) const {
    p = f.p[j];
    moment[0] = decode_m(code_at(f.code[0], j), factor[0]);
#pragma unroll
    for (int k = 1; k < kMoments; ++k) moment[k] = decode_v(code_at(f.code[k], j), factor[k]);
    float unused = 0.f;
    adamw_math<kAmsgrad>(p, f.g[j], moment[0], moment[1], kAmsgrad ? moment[kMoments - 1] : unused,
                         c, root);
  }

  // The computed vector starting at element e of the chunk, into storage, in two passes that
  // each hold only their own words: param (and master) with exp_avg, then exp_avg_sq with
  // max_exp_avg_sq. Each pass draws one noise word per element (rounding.element_noise):
  // word 1 rounds the param (high half) and exp_avg (low), word 2 exp_avg_sq (high) and
  // max_exp_avg_sq (low); 8-bit codes take the halves of the stores they replace. kFull: all
  // kVec elements; else the first `count`.
  template <bool kFull, bool kAligned>
  __device__ __forceinline__ void encode_store(int e, int count, const Frag& f) const {
    if constexpr (kQuant) {
      encode_store_codes<kFull, kAligned>(e, count, f);
    } else {
      encode_store_floats<kFull, kAligned>(e, count, f);
    }
  }
  template <bool kFull, bool kAligned>
  __device__ __forceinline__ void encode_store_floats(int e, int count, const FloatFrag& f) const {
    {
      P p[kVec];
      M w[kHasMaster ? kVec : 1];
      S m[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const uint32_t index = base + static_cast<uint32_t>(e + j);
        const uint32_t w1 = kSR ? mix32(key1 ^ (index < base ? next_high : 0u) ^ index) : 0u;
        round_param(f.p[j], w1, p[j], w[kHasMaster ? j : 0]);
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

  // 8-bit moments: each element's update again, its codes encoded with the block's new scales
  // and the halves of both noise words (word 1 low: exp_avg; word 2 high: exp_avg_sq, low:
  // max_exp_avg_sq), then every stream stored.
  template <bool kFull, bool kAligned>
  __device__ __forceinline__ void encode_store_codes(int e, int count, CodeFrag f) const {
    // The codes and gradients hidden from the optimiser, so that it recomputes the update here
    // rather than keep compute()'s values of every element alive until now (which spilled).
#pragma unroll
    for (int k = 0; k < kMoments; ++k) {
#pragma unroll
      for (int w = 0; w < kVec / 4; ++w) asm volatile("" : "+r"(f.code[k][w]));
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) asm volatile("" : "+f"(f.g[j]));
    float factor[kMoments], inverse[kMoments];
    scale_factors(f.scale, 1, factor);
    scale_factors(f.next_scale, -1, inverse);
    // The param (and master) go out a 16-byte word at a time, as soon as one is complete: held
    // for the whole vector they spilled with amsgrad.
    constexpr int kParamWord = 16 / sizeof(P), kMasterWord = 16 / sizeof(M);
    P p[kParamWord];
    M w[kMasterWord];
    uint32_t code[kMoments][kVec / 4] = {};  // packed as they come, as on load
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float x, moment[kMoments], root;
      update(f, j, factor, x, moment, root);
      // exp_avg_sq's code stores sqrt(v), max_exp_avg_sq's the root the denominator used,
      // sqrt(vmax); without amsgrad that root is sqrt(v) itself.
      const float v_root = kAmsgrad ? sqrtf(moment[1]) : root;
      const uint32_t index = base + static_cast<uint32_t>(e + j);
      const uint32_t high = index < base ? next_high : 0u;
      const uint32_t w1 = mix32(key1 ^ high ^ index);
      const uint32_t w2 = mix32(key2 ^ high ^ index);
      round_param(x, w1, p[j % kParamWord], w[j % kMasterWord]);
      if ((j + 1) % kParamWord == 0) store_part<kFull, kAligned>(param + e, j + 1, count, p);
      if (kHasMaster && (j + 1) % kMasterWord == 0) {
        store_part<kFull, kAligned>(master + e, j + 1, count, w);
      }
      const int shift = 8 * (j % 4);
      code[0][j / 4] |= uint32_t{encode_m(moment[0], inverse[0], w1 & 0xFFFFu)} << shift;
      code[1][j / 4] |= uint32_t{encode_v(v_root, inverse[1], w2 >> 16)} << shift;
      if constexpr (kAmsgrad) {
        code[2][j / 4] |= uint32_t{encode_v(root, inverse[2], w2 & 0xFFFFu)} << shift;
      }
    }
    store_codes<kFull, kAligned>(exp_avg + e, count, code[0]);
    store_codes<kFull, kAligned>(exp_avg_sq + e, count, code[1]);
    if constexpr (kAmsgrad) store_codes<kFull, kAligned>(max_exp_avg_sq + e, count, code[2]);
    // The block's first lane writes its scales: it holds an element of the block whenever
    // any lane does (store_partial runs only for vectors that start before the end).
    if (e % kQuantBlock == 0) {
#pragma unroll
      for (int k = 0; k < kMoments; ++k) {
        scales[k * scale_row + e / kQuantBlock] = static_cast<int8_t>(f.next_scale[k]);
      }
    }
  }
  // The N elements of a vector that end before element `end` of it (of `count` to store).
  template <bool kFull, bool kAligned, typename T, int N>
  __device__ __forceinline__ static void store_part(T* __restrict__ p, int end, int count,
                                                    const T (&in)[N]) {
    if constexpr (kFull) {
      store_raw<N, kAligned>(p + end - N, in);
    } else {
      store_raw_partial<N>(p + end - N, count - (end - N), in);
    }
  }
  template <bool kFull, bool kAligned>
  __device__ __forceinline__ static void store_codes(uint8_t* __restrict__ p, int count,
                                                     const uint32_t (&words)[kVec / 4]) {
    uint8_t bytes[kVec];
    memcpy(bytes, words, sizeof(bytes));
    store_words<kFull, kAligned>(p, count, bytes);
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
    adamw_kernel(const AdamWMeta<S, kAmsgrad, kM, kSR> meta, const AdamWScalars s) {
  using Op = AdamWOp<P, G, S, kM, kSR, kAmsgrad>;
  constexpr int kDepth = adamw_depth(kAmsgrad, kM, Op::kQuant);
  constexpr int kMasterStream = kAmsgrad ? 5 : 4;
  constexpr int kScaleStream = kDepth - 1;  // with 8-bit moments
  // Codes and scales, like params and moments, stay bit-unchanged by a skipped step.
  // A skipped step returns before touching params, masters, moments or scales.
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

  // Counted by iteration, the chunk and the slot derived from it: one live register where a
  // chunk index and a slot took three (the widest 8-bit variant spilled the slot).
  for (int i = 0;; ++i) {
    const int64_t chunk = blockIdx.x + static_cast<int64_t>(i) * gridDim.x;
    if (chunk >= meta.num_chunks) break;
    const int slot = i & 1;
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
      if constexpr (Op::kNoise) {
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
    op.master = Op::kHasMaster
                    ? static_cast<typename Op::M*>(meta.ptr[kMasterStream][t]) + begin
                    : nullptr;
    if constexpr (Op::kQuant) {
      // scales[t] is (kMoments, blocks) contiguous, blocks counted from the tensor's element 0;
      // a chunk's first block is begin / kQuantBlock exactly (static_assert in AdamWOp).
      op.scales = static_cast<int8_t*>(meta.ptr[kScaleStream][t]) + begin / kQuantBlock;
      op.scale_row = (meta.numel[t] + kQuantBlock - 1) / kQuantBlock;
    }
    op.c = plan[slot].c;
    op.base = plan[slot].base;
    op.key1 = plan[slot].key1;
    op.key2 = plan[slot].key2;
    op.next_high = plan[slot].next_high;
    // Chunk starts are multiples of kChunk elements, so the base pointers decide alignment;
    // scales are read and written a byte at a time, whatever theirs.
    bool aligned = true;
#pragma unroll
    for (int d = 0; d < (Op::kQuant ? kScaleStream : kDepth); ++d) {
      aligned = aligned && aligned16(meta.ptr[d][t]);
    }
    process_chunk<Op::kVec, Op::kUnroll>(op, len, aligned);
  }
}

template <typename P, typename G, typename S, Master kM, bool kSR, bool kAmsgrad>
void launch_adamw(const AdamWInputs& in, std::span<const int64_t> positions,
                  std::span<const int64_t> first_indices, const AdamWScalars& s,
                  cudaStream_t stream, int device) {
  constexpr bool kQuant = kQuantized<S>;
  constexpr int kDepth = adamw_depth(kAmsgrad, kM, kQuant);
  std::array<InfoList, kDepth> lists;
  lists[0] = in.params;
  lists[1] = in.grads;
  lists[2] = in.exp_avgs;
  lists[3] = in.exp_avg_sqs;
  if constexpr (kAmsgrad) lists[4] = in.max_exp_avg_sqs;
  if constexpr (kM != Master::kNone) lists[kAmsgrad ? 5 : 4] = in.masters;
  if constexpr (kQuant) lists[kDepth - 1] = in.scales;
  std::vector<int64_t> all(in.params.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
  constexpr auto kernel = adamw_kernel<P, G, S, kM, kSR, kAmsgrad>;
  multi_tensor_apply<kDepth, true, kSR || kQuant>(
      lists, in.steps, all,
      [&](const AdamWMeta<S, kAmsgrad, kM, kSR>& meta, int64_t /*first_chunk*/) {
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
