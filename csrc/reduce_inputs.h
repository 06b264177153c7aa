// The rules of the arguments of multi_tensor_norm, accumulate_ and update_scale_, shared by the
// CPU kernels (csrc/cpu/reduce.cpp) and the CUDA ones (csrc/cuda/norm.cu, accumulate.cu).
#pragma once

#include <cmath>
#include <vector>

#include "inputs.h"

namespace fastopt {

// Which norm multi_tensor_norm computes: the 2-norm, 1-norm and inf-norm have their own
// kernels, any other positive order the general sum of |x|^p.
enum class NormKind { kL2, kL1, kInf, kP };

// multi_tensor_norm's arguments: `tensors` on `device`, and a positive (or infinite) norm_type,
// whose kind it returns. Other orders (0, -inf, negative p) the Python side computes with
// torch's norm.
inline NormKind check_norm_inputs(const std::vector<TensorInfo>& tensors, const Device& device,
                                  double norm_type, const char* op = "multi_tensor_norm") {
  check_floating_list(op, "tensors", tensors, device);
  FASTOPT_CHECK(norm_type > 0, "fastopt.", op, ": norm_type must be positive or inf, got ",
                norm_type);
  if (std::isinf(norm_type)) return NormKind::kInf;
  if (norm_type == 2.0) return NormKind::kL2;
  if (norm_type == 1.0) return NormKind::kL1;
  return NormKind::kP;
}

// The chunk partials of norm_partials_ and norm_combine: `slots`, a contiguous buffer of the
// kernel's partial type (`dtype`) on `device`, holds 2 * total values, each chunk's partial
// and then each chunk's non-finite flag (0 or 1), and `first` + `chunks` of them are written.
// Returns total.
inline int64_t check_partials(const char* op, const TensorInfo& slots, ScalarType dtype,
                              const Device& device, int64_t first, int64_t chunks) {
  FASTOPT_CHECK(slots.dtype == dtype, "fastopt.", op, ": partials must be ", dtype, " on ",
                DeviceName{device}, ", got ", slots.dtype);
  FASTOPT_CHECK(on_device(slots.device, device), "fastopt.", op, ": partials is on ",
                DeviceName{slots.device}, ", the tensors on ", DeviceName{device});
  FASTOPT_CHECK(slots.contiguous && slots.numel % 2 == 0, "fastopt.", op,
                ": partials must be contiguous, with two rows (the partials, then the flags)");
  const int64_t total = slots.numel / 2;
  FASTOPT_CHECK(first >= 0 && first + chunks <= total, "fastopt.", op, ": chunks ", first, " to ",
                first + chunks, " do not fit in partials for ", total, " chunks");
  return total;
}

// norm_partials_'s and norm_combine's arguments, read and checked.
struct PartialsInputs {
  TensorInfo slots;                 // the partials
  std::vector<TensorInfo> tensors;  // what norm_partials_ measures (none for norm_combine)
  NormKind kind;
  int64_t total;  // the chunks `slots` holds partials for
};

// norm_partials_: `partials` of the kernel's `dtype` on a device of type `device_type`, the
// tensors on the same device, cut into chunks of `chunk` elements each, from chunk `first`.
inline PartialsInputs check_partials_inputs(const Tensor& partials, const TensorList& list,
                                            int64_t first, double norm_type,
                                            DeviceType device_type, ScalarType dtype,
                                            int64_t chunk) {
  constexpr const char* kOp = "norm_partials_";
  PartialsInputs in{TensorInfo(partials, Access::kWrite), infos(list, Access::kRead),
                    NormKind::kL2, 0};
  check_device_type(kOp, "partials", in.slots, device_type);
  in.kind = check_norm_inputs(in.tensors, in.slots.device, norm_type, kOp);
  int64_t chunks = 0;
  for (const auto& t : in.tensors) chunks += (t.numel + chunk - 1) / chunk;
  in.total = check_partials(kOp, in.slots, dtype, in.slots.device, first, chunks);
  return in;
}

// norm_combine: `partials` as above.
inline PartialsInputs check_combine_inputs(const Tensor& partials, double norm_type,
                                           DeviceType device_type, ScalarType dtype) {
  constexpr const char* kOp = "norm_combine";
  PartialsInputs in{TensorInfo(partials, Access::kRead), {}, NormKind::kL2, 0};
  check_device_type(kOp, "partials", in.slots, device_type);
  in.kind = check_norm_inputs({}, in.slots.device, norm_type, kOp);
  in.total = check_partials(kOp, in.slots, dtype, in.slots.device, 0, 0);
  return in;
}

// accumulate_'s tensor lists, read once.
struct AccumulateInputs {
  std::vector<TensorInfo> accs, grads;
};

// Reads and checks accumulate_'s lists: fp32 accumulators on a device of type `device_type`,
// and grads of any floating dtype, one of the same size per accumulator, on the same device.
inline AccumulateInputs check_accumulate_inputs(const TensorList& accs, const TensorList& grads,
                                                DeviceType device_type) {
  constexpr const char* kOp = "accumulate_";
  FASTOPT_CHECK(accs.size() == grads.size(), "fastopt.accumulate_: accs has ", accs.size(),
                " tensors and grads ", grads.size());
  AccumulateInputs in{infos(accs, Access::kWrite), infos(grads, Access::kRead)};
  if (in.accs.empty()) return in;
  check_device_type(kOp, "accs[0]", in.accs[0], device_type);
  const Device device = in.accs[0].device;
  check_list(kOp, "accs", in.accs, in.accs.size(), ScalarType::Float, device, "accs[0]");
  check_floating_list(kOp, "grads", in.grads, device);
  for (size_t i = 0; i < in.accs.size(); ++i) {
    FASTOPT_CHECK(in.accs[i].numel == in.grads[i].numel, "fastopt.accumulate_: accs[", i, "] has ",
                  in.accs[i].numel, " elements and grads[", i, "] ", in.grads[i].numel);
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
  check_device_type("update_scale_", "scale", scale, device_type);
  const Device device = scale.device;
  FASTOPT_CHECK(growth_tracker.device == device, "fastopt.update_scale_: growth_tracker is on ",
                DeviceName{growth_tracker.device}, ", scale on ", DeviceName{device});
  FASTOPT_CHECK(found_inf.device == device, "fastopt.update_scale_: found_inf is on ",
                DeviceName{found_inf.device}, ", scale on ", DeviceName{device});
}

}  // namespace fastopt
