"""Dynamic loss-scale update on the device: torch._amp_update_scale_'s rule, one program.

Reads found_inf where it lives, so the scaler never syncs to decide whether to back off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["update_scale_"]


@triton.jit(do_not_specialize=["growth_interval"])
def update_scale_kernel(scale_ptr, tracker_ptr, found_inf_ptr, growth_factor, backoff_factor,
                        growth_interval):  # fmt: skip
    scale = tl.load(scale_ptr)
    tracker = tl.load(tracker_ptr)
    inf = tl.load(found_inf_ptr).to(tl.float32) != 0
    successful = tracker + 1
    grown = successful >= growth_interval
    grown_scale = scale * growth_factor
    # Never grow past the fp32 range into inf (|x| < inf is false for inf and NaN).
    grown_scale = tl.where(tl.abs(grown_scale) < float("inf"), grown_scale, scale)
    new_scale = tl.where(inf, scale * backoff_factor, tl.where(grown, grown_scale, scale))
    tl.store(scale_ptr, new_scale)
    tl.store(tracker_ptr, tl.where(inf | grown, 0, successful).to(tl.int32))


@torch.no_grad()
def update_scale_(
    scale: Tensor,
    growth_tracker: Tensor,
    found_inf: Tensor,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
) -> None:
    """fastopt.reference.update_scale_'s contract, in place, without a host sync."""
    if scale.numel() != 1 or scale.dtype != torch.float32:
        raise ValueError(
            f"scale must be a one-element float32 tensor, got {scale.shape} {scale.dtype}"
        )
    if growth_tracker.numel() != 1 or growth_tracker.dtype != torch.int32:
        raise ValueError(
            f"growth_tracker must be a one-element int32 tensor, got "
            f"{growth_tracker.shape} {growth_tracker.dtype}"
        )
    if growth_tracker.device != scale.device:
        raise ValueError(f"growth_tracker is on {growth_tracker.device}, scale on {scale.device}")
    if found_inf.numel() != 1:
        raise ValueError(f"found_inf must have one element, got {found_inf.shape}")
    # As the reference, found_inf may live elsewhere (copied non_blocking; on the device, free).
    found_inf = found_inf.to(scale.device, non_blocking=True)
    update_scale_kernel[(1,)](
        scale, growth_tracker, found_inf, float(growth_factor), float(backoff_factor),
        int(growth_interval), num_warps=1,
    )  # fmt: skip
