// The AdamW kernels for float params (csrc/cuda/adamw_kernel.cuh).
#include "adamw_kernel.cuh"

namespace fastopt::cuda {
FASTOPT_ADAMW_FOR(float);
}  // namespace fastopt::cuda
