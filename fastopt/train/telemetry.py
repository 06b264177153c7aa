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
* Under FSDP2 (DTensor params) each rank measures its shards and the sums are added up over
  the ranks: the numbers are the whole model's, the same on every rank.
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
import torch.distributed as dist
from torch import nn

from fastopt.sharded import is_dtensor, like_param, local, shard_spec

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
        if measure:
            with torch.no_grad():
                # This rank's shard of each (a DTensor's local part; a plain tensor whole):
                # the sums below are of shards, added up over the ranks in _whole_sums.
                grads = {p: _local_grad(p, g) for p, g in self._gradients().items()}
                before = {p: local(p).detach().clone() for p in grads}
                sums = {
                    f"grad/{k}": [(p, _sq(grads[p])) for p in ps if p in grads]
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
            # An overlapped offload's update is still running (fastopt.AdamW.overlap); the
            # weights after it are what is measured. Steps that log only: the others overlap.
            getattr(self.optimizer, "synchronize", lambda: None)()
            with torch.no_grad():
                for k, ps in self.sets.items():
                    ps = [p for p in ps if p in before]
                    sums[f"delta/{k}"] = [
                        (p, _sq(local(p).detach().float() - before[p].float())) for p in ps
                    ]
                    sums[f"weight/{k}"] = [(p, _sq(before[p])) for p in ps]
                sums["zero"] = [
                    (p, (mask & (local(p).detach() == before[p])).sum().double())
                    for p, mask in nonzero.items()
                ]
                whole = _whole_sums(sums, self.device)
            norms, ratios = {}, {}
            for k in self.sets:
                grad, delta, weight = (whole[f"{q}/{k}"] for q in ("grad", "delta", "weight"))
                norms[f"grad_norm/{k}"] = None if grad is None else math.sqrt(grad)
                if weight is not None:
                    ratio = math.sqrt(delta) / math.sqrt(weight) if weight > 0 else None
                    ratios[f"update_ratio/{k}"] = ratio
            self._measured = {**norms, **ratios, "zero_updates": int(whole["zero"] or 0)}

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


def _local_grad(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``p``'s gradient, element for element beside ``local(p)``."""
    return local(like_param(p, g)) if is_dtensor(p) else g


def _sq(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().pow(2).sum()


def _whole_sums(
    sums: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], device: torch.device
) -> dict[str, float | None]:
    """Each name's total over the whole params, from (param, this rank's sum over its part)
    pairs: a sharded param's parts are summed over the ranks that hold them, with one
    all-reduce per mesh dimension (every rank makes the same calls: the names and params are
    the same on all). None for a name without params."""
    plain = {name: 0.0 for name in sums}
    meshes: dict[tuple, torch.Tensor] = {}
    for i, (name, items) in enumerate(sums.items()):
        for p, value in items:
            spec = shard_spec(p)
            if spec is None or not spec[1]:  # whole, or a copy on every rank
                plain[name] += float(value)
                continue
            key = (spec[0], spec[1])
            if key not in meshes:
                meshes[key] = torch.zeros(len(sums), dtype=torch.float64, device=device)
            meshes[key][i] += value.to(device)
    for (mesh, dims), values in meshes.items():
        for dim in dims:
            dist.all_reduce(values, group=mesh.get_group(dim))
        for i, name in enumerate(sums):
            plain[name] += float(values[i])
    return {name: plain[name] if items else None for name, items in sums.items()}


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes there, KiB here
