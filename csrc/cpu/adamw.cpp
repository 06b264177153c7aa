// AdamW on the CPU: every tensor of a param group in one parallel loop over fixed-size chunks.
// The per-element math is csrc/adamw_math.h, shared with the CUDA kernel.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include "../adamw_math.h"
#include "../checks.h"
#include "cpu_common.h"

namespace fastopt::cpu {
namespace {

// One chunk of one tensor. Each clone is compiled for its instruction set and picked at load
// time, so the same wheel uses AVX2 or AVX-512 where the CPU has it; the plain loop below is
// what GCC vectorises.
template <typename P, typename G, bool kAmsgrad>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void adamw_chunk(P* __restrict__ param, const G* __restrict__ grad, P* __restrict__ exp_avg,
                 P* __restrict__ exp_avg_sq, P* __restrict__ max_exp_avg_sq, int64_t begin,
                 int64_t end, const AdamWCoeffs c) {
  for (int64_t i = begin; i < end; ++i) {
    float p = load(param, i), m = load(exp_avg, i), v = load(exp_avg_sq, i);
    float vmax = kAmsgrad ? load(max_exp_avg_sq, i) : 0.f;
    adamw_math<kAmsgrad>(p, load(grad, i), m, v, vmax, c);
    store(param, i, p);
    store(exp_avg, i, m);
    store(exp_avg_sq, i, v);
    if (kAmsgrad) store(max_exp_avg_sq, i, vmax);
  }
}

// Calls f(P{}, G{}) with the param storage type P and grad storage type G (G is P or float).
template <typename F>
void dispatch_param_grad(ScalarType param, ScalarType grad, F&& f) {
  auto with_grad = [&](auto p) {
    if (grad == ScalarType::Float) {
      f(p, float{});
    } else {
      f(p, p);
    }
  };
  switch (param) {
    case ScalarType::Float: return with_grad(float{});
    case ScalarType::BFloat16: return with_grad(BFloat16{});
    default: return with_grad(Half{});
  }
}

void adamw_cpu(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
               const TensorList& exp_avg_sqs, const TensorList& max_exp_avg_sqs,
               const TensorList& state_steps, double lr, const OptionalTensor& lr_tensor,
               double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
               bool maximize, const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
               const OptionalTensor& grad_norm, double max_grad_norm, double grad_factor) {
  const size_t n = params.size();
  if (n == 0) return;
  const AdamWInputs in = check_adamw_inputs(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                            state_steps, amsgrad, DeviceType::CPU);
  const auto dtype = in.params[0].dtype;
  const auto grad_dtype = in.grads[0].dtype;

  const float* inf = optional_scalar(found_inf, "found_inf");
  if (inf != nullptr && *inf != 0.f) return;  // a skipped step touches nothing
  // lr_tensor and the step counts are fp32 CPU scalars (fastopt/_ops.py moves lr_tensor so).
  if (const float* lr_ptr = optional_scalar(lr_tensor, "lr_tensor")) lr = *lr_ptr;
  const float coef = grad_coefficient(optional_scalar(grad_scale, "grad_scale"),
                                      optional_scalar(grad_norm, "grad_norm"),
                                      static_cast<float>(max_grad_norm),
                                      static_cast<float>(grad_factor));
  std::vector<AdamWCoeffs> coeffs(n);
  for (size_t i = 0; i < n; ++i) {
    coeffs[i] = adamw_coeffs(lr, beta1, beta2, weight_decay, eps, static_cast<double>(*in.steps[i]),
                             coef, maximize);
  }

  const std::vector<Chunk> chunks = make_chunks(in.params);
  parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Chunk& ch = chunks[k];
      const auto t = ch.tensor;
      dispatch_param_grad(dtype, grad_dtype, [&](auto p_tag, auto g_tag) {
        using P = decltype(p_tag);
        using G = decltype(g_tag);
        auto* p = static_cast<P*>(in.params[t].data);
        auto* g = static_cast<const G*>(in.grads[t].data);
        auto* m = static_cast<P*>(in.exp_avgs[t].data);
        auto* v = static_cast<P*>(in.exp_avg_sqs[t].data);
        if (amsgrad) {
          auto* vmax = static_cast<P*>(in.max_exp_avg_sqs[t].data);
          adamw_chunk<P, G, true>(p, g, m, v, vmax, ch.begin, ch.end, coeffs[t]);
        } else {
          adamw_chunk<P, G, false>(p, g, m, v, nullptr, ch.begin, ch.end, coeffs[t]);
        }
      });
    }
  });
}

}  // namespace
}  // namespace fastopt::cpu

STABLE_TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("adamw_", TORCH_BOX(&fastopt::cpu::adamw_cpu));
}
