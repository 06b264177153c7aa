"""Early stopping: a pure decision over (state, metric) and a small object that holds the state.

The trainer feeds every evaluation to :meth:`EarlyStopping.update`; its ``state_dict`` goes into
the checkpoint, so a resumed run stops where an uninterrupted one would. Under DDP every rank
computes the same decision from the all-reduced metric, and the trainer still all-reduces the
stop flag so no rank can run on alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Decision", "EarlyStopping"]


@dataclass(frozen=True)
class Decision:
    """What one evaluation decided: stop now, and whether it is the best so far."""

    stop: bool
    improved: bool
    reason: str | None = None


class EarlyStopping:
    """Stops after ``patience`` evaluations in a row in which ``monitor`` did not improve by
    more than ``min_delta``, at once when it is inf/NaN (``stop_on_nonfinite``) or worse than
    ``divergence_threshold``.

    ``restore_best`` asks the trainer to load the best weights back at the end of the run.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        mode: str = "min",
        patience: int = 5,
        min_delta: float = 0.0,
        restore_best: bool = True,
        stop_on_nonfinite: bool = True,
        divergence_threshold: float | None = None,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not (isinstance(patience, int) and patience >= 1):
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        if not min_delta >= 0.0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        if divergence_threshold is not None and not math.isfinite(divergence_threshold):
            raise ValueError(f"divergence_threshold must be finite, got {divergence_threshold!r}")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.restore_best = restore_best
        self.stop_on_nonfinite = stop_on_nonfinite
        self.divergence_threshold = divergence_threshold
        self.state = self.initial_state()

    @staticmethod
    def initial_state() -> dict[str, Any]:
        return {"best": None, "best_step": None, "wait": 0, "stopped_step": None, "reason": None}

    def _better(self, value: float, than: float, margin: float) -> bool:
        return value < than - margin if self.mode == "min" else value > than + margin

    def decide(
        self, state: dict[str, Any], value: float, step: int
    ) -> tuple[dict[str, Any], Decision]:
        """The new state and the decision after seeing ``value`` at ``step`` (pure)."""
        state = dict(state)
        value = float(value)
        reason = None
        if not math.isfinite(value):
            if self.stop_on_nonfinite:
                reason = f"{self.monitor} is {value} at step {step}"
            improved = False
        elif self.divergence_threshold is not None and self._better(
            self.divergence_threshold, value, 0.0
        ):
            reason = (
                f"{self.monitor} = {value:.6g} is past the divergence threshold "
                f"{self.divergence_threshold:g} at step {step}"
            )
            improved = False
        else:
            improved = state["best"] is None or self._better(value, state["best"], self.min_delta)
        if improved:
            state.update(best=value, best_step=step, wait=0)
        elif reason is None:
            state["wait"] += 1
            if state["wait"] >= self.patience:
                # No best yet when every value so far was inf/NaN (stop_on_nonfinite=False).
                best = (
                    "no finite value yet"
                    if state["best"] is None
                    else f"best {state['best']:.6g} at step {state['best_step']}"
                )
                reason = (
                    f"{self.monitor} did not improve by more than {self.min_delta:g} for "
                    f"{state['wait']} evaluations ({best})"
                )
        if reason is not None:
            state.update(stopped_step=step, reason=reason)
        return state, Decision(stop=reason is not None, improved=improved, reason=reason)

    def update(self, value: float, step: int) -> Decision:
        """Records an evaluation and returns the decision."""
        self.state, decision = self.decide(self.state, value, step)
        return decision

    @property
    def best(self) -> float | None:
        return self.state["best"]

    @property
    def best_step(self) -> int | None:
        return self.state["best_step"]

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode, **self.state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if (state_dict["monitor"], state_dict["mode"]) != (self.monitor, self.mode):
            raise ValueError(
                f"the saved early-stopping state monitors {state_dict['monitor']} "
                f"({state_dict['mode']}), not {self.monitor} ({self.mode})"
            )
        self.state = {key: state_dict[key] for key in self.initial_state()}
