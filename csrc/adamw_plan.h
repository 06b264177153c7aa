// AdamW plans: a param group's tensors handed to the kernels once, so that a step passes only
// its gradients and scalars (fastopt::adamw_plan and fastopt::adamw_planned_ in ops.cpp).
//
// Why: a Tensor[] argument reaches a stable-ABI kernel through torch's boxed call, which makes
// one owning handle per tensor, takes and drops a reference on each (the GIL with it, for a
// tensor Python also holds) and frees them all when the call returns: about 0.2 us per tensor
// per list on a 2-core EPYC, against 0.08 for a list of torch's own unboxed ops. A group whose
// params and state tensors are the same objects step after step (fastopt/_plan.py checks
// that) pays it for five lists of them; a plan pays it for one, the gradients.
//
// A plan is a group's buckets (one per kernel variant), stepped in one call. That call first
// checks what Python would otherwise check per tensor at every step, at a tenth of the cost:
// that every param and gradient still has its bucket's dtype and is contiguous (a param's
// .data may be replaced, a gradient is new at every step). If one is not, it declines, having
// written nothing, and the group takes the general path, which replans. A plan holds its
// tensors, not their pointers: a param whose .data is replaced keeps its TensorImpl, so the
// kernels read the new data, and the kernels check every tensor as a call with lists does.
//
// The registry lives in fastopt._C; fastopt._C_cuda reaches it through a capsule, as it does
// the launch setting (launch_config.h). Python drops a plan when its owner is collected
// (fastopt._C._drop_adamw_plan); the registry itself is never destroyed, so no tensor is
// released while libtorch unloads at exit.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

#include "dtypes.h"
#include "error.h"
#include "inputs.h"

namespace fastopt {

// One bucket: the tensors and settings of adamw_'s arguments that stay from step to step, the
// dtypes its params and gradients must keep, and where its gradients are in a step's list.
struct AdamWBucketPlan {
  TensorList params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masters, scales;
  bool amsgrad = false;
  bool stochastic_rounding = false;
  int64_t seed = 0;
  std::vector<int64_t> positions, first_indices;
  std::vector<int64_t> grad_indices;  // into the step's gradients, one per param
  ScalarType param_dtype = ScalarType::Float;
  ScalarType grad_dtype = ScalarType::Float;
};

struct AdamWPlan {
  std::vector<AdamWBucketPlan> buckets;
  size_t num_grads = 0;  // the step's gradients: one per param of every bucket
};

class AdamWPlans {
 public:
  // Adds `bucket` to plan `id`, or to a new plan when `id` is 0; returns the plan's id.
  int64_t add(int64_t id, AdamWBucketPlan bucket) {
    const std::lock_guard<std::mutex> lock(mutex_);
    if (id == 0) {
      id = next_++;
      plans_.emplace(id, std::make_shared<AdamWPlan>());
    }
    const auto it = plans_.find(id);
    FASTOPT_CHECK(it != plans_.end(), "fastopt.adamw_plan: no plan ", id, " to add to");
    // A plan is stepped only once it is built (fastopt/_ops.py), so it may change here.
    it->second->num_grads += bucket.params.size();
    it->second->buckets.push_back(std::move(bucket));
    return id;
  }

  // Shared, so a plan dropped by another thread outlives the step that is using it.
  std::shared_ptr<const AdamWPlan> get(int64_t id) const {
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = plans_.find(id);
    FASTOPT_CHECK(it != plans_.end(), "fastopt.adamw_planned_: no plan ", id,
                  " (it was dropped, or never made by fastopt.adamw_plan)");
    return it->second;
  }

  // Whether a plan `id` existed. Its tensors are released here, outside the lock.
  bool drop(int64_t id) {
    std::shared_ptr<const AdamWPlan> released;
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto it = plans_.find(id);
    if (it == plans_.end()) return false;
    released = std::move(it->second);
    plans_.erase(it);
    return true;
  }

 private:
  mutable std::mutex mutex_;
  std::unordered_map<int64_t, std::shared_ptr<AdamWPlan>> plans_;
  int64_t next_ = 1;
};

// The process's plans: defined in fastopt._C (csrc/ops.cpp) and in fastopt._C_cuda
// (csrc/cuda/module.cpp, from the capsule).
AdamWPlans& adamw_plans();

inline constexpr const char* kAdamWPlansCapsule = "fastopt._C._adamw_plans";

// Whether `grads` (the step's) and the plan's params still have their buckets' dtypes and are
// contiguous: reads two properties of each and nothing else. (A sparse gradient never gets
// here: the dispatcher sends the call to a sparse kernel, which there is not, and
// fastopt._ops.AdamWPlan.step takes that as a decline.) Throws if grads has the wrong count.
inline bool plan_holds(const AdamWPlan& plan, const TensorList& grads) {
  FASTOPT_CHECK(grads.size() == plan.num_grads, "fastopt.adamw_planned_: grads has ",
                grads.size(), " tensors, expected ", plan.num_grads);
  for (const auto& b : plan.buckets) {
    const ReadAhead params_ahead(b.params), grads_ahead(grads);
    for (size_t i = 0; i < b.params.size(); ++i) {
      const auto grad_index = static_cast<size_t>(b.grad_indices[i]);
      params_ahead.at(i);
      grads_ahead.at(grad_index);
      const Tensor& p = b.params[i];
      const Tensor& g = grads[grad_index];
      if (dtype_of(p) != b.param_dtype || !p.is_contiguous() || dtype_of(g) != b.grad_dtype ||
          !g.is_contiguous()) {
        return false;
      }
    }
  }
  return true;
}

// adamw_planned_ for the device whose adamw_ is `kAdamW` (each library instantiates its own):
// adamw_ of each bucket of the plan, or false, having written nothing, if the plan no longer
// holds.
template <auto kAdamW>
bool adamw_planned(int64_t plan, const TensorList& grads, double lr,
                   const OptionalTensor& lr_tensor, double beta1, double beta2,
                   double weight_decay, double eps, bool maximize,
                   const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                   const OptionalTensor& grad_norm, double max_grad_norm, double grad_factor) {
  const auto p = adamw_plans().get(plan);
  if (!plan_holds(*p, grads)) return false;
  const bool whole = p->buckets.size() == 1;  // then its grad_indices are 0, 1, ...
  TensorList own;
  for (const auto& b : p->buckets) {
    if (!whole) {
      own.clear();
      for (const int64_t i : b.grad_indices) own.push_back(grads[static_cast<size_t>(i)]);
    }
    kAdamW(b.params, whole ? grads : own, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs,
           b.state_steps, lr, lr_tensor, beta1, beta2, weight_decay, eps, b.amsgrad, maximize,
           grad_scale, found_inf, grad_norm, max_grad_norm, grad_factor, b.masters,
           b.stochastic_rounding, b.seed, b.positions, b.first_indices, b.scales);
  }
  return true;
}

}  // namespace fastopt
