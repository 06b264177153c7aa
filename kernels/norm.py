"""Global p-norm of many tensors plus a non-finite flag, in two deterministic launches.

Pass 1 (one launch per storage dtype, all into one buffer): each program reduces its chunk to
one fp32 partial (sum of x^2, sum of |x|, sum of |x|^p, or max |x|) and one flag, and writes
them to its own slot. Pass 2: one program reduces the partials in a fixed order. No float
atomics anywhere, so the result is bit-identical run to run, whatever the scheduling.

The flag checks every element for inf/NaN explicitly: a norm that overflows to inf from
finite values (sum of squares past 3.4e38) is not a non-finite gradient.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._table import chunk_coords, get_table, launch_heuristics, on_device, tensor_ptr, tl_dtype

__all__ = ["multi_tensor_norm"]

# Which reduction a launch does (a constexpr: each compiles its own loop).
L2 = tl.constexpr(0)
L1 = tl.constexpr(1)
LINF = tl.constexpr(2)
LP = tl.constexpr(3)

# The final pass walks the partials this many at a time (one program, 4 warps).
_FINISH_BLOCK = 1024


# Scalar kernel arguments are converted with tl.cast, not .to(): the interpreter passes Python
# floats through as Python floats.


@triton.jit
def _max_nan(a, b):
    """max that propagates NaN, as torch's amax does: an inf-norm over a NaN is NaN."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _fold(acc, flag, x, p, KIND: tl.constexpr):
    """Add the fp32 block ``x`` into the per-lane accumulator and non-finite flag."""
    a = tl.abs(x)
    flag = tl.maximum(flag, tl.where(a < float("inf"), 0.0, 1.0))  # NaN < inf is false too
    if KIND == L2:
        acc += x * x
    elif KIND == L1:
        acc += a
    elif KIND == LINF:
        acc = _max_nan(acc, a)
    else:
        # |x|^p in float64, rounded once: fp32 exp2/log2 lose ~1e-5 relative for large |log x|.
        # Zeros (the masked tail too) skip the log: 0^p = 0 for p > 0.
        a64 = tl.where(a == 0, 1.0, a).to(tl.float64)
        term = tl.exp2(tl.cast(p, tl.float64) * tl.log2(a64)).to(tl.float32)
        acc += tl.where(a == 0, 0.0, term)
    return acc, flag


@triton.jit(do_not_specialize=["n_tensors", "out_offset"])
def norm_partials_kernel(table, n_tensors, partials, flags, out_offset, p, DTYPE: tl.constexpr,
                         KIND: tl.constexpr, ALIGNED: tl.constexpr, MAP_ROW: tl.constexpr,
                         BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    """One partial and one flag per chunk, at ``out_offset + chunk``."""
    t, start, n_here = chunk_coords(table, n_tensors, MAP_ROW, CHUNK)
    x_ptr = tensor_ptr(table, n_tensors, 0, t, start, DTYPE, ALIGNED)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    flag = tl.zeros([BLOCK], dtype=tl.float32)
    n_full = n_here // BLOCK
    for i in range(0, n_full):  # unmasked full blocks: 128-bit loads
        x = tl.load(x_ptr + i * BLOCK + tl.arange(0, BLOCK)).to(tl.float32)
        acc, flag = _fold(acc, flag, x, p, KIND)
    offs = n_full * BLOCK + tl.arange(0, BLOCK)
    if n_full * BLOCK < n_here:  # zeros beyond the end are neutral for every KIND
        x = tl.load(x_ptr + offs, mask=offs < n_here, other=0.0).to(tl.float32)
        acc, flag = _fold(acc, flag, x, p, KIND)
    if KIND == LINF:
        total = tl.reduce(acc, 0, _max_nan)
    else:
        total = tl.sum(acc, axis=0)
    slot = out_offset + tl.program_id(0).to(tl.int64)
    tl.store(partials + slot, total)
    tl.store(flags + slot, tl.max(flag, axis=0))


@triton.jit(do_not_specialize=["n"])
def norm_finish_kernel(partials, flags, n, norm_out, flag_out, p,
                       KIND: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Reduce the ``n`` partials in index order (one program) and take the root."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    flag = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(partials + offs, mask=offs < n, other=0.0)
        if KIND == LINF:
            acc = _max_nan(acc, x)
        else:
            acc += x
        flag = tl.maximum(flag, tl.load(flags + offs, mask=offs < n, other=0.0))
    if KIND == LINF:
        total = tl.reduce(acc, 0, _max_nan)
    else:
        total = tl.sum(acc, axis=0)
    if KIND == L2:
        total = tl.sqrt_rn(total)
    elif KIND == LP:
        total = tl.exp2(tl.log2(total.to(tl.float64)) / tl.cast(p, tl.float64)).to(tl.float32)
    tl.store(norm_out, total)
    tl.store(flag_out, tl.max(flag, axis=0))


def _kind(norm_type: float):
    if norm_type == 2:
        return L2
    if norm_type == 1:
        return L1
    if norm_type == math.inf:
        return LINF
    if norm_type > 0 and math.isfinite(norm_type):
        return LP
    return None  # 0, negative, -inf, NaN: the reference's business


@torch.no_grad()
def multi_tensor_norm(tensors: list[Tensor], norm_type: float) -> tuple[Tensor, Tensor]:
    """fastopt.reference.multi_tensor_norm's contract: (fp32 norm, fp32 non-finite flag)."""
    norm_type = float(norm_type)
    kind = _kind(norm_type)
    if not tensors or kind is None:
        from .. import reference  # the oracle is the spec for these cases: no kernel to get wrong

        return reference.multi_tensor_norm(tensors, norm_type)
    device = tensors[0].device
    if not (all(map(Tensor.is_contiguous, tensors)) and on_device(tensors, device)):
        for i, t in enumerate(tensors):
            if t.device != device:
                raise ValueError(f"tensors[{i}] is on {t.device}, expected {device}")
            if not t.is_contiguous():
                raise ValueError(f"tensors[{i}] must be contiguous")
    # One launch per storage dtype (the dtype is a compile-time constant), in first-seen order.
    groups: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    plans, n_partials = [], 0
    for dtype, group in groups.items():
        dtype_tl = tl_dtype(dtype, "tensors")
        launch = launch_heuristics("norm", dtype.itemsize)
        table = get_table([group], launch.chunk, device)
        plans.append((dtype_tl, launch, table, n_partials))
        n_partials += table.n_chunks
    norm = torch.empty((), dtype=torch.float32, device=device)
    flag = torch.empty((), dtype=torch.float32, device=device)
    if n_partials == 0:  # only empty tensors: norm 0, nothing non-finite
        return norm.zero_(), flag.zero_()
    buf = torch.empty((2, n_partials), dtype=torch.float32, device=device)
    for dtype_tl, launch, table, offset in plans:
        if table.n_chunks == 0:
            continue
        norm_partials_kernel[(table.n_chunks,)](
            table.data, table.n_tensors, buf[0], buf[1], offset, norm_type,
            DTYPE=dtype_tl, KIND=kind, ALIGNED=table.aligned, MAP_ROW=table.map_row,
            BLOCK=launch.block, CHUNK=launch.chunk, num_warps=launch.num_warps,
        )  # fmt: skip
    norm_finish_kernel[(1,)](
        buf[0], buf[1], n_partials, norm, flag, norm_type, KIND=kind, BLOCK=_FINISH_BLOCK,
        num_warps=4,
    )  # fmt: skip
    return norm, flag
