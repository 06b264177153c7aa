// Shared pieces of the CPU kernels: how work is split into chunks, and scalar loads/stores of
// the storage dtypes.
#pragma once

#include <torch/csrc/stable/ops.h>

#include <cstdint>
#include <vector>

#include "../adamw_math.h"
#include "../inputs.h"

// Helpers of the target_clones kernels: GCC inlines a callee into each clone (compiled for that
// clone's instruction set) only when told to; left to itself it called the 8-bit codes' block
// loops out of line, built for the baseline x86-64, at a quarter of the AVX-512 width.
#define FASTOPT_INLINE inline __attribute__((always_inline))

namespace fastopt::cpu {

// at::parallel_for through the stable ABI: f(lo, hi) runs on libtorch's own thread pool.
using torch::stable::parallel_for;

// Elements per unit of parallel work. Fixed (not derived from the thread count) so reductions
// combine the same partial sums in the same order on any machine. 64 Ki fp32 elements is 256 KB
// per tensor stream: big enough to amortise scheduling, small enough to balance hundreds of
// small tensors beside a large one across cores.
constexpr int64_t kChunk = 1 << 16;

struct Chunk {
  int64_t tensor;  // index into the tensor lists
  int64_t begin;   // element range [begin, end) within that tensor
  int64_t end;
};

// Splits every non-empty tensor of `list` into kChunk-sized pieces, in list order.
inline std::vector<Chunk> make_chunks(const std::vector<TensorInfo>& list) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(list.size()); ++t) {
    const int64_t n = list[t].numel;
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
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

}  // namespace fastopt::cpu
