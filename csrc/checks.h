// Input validation shared by the CPU and CUDA implementations of the ops: the same checks and
// the same messages on every device, each naming the offending argument.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastopt {

inline bool is_floating(at::ScalarType dt) {
  return dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf;
}

// `list` holds n contiguous tensors of `dtype` on `first`'s device.
inline void check_list(at::TensorList list, const at::Tensor& first, size_t n,
                       at::ScalarType dtype, const char* name) {
  TORCH_CHECK(list.size() == n, "fastopt.adamw_: ", name, " has ", list.size(),
              " tensors, expected ", n);
  for (size_t i = 0; i < n; ++i) {
    const auto& t = list[i];
    TORCH_CHECK(t.device() == first.device(), "fastopt.adamw_: ", name, "[", i, "] is on ",
                t.device(), ", params[0] on ", first.device());
    TORCH_CHECK(t.scalar_type() == dtype, "fastopt.adamw_: ", name, "[", i, "] is ",
                t.scalar_type(), ", expected ", dtype);
    TORCH_CHECK(t.is_contiguous(), "fastopt.adamw_: ", name, "[", i, "] must be contiguous");
  }
}

// adamw_'s tensor arguments, for a non-empty params on a device of type `device_type`.
inline void check_adamw_inputs(at::TensorList params, at::TensorList grads,
                               at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                               at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                               bool amsgrad, c10::DeviceType device_type) {
  const size_t n = params.size();
  const auto& first = params[0];
  TORCH_CHECK(first.device().type() == device_type, "fastopt.adamw_: params[0] is on ",
              first.device(), ", expected a ", c10::DeviceTypeName(device_type), " device");
  const auto dtype = first.scalar_type();
  TORCH_CHECK(is_floating(dtype),
              "fastopt.adamw_: params must be float32, bfloat16 or float16, got ", dtype);
  check_list(params, first, n, dtype, "params");
  TORCH_CHECK(grads.size() == n, "fastopt.adamw_: grads has ", grads.size(),
              " tensors, expected ", n);
  const auto grad_dtype = grads[0].scalar_type();
  TORCH_CHECK(grad_dtype == dtype || grad_dtype == at::kFloat, "fastopt.adamw_: grads must be ",
              dtype, " or float32, got ", grad_dtype);
  check_list(grads, first, n, grad_dtype, "grads");
  check_list(exp_avgs, first, n, dtype, "exp_avgs");
  check_list(exp_avg_sqs, first, n, dtype, "exp_avg_sqs");
  if (amsgrad) check_list(max_exp_avg_sqs, first, n, dtype, "max_exp_avg_sqs");
  TORCH_CHECK(state_steps.size() == n, "fastopt.adamw_: state_steps has ", state_steps.size(),
              " tensors, expected ", n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = params[i].numel();
    TORCH_CHECK(grads[i].numel() == numel && exp_avgs[i].numel() == numel &&
                    exp_avg_sqs[i].numel() == numel &&
                    (!amsgrad || max_exp_avg_sqs[i].numel() == numel),
                "fastopt.adamw_: params[", i, "], grads, exp_avgs and exp_avg_sqs",
                amsgrad ? " and max_exp_avg_sqs" : "", " differ in size");
    const auto& step = state_steps[i];
    TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kFloat &&
                    step.device() == first.device(),
                "fastopt.adamw_: state_steps[", i, "] must be a one-element float32 tensor on ",
                first.device(), ", got ", step.sizes(), " of ", step.scalar_type(), " on ",
                step.device());
  }
}

// update_scale_'s arguments: one-element scale (fp32), growth_tracker (int32) and found_inf
// (fp32), all on one device of type `device_type`.
inline void check_update_scale_inputs(const at::Tensor& scale, const at::Tensor& growth_tracker,
                                      const at::Tensor& found_inf, c10::DeviceType device_type) {
  TORCH_CHECK(scale.numel() == 1 && scale.scalar_type() == at::kFloat,
              "fastopt.update_scale_: scale must be a one-element float32 tensor");
  TORCH_CHECK(growth_tracker.numel() == 1 && growth_tracker.scalar_type() == at::kInt,
              "fastopt.update_scale_: growth_tracker must be a one-element int32 tensor");
  TORCH_CHECK(found_inf.numel() == 1 && found_inf.scalar_type() == at::kFloat,
              "fastopt.update_scale_: found_inf must be a one-element float32 tensor");
  const c10::Device device = scale.device();
  TORCH_CHECK(device.type() == device_type, "fastopt.update_scale_: scale is on ", device,
              ", expected a ", c10::DeviceTypeName(device_type), " device");
  TORCH_CHECK(growth_tracker.device() == device, "fastopt.update_scale_: growth_tracker is on ",
              growth_tracker.device(), ", scale on ", device);
  TORCH_CHECK(found_inf.device() == device, "fastopt.update_scale_: found_inf is on ",
              found_inf.device(), ", scale on ", device);
}

}  // namespace fastopt
