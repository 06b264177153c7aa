// fastopt._C_cuda: the CUDA kernels (registered by csrc/cuda/*.cu for the CUDA dispatch key of
// the schemas in fastopt._C). fastopt/_ext.py imports it only into a CUDA build of torch of the
// CUDA major it was built for, with a GPU visible. Python's limited API only, like fastopt._C.
#include <Python.h>

#include <atomic>

#include "../adamw_plan.h"
#include "../launch_config.h"

namespace fastopt {
namespace {

// Until the module is initialised (or if this library were loaded without it), the default.
std::atomic<int> g_default_setting{0};
std::atomic<int>* g_setting = &g_default_setting;

}  // namespace

int grid_blocks_per_sm() { return g_setting->load(std::memory_order_relaxed); }

namespace {
AdamWPlans* g_plans = nullptr;  // fastopt._C's, set when the module is initialised
}  // namespace

AdamWPlans& adamw_plans() { return *g_plans; }

}  // namespace fastopt

namespace {

// _grid_blocks_per_sm() -> the setting as the launches here see it (a test of the capsule).
PyObject* get_grid_blocks_per_sm(PyObject* /*self*/, PyObject* /*unused*/) {
  return PyLong_FromLong(fastopt::grid_blocks_per_sm());
}

PyMethodDef methods[] = {
    {"_grid_blocks_per_sm", get_grid_blocks_per_sm, METH_NOARGS,
     "Blocks per SM of the multi-tensor grids as this library reads them; set them with "
     "fastopt._C._set_grid_blocks_per_sm."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMODINIT_FUNC PyInit__C_cuda(void) {
  // The setting lives in fastopt._C (csrc/ops.cpp); importing the capsule imports that module,
  // whose schemas the kernels here implement.
  void* setting = PyCapsule_Import(fastopt::kGridSettingCapsule, 0);
  if (setting == nullptr) return nullptr;
  fastopt::g_setting = static_cast<std::atomic<int>*>(setting);
  // The plans too: one registry, whichever library's kernel steps a plan.
  void* plans = PyCapsule_Import(fastopt::kAdamWPlansCapsule, 0);
  if (plans == nullptr) return nullptr;
  fastopt::g_plans = static_cast<fastopt::AdamWPlans*>(plans);
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
