"""The arguments of ``adamw_step`` after its six tensor lists, written once for every backend.

Each backend (:mod:`fastopt.reference`, :mod:`fastopt._ops` for 'cpu' and 'cuda', the Triton
``fastopt.kernels``) defines ``adamw_step(params, grads, exp_avgs, exp_avg_sqs,
max_exp_avg_sqs, state_steps, hyper, lean=PLAIN)``: :class:`Hyper` holds the step's scalars,
:class:`Lean` the memory-lean settings of the call's tensors. The C++ schema of
``fastopt::adamw_`` takes the same arguments flat, in this order (with ``lr_tensor`` after
``lr``); tests/test_step_args.py checks that all of them agree.

An optimizer builds its :class:`Lean` once per bucket of tensors and reuses it from step to
step; a :class:`Hyper` per param group and step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = ["Hyper", "Lean", "PLAIN", "TENSOR_LISTS"]

# The tensor lists every adamw_step takes first, in this order.
TENSOR_LISTS = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps")


@dataclass(frozen=True, slots=True)
class Hyper:
    """A step's scalars. ``lr`` may be a 0-dim tensor (read on the device). ``grad_scale``
    (the loss scale the gradients carry), ``found_inf`` (non-zero: skip the step, counts
    unchanged) and ``grad_norm`` (the stored gradients' global norm, for clipping to
    ``max_grad_norm`` when that is positive) are 0-dim tensors or None; ``grad_factor``
    multiplies every gradient (an accumulation's 1 / micro-batches)."""

    lr: float | Tensor
    beta1: float
    beta2: float
    weight_decay: float
    eps: float
    amsgrad: bool = False
    maximize: bool = False
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    grad_norm: Tensor | None = None
    max_grad_norm: float = 0.0
    grad_factor: float = 1.0


@dataclass(frozen=True, slots=True)
class Lean:
    """The memory-lean settings of one call's tensors (fastopt.reference.adamw_step explains
    each): ``masters`` (empty, or an int16 remainder / fp32 copy per param),
    ``stochastic_rounding`` and the noise's ``seed``, ``positions`` (each param's place in the
    optimizer) and ``first_indices`` (each tensor's first element in its whole param; empty:
    all 0), and ``scales`` (the block scales of 8-bit moments, one int8 tensor per param)."""

    masters: Sequence[Tensor] = ()
    stochastic_rounding: bool = False
    seed: int = 0
    positions: Sequence[int] = ()
    first_indices: Sequence[int] = ()
    scales: Sequence[Tensor] = ()


# Full-precision storage, no masters, rounding to nearest: torch's AdamW.
PLAIN = Lean()
