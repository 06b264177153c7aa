"""Learning-rate schedules: pure functions of the step, wrapped as one torch LR scheduler.

A schedule is a small frozen dataclass whose call ``schedule(step)`` returns the multiplier of
the optimizer's base (peak) learning rate after ``step`` applied optimizer steps, so
``lr_at(step) = base_lr * schedule(step)``. Being pure, a schedule is tested against its
closed form and saves nothing: :class:`ScheduleLR` (a ``torch.optim.lr_scheduler.LRScheduler``,
so any torch optimizer works) keeps only the step count. The trainer steps it once per
*applied* optimizer step: not per micro-batch, not on a step skipped for inf/NaN gradients.

Reduce-on-plateau is the one schedule that depends on more than the step: its decision
:meth:`ReduceOnPlateau.decide` is a pure function of (state, metric), and the state lives in
:class:`ScheduleLR`'s ``state_dict``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "SCHEDULES",
    "ConstantWarmup",
    "Cyclical",
    "ExponentialDecay",
    "ReduceOnPlateau",
    "ScheduleLR",
    "StepDecay",
    "WarmupCosine",
    "WarmupLinear",
    "schedule_identity",
]


def _check(cond: bool, name: str, value: Any, what: str) -> None:
    if not cond:
        raise ValueError(f"{name} must be {what}, got {value!r}")


def _warmup(step: int, warmup_steps: int) -> float:
    # (step + 1) / warmup: the first step already moves (a zero lr would waste it) and the
    # warm-up reaches the peak exactly on step ``warmup_steps - 1``.
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def _check_horizon(warmup_steps: int, total_steps: int) -> None:
    _check(warmup_steps >= 0, "warmup_steps", warmup_steps, ">= 0")
    _check(
        total_steps > warmup_steps, "total_steps", total_steps, f"> warmup_steps ({warmup_steps})"
    )


def _decay_progress(step: int, warmup_steps: int, total_steps: int) -> float:
    """How far the decay after warm-up has got: 0 at its start, 1 at total_steps and after."""
    return min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))


@dataclass(frozen=True)
class WarmupLinear:
    """Linear warm-up to the peak over ``warmup_steps``, then linear decay to
    ``final_ratio`` at ``total_steps`` (and constant after)."""

    total_steps: int
    warmup_steps: int = 0
    final_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check_horizon(self.warmup_steps, self.total_steps)
        _check(0.0 <= self.final_ratio <= 1.0, "final_ratio", self.final_ratio, "in [0, 1]")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        progress = _decay_progress(step, self.warmup_steps, self.total_steps)
        return 1.0 - (1.0 - self.final_ratio) * progress


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warm-up, then half a cosine from the peak down to the floor ``min_ratio`` at
    ``total_steps`` (and the floor after)."""

    total_steps: int
    warmup_steps: int = 0
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        _check_horizon(self.warmup_steps, self.total_steps)
        _check(0.0 <= self.min_ratio <= 1.0, "min_ratio", self.min_ratio, "in [0, 1]")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return _warmup(step, self.warmup_steps)
        progress = _decay_progress(step, self.warmup_steps, self.total_steps)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StepDecay:
    """Multiply by ``gamma`` every ``step_size`` steps."""

    step_size: int
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _check(self.step_size > 0, "step_size", self.step_size, "> 0")
        _check(0.0 < self.gamma <= 1.0, "gamma", self.gamma, "in (0, 1]")

    def __call__(self, step: int) -> float:
        return self.gamma ** (step // self.step_size)


@dataclass(frozen=True)
class ExponentialDecay:
    """Multiply by ``gamma`` every step."""

    gamma: float

    def __post_init__(self) -> None:
        _check(0.0 < self.gamma <= 1.0, "gamma", self.gamma, "in (0, 1]")

    def __call__(self, step: int) -> float:
        return self.gamma**step


CYCLICAL_MODES = ("triangular", "triangular2", "exp_range")


@dataclass(frozen=True)
class Cyclical:
    """Triangular cyclical learning rate (Smith, 2017) between ``low`` and ``high`` (as
    multipliers of the base lr), ``step_size`` steps per half cycle.

    ``triangular`` keeps the amplitude, ``triangular2`` halves it every cycle and
    ``exp_range`` scales it by ``gamma ** step``.
    """

    step_size: int
    low: float = 0.1
    high: float = 1.0
    mode: str = "triangular"
    gamma: float = 1.0

    def __post_init__(self) -> None:
        _check(self.step_size > 0, "step_size", self.step_size, "> 0")
        _check(0.0 <= self.low <= self.high, "low", self.low, f"in [0, high={self.high}]")
        _check(self.mode in CYCLICAL_MODES, "mode", self.mode, f"one of {CYCLICAL_MODES}")
        _check(0.0 < self.gamma <= 1.0, "gamma", self.gamma, "in (0, 1]")

    def __call__(self, step: int) -> float:
        cycle = step // (2 * self.step_size)  # 0-based
        x = abs(step / self.step_size - 2 * cycle - 1)  # 1 at the cycle's ends, 0 at its peak
        amplitude = (self.high - self.low) * (1.0 - x)
        if self.mode == "triangular2":
            amplitude /= 2.0**cycle
        elif self.mode == "exp_range":
            amplitude *= self.gamma**step
        return self.low + amplitude


@dataclass(frozen=True)
class ConstantWarmup:
    """Linear warm-up over ``warmup_steps``, then the base lr."""

    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")

    def __call__(self, step: int) -> float:
        return _warmup(step, self.warmup_steps)


@dataclass(frozen=True)
class ReduceOnPlateau:
    """Optional linear warm-up, then multiply the lr by ``factor`` whenever the metric has not
    improved (by more than ``threshold``, relative) for ``patience`` evaluations in a row;
    ``cooldown`` evaluations are ignored after each reduction; never below ``min_ratio``."""

    mode: str = "min"
    factor: float = 0.5
    patience: int = 3
    threshold: float = 1e-4
    cooldown: int = 0
    min_ratio: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        _check(self.mode in ("min", "max"), "mode", self.mode, "'min' or 'max'")
        _check(0.0 < self.factor < 1.0, "factor", self.factor, "in (0, 1)")
        _check(self.patience >= 0, "patience", self.patience, ">= 0")
        _check(self.threshold >= 0.0, "threshold", self.threshold, ">= 0")
        _check(self.cooldown >= 0, "cooldown", self.cooldown, ">= 0")
        _check(0.0 <= self.min_ratio <= 1.0, "min_ratio", self.min_ratio, "in [0, 1]")
        _check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")

    def __call__(self, step: int) -> float:
        return _warmup(step, self.warmup_steps)

    def initial_state(self) -> dict[str, Any]:
        return {"best": None, "bad": 0, "cooldown": 0, "scale": 1.0}

    def decide(self, state: dict[str, Any], metric: float) -> dict[str, Any]:
        """The state after observing ``metric`` (pure: ``state`` is not modified)."""
        best, bad, cooldown, scale = state["best"], state["bad"], state["cooldown"], state["scale"]
        sign = 1.0 if self.mode == "min" else -1.0
        if best is None or sign * metric < sign * best - self.threshold * abs(best):
            best, bad = metric, 0
        elif cooldown > 0:
            bad = 0
        else:
            bad += 1
        cooldown = max(0, cooldown - 1)
        if bad > self.patience:
            scale, bad, cooldown = max(self.min_ratio, scale * self.factor), 0, self.cooldown
        return {"best": best, "bad": bad, "cooldown": cooldown, "scale": scale}


SCHEDULES: dict[str, type] = {
    "warmup_linear": WarmupLinear,
    "warmup_cosine": WarmupCosine,
    "step": StepDecay,
    "exponential": ExponentialDecay,
    "cyclical": Cyclical,
    "constant": ConstantWarmup,
    "plateau": ReduceOnPlateau,
}


def schedule_identity(schedule) -> str:
    """What the scheduler state records so that a resumed run can check it has the same
    schedule: a dataclass schedule's repr, which lists its fields; for any other callable
    (function, lambda, ``functools.partial``, bound method, callable object) its module and
    qualified name, because its repr holds a memory address that differs in every process.
    Such a callable's arguments and closure are not compared."""
    if dataclasses.is_dataclass(schedule) and not isinstance(schedule, type):
        return repr(schedule)
    target = schedule.func if isinstance(schedule, functools.partial) else schedule
    if not hasattr(target, "__qualname__"):  # a callable object: name its class
        target = type(target)
    return f"{getattr(target, '__module__', None)}.{target.__qualname__}"


class ScheduleLR(LRScheduler):
    """``lr = base_lr * schedule(step)`` for each param group, as a torch LR scheduler.

    ``step()`` advances one applied optimizer step. ``observe(metric)`` feeds an evaluation
    to a :class:`ReduceOnPlateau` schedule (and is a no-op for the others). ``state_dict``
    holds the step count and plateau state, not the schedule: the schedule comes from the
    config (or the caller), and loading checks it is the same one (:func:`schedule_identity`).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, schedule, last_epoch: int = -1) -> None:
        if not callable(schedule):
            raise TypeError(f"schedule must be callable step -> multiplier, got {schedule!r}")
        self.schedule = schedule
        self.plateau = schedule.initial_state() if isinstance(schedule, ReduceOnPlateau) else None
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int | None = None) -> float:
        step = self.last_epoch if step is None else step
        scale = self.plateau["scale"] if self.plateau is not None else 1.0
        return float(self.schedule(step)) * scale

    def get_lr(self) -> list[float]:
        f = self.factor()
        return [base * f for base in self.base_lrs]

    def observe(self, metric: float) -> None:
        """Records an evaluation metric (reduce-on-plateau only); applies a reduction now."""
        if self.plateau is None:
            return
        self.plateau = self.schedule.decide(self.plateau, float(metric))
        self._apply()

    def _apply(self) -> None:
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "schedule": schedule_identity(self.schedule),
            "last_epoch": self.last_epoch,
            "_step_count": self._step_count,
            "base_lrs": list(self.base_lrs),
            "plateau": None if self.plateau is None else dict(self.plateau),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("schedule") != schedule_identity(self.schedule):
            raise ValueError(
                f"the saved scheduler state is for the schedule {state_dict.get('schedule')}, "
                f"not for {schedule_identity(self.schedule)}"
            )
        self.last_epoch = int(state_dict["last_epoch"])
        self._step_count = int(state_dict["_step_count"])
        self.base_lrs = list(state_dict["base_lrs"])
        self.plateau = None if state_dict["plateau"] is None else dict(state_dict["plateau"])
        self._apply()
