"""Gradient accumulation into fp32 buffers, with the averaging folded into the optimizer step.

    acc = fastopt.GradAccumulator(opt)
    for micro_batch in micro_batches:
        loss_fn(model(x), y).backward()
        acc.accumulate()            # buffers += grads (fp32), .grad freed
    opt.step()                      # uses the buffers, scaled by 1 / number of micro-batches
    opt.zero_grad()

Low-precision models (bf16/fp16 params) accumulate in fp32 instead of in their own dtype, and
the 1/N (or 1/token-count) factor costs no pass of its own: it is part of the step's gradient
coefficient.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from .backends import backend_ops, select_backend
from .sharded import is_dtensor

__all__ = ["GradAccumulator"]


def _check_param(p: Tensor) -> None:
    if is_dtensor(p):
        raise TypeError(
            "GradAccumulator does not take DTensor params (FSDP2, tensor parallelism): let their "
            "gradients accumulate in .grad across backward calls instead"
        )


def _buffer_dtype(p: Tensor) -> torch.dtype:
    """fp32, or complex64 (pairs of fp32) for a complex param; float64 and complex128 params
    keep their precision."""
    if p.dtype in (torch.float64, torch.complex128):
        return p.dtype
    if p.is_complex():
        if p.dtype != torch.complex64:
            raise TypeError(f"GradAccumulator does not support {p.dtype} params")
        return torch.complex64
    return torch.float32


class GradAccumulator:
    """Accumulates the gradients of ``optimizer``'s params in fp32 between optimizer steps.

    ``accumulate(weight)`` after each backward adds ``weight * grad`` to the buffers and frees
    ``.grad``. The next ``optimizer.step()`` (directly or through a loss scaler) uses the
    buffers with the factor ``1 / normalizer``, where the normalizer is the sum of the weights
    unless :meth:`set_normalizer` gave one (e.g. the number of tokens when each micro-batch's
    loss is a sum), then resets. Needs a fastopt optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, backend: str = "auto") -> None:
        if not hasattr(optimizer, "_accumulator"):
            raise TypeError(
                f"GradAccumulator needs a fastopt optimizer, got {type(optimizer).__name__}; with "
                "other optimizers let .grad accumulate and divide the loss by the micro-batch count"
            )
        if optimizer._accumulator is not None:
            raise RuntimeError("this optimizer already has a GradAccumulator")
        optimizer._accumulator = self
        self.optimizer = optimizer
        self.backend = backend
        self._buffers: dict[Tensor, Tensor] = {}
        self._fresh: set[Tensor] = set()  # params whose buffer holds this cycle's sum
        self._weight_sum = 0.0
        self._normalizer: float | None = None
        self.count = 0  # micro-batches accumulated since the last step

    @property
    def pending(self) -> bool:
        return self.count > 0

    @torch.no_grad()
    def accumulate(self, weight: float = 1.0) -> None:
        """Adds ``weight * p.grad`` of every param with a gradient into its fp32 buffer."""
        weight = float(weight)
        # The buffers are overwritten below: an overlapped update may still be reading them.
        self.optimizer.synchronize()
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        first, rest = defaultdict(lambda: ([], [])), defaultdict(lambda: ([], []))
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("GradAccumulator does not support sparse gradients")
                buf = self._buffers.get(p)
                if buf is None:
                    _check_param(p)
                    buf = torch.empty(p.shape, dtype=_buffer_dtype(p), device=p.device)
                    self._buffers[p] = buf
                grad = p.grad if p.grad.is_contiguous() else p.grad.contiguous()
                grad = grad.reshape(buf.shape)
                target = rest if p in self._fresh else first
                if buf.is_complex():  # the kernels add real and imaginary parts alike
                    buf, grad = torch.view_as_real(buf), torch.view_as_real(grad)
                # One launch per (device, buffer dtype, gradient dtype): a kernel takes one
                # dtype per list (the Triton one refused a bf16 grad beside an fp32 one).
                key = (p.device, buf.dtype, grad.dtype)
                target[key][0].append(buf)
                target[key][1].append(grad)
                self._fresh.add(p)
                p.grad = None
        for overwrite, lists in ((True, first), (False, rest)):
            for (device, dtype, _), (bufs, grads) in lists.items():
                ops = backend_ops(select_backend(self.backend, device, dtype))
                ops.accumulate_(bufs, grads, weight, overwrite)
        self._weight_sum += weight
        self.count += 1

    def set_normalizer(self, value: float) -> None:
        """Divide the accumulated sum by ``value`` instead of by the sum of the weights."""
        value = float(value)
        if not value > 0:
            raise ValueError(f"normalizer must be positive, got {value}")
        self._normalizer = value

    def gradients(self) -> dict[Tensor, Tensor]:
        """The accumulated (not yet normalised) gradient of each param that received one."""
        return {p: self._buffers[p] for p in self._fresh}

    def factor(self) -> float:
        """The factor the step multiplies the accumulated gradients by."""
        return 1.0 / (self._normalizer if self._normalizer is not None else self._weight_sum)

    def reset(self) -> None:
        """Forget this cycle's sums (the buffers are kept and overwritten next time)."""
        self._fresh.clear()
        self._weight_sum = 0.0
        self._normalizer = None
        self.count = 0
