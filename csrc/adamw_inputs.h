// The rules of adamw_'s arguments, shared by the CPU and CUDA launchers: both read a call's
// tensors into one AdamWInputs, accept the same calls and refuse the rest with the same
// messages. adamw_dispatch.h then picks the kernel variant for a checked call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "adamw_math.h"
#include "inputs.h"

namespace fastopt {

// adamw_'s tensor lists, read once (the kernels take their pointers and sizes from here).
struct AdamWInputs {
  std::vector<TensorInfo> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters;
  std::vector<TensorInfo> scales;   // of 8-bit moments: int8, (2 or 3, blocks) per param
  std::vector<float*> steps;  // the one-element fp32 step counts (the kernels advance them)
  ScalarType state_dtype;  // of the moments: the params' or (lean) fp32, bf16 or uint8 codes
  bool quantized() const { return state_dtype == ScalarType::Byte; }
};

// Where a param's fp32 master lives: nowhere (the param is it), as the param plus an int16
// remainder (bf16 params), or in an fp32 copy (fp16 params).
enum class Master { kNone, kRemainder, kCopy };

// The master of params of `dtype` (bf16 or fp16), when a call brings masters.
inline Master master_for(ScalarType dtype) {
  return dtype == ScalarType::BFloat16 ? Master::kRemainder : Master::kCopy;
}

// The dtype a master of kind `master` is stored in.
inline ScalarType master_dtype(Master master) {
  return master == Master::kRemainder ? ScalarType::Short : ScalarType::Float;
}

inline Master master_kind(const AdamWInputs& in) {
  return in.masters.empty() ? Master::kNone : master_for(in.params[0].dtype);
}

// Reads and checks adamw_'s tensor arguments into `in` (whose memory is reused), for a
// non-empty params on a device of type `device_type`. `lean`: whether this device's kernel
// takes masters and moments in another dtype than the params (else both are refused with a
// message saying so).
inline void read_adamw_inputs(AdamWInputs& in, const TensorList& params, const TensorList& grads,
                              const TensorList& exp_avgs, const TensorList& exp_avg_sqs,
                              const TensorList& max_exp_avg_sqs, const TensorList& state_steps,
                              bool amsgrad, DeviceType device_type, const TensorList& masters,
                              bool lean, const TensorList& scales) {
  constexpr const char* kOp = "adamw_";
  constexpr const char* kFirst = "params[0]";
  const size_t n = params.size();
  for (auto* list : {&in.max_exp_avg_sqs, &in.masters, &in.scales}) list->clear();
  read_infos(params, Access::kWrite, in.params);
  const TensorInfo& first = in.params[0];
  const Device& device = first.device;
  check_device_type(kOp, kFirst, first, device_type);
  const auto dtype = first.dtype;
  FASTOPT_CHECK(is_floating(dtype),
                "fastopt.adamw_: params must be float32, bfloat16 or float16, got ", dtype);
  check_list(kOp, "params", in.params, n, dtype, device, kFirst);
  check_count(kOp, "grads", grads.size(), n);
  read_infos(grads, Access::kRead, in.grads);
  const auto grad_dtype = in.grads[0].dtype;
  FASTOPT_CHECK(grad_dtype == dtype || grad_dtype == ScalarType::Float,
                "fastopt.adamw_: grads must be ", dtype, " or float32, got ", grad_dtype);
  check_list(kOp, "grads", in.grads, n, grad_dtype, device, kFirst);
  read_infos(exp_avgs, Access::kWrite, in.exp_avgs);
  in.state_dtype = in.exp_avgs.empty() ? dtype : in.exp_avgs[0].dtype;
  if (in.state_dtype != dtype) {
    FASTOPT_CHECK(lean, "fastopt.adamw_: exp_avgs are ", in.state_dtype, " and params ", dtype,
                  ": moments in another dtype are not implemented on ",
                  device_type_name(device_type), " yet");
    FASTOPT_CHECK(in.state_dtype == ScalarType::Float || in.state_dtype == ScalarType::BFloat16 ||
                      in.state_dtype == ScalarType::Byte,
                  "fastopt.adamw_: exp_avgs must be ", dtype,
                  " (as params), float32, bfloat16 or uint8 (8-bit codes), got ", in.state_dtype);
  }
  check_list(kOp, "exp_avgs", in.exp_avgs, n, in.state_dtype, device, kFirst);
  read_infos(exp_avg_sqs, Access::kWrite, in.exp_avg_sqs);
  check_list(kOp, "exp_avg_sqs", in.exp_avg_sqs, n, in.state_dtype, device, kFirst);
  if (amsgrad) {
    read_infos(max_exp_avg_sqs, Access::kWrite, in.max_exp_avg_sqs);
    check_list(kOp, "max_exp_avg_sqs", in.max_exp_avg_sqs, n, in.state_dtype, device, kFirst);
  }
  if (!masters.empty()) {
    FASTOPT_CHECK(lean, "fastopt.adamw_: masters are not implemented on ",
                  device_type_name(device_type), " yet");
    FASTOPT_CHECK(dtype != ScalarType::Float, "fastopt.adamw_: float32 params take no masters");
    read_infos(masters, Access::kWrite, in.masters);
    check_list(kOp, "masters", in.masters, n, master_dtype(master_for(dtype)), device, kFirst);
    for (size_t i = 0; i < n; ++i) {
      FASTOPT_CHECK(in.masters[i].numel == in.params[i].numel, "fastopt.adamw_: masters[", i,
                    "] and params[", i, "] differ in size");
    }
  }
  if (in.quantized()) {
    read_infos(scales, Access::kWrite, in.scales);
    check_list(kOp, "scales", in.scales, n, ScalarType::Char, device, kFirst);
    const int64_t rows = amsgrad ? 3 : 2;
    for (size_t i = 0; i < n; ++i) {
      const int64_t blocks = (in.params[i].numel + kQuantBlock - 1) / kQuantBlock;
      FASTOPT_CHECK(in.scales[i].numel == rows * blocks, "fastopt.adamw_: scales[", i, "] has ",
                    in.scales[i].numel, " elements, expected ", rows * blocks, " (", rows,
                    " moments of ", blocks, " blocks)");
    }
  } else {
    FASTOPT_CHECK(scales.empty(), "fastopt.adamw_: scales are for uint8 (8-bit) moments only");
  }
  check_count(kOp, "state_steps", state_steps.size(), n);
  in.steps.resize(n);
  const ReadAhead steps_ahead(state_steps);
  for (size_t i = 0; i < n; ++i) {
    steps_ahead.at(i);
    const int64_t numel = in.params[i].numel;
    FASTOPT_CHECK(in.grads[i].numel == numel && in.exp_avgs[i].numel == numel &&
                      in.exp_avg_sqs[i].numel == numel &&
                      (!amsgrad || in.max_exp_avg_sqs[i].numel == numel),
                  "fastopt.adamw_: params[", i, "], grads, exp_avgs and exp_avg_sqs",
                  amsgrad ? " and max_exp_avg_sqs" : "", " differ in size");
    const TensorInfo step(state_steps[i], Access::kWrite);
    FASTOPT_CHECK(step.numel == 1 && step.dtype == ScalarType::Float && step.device == device,
                  "fastopt.adamw_: state_steps[", i, "] must be a one-element float32 tensor on ",
                  DeviceName{device}, ", got ", Sizes{state_steps[i]}, " of ", step.dtype, " on ",
                  DeviceName{step.device});
    in.steps[i] = static_cast<float*>(step.data);
  }
}

inline AdamWInputs check_adamw_inputs(const TensorList& params, const TensorList& grads,
                                      const TensorList& exp_avgs, const TensorList& exp_avg_sqs,
                                      const TensorList& max_exp_avg_sqs,
                                      const TensorList& state_steps, bool amsgrad,
                                      DeviceType device_type, const TensorList& masters = {},
                                      bool lean = false, const TensorList& scales = {}) {
  AdamWInputs in;
  read_adamw_inputs(in, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                    amsgrad, device_type, masters, lean, scales);
  return in;
}

// Stochastic rounding, and 8-bit moments (whose codes always round so), need one position (the
// noise's tensor index) and one first index (of the tensor's first element in its whole param)
// per tensor; stochastic rounding is implemented for bf16 stores only; fastopt.AdamW refuses
// the rest before a step.
inline void check_rounding(const AdamWInputs& in, Master master, bool stochastic_rounding,
                           size_t num_positions, size_t num_first_indices) {
  if (!stochastic_rounding && !in.quantized()) return;
  FASTOPT_CHECK(num_positions == in.params.size(), "fastopt.adamw_: positions has ", num_positions,
                " entries, expected ", in.params.size());
  FASTOPT_CHECK(num_first_indices == in.params.size(), "fastopt.adamw_: first_indices has ",
                num_first_indices, " entries, expected ", in.params.size());
  if (!stochastic_rounding) return;
  const bool fp16_store = in.state_dtype == ScalarType::Half ||
                          (in.params[0].dtype == ScalarType::Half && master == Master::kNone);
  FASTOPT_CHECK(!fp16_store,
                "fastopt.adamw_: stochastic rounding rounds bfloat16 stores "
                "only, and this step stores float16");
}

}  // namespace fastopt
