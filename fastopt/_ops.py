"""The compiled backends ('cpu' and 'cuda'): torch.ops.fastopt.* behind the reference signatures.

Also registers the fake (meta) implementations that let torch.compile trace around the ops.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _ext
from .step_args import PLAIN, Hyper, Lean

__all__ = [
    "NORM_CHUNK",
    "AdamWPlan",
    "accumulate_",
    "adamw_step",
    "multi_tensor_norm",
    "norm_combine",
    "norm_partials_",
    "norm_partials_dtype",
    "update_scale_",
]


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    """A 0-dim fp32 scalar tensor moved to ``device`` without a sync (None stays None)."""
    if t is None:
        return None
    return t.to(device=device, dtype=torch.float32, non_blocking=True)


def adamw_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    hyper: Hyper,
    lean: Lean = PLAIN,
) -> None:
    if not params:
        return
    h = hyper
    device = params[0].device
    lr = h.lr
    lr_tensor = _on(lr, device) if isinstance(lr, Tensor) else None
    torch.ops.fastopt.adamw_.default(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
        0.0 if lr_tensor is not None else lr, lr_tensor, h.beta1, h.beta2, h.weight_decay,
        h.eps, h.amsgrad, h.maximize, _on(h.grad_scale, device), _on(h.found_inf, device),
        _on(h.grad_norm, device), h.max_grad_norm, h.grad_factor, lean.masters,
        lean.stochastic_rounding, lean.seed, lean.positions, _first_indices(lean, exp_avgs),
        lean.scales,
    )  # fmt: skip


class AdamWPlan:
    """A param group's tensors handed to the kernels once: every argument of ``adamw_step``
    that stays from step to step, bucket by bucket, so that a step passes its gradients alone
    (csrc/adamw_plan.h measures why). ``buckets``: per bucket, (params, exp_avgs, exp_avg_sqs,
    max_exp_avg_sqs, state_steps, amsgrad, lean, the positions of its gradients in a step's
    list, their dtype). The kernels hold the tensors until this object is collected. For
    eager steps only: a traced program cannot see what a planned step writes."""

    __slots__ = ("id", "__weakref__")

    def __init__(self, buckets: list[tuple]) -> None:
        self.id = 0
        for part in buckets:
            params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad, lean, at, dtype = part
            made = self.id == 0
            self.id = torch.ops.fastopt.adamw_plan.default(
                self.id, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad,
                list(lean.masters), lean.stochastic_rounding, lean.seed, lean.positions,
                _first_indices(lean, exp_avgs), list(lean.scales), at, dtype,
            )  # fmt: skip
            if made:  # not at exit: the registry outlives the interpreter (adamw_plan.h)
                weakref.finalize(self, _ext.drop_adamw_plan, self.id).atexit = False

    def step(self, grads: list[Tensor], hyper: Hyper) -> bool:
        """``adamw_step`` of every bucket with these gradients (the group's, in its order);
        False, with nothing written, when a param or gradient no longer has its bucket's dtype
        or is not contiguous, or a gradient is sparse."""
        h = hyper
        device = grads[0].device
        lr = h.lr
        lr_tensor = _on(lr, device) if isinstance(lr, Tensor) else None
        try:
            return torch.ops.fastopt.adamw_planned_.default(
                self.id, grads, 0.0 if lr_tensor is not None else lr, lr_tensor, h.beta1,
                h.beta2, h.weight_decay, h.eps, h.maximize, _on(h.grad_scale, device),
                _on(h.found_inf, device), _on(h.grad_norm, device), h.max_grad_norm,
                h.grad_factor,
            )  # fmt: skip
        except NotImplementedError:
            # A gradient of another layout (sparse) sends the call to a kernel there is not,
            # before anything runs: declined, like any gradient the plan does not fit.
            return False


def _first_indices(lean: Lean, exp_avgs: list[Tensor]) -> Sequence[int]:
    """first_indices as the op takes them: one per tensor where noise is drawn (stochastic
    rounding, 8-bit codes), empty meaning all 0; none otherwise, as the op then reads none
    (every int in a list is one more conversion per call)."""
    if lean.first_indices or not (lean.stochastic_rounding or exp_avgs[0].dtype == torch.uint8):
        return lean.first_indices
    return [0] * len(exp_avgs)


def multi_tensor_norm(tensors: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    if not tensors:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, zero.clone()
    return torch.ops.fastopt.multi_tensor_norm(tensors, float(norm_type))


# The norm's chunk (csrc/cpu/cpu_common.h and csrc/cuda/multi_tensor.cuh: kChunk): a tensor's
# partials take ceil(numel / NORM_CHUNK) slots.
NORM_CHUNK = 1 << 16


def norm_partials_dtype(device: torch.device) -> torch.dtype:
    """The type of the norm kernel's chunk partials on ``device``: float64 on the CPU, whose
    kernel combines them in double, float32 on CUDA."""
    return torch.float64 if device.type == "cpu" else torch.float32


def norm_partials_(partials: Tensor, tensors: list[Tensor], first_chunk: int,
                   norm_type: float) -> None:  # fmt: skip
    """Writes the chunk partials of ``tensors`` into ``partials`` (2 x chunks) from
    ``first_chunk`` on."""
    torch.ops.fastopt.norm_partials_(partials, tensors, int(first_chunk), float(norm_type))


def norm_combine(partials: Tensor, norm_type: float) -> tuple[Tensor, Tensor]:
    """multi_tensor_norm's (norm, flag) from every chunk's partial in ``partials``."""
    return torch.ops.fastopt.norm_combine(partials, float(norm_type))


def accumulate_(accs: list[Tensor], grads: list[Tensor], alpha: float, overwrite: bool) -> None:
    if accs:
        torch.ops.fastopt.accumulate_(accs, grads, float(alpha), bool(overwrite))


def update_scale_(
    scale: Tensor,
    growth_tracker: Tensor,
    found_inf: Tensor,
    growth_factor: float,
    backoff_factor: float,
    growth_interval: int,
) -> None:
    torch.ops.fastopt.update_scale_(
        scale, growth_tracker, _on(found_inf, scale.device), float(growth_factor),
        float(backoff_factor), int(growth_interval),
    )  # fmt: skip


def _register_fakes() -> None:
    """Shapes and dtypes of the outputs, without computing them (torch.compile, meta tensors)."""

    @torch.library.register_fake("fastopt::adamw_")
    def _(*args):  # the schema's arguments (csrc/ops.cpp); every output is written in place
        return None

    @torch.library.register_fake("fastopt::multi_tensor_norm")
    def _(tensors, norm_type):
        like = tensors[0]
        return like.new_empty((), dtype=torch.float32), like.new_empty((), dtype=torch.float32)

    @torch.library.register_fake("fastopt::norm_partials_")
    def _(partials, tensors, first_chunk, norm_type):
        return None

    @torch.library.register_fake("fastopt::norm_combine")
    def _(partials, norm_type):
        return (partials.new_empty((), dtype=torch.float32),
                partials.new_empty((), dtype=torch.float32))  # fmt: skip

    @torch.library.register_fake("fastopt::accumulate_")
    def _(accs, grads, alpha, overwrite):
        return None

    @torch.library.register_fake("fastopt::update_scale_")
    def _(scale, growth_tracker, found_inf, growth_factor, backoff_factor, growth_interval):
        return None


if _ext.load():
    _register_fakes()
