// Input validation shared by the CPU and CUDA implementations of the ops: the same checks and
// the same messages on every device, each naming the offending argument.
//
// Written against PyTorch's stable ABI (torch::stable::Tensor), so one binary loads into every
// torch from TORCH_TARGET_VERSION on; failures throw through FASTOPT_CHECK (check.h), whose
// messages carry no build paths. Every accessor of a stable tensor is a call into libtorch
// (scalar_type() and device() several), so each tensor's properties are read once, into a
// TensorInfo, which the kernels then take their pointers and sizes from.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <ostream>
#include <vector>

#include "check.h"

namespace fastopt {

using torch::headeronly::ScalarType;
using torch::stable::Device;
using torch::stable::DeviceType;
using torch::stable::Tensor;
// Tensor[] arguments arrive as a vector of owning handles; Tensor? as an optional.
using TensorList = std::vector<Tensor>;
using OptionalTensor = std::optional<Tensor>;

inline bool is_floating(ScalarType dt) {
  return dt == ScalarType::Float || dt == ScalarType::BFloat16 || dt == ScalarType::Half;
}

// torch's name of a device type, for the types a tensor reaching these kernels can have.
inline const char* device_type_name(DeviceType type) {
  switch (type) {
    case DeviceType::CPU: return "cpu";
    case DeviceType::CUDA: return "cuda";
    case DeviceType::Meta: return "meta";
    case DeviceType::XPU: return "xpu";
    case DeviceType::MPS: return "mps";
    case DeviceType::PrivateUse1: return "privateuseone";
    default: return "unknown";
  }
}

// For messages: "cpu", "cuda:1", as torch prints a device (the stable Device has no <<).
struct DeviceName {
  Device device;
};
inline std::ostream& operator<<(std::ostream& out, const DeviceName& d) {
  out << device_type_name(d.device.type());
  if (d.device.has_index() && !d.device.is_cpu()) out << ":" << int(d.device.index());
  return out;
}

// Whether a kernel writes a tensor (its pointer comes from mutable_data_ptr, which unshares a
// copy-on-write tensor first) or only reads it (const_data_ptr, which leaves it shared).
enum class Access { kRead, kWrite };

// One tensor's properties, read once.
struct TensorInfo {
  void* data;  // const unless read with Access::kWrite
  int64_t numel;
  ScalarType dtype;
  Device device;
  bool contiguous;

  TensorInfo(const Tensor& t, Access access)
      : data(access == Access::kWrite ? t.mutable_data_ptr()
                                      : const_cast<void*>(t.const_data_ptr())),
        numel(t.numel()),
        dtype(t.scalar_type()),
        device(t.device()),
        contiguous(t.is_contiguous()) {}
};

inline std::vector<TensorInfo> infos(const TensorList& list, Access access) {
  std::vector<TensorInfo> out;
  out.reserve(list.size());
  for (const auto& t : list) out.emplace_back(t, access);
  return out;
}

// For messages: a tensor's shape as torch prints it, "[2, 3]".
struct Sizes {
  const Tensor& t;
};
inline std::ostream& operator<<(std::ostream& out, const Sizes& s) {
  out << "[";
  const auto sizes = s.t.sizes();
  for (size_t d = 0; d < sizes.size(); ++d) out << (d ? ", " : "") << sizes[d];
  return out << "]";
}

// `list` holds n contiguous tensors of `dtype` on `first`'s device.
inline void check_list(const std::vector<TensorInfo>& list, const TensorInfo& first, size_t n,
                       ScalarType dtype, const char* name) {
  FASTOPT_CHECK(list.size() == n, "fastopt.adamw_: ", name, " has ", list.size(),
                " tensors, expected ", n);
  for (size_t i = 0; i < n; ++i) {
    const auto& t = list[i];
    FASTOPT_CHECK(t.device == first.device, "fastopt.adamw_: ", name, "[", i, "] is on ",
                  DeviceName{t.device}, ", params[0] on ", DeviceName{first.device});
    FASTOPT_CHECK(t.dtype == dtype, "fastopt.adamw_: ", name, "[", i, "] is ", t.dtype,
                  ", expected ", dtype);
    FASTOPT_CHECK(t.contiguous, "fastopt.adamw_: ", name, "[", i, "] must be contiguous");
  }
}

// adamw_'s tensor lists, read once (the kernels take their pointers and sizes from here).
struct AdamWInputs {
  std::vector<TensorInfo> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters;
  std::vector<TensorInfo> scales;   // of 8-bit moments: int8, (2 or 3, blocks) per param
  std::vector<const float*> steps;  // the one-element fp32 step counts
  ScalarType state_dtype;  // of the moments: the params' or (lean) fp32, bf16 or uint8 codes
  bool quantized() const { return state_dtype == ScalarType::Byte; }
};

// Elements per block of 8-bit moments (csrc/adamw_math.h's kQuantBlock, fastopt.quant.BLOCK).
constexpr int64_t kScaleBlock = 32;

// Reads and checks adamw_'s tensor arguments, for a non-empty params on a device of type
// `device_type`. `lean`: whether this device's kernel takes masters and moments in another
// dtype than the params (else both are refused with a message saying so).
inline AdamWInputs check_adamw_inputs(const TensorList& params, const TensorList& grads,
                                      const TensorList& exp_avgs, const TensorList& exp_avg_sqs,
                                      const TensorList& max_exp_avg_sqs,
                                      const TensorList& state_steps, bool amsgrad,
                                      DeviceType device_type, const TensorList& masters = {},
                                      bool lean = false, const TensorList& scales = {}) {
  AdamWInputs in;
  const size_t n = params.size();
  in.params = infos(params, Access::kWrite);
  const TensorInfo& first = in.params[0];
  FASTOPT_CHECK(first.device.type() == device_type, "fastopt.adamw_: params[0] is on ",
                DeviceName{first.device}, ", expected a ", device_type_name(device_type),
                " device");
  const auto dtype = first.dtype;
  FASTOPT_CHECK(is_floating(dtype),
                "fastopt.adamw_: params must be float32, bfloat16 or float16, got ", dtype);
  check_list(in.params, first, n, dtype, "params");
  FASTOPT_CHECK(grads.size() == n, "fastopt.adamw_: grads has ", grads.size(),
                " tensors, expected ", n);
  in.grads = infos(grads, Access::kRead);
  const auto grad_dtype = in.grads[0].dtype;
  FASTOPT_CHECK(grad_dtype == dtype || grad_dtype == ScalarType::Float,
                "fastopt.adamw_: grads must be ", dtype, " or float32, got ", grad_dtype);
  check_list(in.grads, first, n, grad_dtype, "grads");
  in.exp_avgs = infos(exp_avgs, Access::kWrite);
  in.state_dtype = in.exp_avgs.empty() ? dtype : in.exp_avgs[0].dtype;
  if (in.state_dtype != dtype) {
    FASTOPT_CHECK(lean, "fastopt.adamw_: exp_avgs are ", in.state_dtype, " and params ", dtype,
                  ": moments in another dtype are not implemented on ",
                  device_type_name(device_type), " yet");
    FASTOPT_CHECK(in.state_dtype == ScalarType::Float || in.state_dtype == ScalarType::BFloat16 ||
                      in.state_dtype == ScalarType::Byte,
                  "fastopt.adamw_: exp_avgs must be ", dtype, " (as params), float32, "
                  "bfloat16 or uint8 (8-bit codes), got ", in.state_dtype);
  }
  check_list(in.exp_avgs, first, n, in.state_dtype, "exp_avgs");
  in.exp_avg_sqs = infos(exp_avg_sqs, Access::kWrite);
  check_list(in.exp_avg_sqs, first, n, in.state_dtype, "exp_avg_sqs");
  if (amsgrad) {
    in.max_exp_avg_sqs = infos(max_exp_avg_sqs, Access::kWrite);
    check_list(in.max_exp_avg_sqs, first, n, in.state_dtype, "max_exp_avg_sqs");
  }
  if (!masters.empty()) {
    FASTOPT_CHECK(lean, "fastopt.adamw_: masters are not implemented on ",
                  device_type_name(device_type), " yet");
    FASTOPT_CHECK(dtype != ScalarType::Float, "fastopt.adamw_: float32 params take no masters");
    // A bf16 param's master is the param and an int16 remainder; a fp16 param's an fp32 copy.
    const auto master_dtype = dtype == ScalarType::BFloat16 ? ScalarType::Short : ScalarType::Float;
    in.masters = infos(masters, Access::kWrite);
    check_list(in.masters, first, n, master_dtype, "masters");
    for (size_t i = 0; i < n; ++i) {
      FASTOPT_CHECK(in.masters[i].numel == in.params[i].numel, "fastopt.adamw_: masters[", i,
                    "] and params[", i, "] differ in size");
    }
  }
  if (in.quantized()) {
    in.scales = infos(scales, Access::kWrite);
    check_list(in.scales, first, n, ScalarType::Char, "scales");
    const int64_t rows = amsgrad ? 3 : 2;
    for (size_t i = 0; i < n; ++i) {
      const int64_t blocks = (in.params[i].numel + kScaleBlock - 1) / kScaleBlock;
      FASTOPT_CHECK(in.scales[i].numel == rows * blocks, "fastopt.adamw_: scales[", i, "] has ",
                    in.scales[i].numel, " elements, expected ", rows * blocks, " (", rows,
                    " moments of ", blocks, " blocks)");
    }
  } else {
    FASTOPT_CHECK(scales.empty(), "fastopt.adamw_: scales are for uint8 (8-bit) moments only");
  }
  FASTOPT_CHECK(state_steps.size() == n, "fastopt.adamw_: state_steps has ", state_steps.size(),
                " tensors, expected ", n);
  in.steps.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t numel = in.params[i].numel;
    FASTOPT_CHECK(in.grads[i].numel == numel && in.exp_avgs[i].numel == numel &&
                      in.exp_avg_sqs[i].numel == numel &&
                      (!amsgrad || in.max_exp_avg_sqs[i].numel == numel),
                  "fastopt.adamw_: params[", i, "], grads, exp_avgs and exp_avg_sqs",
                  amsgrad ? " and max_exp_avg_sqs" : "", " differ in size");
    const TensorInfo step(state_steps[i], Access::kRead);
    FASTOPT_CHECK(step.numel == 1 && step.dtype == ScalarType::Float && step.device == first.device,
                  "fastopt.adamw_: state_steps[", i, "] must be a one-element float32 tensor on ",
                  DeviceName{first.device}, ", got ", Sizes{state_steps[i]}, " of ", step.dtype,
                  " on ", DeviceName{step.device});
    in.steps[i] = static_cast<const float*>(step.data);
  }
  return in;
}

// update_scale_'s arguments: one-element scale (fp32), growth_tracker (int32) and found_inf
// (fp32), all on one device of type `device_type`.
inline void check_update_scale_inputs(const TensorInfo& scale, const TensorInfo& growth_tracker,
                                      const TensorInfo& found_inf, DeviceType device_type) {
  FASTOPT_CHECK(scale.numel == 1 && scale.dtype == ScalarType::Float,
                "fastopt.update_scale_: scale must be a one-element float32 tensor");
  FASTOPT_CHECK(growth_tracker.numel == 1 && growth_tracker.dtype == ScalarType::Int,
                "fastopt.update_scale_: growth_tracker must be a one-element int32 tensor");
  FASTOPT_CHECK(found_inf.numel == 1 && found_inf.dtype == ScalarType::Float,
                "fastopt.update_scale_: found_inf must be a one-element float32 tensor");
  const Device device = scale.device;
  FASTOPT_CHECK(device.type() == device_type, "fastopt.update_scale_: scale is on ",
                DeviceName{device}, ", expected a ", device_type_name(device_type), " device");
  FASTOPT_CHECK(growth_tracker.device == device, "fastopt.update_scale_: growth_tracker is on ",
                DeviceName{growth_tracker.device}, ", scale on ", DeviceName{device});
  FASTOPT_CHECK(found_inf.device == device, "fastopt.update_scale_: found_inf is on ",
                DeviceName{found_inf.device}, ", scale on ", DeviceName{device});
}

}  // namespace fastopt
