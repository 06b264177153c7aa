"""Global gradient norms: the multi-tensor norm kernel behind a device- and dtype-aware call,
and the drop-in :func:`clip_grad_norm_`."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import reference
from .backends import backend_ops, select_backend
from .backward_norm import combine_buckets
from .sharded import combine_flag, combine_norm, local, shard_spec

__all__ = ["clip_grad_norm_", "global_norm"]


def _kernel_supports(norm_type: float) -> bool:
    # 2, 1 and inf, the norms training uses, run in the kernels. Other p go to the reference,
    # which sums |x|^p in float64: in fp32 |x|^8 underflows below |x| = 2e-5 and overflows
    # above 6e4, so a one-element gradient's 8-norm came out 1e-3 off or inf where torch's
    # is |x| exactly. 0 and -inf use torch's norm there too.
    return norm_type in (1.0, 2.0, math.inf)


def _count_nonzero_tensors(tensors: list[Tensor]) -> tuple[Tensor, Tensor]:
    """torch's 0-"norm" of a list of gradients: the 0-norm of their per-tensor 0-norms, that
    is, how many tensors hold a non-zero element; and the non-finite flag. Per tensor, not per
    bucket or shard: a DTensor counts once, however many ranks hold non-zeros of it."""
    first = tensors[0].device
    dtype = torch.float64 if any(t.dtype in (torch.float64, torch.complex128) for t in tensors) \
        else torch.float32  # fmt: skip
    by_spec: dict[Any, list[Tensor]] = defaultdict(list)
    for t in tensors:
        by_spec[shard_spec(t)].append(local(t))
    counts, flags = [], []
    for spec, group in by_spec.items():
        nonzero = torch.stack([(t != 0).any() for t in group]).to(torch.float32)
        nonfinite = torch.stack([(~torch.isfinite(t)).any() for t in group]).to(torch.float32)
        if spec is not None:  # a tensor is non-zero (or non-finite) if any of its shards is
            nonzero, nonfinite = combine_flag(nonzero, [spec]), combine_flag(nonfinite, [spec])
        counts.append(nonzero.sum().to(first, dtype))
        flags.append(nonfinite.amax().to(first))
    return torch.stack(counts).sum(), torch.stack(flags).amax()


@torch.no_grad()
def global_norm(
    tensors: list[Tensor], norm_type: float = 2.0, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """The ``norm_type``-norm of all ``tensors`` together, and a non-finite flag.

    Returns 0-dim tensors on the first tensor's device: the norm (accumulated in fp32 whatever
    the dtype, but in float64 for float64 tensors, and then float64) and an fp32 1.0 if any
    element is inf or NaN. No host sync. DTensors (FSDP2, tensor parallelism) count whole:
    every rank measures its shards and the ranks sharing a mesh combine their results (a
    collective, so every rank of the mesh must call this with the same tensors).
    """
    if not tensors:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, zero.clone()
    if norm_type == 0:
        return _count_nonzero_tensors(tensors)
    buckets: dict[tuple, list[Tensor]] = defaultdict(list)
    for t in tensors:
        spec = shard_spec(t)
        t = local(t)
        if t.is_complex():
            # The norm is over magnitudes |z|; for p = 2 that equals the norm over the real and
            # imaginary parts, which needs no copy. Other p need the magnitudes themselves.
            t = torch.view_as_real(t) if norm_type == 2.0 else t.abs()
        buckets[(t.device, t.dtype, spec)].append(t if t.is_contiguous() else t.contiguous())
    first = tensors[0].device
    norms, flags = [], []
    for (device, dtype, spec), group in buckets.items():
        ops = backend_ops(select_backend(backend, device, dtype))
        if not _kernel_supports(norm_type):
            ops = reference
        norm, flag = ops.multi_tensor_norm(group, norm_type)
        if spec is not None:  # every rank must bring the same dtypes to the collectives
            empty = all(t.numel() == 0 for t in group)
            wide = torch.float64 if dtype == torch.float64 else torch.float32
            norm, flag = norm.to(device, wide), flag.to(device, torch.float32)
            norm, flag = combine_norm(norm, flag, spec, norm_type, empty)
        norms.append(norm)
        flags.append(flag)
    return combine_buckets(norms, flags, first, norm_type)


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Drop-in for :func:`torch.nn.utils.clip_grad_norm_`: same arguments, result and errors.

    The norm comes from fastopt's multi-tensor kernel with fp32 accumulation, so the returned
    total norm is fp32 whatever the gradient dtype (float64 when a gradient is float64).
    ``foreach`` is accepted and ignored.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    max_norm = float(max_norm)
    norm_type = float(norm_type)
    if len(grads) == 0:
        return torch.tensor(0.0)
    if norm_type < 0 or math.isinf(norm_type):
        # Max, min and negative-p norms have no identity, so torch refuses an empty gradient
        # among the others rather than ignore it; raise its own error, word for word.
        for g in grads:
            if g.numel() == 0:
                torch.linalg.vector_norm(g, norm_type)
    total_norm, _ = global_norm(grads, norm_type)
    if error_if_nonfinite and not math.isfinite(total_norm.item()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped. To disable this error and scale the gradients by the "
            "non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    clip_coef = max_norm / (total_norm + reference.CLIP_EPS)
    clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    for g in grads:
        by_device[g.device].append(local(g))
    for device, device_grads in by_device.items():
        torch._foreach_mul_(device_grads, clip_coef_clamped.to(device))
    return total_norm
