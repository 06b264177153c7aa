"""The compiled backends ('cpu' and 'cuda'): torch.ops.fastopt.* behind the reference signatures.

Also registers the fake (meta) implementations that let torch.compile trace around the ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _ext

__all__ = ["accumulate_", "adamw_step", "multi_tensor_norm", "update_scale_"]


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
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    grad_norm: Tensor | None = None,
    max_grad_norm: float = 0.0,
    grad_factor: float = 1.0,
    masters: list[Tensor] = (),
    stochastic_rounding: bool = False,
    seed: int = 0,
    positions: list[int] = (),
    first_indices: list[int] = (),
    scales: list[Tensor] = (),
) -> None:
    if not params:
        return
    device = params[0].device
    lr_tensor = _on(lr, device) if isinstance(lr, Tensor) else None
    torch.ops.fastopt.adamw_(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
        0.0 if lr_tensor is not None else float(lr), lr_tensor,
        float(beta1), float(beta2), float(weight_decay), float(eps), bool(amsgrad),
        bool(maximize), _on(grad_scale, device), _on(found_inf, device), _on(grad_norm, device),
        float(max_grad_norm), float(grad_factor), list(masters), bool(stochastic_rounding),
        int(seed), [int(i) for i in positions],
        [int(i) for i in first_indices] if first_indices else [0] * len(params), list(scales),
    )  # fmt: skip


def multi_tensor_norm(tensors: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    if not tensors:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, zero.clone()
    return torch.ops.fastopt.multi_tensor_norm(tensors, float(norm_type))


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
    def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, lr_tensor,
          beta1, beta2, weight_decay, eps, amsgrad, maximize, grad_scale, found_inf, grad_norm,
          max_grad_norm, grad_factor, masters, stochastic_rounding, seed, positions,
          first_indices, scales):  # fmt: skip
        return None

    @torch.library.register_fake("fastopt::multi_tensor_norm")
    def _(tensors, norm_type):
        like = tensors[0]
        return like.new_empty((), dtype=torch.float32), like.new_empty((), dtype=torch.float32)

    @torch.library.register_fake("fastopt::accumulate_")
    def _(accs, grads, alpha, overwrite):
        return None

    @torch.library.register_fake("fastopt::update_scale_")
    def _(scale, growth_tracker, found_inf, growth_factor, backoff_factor, growth_interval):
        return None


if _ext.load():
    _register_fakes()
