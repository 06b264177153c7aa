// Schemas of every fastopt op, in one place. Implementations register per device in
// csrc/cpu/*.cpp and csrc/cuda/*.cu; fake (meta) implementations live in fastopt/_ops.py so
// torch.compile can trace around the ops.
//
// This library, fastopt._C, holds the schemas and the CPU kernels and loads into any torch; the
// CUDA kernels are a second library, fastopt._C_cuda, that fastopt/_ext.py loads only into a
// CUDA build of torch with a GPU (csrc/cuda/module.cpp).
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(fastopt, m) {
  // AdamW update of many tensors at once. grads may be the params' dtype or fp32. state_steps
  // hold the counts before this step: the op advances each by one (unless found_inf is
  // non-zero: a skipped step leaves them as they are) and updates with the advanced count.
  // lr_tensor, when given, overrides lr (read on device).
  // masters (empty, or one per param), the moments' own dtype and stochastic rounding (noise
  // keyed by seed, positions and the step, by each element's index in its whole param from
  // first_indices), 8-bit moments (uint8 codes, with one int8 tensor of block scales per
  // param in scales; empty otherwise): fastopt.reference.adamw_step explains them.
  m.def(
      "adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(g!)[] state_steps, "
      "float lr, Tensor? lr_tensor, float beta1, float beta2, float weight_decay, float eps, "
      "bool amsgrad, bool maximize, Tensor? grad_scale, Tensor? found_inf, Tensor? grad_norm, "
      "float max_grad_norm, float grad_factor, Tensor(e!)[] masters, bool stochastic_rounding, "
      "int seed, int[] positions, int[] first_indices, Tensor(f!)[] scales) -> ()");
  // The same step in two parts (csrc/adamw_plan.h says why). adamw_plan takes one bucket's
  // arguments of adamw_ that stay from step to step, where its gradients will be in a step's
  // list and their dtype, and adds it to `plan` (0: a new one); it returns the plan's number.
  // adamw_planned_ takes the plan, the gradients of all its buckets and the rest of adamw_'s
  // arguments, and writes what adamw_ writes, bucket by bucket: the plan's params, moments,
  // counts, masters and scales (tensors the schema cannot name, so no traced or
  // functionalized program may call it; fastopt/_ops.py calls it only in eager mode). It
  // returns false, having written nothing, when a param or gradient no longer has its
  // bucket's dtype or is not contiguous. fastopt._C._drop_adamw_plan releases a plan.
  m.def(
      "adamw_plan(int plan, Tensor[] params, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
      "Tensor[] max_exp_avg_sqs, Tensor[] state_steps, bool amsgrad, Tensor[] masters, "
      "bool stochastic_rounding, int seed, int[] positions, int[] first_indices, "
      "Tensor[] scales, int[] grad_indices, ScalarType grad_dtype) -> int");
  m.def(
      "adamw_planned_(int plan, Tensor[] grads, float lr, Tensor? lr_tensor, float beta1, "
      "float beta2, float weight_decay, float eps, bool maximize, Tensor? grad_scale, "
      "Tensor? found_inf, Tensor? grad_norm, float max_grad_norm, float grad_factor) -> bool");
  // Global norm of many tensors with fp32 accumulation in a fixed order, and a non-finite
  // flag: returns (norm, found_inf), both fp32 0-dim.
  m.def("multi_tensor_norm(Tensor[] tensors, float norm_type) -> (Tensor, Tensor)");
  // The same norm in two halves, so that each tensor can be measured when it is ready:
  // norm_partials_ writes the tensors' chunk partials (chunks of 2^16 elements, each tensor
  // on its own) into partials from chunk first_chunk on, and norm_combine reads all of them
  // and gives multi_tensor_norm's result, bit for bit, when the partials are those of
  // multi_tensor_norm's list (of one dtype) in its order. partials: 2 x chunks, float64 on
  // the CPU and float32 on CUDA (each kernel's own partial type), the partials then the flags.
  m.def(
      "norm_partials_(Tensor(a!) partials, Tensor[] tensors, int first_chunk, float norm_type) "
      "-> ()");
  m.def("norm_combine(Tensor partials, float norm_type) -> (Tensor, Tensor)");
  // acc = alpha * grad (overwrite) or acc += alpha * grad, fp32 accumulators.
  m.def("accumulate_(Tensor(a!)[] accs, Tensor[] grads, float alpha, bool overwrite) -> ()");
  // torch._amp_update_scale_'s rule.
  m.def(
      "update_scale_(Tensor(a!) scale, Tensor(b!) growth_tracker, Tensor found_inf, "
      "float growth_factor, float backoff_factor, int growth_interval) -> ()");
}

// Settings shared with the CUDA launchers (csrc/launch_config.h), and the AdamW plans
// (csrc/adamw_plan.h).
#include <atomic>

#include "adamw_plan.h"
#include "launch_config.h"

namespace fastopt {
namespace {
std::atomic<int> g_grid_blocks_per_sm{0};

// Any device's: a plan only holds its tensors; adamw_planned_ checks them, by device.
int64_t adamw_plan(int64_t plan, const TensorList& params, const TensorList& exp_avgs,
                   const TensorList& exp_avg_sqs, const TensorList& max_exp_avg_sqs,
                   const TensorList& state_steps, bool amsgrad, const TensorList& masters,
                   bool stochastic_rounding, int64_t seed, const std::vector<int64_t>& positions,
                   const std::vector<int64_t>& first_indices, const TensorList& scales,
                   const std::vector<int64_t>& grad_indices, ScalarType grad_dtype) {
  FASTOPT_CHECK(!params.empty(), "fastopt.adamw_plan: params is empty");
  check_count("adamw_plan", "grad_indices", grad_indices.size(), params.size());
  return adamw_plans().add(
      plan, AdamWBucketPlan{params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, masters,
                            scales, amsgrad, stochastic_rounding, seed, positions, first_indices,
                            grad_indices, params[0].scalar_type(), grad_dtype});
}
}  // namespace

AdamWPlans& adamw_plans() {
  static auto* plans = new AdamWPlans();  // never destroyed (adamw_plan.h says why)
  return *plans;
}
}  // namespace fastopt

STABLE_TORCH_LIBRARY_IMPL(fastopt, CompositeExplicitAutograd, m) {
  m.impl("adamw_plan", TORCH_BOX(&fastopt::adamw_plan));
}

// `import fastopt._C` loads this library (and so runs the registrations above). Ops are
// reached through torch.ops.fastopt; the module itself holds a private tuning hook, the
// address of its setting for fastopt._C_cuda, and the CUDA version that library was built for.
// Python's limited API only: the module is built once for every CPython from 3.10 (abi3).
#include <Python.h>

#include "plan_checks.h"

namespace {

PyObject* g_grad_name = nullptr;  // "grad", interned at import

// _set_grid_blocks_per_sm(n) -> the previous value. See csrc/launch_config.h.
PyObject* set_grid_blocks_per_sm(PyObject* /*self*/, PyObject* arg) {
  const long n = PyLong_AsLong(arg);
  if (n == -1 && PyErr_Occurred()) return nullptr;
  if (n < 0 || n > 1024) {
    PyErr_Format(PyExc_ValueError,
                 "_set_grid_blocks_per_sm: n must be 0 (as many as are resident) or a number "
                 "of blocks per SM from 1 to 1024, got %ld",
                 n);
    return nullptr;
  }
  return PyLong_FromLong(fastopt::g_grid_blocks_per_sm.exchange(static_cast<int>(n)));
}

// _drop_adamw_plan(n) -> whether plan n existed; its tensors are released.
PyObject* drop_adamw_plan(PyObject* /*self*/, PyObject* arg) {
  const long long id = PyLong_AsLongLong(arg);
  if (id == -1 && PyErr_Occurred()) return nullptr;
  return PyBool_FromLong(fastopt::adamw_plans().drop(id));
}

// _grads(params) -> ([p.grad for p in params], how many are None). See plan_checks.h.
PyObject* grads(PyObject* /*self*/, PyObject* params) {
  return fastopt::py::grads(params, g_grad_name);
}

PyMethodDef methods[] = {
    {"_set_grid_blocks_per_sm", set_grid_blocks_per_sm, METH_O,
     "Blocks per SM of the CUDA multi-tensor grids (0: as many as are resident); returns the "
     "previous value. A benchmarking hook, not an API."},
    {"_drop_adamw_plan", drop_adamw_plan, METH_O,
     "Releases the tensors of an AdamW plan (fastopt::adamw_plan); returns whether it existed."},
    {"_same_objects", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
                          &fastopt::py::same_objects)),
     METH_FASTCALL, "Whether two lists hold the same objects in order (fastopt/_plan.py)."},
    {"_entries_are", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(
                         &fastopt::py::entries_are)),
     METH_FASTCALL,
     "Whether dicts hold exactly the given keys, in order, with the given value objects "
     "(fastopt/_plan.py)."},
    {"_grads", grads, METH_O,
     "([p.grad for p in params], how many are None) (fastopt/_plan.py)."},
    {nullptr, nullptr, 0, nullptr}};

// Adds `value` (a new reference, or null with an error set) to `module` as `name`.
bool add(PyObject* module, const char* name, PyObject* value) {
  if (value == nullptr) return false;
  const int rc = PyModule_AddObjectRef(module, name, value);
  Py_DECREF(value);
  return rc == 0;
}

// The CUDA version fastopt._C_cuda was built for ("13.0"; setup.py defines it), or None when
// this build has no CUDA kernels: fastopt/_ext.py compares it with torch's before it loads
// that library.
PyObject* cuda_version() {
#if defined(FASTOPT_CUDA_MAJOR) && defined(FASTOPT_CUDA_MINOR)
  return PyUnicode_FromFormat("%d.%d", FASTOPT_CUDA_MAJOR, FASTOPT_CUDA_MINOR);
#else
  return Py_NewRef(Py_None);
#endif
}

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  g_grad_name = PyUnicode_InternFromString("grad");
  if (g_grad_name == nullptr) return nullptr;
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  // fastopt._C_cuda reads the grid setting through this capsule (launch_config.h), so the hook
  // above steers the CUDA launches without the two libraries linking to each other.
  PyObject* setting = PyCapsule_New(static_cast<void*>(&fastopt::g_grid_blocks_per_sm),
                                    fastopt::kGridSettingCapsule, nullptr);
  PyObject* plans = PyCapsule_New(static_cast<void*>(&fastopt::adamw_plans()),
                                  fastopt::kAdamWPlansCapsule, nullptr);
  if (!add(module, "_grid_blocks_per_sm", setting) || !add(module, "_adamw_plans", plans) ||
      !add(module, "_cuda_version", cuda_version())) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
