// AdamW on the CPU: every tensor of a param group in one parallel loop over fixed-size chunks.
// The per-element math is csrc/adamw_math.h, shared with the CUDA kernel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

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
void dispatch_param_grad(at::ScalarType param, at::ScalarType grad, F&& f) {
  auto with_grad = [&](auto p) {
    if (grad == at::kFloat) {
      f(p, float{});
    } else {
      f(p, p);
    }
  };
  switch (param) {
    case at::kFloat: return with_grad(float{});
    case at::kBFloat16: return with_grad(c10::BFloat16{});
    default: return with_grad(c10::Half{});
  }
}

void adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList state_steps, double lr, const std::optional<at::Tensor>& lr_tensor,
               double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
               bool maximize, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf,
               const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
               double grad_factor) {
  const size_t n = params.size();
  if (n == 0) return;
  check_adamw_inputs(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, amsgrad,
                     c10::DeviceType::CPU);
  const auto dtype = params[0].scalar_type();
  const auto grad_dtype = grads[0].scalar_type();

  const float* inf = optional_scalar(found_inf, "found_inf");
  if (inf != nullptr && *inf != 0.f) return;  // a skipped step touches nothing
  if (lr_tensor.has_value()) lr = lr_tensor->item<double>();
  const float coef = grad_coefficient(optional_scalar(grad_scale, "grad_scale"),
                                      optional_scalar(grad_norm, "grad_norm"),
                                      static_cast<float>(max_grad_norm),
                                      static_cast<float>(grad_factor));
  std::vector<AdamWCoeffs> coeffs(n);
  for (size_t i = 0; i < n; ++i) {
    coeffs[i] = adamw_coeffs(lr, beta1, beta2, weight_decay, eps,
                             state_steps[i].item<double>(), coef, maximize);
  }

  const std::vector<Chunk> chunks = make_chunks(params);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Chunk& ch = chunks[k];
      const auto t = ch.tensor;
      dispatch_param_grad(dtype, grad_dtype, [&](auto p_tag, auto g_tag) {
        using P = decltype(p_tag);
        using G = decltype(g_tag);
        auto* p = static_cast<P*>(params[t].data_ptr());
        auto* g = static_cast<const G*>(grads[t].data_ptr());
        auto* m = static_cast<P*>(exp_avgs[t].data_ptr());
        auto* v = static_cast<P*>(exp_avg_sqs[t].data_ptr());
        if (amsgrad) {
          auto* vmax = static_cast<P*>(max_exp_avg_sqs[t].data_ptr());
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

TORCH_LIBRARY_IMPL(fastopt, CPU, m) { m.impl("adamw_", &fastopt::cpu::adamw_cpu); }
