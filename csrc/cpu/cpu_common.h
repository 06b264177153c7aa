// Shared pieces of the CPU kernels: how work is split into chunks, and scalar loads/stores of
// the storage dtypes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

namespace fastopt::cpu {

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
inline std::vector<Chunk> make_chunks(at::TensorList list) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(list.size()); ++t) {
    const int64_t n = list[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

// Conversions the compiler can inline and vectorise: c10's BFloat16/Half constructors do the
// same bit manipulation, but this keeps the hot loops free of class wrappers.
inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const c10::BFloat16* p, int64_t i) { return static_cast<float>(p[i]); }
inline float load(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline void store(float* p, int64_t i, float x) { p[i] = x; }
inline void store(c10::BFloat16* p, int64_t i, float x) { p[i] = c10::BFloat16(x); }
inline void store(c10::Half* p, int64_t i, float x) { p[i] = c10::Half(x); }

// Reads an optional fp32 0-dim tensor as a pointer (nullptr when absent).
inline const float* optional_scalar(const std::optional<at::Tensor>& t, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat,
              "fastopt: ", name, " must be a one-element float32 tensor, got ", t->sizes(),
              " of ", t->scalar_type());
  TORCH_CHECK(t->device().is_cpu(), "fastopt: ", name, " must be on the CPU for CPU params");
  return t->data_ptr<float>();
}

}  // namespace fastopt::cpu
