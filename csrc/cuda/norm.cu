// Multi-tensor global norm with a non-finite flag, and the loss-scale update, on CUDA.
//
// The norm is deterministic: each chunk's partial (sum of |x|^p, or max |x|) is reduced by one
// block in a fixed order and written to its own slot of a buffer; a second, single-block kernel
// combines the slots in a fixed order (in double) and writes the norm and the flag. No atomics,
// so the result does not depend on the grid size or on scheduling, and no host sync.
#include <math_constants.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <cmath>
#include <tuple>

#include "../adamw_math.h"
#include "../reduce_inputs.h"
#include "multi_tensor.cuh"

namespace fastopt::cuda {
namespace {

using NormMeta = TensorListMeta<1, /*kWithStep=*/false>;
static_assert(sizeof(NormMeta) + 3 * sizeof(int64_t) <= kMaxKernelParamBytes);

// Per-chunk partial of one tensor of storage type T. Each thread keeps kUnroll * kVec
// independent fp32 accumulators (element e of the chunk always lands in the same one), so a
// chunk sums 8 terms per accumulator before the fixed-order combine: no long serial chains.
template <typename T, NormKind kKind>
struct NormOp {
  static constexpr int kVec = vector_elems<T, T>();
  static constexpr int kUnroll = unroll_for(kVec, 2);  // data plus as many accumulators

  struct Frag {
    float x[kVec];
  };

  const T* __restrict__ x;
  float p;
  float acc[kUnroll][kVec];
  bool nonfinite;

  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[u][j] = 0.f;
    }
    nonfinite = false;
  }
  template <bool kAligned>
  __device__ __forceinline__ void load(int e, Frag& f) const {
    load_n<kVec, kAligned>(x + e, f.x);
  }
  __device__ __forceinline__ void load_partial(int e, int count, Frag& f) const {
    load_n_partial<kVec>(x + e, count, f.x);  // zeros beyond: they add nothing, max nothing
  }
  __device__ __forceinline__ void compute(Frag& f, int u) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      // An explicit test, not overflow of the sum: 3e38 is finite though its square is not.
      nonfinite = nonfinite || !isfinite(f.x[j]);
      const float a = fabsf(f.x[j]);
      float& s = acc[u][j];
      if constexpr (kKind == NormKind::kL2) s = s + a * a;
      if constexpr (kKind == NormKind::kL1) s = s + a;
      if constexpr (kKind == NormKind::kInf) s = a > s ? a : s;  // NaN never wins; see below
      if constexpr (kKind == NormKind::kP) s = s + powf(a, p);
    }
  }
  template <bool kAligned>
  __device__ __forceinline__ void store(int, const Frag&) const {}
  __device__ __forceinline__ void store_partial(int, int, const Frag&) const {}

  static __device__ __forceinline__ float combine(float a, float b) {
    if constexpr (kKind == NormKind::kInf) return b > a ? b : a;
    return a + b;
  }
  __device__ __forceinline__ float thread_value() const {
    float v = acc[0][0];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        if (u != 0 || j != 0) v = combine(v, acc[u][j]);
      }
    }
    return v;
  }
};

// Fixed-order block reduction (shuffle tree in each warp, then warp 0 over the warp results);
// the result is valid in thread 0. `scratch` holds kBlockThreads / 32 values and may be reused
// once every thread has passed a barrier after this call.
template <typename V, typename Combine>
__device__ __forceinline__ V block_reduce(V v, V* scratch, Combine combine) {
  constexpr int kWarps = kBlockThreads / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v = combine(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? scratch[lane] : scratch[0];
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset >>= 1) {
      const V other = __shfl_down_sync(0xffffffffu, v, offset);
      v = combine(v, other);
    }
  }
  return v;
}

// One partial per chunk: partials[first_chunk + c] is the chunk's value and
// partials[total_chunks + first_chunk + c] its non-finite flag (0 or 1).
template <typename T, NormKind kKind>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    norm_chunk_kernel(const NormMeta meta, float* __restrict__ partials, int64_t total_chunks,
                      int64_t first_chunk, float p) {
  __shared__ float scratch[kBlockThreads / 32];
  using Op = NormOp<T, kKind>;
  for (int64_t chunk = blockIdx.x; chunk < meta.num_chunks; chunk += gridDim.x) {
    const int t = find_tensor(meta, chunk);
    const int64_t begin = (chunk - chunk_start(meta, t)) * kChunk;
    const int len = static_cast<int>(std::min<int64_t>(kChunk, meta.numel[t] - begin));
    Op op;
    op.x = static_cast<const T*>(meta.ptr[0][t]) + begin;
    op.p = p;
    op.reset();
    process_chunk<Op::kVec, Op::kUnroll>(op, len, aligned16(meta.ptr[0][t]));
    const float v = block_reduce(op.thread_value(), scratch, Op::combine);
    // Also the barrier after which `scratch` may be rewritten by the next chunk.
    const bool nonfinite = __syncthreads_or(op.nonfinite);
    if (threadIdx.x == 0) {
      partials[first_chunk + chunk] = v;
      partials[total_chunks + first_chunk + chunk] = nonfinite ? 1.f : 0.f;
    }
  }
}

constexpr int kFinalThreads = 512;

// Combines the partials in double, in an order fixed by kFinalThreads alone, and writes the
// norm and the flag. An empty list (num_partials == 0) gives 0 and 0.
__global__ void __launch_bounds__(kFinalThreads)
    norm_finalize_kernel(const float* __restrict__ partials, int64_t num_partials, int kind_int,
                         double norm_type, float* __restrict__ norm_out,
                         float* __restrict__ found_inf_out) {
  const NormKind kind = static_cast<NormKind>(kind_int);
  const bool is_max = kind == NormKind::kInf;
  double acc = 0.0;
  bool nonfinite = false;
  for (int64_t i = threadIdx.x; i < num_partials; i += kFinalThreads) {
    const double v = partials[i];
    acc = is_max ? (v > acc ? v : acc) : acc + v;
    nonfinite = nonfinite || partials[num_partials + i] != 0.f;
  }
  // Fixed-order tree: shuffles within each warp, then warp 0 over the 16 warp results.
  __shared__ double scratch[kFinalThreads / 32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const double other = __shfl_down_sync(0xffffffffu, acc, offset);
    acc = is_max ? (other > acc ? other : acc) : acc + other;
  }
  if (lane == 0) scratch[warp] = acc;
  nonfinite = __syncthreads_or(nonfinite);
  if (threadIdx.x != 0) return;
  double total = scratch[0];
  for (int w = 1; w < kFinalThreads / 32; ++w) {
    total = is_max ? (scratch[w] > total ? scratch[w] : total) : total + scratch[w];
  }
  double norm = total;
  if (kind == NormKind::kL2) norm = sqrt(total);
  if (kind == NormKind::kP) norm = pow(total, 1.0 / norm_type);
  // A NaN never wins a max, so the inf-norm of data holding NaN would come out finite: make it
  // NaN, as torch's is. The other norms carry NaN and inf through their sums by themselves.
  if (kind == NormKind::kInf && nonfinite && !isinf(norm)) norm = CUDART_NAN;
  *norm_out = static_cast<float>(norm);
  *found_inf_out = nonfinite ? 1.f : 0.f;
}

template <typename T, NormKind kKind>
void launch_norm_chunks(InfoList tensors, const std::vector<int64_t>& indices, float* partials,
                        int64_t total_chunks, int64_t group_first_chunk, float p,
                        cudaStream_t stream, int device) {
  constexpr auto kernel = norm_chunk_kernel<T, kKind>;
  multi_tensor_apply<1, false>(
      {tensors}, {}, indices, [&](const NormMeta& meta, int64_t first_chunk) {
        const int grid = persistent_grid<kernel>(meta.num_chunks, device);
        kernel<<<grid, kBlockThreads, 0, stream>>>(meta, partials, total_chunks,
                                                   group_first_chunk + first_chunk, p);
        STD_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

// Each chunk's partial of `tensors` (and its flag) into slots first + k of `out` (which holds
// `total` partials, then their flags), k counting chunks dtype group by dtype group (fp32,
// bf16, fp16), list order within each. A chunk's partial depends on its elements alone.
void write_partials(const std::vector<TensorInfo>& tensors, NormKind kind, float p, float* out,
                    int64_t total, int64_t first, cudaStream_t stream, int device) {
  const auto groups = group_by_dtype(tensors);
  int64_t group_first_chunk = first;
  for (const auto& indices : groups) {
    if (indices.empty()) continue;
    dispatch_float(tensors[indices[0]].dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      switch (kind) {
        case NormKind::kL2:
          launch_norm_chunks<T, NormKind::kL2>(tensors, indices, out, total, group_first_chunk, p,
                                               stream, device);
          break;
        case NormKind::kL1:
          launch_norm_chunks<T, NormKind::kL1>(tensors, indices, out, total, group_first_chunk, p,
                                               stream, device);
          break;
        case NormKind::kInf:
          launch_norm_chunks<T, NormKind::kInf>(tensors, indices, out, total, group_first_chunk,
                                                p, stream, device);
          break;
        case NormKind::kP:
          launch_norm_chunks<T, NormKind::kP>(tensors, indices, out, total, group_first_chunk, p,
                                              stream, device);
          break;
      }
    });
    for (const int64_t i : indices) group_first_chunk += (tensors[i].numel + kChunk - 1) / kChunk;
  }
}

// The norm and the flag from `total` partials (then their flags) at `partials`.
std::tuple<Tensor, Tensor> combine_partials(const float* partials, int64_t total, NormKind kind,
                                            double norm_type, const Device& device,
                                            cudaStream_t stream) {
  Tensor norm = torch::stable::empty({}, ScalarType::Float, std::nullopt, device);
  Tensor found_inf = torch::stable::empty({}, ScalarType::Float, std::nullopt, device);
  norm_finalize_kernel<<<1, kFinalThreads, 0, stream>>>(partials, total, static_cast<int>(kind),
                                                        norm_type, norm.mutable_data_ptr<float>(),
                                                        found_inf.mutable_data_ptr<float>());
  STD_CUDA_KERNEL_LAUNCH_CHECK();
  return {norm, found_inf};
}

std::tuple<Tensor, Tensor> multi_tensor_norm_cuda(const TensorList& list, double norm_type) {
  if (list.empty()) {  // as the reference: (0, 0) on the CPU
    Tensor zero = torch::stable::empty({}, ScalarType::Float);
    torch::stable::zero_(zero);
    return {zero, torch::stable::clone(zero)};
  }
  const std::vector<TensorInfo> tensors = infos(list, Access::kRead);
  check_device_type("multi_tensor_norm", "tensors[0]", tensors[0], DeviceType::CUDA);
  const Device device = tensors[0].device;
  const NormKind kind = check_norm_inputs(tensors, device, norm_type);

  const torch::stable::accelerator::DeviceGuard guard(device.index());
  const cudaStream_t stream = current_stream(device.index());
  const int64_t total = count_chunks(tensors);
  Tensor partials = torch::stable::empty({2 * total}, ScalarType::Float, std::nullopt, device);
  float* out = partials.mutable_data_ptr<float>();
  write_partials(tensors, kind, static_cast<float>(norm_type), out, total, 0, stream,
                 device.index());
  return combine_partials(out, total, kind, norm_type, device, stream);
}

// multi_tensor_norm in two halves (csrc/ops.cpp): the tensors' chunk partials into the
// caller's fp32 `partials` from chunk `first` on, on the current stream; norm_combine then
// reads all of them.
void norm_partials_cuda(const Tensor& partials, const TensorList& list, int64_t first,
                        double norm_type) {
  const PartialsInputs in = check_partials_inputs(partials, list, first, norm_type,
                                                  DeviceType::CUDA, ScalarType::Float, kChunk);
  if (in.tensors.empty()) return;
  const int device = in.slots.device.index();
  const torch::stable::accelerator::DeviceGuard guard(device);
  write_partials(in.tensors, in.kind, static_cast<float>(norm_type),
                 static_cast<float*>(in.slots.data), in.total, first, current_stream(device),
                 device);
}

std::tuple<Tensor, Tensor> norm_combine_cuda(const Tensor& partials, double norm_type) {
  const PartialsInputs in =
      check_combine_inputs(partials, norm_type, DeviceType::CUDA, ScalarType::Float);
  const torch::stable::accelerator::DeviceGuard guard(in.slots.device.index());
  return combine_partials(static_cast<const float*>(in.slots.data), in.total, in.kind, norm_type,
                          in.slots.device, current_stream(in.slots.device.index()));
}

// ---------------------------------------------------------------------------------------------
// Loss-scale update: one thread runs fastopt::update_scale, the CPU kernel's rule.

__global__ void update_scale_kernel(float* scale, int32_t* growth_tracker,
                                    const float* found_inf, float growth_factor,
                                    float backoff_factor, int64_t growth_interval) {
  update_scale(scale, growth_tracker, *found_inf, growth_factor, backoff_factor,
               growth_interval);
}

void update_scale_cuda(const Tensor& scale, const Tensor& growth_tracker, const Tensor& found_inf,
                       double growth_factor, double backoff_factor, int64_t growth_interval) {
  const TensorInfo s(scale, Access::kWrite), tracker(growth_tracker, Access::kWrite),
      inf(found_inf, Access::kRead);
  check_update_scale_inputs(s, tracker, inf, DeviceType::CUDA);
  const torch::stable::accelerator::DeviceGuard guard(s.device.index());
  const cudaStream_t stream = current_stream(s.device.index());
  update_scale_kernel<<<1, 1, 0, stream>>>(
      static_cast<float*>(s.data), static_cast<int32_t*>(tracker.data),
      static_cast<const float*>(inf.data), static_cast<float>(growth_factor),
      static_cast<float>(backoff_factor), growth_interval);
  STD_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace fastopt::cuda

STABLE_TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("multi_tensor_norm", TORCH_BOX(&fastopt::cuda::multi_tensor_norm_cuda));
  m.impl("norm_partials_", TORCH_BOX(&fastopt::cuda::norm_partials_cuda));
  m.impl("norm_combine", TORCH_BOX(&fastopt::cuda::norm_combine_cuda));
  m.impl("update_scale_", TORCH_BOX(&fastopt::cuda::update_scale_cuda));
}
