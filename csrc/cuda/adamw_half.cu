// The AdamW kernels for half params (csrc/cuda/adamw_kernel.cuh).
#include "adamw_kernel.cuh"

namespace fastopt::cuda {
FASTOPT_ADAMW_FOR(Half);
}  // namespace fastopt::cuda
