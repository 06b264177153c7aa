"""How the model is spread over processes: one strategy object, three calls.

``wrap`` gives the module the loop runs forward through (and the plain module beneath it,
whose state is saved); ``backward_context(last)`` is what a micro-batch's backward runs in (DDP
reduces gradients on the step's last micro-batch only); ``reduce(tensors)`` sums gradients
held outside ``.grad`` (fastopt's fp32 accumulation buffers) over the processes. In one
process every call is a no-op; under torchrun the model is DDP's.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import distributed as D

__all__ = ["DataParallel", "SingleProcess", "choose_strategy"]


class SingleProcess:
    """One process: the model as given (a model already wrapped in DDP stays wrapped)."""

    name = "single"

    def wrap(self, model: nn.Module, device: torch.device) -> tuple[nn.Module, nn.Module]:
        if isinstance(model, DDP):
            return model, model.module.to(device)
        model = model.to(device)
        return model, model

    def backward_context(self, model: nn.Module, last: bool):
        """DDP reduces on the step's last micro-batch only."""
        if isinstance(model, DDP) and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def reduce(self, tensors: list[torch.Tensor]) -> None:
        D.all_reduce_sum_many(tensors)  # a no-op in one process


class DataParallel(SingleProcess):
    """DDP: every process holds the whole model; gradients are all-reduced once a step."""

    name = "ddp"

    def wrap(self, model: nn.Module, device: torch.device) -> tuple[nn.Module, nn.Module]:
        if isinstance(model, DDP):
            return model, model.module.to(device)
        raw = model.to(device)
        device_ids = [device.index] if device.type == "cuda" else None
        return DDP(raw, device_ids=device_ids), raw


def choose_strategy() -> SingleProcess:
    """DDP under torchrun (a process group of more than one), else a single process."""
    return DataParallel() if D.is_distributed() else SingleProcess()
