// AdamW on CUDA: every tensor of a param group in a few multi-tensor launches, with
// unscaling, clipping, the accumulation factor and the skip on non-finite gradients all
// decided on the device. The per-element math is csrc/adamw_math.h, shared with the CPU kernel.
//
// No host synchronisation: found_inf, grad_scale, grad_norm, lr_tensor and the step counts
// are read by the kernel from device memory, so the launch can be captured in a CUDA graph.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>

#include "../adamw_math.h"
#include "../checks.h"
#include "multi_tensor.cuh"

namespace fastopt::cuda {
namespace {

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
  bool maximize;
};

template <bool kAmsgrad>
using AdamWMeta = TensorListMeta<kAmsgrad ? 5 : 4, /*kWithStep=*/true>;

static_assert(sizeof(AdamWMeta<false>) + sizeof(AdamWScalars) <= kMaxKernelParamBytes);
static_assert(sizeof(AdamWMeta<true>) + sizeof(AdamWScalars) <= kMaxKernelParamBytes);

// One chunk of one tensor: P the storage dtype of params and moments, G the grads'.
template <typename P, typename G, bool kAmsgrad>
struct AdamWOp {
  static constexpr int kVec = vector_elems<P, G>();
  static constexpr int kUnroll = unroll_for(kVec, kAmsgrad ? 5 : 4);

  struct Frag {
    float p[kVec], g[kVec], m[kVec], v[kVec], vmax[kAmsgrad ? kVec : 1];
  };

  P* __restrict__ param;
  const G* __restrict__ grad;
  P* __restrict__ exp_avg;
  P* __restrict__ exp_avg_sq;
  P* __restrict__ max_exp_avg_sq;
  AdamWCoeffs c;

  template <bool kAligned>
  __device__ __forceinline__ void load(int e, Frag& f) const {
    load_n<kVec, kAligned>(param + e, f.p);
    load_n<kVec, kAligned>(grad + e, f.g);
    load_n<kVec, kAligned>(exp_avg + e, f.m);
    load_n<kVec, kAligned>(exp_avg_sq + e, f.v);
    if constexpr (kAmsgrad) load_n<kVec, kAligned>(max_exp_avg_sq + e, f.vmax);
  }
  __device__ __forceinline__ void load_partial(int e, int count, Frag& f) const {
    load_n_partial<kVec>(param + e, count, f.p);
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
  template <bool kAligned>
  __device__ __forceinline__ void store(int e, const Frag& f) const {
    store_n<kVec, kAligned>(param + e, f.p);
    store_n<kVec, kAligned>(exp_avg + e, f.m);
    store_n<kVec, kAligned>(exp_avg_sq + e, f.v);
    if constexpr (kAmsgrad) store_n<kVec, kAligned>(max_exp_avg_sq + e, f.vmax);
  }
  __device__ __forceinline__ void store_partial(int e, int count, const Frag& f) const {
    store_n_partial<kVec>(param + e, count, f.p);
    store_n_partial<kVec>(exp_avg + e, count, f.m);
    store_n_partial<kVec>(exp_avg_sq + e, count, f.v);
    if constexpr (kAmsgrad) store_n_partial<kVec>(max_exp_avg_sq + e, count, f.vmax);
  }
};

// What thread 0 hands the block for one chunk.
struct ChunkPlan {
  AdamWCoeffs c;
  int tensor;
  int64_t local_chunk;  // the chunk's number within its tensor
};

template <typename P, typename G, bool kAmsgrad>
__global__ void __launch_bounds__(kBlockThreads, kMinBlocksPerSM)
    adamw_kernel(const AdamWMeta<kAmsgrad> meta, const AdamWScalars s) {
  // A skipped step returns before touching params or moments.
  if (s.found_inf != nullptr && *s.found_inf != 0.f) return;

  // Thread 0 computes the tensor and the coefficients (bias corrections in double) of each
  // chunk, once per tensor, and hands them over through shared memory. Two slots, alternated
  // per iteration, need one barrier per chunk: a slot is rewritten two iterations later, after
  // every thread has passed the barrier of the iteration in between.
  __shared__ ChunkPlan plan[2];
  float coef = 0.f;
  double lr = 0.0;
  int cached_tensor = -1;
  AdamWCoeffs cached{};
  if (threadIdx.x == 0) {
    coef = grad_coefficient(s.grad_scale, s.grad_norm, s.max_grad_norm, s.grad_factor);
    lr = s.lr_tensor != nullptr ? static_cast<double>(*s.lr_tensor) : s.lr;
  }

  int slot = 0;
  for (int64_t chunk = blockIdx.x; chunk < meta.num_chunks; chunk += gridDim.x, slot ^= 1) {
    if (threadIdx.x == 0) {
      const int t = find_tensor(meta, chunk);
      if (t != cached_tensor) {
        cached = adamw_coeffs(lr, s.beta1, s.beta2, s.weight_decay, s.eps,
                              static_cast<double>(*meta.step[t]), coef, s.maximize);
        cached_tensor = t;
      }
      plan[slot].c = cached;
      plan[slot].tensor = t;
      plan[slot].local_chunk = chunk - chunk_start(meta, t);
    }
    __syncthreads();
    const int t = plan[slot].tensor;
    const int64_t begin = plan[slot].local_chunk * kChunk;
    const int len = static_cast<int>(std::min<int64_t>(kChunk, meta.numel[t] - begin));

    AdamWOp<P, G, kAmsgrad> op;
    op.param = static_cast<P*>(meta.ptr[0][t]) + begin;
    op.grad = static_cast<const G*>(meta.ptr[1][t]) + begin;
    op.exp_avg = static_cast<P*>(meta.ptr[2][t]) + begin;
    op.exp_avg_sq = static_cast<P*>(meta.ptr[3][t]) + begin;
    op.max_exp_avg_sq = nullptr;
    op.c = plan[slot].c;
    // Chunk starts are multiples of kChunk elements, so the base pointers decide alignment.
    bool aligned = aligned16(meta.ptr[0][t]) && aligned16(meta.ptr[1][t]) &&
                   aligned16(meta.ptr[2][t]) && aligned16(meta.ptr[3][t]);
    if constexpr (kAmsgrad) {
      op.max_exp_avg_sq = static_cast<P*>(meta.ptr[4][t]) + begin;
      aligned = aligned && aligned16(meta.ptr[4][t]);
    }
    process_chunk<AdamWOp<P, G, kAmsgrad>::kVec, AdamWOp<P, G, kAmsgrad>::kUnroll>(op, len,
                                                                                   aligned);
  }
}

template <typename P, typename G, bool kAmsgrad>
void launch_adamw(const std::array<InfoList, kAmsgrad ? 5 : 4>& lists,
                  std::span<const float* const> state_steps, const AdamWScalars& s,
                  cudaStream_t stream, int device) {
  std::vector<int64_t> all(lists[0].size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int64_t>(i);
  constexpr auto kernel = adamw_kernel<P, G, kAmsgrad>;
  multi_tensor_apply<kAmsgrad ? 5 : 4, true>(
      lists, state_steps, all, [&](const AdamWMeta<kAmsgrad>& meta, int64_t /*first_chunk*/) {
        const int grid = persistent_grid<kernel>(meta.num_chunks, device);
        kernel<<<grid, kBlockThreads, 0, stream>>>(meta, s);
        STD_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

void adamw_cuda(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
                const TensorList& exp_avg_sqs, const TensorList& max_exp_avg_sqs,
                const TensorList& state_steps, double lr, const OptionalTensor& lr_tensor,
                double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                bool maximize, const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                const OptionalTensor& grad_norm, double max_grad_norm, double grad_factor,
                const TensorList& masters, bool stochastic_rounding, int64_t /*seed*/,
                const std::vector<int64_t>& /*positions*/) {
  const size_t n = params.size();
  if (n == 0) return;
  // The lean-precision arguments are not implemented in the CUDA kernels yet: the checks
  // refuse masters and moments of another dtype, and this stochastic rounding.
  FASTOPT_CHECK(!stochastic_rounding,
                "fastopt.adamw_: stochastic rounding is not implemented on cuda yet");
  const AdamWInputs in = check_adamw_inputs(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                            state_steps, amsgrad, DeviceType::CUDA, masters,
                                            /*lean=*/false);
  const auto dtype = in.params[0].dtype;
  const auto grad_dtype = in.grads[0].dtype;
  const Device device = in.params[0].device;
  AdamWScalars s;
  s.lr_tensor = optional_scalar(lr_tensor, device, "adamw_", "lr_tensor");
  s.grad_scale = optional_scalar(grad_scale, device, "adamw_", "grad_scale");
  s.found_inf = optional_scalar(found_inf, device, "adamw_", "found_inf");
  s.grad_norm = optional_scalar(grad_norm, device, "adamw_", "grad_norm");
  s.lr = lr;
  s.beta1 = beta1;
  s.beta2 = beta2;
  s.weight_decay = weight_decay;
  s.eps = eps;
  s.max_grad_norm = static_cast<float>(max_grad_norm);
  s.grad_factor = static_cast<float>(grad_factor);
  s.maximize = maximize;

  const torch::stable::accelerator::DeviceGuard guard(device.index());
  const cudaStream_t stream = current_stream(device.index());
  dispatch_float_type(dtype, [&](auto p_tag) {
    using P = decltype(p_tag);
    auto with_grad = [&](auto g_tag) {
      using G = decltype(g_tag);
      if (amsgrad) {
        launch_adamw<P, G, true>(
            {in.params, in.grads, in.exp_avgs, in.exp_avg_sqs, in.max_exp_avg_sqs}, in.steps, s,
            stream, device.index());
      } else {
        launch_adamw<P, G, false>({in.params, in.grads, in.exp_avgs, in.exp_avg_sqs}, in.steps, s,
                                  stream, device.index());
      }
    };
    if constexpr (std::is_same_v<P, float>) {
      with_grad(float{});
    } else if (grad_dtype == ScalarType::Float) {
      with_grad(float{});
    } else {
      with_grad(P{});
    }
  });
}

}  // namespace
}  // namespace fastopt::cuda

STABLE_TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("adamw_", TORCH_BOX(&fastopt::cuda::adamw_cuda));
}
