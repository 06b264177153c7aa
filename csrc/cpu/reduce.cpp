// Multi-tensor global norm with a non-finite flag, fp32 gradient accumulation and the
// loss-scale update, on the CPU.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>

#include "../adamw_math.h"
#include "../reduce_inputs.h"
#include "cpu_common.h"

namespace fastopt::cpu {
namespace {

struct Partial {
  double value;  // sum of |x|^p (or max |x| for the inf-norm) over the chunk
  bool nonfinite;
};

// Sixteen independent partial sums in GCC's portable vector type: one zmm register in the
// AVX-512 clone, two ymm in the AVX2 one. GCC's auto-vectoriser did this reduction badly
// (transposed, through the stack: 10 GB/s on one core against torch's 36), and a fixed lane
// count keeps the summation order the same on every instruction set.
//
// Every helper taking or returning these vectors is always inlined: the target clones pass
// them in zmm, ymm or xmm registers or in memory, so an out-of-line helper (compiled for the
// default target) called from the AVX-512 clone reads its arguments from the wrong place
// (seen: GCC outlined the p-norm's term once the loop had several call sites, and fp16
// p-norms then wrote garbage over the stack). That is the ABI change -Wno-psabi silences.
constexpr int kLanes = 16;
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

[[gnu::always_inline]] inline f32x16 load16(const float* x, int64_t i) {
  f32x16 v;
  std::memcpy(&v, x + i, sizeof(v));
  return v;
}
[[gnu::always_inline]] inline f32x16 load16(const BFloat16* x, int64_t i) {
  u16x16 raw;  // a bf16 is the top half of an fp32
  std::memcpy(&raw, x + i, sizeof(raw));
  return reinterpret_cast<f32x16>(__builtin_convertvector(raw, u32x16) << 16);
}
[[gnu::always_inline]] inline f32x16 load16(const Half* x, int64_t i) {
  f32x16 v;
  for (int l = 0; l < kLanes; ++l) v[l] = static_cast<float>(x[i + l]);
  return v;
}

template <NormKind kKind>
[[gnu::always_inline]] inline f32x16 norm_term(f32x16 acc, f32x16 a, float p) {
  if constexpr (kKind == NormKind::kL2) return acc + a * a;
  if constexpr (kKind == NormKind::kL1) return acc + a;
  if constexpr (kKind == NormKind::kInf) return a > acc ? a : acc;
  for (int l = 0; l < kLanes; ++l) acc[l] += std::pow(a[l], p);
  return acc;
}

// A chunk is read as kStreams interleaved sub-ranges, each with its own accumulator: one
// core's read bandwidth is bound by how many cache-line misses it keeps in flight, and the
// prefetchers follow several streams at once. Measured single-threaded on this CPU's 2-core
// AVX-512 VM, summing 30.5M fp32 in 64 Ki-element chunks: 9-11 GB/s with one stream,
// 13-15 GB/s with 2, 14-15 GB/s with 4 (8 gains nothing more). The split depends only on
// the chunk, so the summation order is still the same on any machine.
constexpr int kStreams = 4;

template <NormKind kKind, typename T>
FASTOPT_CPU_CLONES
Partial norm_chunk(const T* __restrict__ x, int64_t begin, int64_t end, float p) {
  f32x16 acc[kStreams] = {};
  // x * 0 is 0 for finite x and NaN for inf or NaN: a branch-free non-finite check that a
  // huge but finite x (whose square overflows) does not trip.
  f32x16 check = {};
  const u32x16 abs_mask = u32x16{} + 0x7fffffffu;
  auto abs16 = [&](int64_t i) {
    return reinterpret_cast<f32x16>(reinterpret_cast<u32x16>(load16(x, i)) & abs_mask);
  };
  // The streams' length: a whole number of vectors each; what is left goes to stream 0.
  const int64_t stride = (end - begin) / (kStreams * kLanes) * kLanes;
  for (int64_t i = begin; i < begin + stride; i += kLanes) {
#pragma GCC unroll 4
    for (int s = 0; s < kStreams; ++s) {
      const f32x16 a = abs16(i + s * stride);
      check += a * 0.f;
      acc[s] = norm_term<kKind>(acc[s], a, p);
    }
  }
  int64_t i = begin + kStreams * stride;
  for (; i + kLanes <= end; i += kLanes) {
    const f32x16 a = abs16(i);
    check += a * 0.f;
    acc[0] = norm_term<kKind>(acc[0], a, p);
  }
  if (i < end) {  // the tail, one element per lane, the other lanes fed zeros
    f32x16 a = {};
    for (int l = 0; i + l < end; ++l) a[l] = std::fabs(static_cast<float>(x[i + l]));
    check += a * 0.f;
    acc[0] = norm_term<kKind>(acc[0], a, p);
  }
  Partial out{0.0, false};
  for (int s = 0; s < kStreams; ++s) {
    for (int l = 0; l < kLanes; ++l) {
      const double v = acc[s][l];
      out.value = kKind == NormKind::kInf ? std::max(out.value, v) : out.value + v;
    }
  }
  for (int l = 0; l < kLanes; ++l) out.nonfinite = out.nonfinite || std::isnan(check[l]);
  return out;
}

template <NormKind kKind>
Partial norm_chunk_any(const TensorInfo& t, const Chunk& ch, float p) {
  return dispatch_float(t.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return norm_chunk<kKind>(static_cast<const T*>(t.data), ch.begin, ch.end, p);
  });
}

// Each chunk's partial of `tensors` into values[k] and its non-finite flag (0 or 1) into
// flags[k], k counting the chunks of all tensors in list order from 0. A chunk's partial
// depends on its elements alone, so a tensor's partials are the same bits whether it is
// measured with others or alone (norm_partials_ relies on it).
void write_partials(const std::vector<TensorInfo>& tensors, NormKind kind, float p,
                    double* values, double* flags) {
  const std::vector<Chunk> chunks = make_chunks(tensors);
  const auto n_chunks = static_cast<int64_t>(chunks.size());
  const int64_t grain = grain_for(n_chunks, total_elements(tensors));
  parallel_for(0, n_chunks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const auto& t = tensors[chunks[k].tensor];
      Partial part{};
      switch (kind) {
        case NormKind::kL2: part = norm_chunk_any<NormKind::kL2>(t, chunks[k], p); break;
        case NormKind::kL1: part = norm_chunk_any<NormKind::kL1>(t, chunks[k], p); break;
        case NormKind::kInf: part = norm_chunk_any<NormKind::kInf>(t, chunks[k], p); break;
        case NormKind::kP: part = norm_chunk_any<NormKind::kP>(t, chunks[k], p); break;
      }
      values[k] = part.value;
      flags[k] = part.nonfinite ? 1.0 : 0.0;
    }
  });
}

// The norm and the flag from n chunks' partials, combined in chunk order: the result does not
// depend on the thread count.
std::tuple<Tensor, Tensor> combine_partials(NormKind kind, double norm_type, const double* values,
                                            const double* flags, int64_t n) {
  double total = 0.0;
  bool nonfinite = false;
  for (int64_t k = 0; k < n; ++k) {
    total = kind == NormKind::kInf ? std::max(total, values[k]) : total + values[k];
    nonfinite = nonfinite || flags[k] != 0.0;
  }
  double norm = total;
  if (kind == NormKind::kL2) norm = std::sqrt(total);
  if (kind == NormKind::kP) norm = std::pow(total, 1.0 / norm_type);
  // A NaN never wins a max, so the inf-norm of data with NaN would come out finite: make it NaN
  // as torch's does. For the other norms NaN and inf propagate through the sums by themselves.
  if (kind == NormKind::kInf && nonfinite && !std::isinf(norm)) {
    norm = std::numeric_limits<double>::quiet_NaN();
  }
  Tensor norm_t = torch::stable::empty({}, ScalarType::Float);
  Tensor inf_t = torch::stable::empty({}, ScalarType::Float);
  *norm_t.mutable_data_ptr<float>() = static_cast<float>(norm);
  *inf_t.mutable_data_ptr<float>() = nonfinite ? 1.f : 0.f;
  return {norm_t, inf_t};
}

int64_t chunk_count(const std::vector<TensorInfo>& tensors) {
  int64_t n = 0;
  for (const auto& t : tensors) n += (t.numel + kChunk - 1) / kChunk;
  return n;
}

std::tuple<Tensor, Tensor> multi_tensor_norm_cpu(const TensorList& list, double norm_type) {
  const std::vector<TensorInfo> tensors = infos(list, Access::kRead);
  const NormKind kind = check_norm_inputs(tensors, Device(DeviceType::CPU), norm_type);
  const int64_t n = chunk_count(tensors);
  std::vector<double> slots(static_cast<size_t>(2 * n));
  write_partials(tensors, kind, static_cast<float>(norm_type), slots.data(), slots.data() + n);
  return combine_partials(kind, norm_type, slots.data(), slots.data() + n, n);
}

// multi_tensor_norm in two halves, for partials measured as each gradient is ready: the
// tensors' chunk partials into `partials` (float64, the partials of `total` chunks then their
// flags) from chunk `first` on; norm_combine then reads all of them.
void norm_partials_cpu(const Tensor& partials, const TensorList& list, int64_t first,
                       double norm_type) {
  const PartialsInputs in = check_partials_inputs(partials, list, first, norm_type,
                                                  DeviceType::CPU, ScalarType::Double, kChunk);
  double* values = static_cast<double*>(in.slots.data);
  write_partials(in.tensors, in.kind, static_cast<float>(norm_type), values + first,
                 values + in.total + first);
}

std::tuple<Tensor, Tensor> norm_combine_cpu(const Tensor& partials, double norm_type) {
  const PartialsInputs in =
      check_combine_inputs(partials, norm_type, DeviceType::CPU, ScalarType::Double);
  const double* values = static_cast<const double*>(in.slots.data);
  return combine_partials(in.kind, norm_type, values, values + in.total, in.total);
}

template <typename G>
FASTOPT_CPU_CLONES
void accumulate_chunk(float* __restrict__ acc, const G* __restrict__ grad, int64_t begin,
                      int64_t end, float alpha, bool overwrite) {
  if (overwrite) {
    for (int64_t i = begin; i < end; ++i) acc[i] = alpha * load(grad, i);
  } else {
    for (int64_t i = begin; i < end; ++i) acc[i] += alpha * load(grad, i);
  }
}

void accumulate_cpu(const TensorList& acc_list, const TensorList& grad_list, double alpha,
                    bool overwrite) {
  const AccumulateInputs in = check_accumulate_inputs(acc_list, grad_list, DeviceType::CPU);
  const std::vector<TensorInfo>& accs = in.accs;
  const std::vector<TensorInfo>& grads = in.grads;
  const std::vector<Chunk> chunks = make_chunks(accs);
  const float a = static_cast<float>(alpha);
  const auto n_chunks = static_cast<int64_t>(chunks.size());
  const int64_t grain = grain_for(n_chunks, total_elements(accs));
  parallel_for(0, n_chunks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Chunk& ch = chunks[k];
      float* acc = static_cast<float*>(accs[ch.tensor].data);
      const auto& g = grads[ch.tensor];
      dispatch_float(g.dtype, [&](auto tag) {
        using G = typename decltype(tag)::type;
        accumulate_chunk(acc, static_cast<const G*>(g.data), ch.begin, ch.end, a, overwrite);
      });
    }
  });
}

void update_scale_cpu(const Tensor& scale, const Tensor& growth_tracker, const Tensor& found_inf,
                      double growth_factor, double backoff_factor, int64_t growth_interval) {
  const TensorInfo s(scale, Access::kWrite), tracker(growth_tracker, Access::kWrite),
      inf(found_inf, Access::kRead);
  check_update_scale_inputs(s, tracker, inf, DeviceType::CPU);
  update_scale(static_cast<float*>(s.data), static_cast<int32_t*>(tracker.data),
               *static_cast<const float*>(inf.data), static_cast<float>(growth_factor),
               static_cast<float>(backoff_factor), growth_interval);
}

}  // namespace
}  // namespace fastopt::cpu

STABLE_TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("multi_tensor_norm", TORCH_BOX(&fastopt::cpu::multi_tensor_norm_cpu));
  m.impl("norm_partials_", TORCH_BOX(&fastopt::cpu::norm_partials_cpu));
  m.impl("norm_combine", TORCH_BOX(&fastopt::cpu::norm_combine_cpu));
  m.impl("accumulate_", TORCH_BOX(&fastopt::cpu::accumulate_cpu));
  m.impl("update_scale_", TORCH_BOX(&fastopt::cpu::update_scale_cpu));
}
