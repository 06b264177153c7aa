"""What a logged step measures, from the passes that already run, for ``metrics.jsonl``.

Every step: its wall time, the share of it spent in the optimizer step, the samples and
tokens it trained on. On logging steps only (one extra read of the gradients and one copy of
the weights, which every other step is spared):

* ``grad_norm/<group>``: the unscaled gradient norm of each param group ("decay" and
  "no_decay" by default) or, with ``per: layer``, of each module's own params. They are
  computed here in Python from the gradients as the step will see them (the accumulated fp32
  buffers times the accumulator's factor, divided by the loss scale): fastopt's fused norm
  pass returns only the global norm, one number for all groups, and reading its per-bucket
  partial sums would need a change to the kernels.
* ``update_ratio/<group>``: ``||w_after - w_before|| / ||w_before||``, the relative size of
  the update (about 1e-3 is the common rule of thumb for a healthy learning rate).
* ``zero_updates``: elements with a nonzero gradient whose value the step left unchanged:
  updates that rounded to nothing in the param's dtype (for bf16 params, the sign that the
  lr is too small for the precision; for fp32 ones it stays near 0).
* ``peak_memory_mb``: on a GPU the peak allocated by torch since the last log; on the CPU the
  process's peak resident set size so far (``ru_maxrss``), which cannot be reset.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from typing import Any

import torch
from torch import nn

__all__ = ["Telemetry"]


class Telemetry:
    """Times steps and, on logging steps, measures gradients and updates (see the module)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler,
        device: torch.device,
        *,
        per: str = "group",
        enabled: bool = True,
    ) -> None:
        if per not in ("group", "layer"):
            raise ValueError(f"per must be 'group' or 'layer', got {per!r}")
        self.optimizer, self.scaler, self.device = optimizer, scaler, device
        self.enabled = enabled
        names = {p: n for n, p in model.named_parameters()}
        self.sets: dict[str, list[torch.Tensor]] = {}
        for i, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if per == "group":
                    key = str(group.get("name", i))
                else:  # the module that owns it: "blocks.0.attn.qkv"
                    key = names.get(p, f"group{i}").rpartition(".")[0] or "model"
                self.sets.setdefault(key, []).append(p)
        self._measured: dict[str, Any] = {}
        self.restart()

    def restart(self) -> None:
        self._t0 = time.perf_counter()
        self._steps, self._samples, self._tokens, self._optimizer_time = 0, 0, 0, 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _gradients(self) -> dict[torch.Tensor, torch.Tensor]:
        """Each param's gradient as the step will use it (unscaled, normalised)."""
        acc = getattr(self.optimizer, "_accumulator", None)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        if acc is not None and acc.pending:
            factor = acc.factor() / scale
            return {p: g * factor for p, g in acc.gradients().items()}
        params = [p for ps in self.sets.values() for p in ps]
        return {p: p.grad / scale for p in params if p.grad is not None}

    @contextlib.contextmanager
    def step(self, measure: bool):
        """Around the optimizer step: times it; with ``measure``, reads the gradients and
        weights before it and the weights after it."""
        if not self.enabled:
            yield
            return
        before = grads = None
        if measure:
            with torch.no_grad():
                grads = self._gradients()
                before = {p: p.detach().clone() for p in grads}
                norms = {
                    f"grad_norm/{k}": _norm([grads[p] for p in ps if p in grads])
                    for k, ps in self.sets.items()
                }
                nonzero = {p: g != 0 for p, g in grads.items()}
            del grads
        if self.device.type == "cuda":
            # Without it the host clock would time the queued backward pass too; the step
            # itself ends in a sync (the skipped-step flag is read), so this is the one added.
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        yield
        self._optimizer_time += time.perf_counter() - t0
        if measure:
            with torch.no_grad():
                ratios, zero = {}, 0
                for k, ps in self.sets.items():
                    ps = [p for p in ps if p in before]
                    delta = _norm([p.detach().float() - before[p].float() for p in ps])
                    weight = _norm([before[p] for p in ps])
                    ratios[f"update_ratio/{k}"] = delta / weight if weight > 0 else None
                for p, mask in nonzero.items():
                    zero += int((mask & (p.detach() == before[p])).sum())
            self._measured = {**norms, **ratios, "zero_updates": zero}

    def count(self, samples: int, tokens: int) -> None:
        self._steps += 1
        self._samples += samples
        self._tokens += tokens

    def metrics(self, applied: bool) -> dict[str, Any]:
        """The interval's rates and the last measured step's numbers; starts a new interval.
        ``applied``: False when the measured step was skipped (its update is then no update
        and its ratios are left out)."""
        elapsed = time.perf_counter() - self._t0
        row: dict[str, Any] = {
            "samples_per_sec": self._samples / elapsed,
            "step_time": elapsed / max(self._steps, 1),
        }
        if self.enabled:
            row["tokens_per_sec"] = self._tokens / elapsed
            row["optimizer_time_fraction"] = self._optimizer_time / elapsed
            row["peak_memory_mb"] = _peak_memory_mb(self.device)
            measured = self._measured
            if not applied:
                measured = {k: v for k, v in measured.items() if k.startswith("grad_norm/")}
            row.update(measured)
        self._measured = {}
        self.restart()
        return row


def _norm(tensors: list[torch.Tensor]) -> float | None:
    if not tensors:
        return None
    total = sum(float(t.detach().float().pow(2).sum()) for t in tensors)
    return math.sqrt(total)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes there, KiB here
