"""Shared test set-up.

Triton's interpreter must be chosen before Triton is first imported: on a machine without a
CUDA GPU every Triton kernel test runs interpreted, on CPU tensors, in this same process.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
