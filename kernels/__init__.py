"""Triton kernels of fastopt: the four fused-step ops, with fastopt.reference's signatures.

Each op is one multi-tensor launch (the device table in _table.py) with no host sync. On CPU
tensors they run under Triton's interpreter (TRITON_INTERPRET=1, set before Triton's import).
"""

from .accumulate import accumulate_
from .adamw import adamw_step
from .loss_scale import update_scale_
from .norm import multi_tensor_norm

__all__ = ["accumulate_", "adamw_step", "multi_tensor_norm", "update_scale_"]
