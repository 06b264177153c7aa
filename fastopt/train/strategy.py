"""How the model is spread over processes: one strategy object, a few calls.

``wrap`` gives the module the loop runs forward through (and the plain module beneath it,
whose state is saved); ``backward_context(last)`` is what a micro-batch's backward runs in (DDP
reduces gradients on the step's last micro-batch only); ``reduce(tensors)`` sums gradients
held outside ``.grad`` (fastopt's fp32 accumulation buffers) over the processes, where
``buffered_accumulation`` allows them; ``state_dict``/``load_state_dict`` are the model's and
optimizer's state as checkpoints hold it, and ``checkpoints`` the manager that writes them.
In one process every collective is a no-op; under torchrun the model is DDP's
(``parallel: ddp``) or sharded with FSDP2 (``parallel: fsdp2``, below).

FSDP2 (``parallel: fsdp2``): the model's parameters sharded over the processes with
``torch.distributed.fsdp.fully_shard``, each rank holding one slice of every parameter, its
gradient and its optimizer state.

Each block (every member of an ``nn.ModuleList``, as a transformer's layers; without one,
each child module that holds parameters) is its own FSDP unit, so only one block's whole
parameters exist at a time during forward and backward; the root takes the rest.
fastopt.AdamW updates the shards and clips with the whole model's norm (:mod:`fastopt.sharded`).
Gradients are reduce-scattered after every micro-batch's backward and summed in the sharded
``.grad``: fastopt's GradAccumulator does not take DTensors, and holding the unsharded
gradients across micro-batches would give back the memory sharding saves.

FSDP2's checkpoints are ``torch.distributed.checkpoint`` folders
(:mod:`~fastopt.train.sharded_checkpoint`): a run saved on N ranks resumes on M, one included.
In one process (no torchrun, or ``--nproc-per-node 1``) the mesh has one rank, in a process
group of one started here that stays for the model's life (its shards' collectives use it).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fastopt.sharded import is_dtensor

from . import distributed as D
from .checkpoint import CheckpointManager
from .errors import ConfigError
from .sharded_checkpoint import ShardedCheckpointManager

__all__ = [
    "PARALLEL",
    "DataParallel",
    "FullyShard",
    "SingleProcess",
    "choose_strategy",
    "is_sharded",
    "shard_units",
]

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
        return FullyShard()
    raise ConfigError(f"config key 'parallel' must be one of {PARALLEL}, got {name!r}")


# -- FSDP2 -----------------------------------------------------------------------------------
def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are DTensors (every rank must then run its forward
    passes together: each one all-gathers the parameters)."""
    return any(is_dtensor(p) for p in model.parameters())


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The submodules that become FSDP units of their own: the members of every
    ``nn.ModuleList``, or without one the root's children that hold parameters. A module
    sharing a parameter with the rest of the model (tied weights) is left to the root, as a
    parameter can belong to one unit only."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    candidates = [u for lst in lists for u in lst] or list(model.children())
    units = []
    for unit in candidates:
        inside = {id(p) for p in unit.parameters()}
        if not inside:
            continue
        outside = {
            id(p)
            for m in model.modules()
            for p in m.parameters(recurse=False)
            if m is not unit and not any(m is sub for sub in unit.modules())
        }
        if inside.isdisjoint(outside):
            units.append(unit)
    return units


def _process_group(device: torch.device) -> None:
    """A process group of one when this process is alone (fully_shard needs a mesh)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class FullyShard(SingleProcess):
    """FSDP2: parameters, gradients and optimizer state sharded over the processes."""

    name = "fsdp2"
    buffered_accumulation = False
    reshardable = True
    lockstep = True

    def wrap(self, model: nn.Module, device: torch.device) -> tuple[nn.Module, nn.Module]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(model, DDP):
            raise ConfigError("parallel 'fsdp2' takes the plain model, not one wrapped in DDP")
        if isinstance(model, FSDPModule):  # sharded by the caller: kept as it is
            return model, model
        _process_group(device)
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        model = model.to(device)
        for unit in shard_units(model):
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, model

    def backward_context(self, model: nn.Module, last: bool):
        return contextlib.nullcontext()  # FSDP2 reduce-scatters every backward (see the module)

    def reduce(self, tensors: list[torch.Tensor]) -> None:
        raise RuntimeError(
            "parallel 'fsdp2': gradients are reduced by FSDP2 in .grad, not outside it"
        )

    def state_dict(self, model: nn.Module, optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_state_dict(self, model: nn.Module, optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
        )

    def checkpoints(self, directory, keep_last: int, model: nn.Module, optimizer):
        return ShardedCheckpointManager(
            directory, keep_last=keep_last, template=lambda: self.state_dict(model, optimizer)
        )
