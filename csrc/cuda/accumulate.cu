// fp32 gradient accumulation on CUDA: acc = alpha * grad (the first micro-batch) or
// acc += alpha * grad, for many tensors per launch.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>

#include "../reduce_inputs.h"
#include "multi_tensor.cuh"

namespace fastopt::cuda {
namespace {

using AccumulateMeta = TensorListMeta<2, /*kWithStep=*/false>;
static_assert(sizeof(AccumulateMeta) + sizeof(float) <= kMaxKernelParamBytes);

// G is the grads' storage type; accumulators are fp32.
template <typename G, bool kOverwrite>
struct AccumulateOp {
  static constexpr int kVec = vector_elems<float, G>();
  static constexpr int kUnroll = unroll_for(kVec, 2);

  struct Frag {
    float acc[kVec], g[kVec];
  };

  float* __restrict__ acc;
  const G* __restrict__ grad;
  float alpha;

  template <bool kAligned>
  __device__ __forceinline__ void load(int e, Frag& f) const {
    if constexpr (!kOverwrite) load_n<kVec, kAligned>(acc + e, f.acc);
    load_n<kVec, kAligned>(grad + e, f.g);
  }
  __device__ __forceinline__ void load_partial(int e, int count, Frag& f) const {
    if constexpr (!kOverwrite) load_n_partial<kVec>(acc + e, count, f.acc);
    load_n_partial<kVec>(grad + e, count, f.g);
  }
  __device__ __forceinline__ void compute(Frag& f, int /*u*/) const {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      // Rounded multiply, then rounded add (no fused multiply-add): the reference's
      // grad.float() * alpha followed by acc.add_, bit for bit.
      const float scaled = __fmul_rn(f.g[j], alpha);
      f.acc[j] = kOverwrite ? scaled : __fadd_rn(f.acc[j], scaled);
    }
  }
  template <bool kAligned>
  __device__ __forceinline__ void store(int e, const Frag& f) const {
    store_n<kVec, kAligned>(acc + e, f.acc);
  }
  __device__ __forceinline__ void store_partial(int e, int count, const Frag& f) const {
    store_n_partial<kVec>(acc + e, count, f.acc);
  }
};

template <typename G, bool kOverwrite>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    accumulate_kernel(const AccumulateMeta meta, float alpha) {
  using Op = AccumulateOp<G, kOverwrite>;
  for (int64_t chunk = blockIdx.x; chunk < meta.num_chunks; chunk += gridDim.x) {
    const int t = find_tensor(meta, chunk);
    const int64_t begin = (chunk - chunk_start(meta, t)) * kChunk;
    const int len = static_cast<int>(std::min<int64_t>(kChunk, meta.numel[t] - begin));
    Op op;
    op.acc = static_cast<float*>(meta.ptr[0][t]) + begin;
    op.grad = static_cast<const G*>(meta.ptr[1][t]) + begin;
    op.alpha = alpha;
    process_chunk<Op::kVec, Op::kUnroll>(op, len,
                                         aligned16(meta.ptr[0][t]) && aligned16(meta.ptr[1][t]));
  }
}

template <typename G, bool kOverwrite>
void launch_accumulate(InfoList accs, InfoList grads, const std::vector<int64_t>& indices,
                       float alpha, cudaStream_t stream, int device) {
  constexpr auto kernel = accumulate_kernel<G, kOverwrite>;
  multi_tensor_apply<2, false>({accs, grads}, {}, indices,
                               [&](const AccumulateMeta& meta, int64_t /*first_chunk*/) {
                                 const int grid = persistent_grid<kernel>(meta.num_chunks, device);
                                 kernel<<<grid, kBlockThreads, 0, stream>>>(meta, alpha);
                                 STD_CUDA_KERNEL_LAUNCH_CHECK();
                               });
}

void accumulate_cuda(const TensorList& acc_list, const TensorList& grad_list, double alpha,
                     bool overwrite) {
  const AccumulateInputs in = check_accumulate_inputs(acc_list, grad_list, DeviceType::CUDA);
  if (in.accs.empty()) return;
  const std::vector<TensorInfo>& accs = in.accs;
  const std::vector<TensorInfo>& grads = in.grads;
  const Device device = accs[0].device;

  const torch::stable::accelerator::DeviceGuard guard(device.index());
  const cudaStream_t stream = current_stream(device.index());
  const float a = static_cast<float>(alpha);
  for (const auto& indices : group_by_dtype(grads)) {
    if (indices.empty()) continue;
    dispatch_float(grads[indices[0]].dtype, [&](auto tag) {
      using G = typename decltype(tag)::type;
      if (overwrite) {
        launch_accumulate<G, true>(accs, grads, indices, a, stream, device.index());
      } else {
        launch_accumulate<G, false>(accs, grads, indices, a, stream, device.index());
      }
    });
  }
}

}  // namespace
}  // namespace fastopt::cuda

STABLE_TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("accumulate_", TORCH_BOX(&fastopt::cuda::accumulate_cuda));
}
