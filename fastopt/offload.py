"""Offload: the update of params on a GPU, run on the host where their state lives.

An offloading group's state is allocated in pinned host memory (fastopt.state) and its
buckets run the CPU kernel. :class:`HostCopies` gives that kernel what it reads on the host: a
step copies each param and gradient down into pinned buffers made at the first step (the
device's params are the truth, so a param changed between steps is seen), the step's
device scalars (learning rate, loss scale, norm, skip flag) with them, and after the update
copies each param back up. The global norm and the skip flag come from the device's own pass
over the gradients before any copy, as without offload; the host waits once, for all of the
copies down, and the copies up are queued on the device's stream (the next step's copies down
are queued after them, so a buffer is never overwritten while it is read).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .step_args import Hyper

__all__ = ["HostCopies"]


def _pinned_like(t: Tensor) -> Tensor:
    """An empty host tensor like ``t``, pinned where a GPU can copy to and from it."""
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())


def _copied_down(buffers: list[Tensor], tensors: list[Tensor]) -> list[Tensor]:
    """``tensors`` copied (queued) into host ``buffers``, made anew where they do not fit."""
    if len(buffers) != len(tensors) or any(
        b.shape != t.shape or b.dtype != t.dtype for b, t in zip(buffers, tensors)
    ):
        buffers = [_pinned_like(t) for t in tensors]
    for host, device in zip(buffers, tensors):
        host.copy_(device, non_blocking=True)
    return buffers


def _host_scalar(value):
    return value.to("cpu", non_blocking=True) if isinstance(value, Tensor) else value


class HostCopies:
    """A bucket's pinned host buffers for its params and gradients, made at its first step."""

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.grads: list[Tensor] = []
        self._device_params: list[Tensor] = []

    def down(self, params: list[Tensor], grads: list[Tensor], hyper: Hyper):
        """(host params, host grads, hyper with host scalars) for this step's update."""
        self.params = _copied_down(self.params, params)
        self.grads = _copied_down(self.grads, grads)
        scalars = {name: _host_scalar(getattr(hyper, name))
                   for name in ("lr", "grad_scale", "found_inf", "grad_norm")}  # fmt: skip
        if params and params[0].is_cuda:
            torch.cuda.current_stream(params[0].device).synchronize()
        self._device_params = params
        return self.params, self.grads, dataclasses.replace(hyper, **scalars)

    def up(self) -> None:
        """The updated params back to the device (queued on its current stream)."""
        for device, host in zip(self._device_params, self.params):
            device.copy_(host, non_blocking=True)
        self._device_params = []
