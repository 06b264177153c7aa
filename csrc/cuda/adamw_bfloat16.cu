// The AdamW kernels for bfloat16 params (csrc/cuda/adamw_kernel.cuh).
#include "adamw_kernel.cuh"

namespace fastopt::cuda {
FASTOPT_ADAMW_FOR(BFloat16);
}  // namespace fastopt::cuda
