// AdamW on CUDA: every tensor of a param group in a few multi-tensor launches, with
// unscaling, clipping, the accumulation factor and the skip on non-finite gradients all
// decided on the device. The per-element math, the master's split into bf16 and remainder and
// the stochastic rounding are csrc/adamw_math.h, shared with the CPU kernel, so both give the
// same bits; csrc/adamw_dispatch.h picks the same variant for a call on either device. This
// file checks the call; adamw_kernel.cuh is the kernel.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>

#include "../adamw_plan.h"
#include "adamw_kernel.cuh"

namespace fastopt::cuda {
namespace {

// Step counts one launch advances: pointers by value, in the kernel parameter space
// (multi_tensor.cuh's limit, less the found_inf pointer and the count).
constexpr int kCountsPerLaunch = (kMaxKernelParamBytes - kReservedParamBytes - 16) / 8;
struct StepCounts {
  float* count[kCountsPerLaunch];
  int n;
};
static_assert(sizeof(StepCounts) + sizeof(const float*) <= kMaxKernelParamBytes,
              "advance_counts' arguments exceed the kernel parameter space");

// Each count one higher, unless found_inf is non-zero. A launch of its own after the update:
// the update's blocks all read a tensor's count (and compute with it plus one) before any
// thread here writes it, as launches on one stream run in order.
__global__ void advance_counts(const StepCounts counts, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.f) return;
  for (int i = threadIdx.x; i < counts.n; i += blockDim.x) *counts.count[i] += 1.f;
}

void launch_advance_counts(const std::vector<float*>& steps, const float* found_inf,
                           cudaStream_t stream) {
  StepCounts counts;
  for (size_t begin = 0; begin < steps.size(); begin += kCountsPerLaunch) {
    const size_t end = std::min(steps.size(), begin + kCountsPerLaunch);
    counts.n = static_cast<int>(end - begin);
    for (size_t i = begin; i < end; ++i) counts.count[i - begin] = steps[i];
    advance_counts<<<1, 256, 0, stream>>>(counts, found_inf);
    STD_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void adamw_cuda(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
                const TensorList& exp_avg_sqs, const TensorList& max_exp_avg_sqs,
                const TensorList& state_steps, double lr, const OptionalTensor& lr_tensor,
                double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                bool maximize, const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                const OptionalTensor& grad_norm, double max_grad_norm, double grad_factor,
                const TensorList& masters, bool stochastic_rounding, int64_t seed,
                const std::vector<int64_t>& positions,
                const std::vector<int64_t>& first_indices, const TensorList& scales) {
  const size_t n = params.size();
  if (n == 0) return;
  const AdamWInputs in = check_adamw_inputs(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                            state_steps, amsgrad, DeviceType::CUDA, masters,
                                            /*lean=*/true, scales);
  const Master master = master_kind(in);
  check_rounding(in, master, stochastic_rounding, positions.size(), first_indices.size());
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
  s.seed32 = seed_key(static_cast<uint64_t>(seed));
  s.maximize = maximize;

  const torch::stable::accelerator::DeviceGuard guard(device.index());
  const cudaStream_t stream = current_stream(device.index());
  dispatch_float(in.params[0].dtype, [&](auto p_tag) {
    launch_adamw_for<typename decltype(p_tag)::type>(in, master, stochastic_rounding, amsgrad,
                                                    positions, first_indices, s, stream,
                                                    device.index());
  });
  launch_advance_counts(in.steps, s.found_inf, stream);
}

}  // namespace
}  // namespace fastopt::cuda

STABLE_TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("adamw_", TORCH_BOX(&fastopt::cuda::adamw_cuda));
  m.impl("adamw_planned_", TORCH_BOX(&fastopt::adamw_planned<&fastopt::cuda::adamw_cuda>));
}
