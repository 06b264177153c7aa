"""Forward and backward over one optimizer step's batches, in micro-batches that fit.

Each batch the loader yields is split into micro-batches of at most ``size`` samples; each
micro-batch's mean loss is weighted by its share of the step's samples, so the gradient, and
the update, is the one of the whole effective batch however it is split (fastopt's
GradAccumulator sums the micro-batches in fp32 and folds the normalisation into its step).

When a micro-batch runs out of memory, the step is started over with micro-batches half as
large (down to ``floor``): gradients dropped, the RNG states and the model's buffers put back
as they were at the start of the step, so the step computes exactly what a run configured
with the smaller size from the start computes. The size is part of the checkpoint, so a
resumed run goes on with the split the run had found. ``probe`` finds the largest size that
fits before the first step (``micro_batch_size: auto``).

Out-of-memory faults can be injected, to test all this on a machine that never runs out of
memory: with ``FASTOPT_INJECT_OOM_ABOVE=N`` in the environment, every micro-batch of more than
N samples raises ``torch.OutOfMemoryError`` after its forward pass (an environment variable,
not a config key: it must not change the run's identity, so that the run it split resumes
without it).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import distributed as D
from .checkpoint import capture_rng, restore_rng
from .components import autocast, to_device
from .data import sample_count
from .errors import ConfigError

__all__ = ["INJECT_OOM_ENV", "MicroBatches", "Passed", "split_batch"]

INJECT_OOM_ENV = "FASTOPT_INJECT_OOM_ABOVE"


def _injected_limit() -> int | None:
    value = os.environ.get(INJECT_OOM_ENV)
    if not value:
        return None
    try:
        limit = int(value)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"{INJECT_OOM_ENV} must be an integer >= 1, got {value!r}")
    return limit


def split_batch(obj: Any, size: int) -> list[Any]:
    """``obj`` (a tensor, or a tuple, list or dict of them) cut along its first dimension
    into pieces of ``size`` samples (the last one may be smaller)."""
    if isinstance(obj, torch.Tensor):
        return list(obj.split(size)) if obj.dim() > 0 else [obj]
    if isinstance(obj, (list, tuple)):
        parts = [split_batch(o, size) for o in obj]
        return [type(obj)(p) for p in zip(*parts)]
    if isinstance(obj, dict):
        parts = {k: split_batch(v, size) for k, v in obj.items()}
        return [dict(zip(parts, p)) for p in zip(*parts.values())]
    raise TypeError(f"cannot split a batch of {type(obj).__name__} into micro-batches")


@dataclass
class Passed:
    """What a step's forward passes saw: the sample-weighted loss sum (a 0-dim tensor, no
    sync), the samples (over all ranks) and the target elements (tokens, this rank)."""

    loss_sum: torch.Tensor
    samples: int
    tokens: int


class MicroBatches:
    """Runs forward and backward over a step's batches, split into micro-batches of at most
    ``size`` samples (None: as the loader yields them), halving the size on out-of-memory."""

    def __init__(
        self,
        model: nn.Module,
        raw_model: nn.Module,
        loss_fn,
        optimizer: torch.optim.Optimizer,
        scaler,
        strategy,
        *,
        device: torch.device,
        precision: str,
        size: int | None,
        floor: int = 1,
        fused: bool,
    ) -> None:
        self.model, self.raw_model, self.loss_fn = model, raw_model, loss_fn
        self.optimizer, self.scaler, self.strategy = optimizer, scaler, strategy
        self.device, self.precision = device, precision
        self.size, self.floor, self.fused = size, floor, fused
        self.accumulator = None
        self.inject_above = _injected_limit()

    def state_dict(self) -> dict[str, Any]:
        return {"size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.size = state["size"]

    # -- one step --------------------------------------------------------------------------
    def run(self, batches: list[tuple[Any, Any]]) -> Passed:
        """Forward and backward over ``batches`` (one optimizer step's), retried with smaller
        micro-batches while one runs out of memory."""
        rng = capture_rng()
        buffers = [b.detach().clone() for b in self.raw_model.buffers()]
        while True:
            try:
                return self._run(batches)
            except torch.OutOfMemoryError as e:
                self._drop_gradients()
                restore_rng(rng)
                for b, saved in zip(self.raw_model.buffers(), buffers):
                    b.copy_(saved)
                self._shrink(batches, e)

    def _pieces(self, batches) -> list[tuple[Any, Any]]:
        if self.size is None:
            return list(batches)
        pieces = []
        for inputs, targets in batches:
            pieces += zip(split_batch(inputs, self.size), split_batch(targets, self.size))
        return pieces

    def _run(self, batches) -> Passed:
        pieces = self._pieces(batches)
        counts = [sample_count(targets) for _, targets in pieces]
        total = sum(counts)
        if D.is_distributed():
            total = int(D.all_reduce_sum(torch.tensor(float(total), device=self.device)).item())
        accumulator = self._accumulator(len(pieces))
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        tokens, world = 0, D.world_size()
        for i, (inputs, targets) in enumerate(pieces):
            inputs, targets = to_device(inputs, self.device), to_device(targets, self.device)
            # Gradients are reduced on the last micro-batch only; with fastopt accumulation on
            # none (its fp32 buffers are reduced once below).
            last = i == len(pieces) - 1 and accumulator is None
            with self.strategy.backward_context(self.model, last):
                with autocast(self.device, self.precision):
                    loss = self.loss_fn(self.model(inputs), targets)
                self._inject(counts[i])
                if accumulator is not None:
                    self.scaler.scale(loss).backward()
                    accumulator.accumulate(weight=counts[i])
                else:  # plain .grad accumulation: weight each micro-batch's mean loss
                    self.scaler.scale(loss * (counts[i] * world / total)).backward()
            loss_sum += loss.detach().float() * counts[i]
            tokens += targets.numel() if isinstance(targets, torch.Tensor) else counts[i]
        if accumulator is not None:
            buffers = accumulator.gradients()  # in params order: the same on every rank
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            self.strategy.reduce([buffers[p] for p in params if p in buffers])
            accumulator.set_normalizer(total)
        return Passed(loss_sum, total, tokens)

    def _inject(self, samples: int) -> None:
        # After the forward pass, as a real OOM often comes: dropout has drawn from the RNG
        # and batch norm has updated its statistics, which the retry must put back.
        if self.inject_above is not None and samples > self.inject_above:
            raise torch.OutOfMemoryError(
                f"injected by {INJECT_OOM_ENV}={self.inject_above}: a micro-batch of "
                f"{samples} samples"
            )

    def _accumulator(self, n_pieces: int):
        """fastopt's fp32 accumulator when a fastopt optimizer sums several micro-batches
        (made when first needed: a split can make a step of one batch several). None under
        a strategy whose gradients must stay in .grad (FSDP2's DTensors)."""
        if not self.fused or n_pieces < 2 or not self.strategy.buffered_accumulation:
            return None
        if self.accumulator is None:
            import fastopt

            self.accumulator = fastopt.GradAccumulator(self.optimizer)
        return self.accumulator

    def _drop_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.accumulator is not None:
            self.accumulator.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _shrink(self, batches, error: BaseException) -> None:
        current = self.size or max(sample_count(t) for _, t in batches)
        if D.is_distributed():
            # The other ranks are inside this step's collectives: they cannot start it over.
            raise RuntimeError(
                f"a micro-batch of {current} samples ran out of memory on rank {D.rank()}; "
                "under torchrun set micro_batch_size (or 'auto', which probes before the first "
                "step on every rank together)"
            ) from error
        if current <= self.floor:
            raise RuntimeError(
                f"a micro-batch of {current} samples ran out of memory, and min_micro_batch_size "
                f"is {self.floor}: {error}"
            ) from error
        self.size = max(self.floor, current // 2)
        print(
            f"python -m fastopt train: a micro-batch of {current} samples ran out of memory; "
            f"going on with micro-batches of {self.size}",
            file=sys.stderr,
        )

    # -- start-up ---------------------------------------------------------------------------
    def probe(self, batch: tuple[Any, Any]) -> int:
        """Sets ``size`` to the largest that fits: forward and backward on ``batch``'s first
        ``size`` samples, halving from the whole batch until one runs (on every rank: the
        smallest wins). Leaves no gradients, and the RNGs and buffers as they were."""
        rng = capture_rng()
        buffers = [b.detach().clone() for b in self.raw_model.buffers()]
        inputs, targets = batch
        size = self.size or sample_count(targets)
        while True:
            fits = True
            try:
                x = to_device(split_batch(inputs, size)[0], self.device)
                y = to_device(split_batch(targets, size)[0], self.device)
                with autocast(self.device, self.precision):
                    loss = self.loss_fn(self.raw_model(x), y)
                self._inject(sample_count(y))
                self.scaler.scale(loss).backward()  # not through DDP: no collective
                del x, y, loss
            except torch.OutOfMemoryError:
                fits = False
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if not D.any_rank(not fits, self.device):
                break
            if size <= self.floor:
                raise RuntimeError(
                    f"micro_batch_size auto: even {size} samples (min_micro_batch_size) run out "
                    "of memory"
                )
            size = max(self.floor, size // 2)
        restore_rng(rng)
        for b, saved in zip(self.raw_model.buffers(), buffers):
            b.copy_(saved)
        self.size = size
        return size
