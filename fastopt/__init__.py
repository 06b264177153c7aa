"""fastopt: fused AdamW, global-norm clipping, loss scaling and gradient accumulation for
PyTorch, with CPU (C++), CUDA and Triton kernels and a readable reference backend."""

from .accumulate import GradAccumulator
from .adamw import AdamW
from .backends import BACKENDS, availability, select_backend
from .norm import clip_grad_norm_, global_norm
from .scaler import LossScaler

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "AdamW",
    "GradAccumulator",
    "LossScaler",
    "__version__",
    "availability",
    "clip_grad_norm_",
    "global_norm",
    "select_backend",
]

# Loads fastopt._C, registering torch.ops.fastopt.* and their fake implementations (or warns
# once and leaves the reference backend).
from . import _ops  # noqa: E402, F401
