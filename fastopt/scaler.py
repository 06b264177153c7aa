"""fastopt.LossScaler: dynamic loss scaling with torch.amp.GradScaler's interface and scale
sequence, whose step with a fastopt optimizer costs no pass of its own.

With a fastopt optimizer, ``step`` hands the scale to the optimizer: the non-finite check
rides on the optimizer's gradient-norm pass, the unscale factor is folded into the update,
and a step with inf/NaN gradients is skipped on the device, without a host sync. With any
other optimizer it behaves like GradScaler (unscale pass, then a host-side skip decision).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from torch import Tensor

from .backends import backend_ops, select_backend
from .sharded import combine_flag, local, shard_spec

__all__ = ["LossScaler"]


class _Stage(Enum):
    READY = 0
    UNSCALED = 1
    STEPPED = 2


class LossScaler:
    """Dynamic loss scaler: ``scale``, ``unscale_``, ``step``, ``update`` as GradScaler.

    ``enabled=False`` turns every method into a pass-through (bf16 autocast needs no
    scaling), so one training loop serves both. ``last_found_inf`` is the 0-dim tensor of
    the last step: non-zero when it was skipped (None before any step or when disabled).
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        *,
        backend: str = "auto",
    ) -> None:
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1.0, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if not (isinstance(growth_interval, int) and growth_interval > 0):
            raise ValueError(f"growth_interval must be a positive int, got {growth_interval!r}")
        self._enabled = enabled
        self._init_scale = float(init_scale)
        self._growth_factor = float(growth_factor)
        self._backoff_factor = float(backoff_factor)
        self._growth_interval = growth_interval
        self._init_growth_tracker = 0
        self._scale: Tensor | None = None
        self._growth_tracker: Tensor | None = None
        self._backend = backend
        self._states: dict[int, dict[str, Any]] = {}
        self.last_found_inf: Tensor | None = None

    # -- scaling --------------------------------------------------------------------------
    def _lazy_init(self, device: torch.device) -> None:
        self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=device)
        self._growth_tracker = torch.full(
            (), self._init_growth_tracker, dtype=torch.int32, device=device
        )

    def scale(self, outputs):
        """Multiplies a tensor (or nested list/tuple of tensors) by the scale factor."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, Tensor):
            if self._scale is None:
                self._lazy_init(outputs.device)
            return outputs * self._scale.to(device=outputs.device, non_blocking=True)
        if isinstance(outputs, (list, tuple)):
            scaled = [self.scale(o) for o in outputs]
            return type(outputs)(scaled) if isinstance(outputs, tuple) else scaled
        raise ValueError("outputs must be a Tensor or an iterable of Tensors")

    def _state(self, optimizer) -> dict[str, Any]:
        return self._states.setdefault(id(optimizer), {"stage": _Stage.READY, "found_inf": None})

    def _require_scale(self, method: str) -> Tensor:
        if self._scale is None:
            raise RuntimeError(
                f"Attempted {method} but the scale is not initialized: call scale() first"
            )
        return self._scale

    # -- unscale and step -----------------------------------------------------------------
    @torch.no_grad()
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divides the optimizer's gradients by the scale in place and records inf/NaN."""
        if not self._enabled:
            return
        scale = self._require_scale("unscale_")
        state = self._state(optimizer)
        if state["stage"] is _Stage.UNSCALED:
            raise RuntimeError(
                "unscale_() has already been called on this optimizer since the last update()."
            )
        if state["stage"] is _Stage.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        inv_scale = scale.double().reciprocal().float()
        found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
        grads = _gradients(optimizer)
        state["checked"] = bool(grads)
        by_key: dict[tuple, list[Tensor]] = {}
        specs = {}  # the shardings of DTensor gradients, whose ranks must agree on the flag
        for grad in grads:
            if grad.is_sparse:
                raise RuntimeError("LossScaler does not unscale sparse gradients")
            spec = shard_spec(grad)
            if spec is not None:
                specs[spec] = None
                grad = local(grad)
            if grad.is_complex():  # torch's unscale kernel takes real tensors only
                grad = torch.view_as_real(grad)
            by_key.setdefault((grad.device, grad.dtype), []).append(grad)
        for (device, _), group in by_key.items():
            device_inf = torch.zeros((), dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(
                group, device_inf, inv_scale.to(device, non_blocking=True)
            )
            found_inf += device_inf.to(found_inf.device, non_blocking=True)
        state["found_inf"] = combine_flag(found_inf, list(specs)) if specs else found_inf
        state["stage"] = _Stage.UNSCALED

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """Unscales (fused where it can) and steps unless the gradients hold inf or NaN."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        if "closure" in kwargs:
            raise RuntimeError("Closure use is not currently supported if LossScaler is enabled.")
        scale = self._require_scale("step")
        state = self._state(optimizer)
        if state["stage"] is _Stage.STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        # As torch's GradScaler: a step with no gradient to check is an error, not a no-op
        # that would count as a clean step towards growing the scale.
        checked = state["checked"] if state["stage"] is _Stage.UNSCALED else _gradients(optimizer)
        if not checked:
            raise AssertionError("No inf checks were recorded for this optimizer.")

        if getattr(optimizer, "_step_supports_amp_scaling", False) and hasattr(
            optimizer, "last_found_inf"
        ):
            # fastopt optimizer: it unscales and checks inside its own passes. Whatever another
            # scaler left behind is dropped first, so exactly one of the two is handed over.
            optimizer.__dict__.pop("grad_scale", None)
            optimizer.__dict__.pop("found_inf", None)
            if state["stage"] is _Stage.UNSCALED:
                optimizer.found_inf = state["found_inf"]
            else:
                optimizer.grad_scale = scale
            try:
                retval = optimizer.step(*args, **kwargs)
            finally:
                optimizer.__dict__.pop("grad_scale", None)
                optimizer.__dict__.pop("found_inf", None)
            found_inf = optimizer.last_found_inf
            if found_inf is None:  # no gradients at all: nothing was non-finite
                found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
        else:
            if state["stage"] is _Stage.READY:
                self.unscale_(optimizer)
            found_inf = state["found_inf"]
            retval = optimizer.step(*args, **kwargs) if found_inf.item() == 0 else None
        state["found_inf"] = found_inf
        state["stage"] = _Stage.STEPPED
        self.last_found_inf = found_inf
        return retval

    # -- scale update ---------------------------------------------------------------------
    @torch.no_grad()
    def update(self, new_scale: float | Tensor | None = None) -> None:
        """Backs off after a skipped step; grows after ``growth_interval`` clean steps."""
        if not self._enabled:
            return
        scale = self._require_scale("update")
        if new_scale is not None:
            if isinstance(new_scale, Tensor):
                if new_scale.numel() != 1 or new_scale.dtype != torch.float32:
                    raise ValueError("new_scale must be a one-element float32 tensor")
                scale.copy_(new_scale.reshape(()))
            else:
                scale.fill_(float(new_scale))
        else:
            found = [s["found_inf"] for s in self._states.values() if s["found_inf"] is not None]
            if not found:
                raise RuntimeError("No inf checks were recorded prior to update.")
            combined = found[0].to(scale.device)
            for f in found[1:]:
                combined = combined + f.to(scale.device)
            ops = backend_ops(select_backend(self._backend, scale.device))
            ops.update_scale_(
                scale, self._growth_tracker, combined, self._growth_factor,
                self._backoff_factor, self._growth_interval,
            )  # fmt: skip
        self._states.clear()

    # -- introspection and state ----------------------------------------------------------
    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        """The current scale as a Python float (a host sync); 1.0 when disabled."""
        if not self._enabled:
            return 1.0
        return self._init_scale if self._scale is None else float(self._scale.item())

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def _get_growth_tracker(self) -> int:
        if self._growth_tracker is None:
            return self._init_growth_tracker
        return int(self._growth_tracker.item())

    def state_dict(self) -> dict[str, Any]:
        """Same keys as torch.amp.GradScaler's, so either loads the other's."""
        if not self._enabled:
            return {}
        return {
            "scale": self.get_scale(),
            "growth_factor": self._growth_factor,
            "backoff_factor": self._backoff_factor,
            "growth_interval": self._growth_interval,
            "_growth_tracker": self._get_growth_tracker(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError(
                "The source state dict is empty, possibly because it was saved from a disabled "
                "instance of LossScaler."
            )
        self._init_scale = float(state_dict["scale"])
        self._growth_factor = float(state_dict["growth_factor"])
        self._backoff_factor = float(state_dict["backoff_factor"])
        self._growth_interval = int(state_dict["growth_interval"])
        self._init_growth_tracker = int(state_dict["_growth_tracker"])
        if self._scale is not None:
            self._scale.fill_(self._init_scale)
        if self._growth_tracker is not None:
            self._growth_tracker.fill_(self._init_growth_tracker)


def _gradients(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The gradients the optimizer's next step reads: a pending GradAccumulator's, else the
    params' ``.grad``."""
    acc = getattr(optimizer, "_accumulator", None)
    if acc is not None and acc.pending:
        return list(acc.gradients().values())
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
