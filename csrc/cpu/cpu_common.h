// Shared pieces of the CPU kernels: how work is split into chunks, and scalar loads/stores of
// the storage dtypes.
#pragma once

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../adamw_inputs.h"
#include "../adamw_math.h"
#include "../inputs.h"

// Helpers of the target_clones kernels: GCC inlines a callee into each clone (compiled for that
// clone's instruction set) only when told to; left to itself it called the 8-bit codes' block
// loops out of line, built for the baseline x86-64, at a quarter of the AVX-512 width.
#define FASTOPT_INLINE inline __attribute__((always_inline))

// x86-64 builds carry each marked kernel three times, for AVX-512 (x86-64-v4), AVX2 (v3) and
// the baseline, and the loader picks the best one this CPU runs; the 8-bit moments' AVX-512
// path (adamw_avx512.h) is picked at run time too. Other hosts (ARM, such as Grace) build the
// portable loops once for their own target; FASTOPT_PORTABLE_CPU builds them so on x86-64
// (a test compiles that way, so that those hosts' code keeps compiling).
#if defined(__x86_64__) && !defined(FASTOPT_PORTABLE_CPU)
#define FASTOPT_X86_SIMD 1
#define FASTOPT_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTOPT_X86_SIMD 0
#define FASTOPT_CPU_CLONES
#endif

namespace fastopt::cpu {

// at::parallel_for through the stable ABI: f(lo, hi) runs on libtorch's own thread pool.
using torch::stable::parallel_for;

// Elements per unit of parallel work. Fixed (not derived from the thread count) so reductions
// combine the same partial sums in the same order on any machine. 64 Ki fp32 elements is 256 KB
// per tensor stream: big enough to amortise scheduling, small enough to balance hundreds of
// small tensors beside a large one across cores.
constexpr int64_t kChunk = 1 << 16;

// Elements per task of the thread pool, at least, in every op (AdamW, the norm, accumulation):
// a call with fewer runs on the calling thread alone. A split waits at the pool's barrier for a
// thread that may not be running, a scheduler time slice (milliseconds) when another process
// is busy on the other core: on the 2-core Xeon of bench/RESULTS.md, with other processes
// busy, 64 tensors of 64 Ki elements in all took 0.36 ms inline and 10.7 ms split, 128 Ki 0.55
// and 2.3 ms; split paid from 512 Ki (2.1 ms inline). 256 Ki elements are about 1 ms of work on
// one core.
constexpr int64_t kInlineElements = 1 << 18;

struct Chunk {
  int64_t tensor;  // index into the tensor lists
  int64_t begin;   // element range [begin, end) within that tensor
  int64_t end;
};

inline int64_t total_elements(const std::vector<TensorInfo>& list) {
  int64_t n = 0;
  for (const auto& t : list) n += t.numel;
  return n;
}

// The parallel_for grain of `n_chunks` chunks holding `elements` elements in all: each task
// gets at least kInlineElements on average, so a call with fewer runs inline. The chunks, and
// so a reduction's partial sums and their order, do not depend on the grain.
inline int64_t grain_for(int64_t n_chunks, int64_t elements) {
  return std::max<int64_t>(1, n_chunks * kInlineElements / std::max<int64_t>(elements, 1));
}

// Splits every non-empty tensor of `list` into kChunk-sized pieces, in list order.
// Into `chunks`, replacing what it held.
inline void make_chunks(const std::vector<TensorInfo>& list, std::vector<Chunk>& chunks) {
  chunks.clear();
  for (int64_t t = 0; t < static_cast<int64_t>(list.size()); ++t) {
    const int64_t n = list[t].numel;
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
}

inline std::vector<Chunk> make_chunks(const std::vector<TensorInfo>& list) {
  std::vector<Chunk> chunks;
  make_chunks(list, chunks);
  return chunks;
}

// Conversions the compiler can inline and vectorise: the BFloat16/Half constructors do the
// same bit manipulation, but this keeps the hot loops free of class wrappers.
// bf16 as bit operations on the fp32 word (round to nearest even, NaN to the canonical NaN:
// the same bits as BFloat16(x)), which GCC if-converts and vectorises; with the class's
// conversion the loops kept a branch and ran scalar (5x slower with bf16 moments).
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const BFloat16* p, int64_t i) {
  return bits_f32(static_cast<uint32_t>(p[i].x) << 16);
}
inline float load(const Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline void store(float* p, int64_t i, float x) { p[i] = x; }
inline void store(BFloat16* p, int64_t i, float x) {
  const uint32_t b = f32_bits(x);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  p[i].x = x != x ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}
inline void store(Half* p, int64_t i, float x) { p[i] = Half(x); }

// A store of the fp32 result x into element i: stochastically rounded into bf16 with 16 bits
// of noise when kSR, else rounded to nearest.
template <bool kSR, typename T>
inline void store_rounded(T* p, int64_t i, float x, uint32_t noise16) {
  if constexpr (kSR && std::is_same_v<T, BFloat16>) {
    p[i].x = bf16_stochastic(x, noise16);
  } else {
    store(p, i, x);
  }
}

// Element j of a param from its new fp32 value x: the bf16 param and its remainder, the fp16
// param and its fp32 copy, or the param alone (rounded stochastically by noise16 when kSR).
template <Master kMaster, bool kSR, typename P, typename M>
FASTOPT_INLINE void store_param(P* __restrict__ pb, M* __restrict__ mb, int64_t j, float x,
                                uint32_t noise16) {
  if constexpr (kMaster == Master::kRemainder) {
    uint16_t bits;
    split_master(x, bits, mb[j]);
    pb[j].x = bits;
  } else if constexpr (kMaster == Master::kCopy) {
    mb[j] = x;
    store(pb, j, x);
  } else {
    store_rounded<kSR>(pb, j, x, noise16);
  }
}

// Element i's stores of its updated p, m, v (and vmax), with its two noise words: word 1
// rounds the param (high half) and exp_avg (low), word 2 exp_avg_sq (high) and max_exp_avg_sq
// (low). The SIMD paths' scalar code for rare groups and tails.
template <Master kM, bool kSR, bool kAmsgrad, typename P, typename M, typename S>
FASTOPT_INLINE void store_element(P* param, M* master, S* exp_avg, S* exp_avg_sq,
                                  S* max_exp_avg_sq, int64_t i, float p, float m, float v,
                                  float vm, uint32_t w1, uint32_t w2) {
  store_param<kM, kSR>(param, master, i, p, w1 >> 16);
  store_rounded<kSR>(exp_avg, i, m, w1 & 0xFFFFu);
  store_rounded<kSR>(exp_avg_sq, i, v, w2 >> 16);
  if constexpr (kAmsgrad) store_rounded<kSR>(max_exp_avg_sq, i, vm, w2 & 0xFFFFu);
}

}  // namespace fastopt::cpu
