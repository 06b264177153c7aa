"""Sharded parameters: DTensors (FSDP2's ``fully_shard``, tensor parallelism) and FSDP1's
flattened shards.

The AdamW update is elementwise, so the kernels run on each rank's local shard as they would
on a whole tensor. A global norm is not: each rank's kernel measures only its own shards, so
ranks that hold different shards of the same tensors combine their results here, over the
mesh dimensions those tensors are sharded on (replicated dimensions hold copies and are not
summed). The non-finite flag is combined the same way, so every rank makes the same skip
decision.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "combine_flag",
    "combine_norm",
    "dtensor_type",
    "first_index",
    "is_dtensor",
    "is_fsdp1_flat",
    "like_param",
    "local",
    "moved",
    "real_view",
    "shard_like",
    "shard_spec",
]


def dtensor_type() -> type | None:
    """The DTensor class, or None while no DTensor can exist: none does until its module is
    imported, and importing it here would add about 0.3 s to ``import fastopt``."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_dtensor(t: Tensor) -> bool:
    dtensor = dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def like_param(param: Tensor, grad: Tensor) -> Tensor:
    """``grad`` laid out as ``param`` (same mesh and placements), so that each rank's local
    shards of the two line up element for element. A gradient still Partial (its ranks' values
    to be summed) or sharded otherwise is redistributed, a collective, as torch's DTensor ops
    would; a plain tensor beside a DTensor is an error."""
    if not (is_dtensor(param) and is_dtensor(grad)):
        raise RuntimeError(
            "fastopt: a parameter and its gradient must both be DTensors or both plain tensors, "
            f"got {type(param).__name__} and {type(grad).__name__}"
        )
    if grad.device_mesh == param.device_mesh and grad.placements == param.placements:
        return grad
    return grad.redistribute(param.device_mesh, param.placements)


def local(t: Tensor) -> Tensor:
    """The rank's shard of a DTensor (its storage: in-place updates reach the DTensor), or
    ``t`` itself. Call under ``torch.no_grad``."""
    return t.to_local() if is_dtensor(t) else t


def real_view(t: Tensor) -> Tensor:
    """A complex tensor as pairs of reals (how the kernels update it, as torch's AdamW does),
    or ``t`` itself."""
    return torch.view_as_real(t) if t.is_complex() else t


def shard_like(p: Tensor, shard: Tensor) -> Tensor:
    """``shard`` as the DTensor it is of a sharded ``p`` (same mesh, placements and global
    shape), whatever its device: an offloaded state's host shard of a param on a GPU, as
    FSDP2's own CPU offload keeps its params; ``shard`` itself beside a plain ``p``."""
    if not is_dtensor(p):
        return shard
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(shard, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())


def moved(t: Tensor, device: torch.device, pin: bool = False) -> Tensor:
    """``t`` on ``device`` (pinned with ``pin``): a DTensor's local shard moved, the DTensor
    kept (its mesh stays the params')."""
    out = local(t).to(device)
    if pin and out.dim() and not out.is_pinned():
        out = out.pin_memory()
    return shard_like(t, out) if is_dtensor(t) else out


def first_index(t: Tensor) -> int:
    """The index, in the whole tensor (row-major), of the first element of this rank's shard
    of a DTensor; 0 for a plain tensor. Stochastic rounding counts elements from it, so that a
    shard's noise is the whole tensor's there (exactly so where the shard is a contiguous range
    of the whole, as FSDP2's first-dimension shards are)."""
    if not is_dtensor(t):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    index, stride = 0, 1
    for size, offset in zip(reversed(t.shape), reversed(offsets)):
        index += offset * stride
        stride *= size
    return index


def is_fsdp1_flat(p: Tensor) -> bool:
    """A parameter FSDP1 (``FullyShardedDataParallel``) has flattened into its shards: a plain
    tensor holding only this rank's part, which nothing here can combine across ranks."""
    return bool(getattr(p, "_fsdp_flattened", False))


def shard_spec(t: Tensor) -> tuple[Any, tuple[int, ...]] | None:
    """(device mesh, the mesh dimensions ``t`` is sharded over) of a DTensor; None for a plain
    tensor."""
    if not is_dtensor(t):
        return None
    dims = []
    for dim, placement in enumerate(t.placements):
        if placement.is_partial():
            raise RuntimeError(
                "fastopt: a gradient DTensor has a Partial placement (its ranks' values are "
                "still to be summed); reduce it (redistribute to Shard or Replicate) first"
            )
        if not placement.is_replicate():
            dims.append(dim)
    return t.device_mesh, tuple(dims)


def combine_norm(
    norm: Tensor, flag: Tensor, spec: tuple[Any, tuple[int, ...]], norm_type: float, empty: bool
) -> tuple[Tensor, Tensor]:
    """The ``norm_type``-norm (p != 0: the 0-"norm" counts tensors, not elements, see
    fastopt.norm) and non-finite flag of tensors sharded as ``spec``, from this rank's ``norm``
    and ``flag`` of its shards (``empty``: it holds no element of them)."""
    mesh, dims = spec
    if not dims:
        return norm, flag
    if norm_type == math.inf:
        op, value = dist.ReduceOp.MAX, norm.clone()
    elif norm_type == -math.inf:  # an empty shard must not win the minimum
        op, value = dist.ReduceOp.MIN, torch.full_like(norm, math.inf) if empty else norm.clone()
    else:  # sum of |x|^p over all shards, then the p-th root (an empty shard adds nothing,
        # where 0 ** p would add inf for p < 0)
        op = dist.ReduceOp.SUM
        value = torch.zeros_like(norm, dtype=torch.float64) if empty else norm.double() ** norm_type
    for dim in dims:
        dist.all_reduce(value, op=op, group=mesh.get_group(dim))
    if op == dist.ReduceOp.SUM:
        value = value ** (1.0 / norm_type)
    return value.to(norm.dtype), combine_flag(flag.clone(), [spec])


def combine_flag(flag: Tensor, specs: list[tuple[Any, tuple[int, ...]]]) -> Tensor:
    """A non-finite flag set on any rank that holds a shard of tensors sharded as ``specs``."""
    for mesh, dims in specs:
        for dim in dims:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return flag
