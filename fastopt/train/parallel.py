"""How the model is spread over processes: one strategy object, a few calls.

``wrap`` gives the module the loop runs forward through (and the plain module beneath it,
whose state is saved); ``backward_context(last)`` is what a micro-batch's backward runs in (DDP
reduces gradients on the step's last micro-batch only); ``reduce(tensors)`` sums gradients
held outside ``.grad`` (fastopt's fp32 accumulation buffers) over the processes, where
``buffered_accumulation`` allows them; ``state_dict``/``load_state_dict`` are the model's and
optimizer's state as checkpoints hold it, and ``checkpoints`` the manager that writes them.
In one process every collective is a no-op; under torchrun the model is DDP's
(``parallel: ddp``) or sharded with FSDP2 (``parallel: fsdp2``, :mod:`~fastopt.train.fsdp`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from . import distributed as D
from .checkpoint import CheckpointManager
from .config import ConfigError

__all__ = ["PARALLEL", "DataParallel", "SingleProcess", "choose_strategy"]

PARALLEL = ("auto", "single", "ddp", "fsdp2")


class SingleProcess:
    """One process: the model as given (a model already wrapped in DDP stays wrapped)."""

    name = "single"
    # fastopt's GradAccumulator may sum micro-batches outside .grad (then reduce() them).
    buffered_accumulation = True
    # A checkpoint resumes on another world size (run.json leaves the world size out of the
    # run's identity).
    reshardable = False
    # Every rank must run each forward pass together (a sharded model's forward all-gathers).
    lockstep = False

    def wrap(self, model: nn.Module, device: torch.device) -> tuple[nn.Module, nn.Module]:
        if isinstance(model, DDP):
            return model, model.module.to(device)
        model = model.to(device)
        return model, model

    def backward_context(self, model: nn.Module, last: bool):
        """DDP reduces on the step's last micro-batch only."""
        if isinstance(model, DDP) and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def reduce(self, tensors: list[torch.Tensor]) -> None:
        D.all_reduce_sum_many(tensors)  # a no-op in one process

    def state_dict(self, model: nn.Module, optimizer) -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

    def load_state_dict(self, model: nn.Module, optimizer, state: dict[str, Any]) -> None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])

    def checkpoints(self, directory, keep_last: int, model: nn.Module, optimizer):
        """``step_*.pt`` files, written by rank 0 (every rank holds the whole state)."""
        return CheckpointManager(directory, keep_last=keep_last)


class DataParallel(SingleProcess):
    """DDP: every process holds the whole model; gradients are all-reduced once a step."""

    name = "ddp"

    def wrap(self, model: nn.Module, device: torch.device) -> tuple[nn.Module, nn.Module]:
        if isinstance(model, DDP):
            return model, model.module.to(device)
        raw = model.to(device)
        device_ids = [device.index] if device.type == "cuda" else None
        return DDP(raw, device_ids=device_ids), raw


def choose_strategy(name: str = "auto") -> SingleProcess:
    """The strategy ``parallel`` names. "auto": DDP under torchrun (a process group of more
    than one), else a single process. "fsdp2" runs on any number of processes, one included
    (a mesh of one: its checkpoints then resume on more)."""
    distributed = D.is_distributed()
    if name == "auto":
        name = "ddp" if distributed else "single"
    if name == "single":
        if distributed:
            raise ConfigError(
                f"parallel 'single' under torchrun ({D.world_size()} processes) would train "
                "one copy per process into one folder: use parallel 'ddp' or 'fsdp2'"
            )
        return SingleProcess()
    if name == "ddp":
        if not distributed:
            raise ConfigError(
                "parallel 'ddp' needs several processes: run it under torchrun "
                "--nproc-per-node N with N >= 2 (in one process use 'single' or 'auto')"
            )
        return DataParallel()
    if name == "fsdp2":
        from .fsdp import FullyShard

        return FullyShard()
    raise ConfigError(f"config key 'parallel' must be one of {PARALLEL}, got {name!r}")
