// The AdamW op of 8-bit moments: uint8 codes with one int8 power-of-two scale per block of
// kQuantBlock elements (csrc/adamw_math.h has the format, fastopt/quant.py explains it).
//
// A vector is 16 elements (16 code bytes, one 16-byte load per moment; an fp32 param or grad
// takes four; 8 with a master, see kVec), so the kQuantBlock = 32 elements of a block are the
// vectors of kLanesPerBlock = 2 (or 4) neighbouring lanes of one warp (thread t is vector t of
// its unroll slot, and blocks start at multiples of 32 elements of the chunk, which starts at
// a multiple of kChunk). A code needs its block's new scale, so the block's largest new value
// before any code: compute() runs the update for the maxima alone and reduces them across the
// block's lanes with shuffles; store() runs it again (the same arithmetic, so the same bits)
// and encodes each element at once. Holding a vector's new param and moments in registers from
// one to the other instead spilled (amsgrad: 212 bytes; 20 without). The first lane of a block
// writes its scale bytes.
#pragma once

#include <cstring>

#include "adamw_op.cuh"

namespace fastopt::cuda {

template <typename P, typename G, Master kM, bool kSR, bool kAmsgrad>
struct AdamW8bitOp : AdamWStreams<P, G, uint8_t, kM, kSR> {
  using Base = AdamWStreams<P, G, uint8_t, kM, kSR>;
  using Base::kHasMaster;
  using Base::master, Base::c, Base::key1, Base::key2;
  using Base::noise, Base::round_param;
  using Base::param, Base::grad, Base::exp_avg, Base::exp_avg_sq, Base::max_exp_avg_sq;
  using typename Base::M;

  // 8-bit codes always round stochastically (fastopt/quant.py says why).
  static constexpr bool kNoise = true;
  // With a master as well, 16 elements a thread spilled (bf16 + remainder + amsgrad: 28
  // bytes), so those take 8: their codes move as 8-byte loads, params and masters still 16.
  static constexpr int kVec = kHasMaster ? 8 : vector_elems<P, G, uint8_t, M>();
  static constexpr int kUnroll = unroll_for(kVec, adamw_depth(kAmsgrad, kM, true));
  // The moments with codes and a row of scales: exp_avg, exp_avg_sq, max_exp_avg_sq.
  static constexpr int kMoments = kAmsgrad ? 3 : 2;
  static constexpr int kLanesPerBlock = kQuantBlock / kVec;
  static_assert(kQuantBlock % kVec == 0 && 32 % kLanesPerBlock == 0 &&
                    kBlockThreads % kLanesPerBlock == 0 && kChunk % kQuantBlock == 0,
                "a block of 8-bit moments must be whole vectors of neighbouring lanes of one "
                "warp, and never straddle a chunk");

  // The codes as loaded, decoded an element at a time, their block's scale exponents, and the
  // block's new ones (from compute()). The codes stay packed four to a word until used: as
  // bytes each took a register of its own.
  struct Frag {
    float p[kVec], g[kVec];
    uint32_t code[kMoments][kVec / 4];
    int scale[kMoments], next_scale[kMoments];
  };

  // exp_avg's block scales from the chunk's first block on, and the distance to the next
  // moment's row (one pointer and a stride: three pointers spilled with amsgrad).
  int8_t* __restrict__ scales;
  int64_t scale_row;

  template <bool kAligned>
  __device__ __forceinline__ void load(int e, Frag& f) const {
    this->template load_master<kAligned>(e, f.p);
    load_n<kVec, kAligned>(grad + e, f.g);
    load_codes<kAligned>(exp_avg + e, kVec, f.code[0]);
    load_codes<kAligned>(exp_avg_sq + e, kVec, f.code[1]);
    if constexpr (kAmsgrad) load_codes<kAligned>(max_exp_avg_sq + e, kVec, f.code[2]);
#pragma unroll
    for (int k = 0; k < kMoments; ++k) f.scale[k] = scales[k * scale_row + e / kQuantBlock];
  }
  __device__ __forceinline__ void load_partial(int e, int count, Frag& f) const {
    this->load_master_partial(e, count, f.p);
    load_n_partial<kVec>(grad + e, count, f.g);
    // Codes past the end are 0, which decode to 0 whatever the scale. A vector wholly past the
    // tensor's end (count <= 0) may lie in a block past it too, whose scale is not there to
    // read.
    load_codes<false>(exp_avg + e, count, f.code[0]);
    load_codes<false>(exp_avg_sq + e, count, f.code[1]);
    if constexpr (kAmsgrad) load_codes<false>(max_exp_avg_sq + e, count, f.code[2]);
#pragma unroll
    for (int k = 0; k < kMoments; ++k) {
      f.scale[k] = count > 0 ? scales[k * scale_row + e / kQuantBlock] : 0;
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
  // too (chunk_tiles), which the shuffles need: all lanes of a warp take part.
  __device__ __forceinline__ void compute(Frag& f, int /*u*/) const {
    float factor[kMoments];
    scale_factors(f.scale, 1, factor);
    // The maxima of m, v and vmax; those of the roots the codes store are the roots of the
    // latter (sqrtf is correctly rounded, so monotonic), which leaves the square roots and the
    // division out of this pass.
    uint32_t top[kMoments] = {};
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      float p, moment[kMoments], root;
      update(f, j, factor, p, moment, root);  // p and root unused: not computed
#pragma unroll
      for (int k = 0; k < kMoments; ++k) top[k] = max(top[k], magnitude_bits(moment[k]));
    }
    // Elements past the tensor's end were loaded as zeros (codes 0), so their new m and v are
    // 0 (or NaN, when the gradient coefficient is inf or NaN), whose magnitude_bits are 0: they
    // cannot raise a block's maximum, which is that of the block's elements alone.
#pragma unroll
    for (int k = 0; k < kMoments; ++k) {
#pragma unroll
      for (int lanes = 1; lanes < kLanesPerBlock; lanes <<= 1) {
        top[k] = max(top[k], __shfl_xor_sync(0xFFFFFFFFu, top[k], lanes));
      }
      f.next_scale[k] = block_scale(k == 0 ? top[k] : magnitude_bits(sqrtf(bits_f32(top[k]))));
    }
  }
  // 2**(sign * scale) of each moment's block scale exponent.
  __device__ __forceinline__ static void scale_factors(const int (&scale)[kMoments], int sign,
                                                       float (&factor)[kMoments]) {
#pragma unroll
    for (int k = 0; k < kMoments; ++k) factor[k] = pow2(sign * scale[k]);
  }
  // Element j's update from its codes (restored with `factor`, 2**scale): the new param, the
  // new m, v (and vmax), and the root of the one the denominator used.
  __device__ __forceinline__ void update(const Frag& f, int j, const float (&factor)[kMoments],
                                         float& p, float (&moment)[kMoments], float& root) const {
    p = f.p[j];
    moment[0] = decode_m(code_at(f.code[0], j), factor[0]);
#pragma unroll
    for (int k = 1; k < kMoments; ++k) moment[k] = decode_v(code_at(f.code[k], j), factor[k]);
    float unused = 0.f;
    adamw_math<kAmsgrad>(p, f.g[j], moment[0], moment[1], kAmsgrad ? moment[kMoments - 1] : unused,
                         c, root);
  }

  // Each element's update again, its codes encoded with the block's new scales and the halves
  // of both noise words (key1's word: param high, exp_avg low; key2's: exp_avg_sq high,
  // max_exp_avg_sq low), then every stream stored. kFull: all kVec elements; else the first
  // `count`.
  template <bool kFull, bool kAligned>
  __device__ __forceinline__ void encode_store(int e, int count, Frag f) const {
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
      const uint32_t w1 = noise(key1, e + j);
      const uint32_t w2 = noise(key2, e + j);
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
    // The block's first lane writes its scales: it holds an element of the block whenever any
    // lane does (store_partial runs only for vectors that start before the end).
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
    store_vector<kFull, kAligned>(p, count, bytes);
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
