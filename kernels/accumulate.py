"""Gradient accumulation into fp32 buffers, many tensors per launch.

``acc = alpha * grad`` (first micro-batch) or ``acc += alpha * grad``, with the gradient upcast
to fp32 first and ``alpha`` an fp32 kernel argument, as the reference's
``grad.float() * alpha`` rounds it. Launched without multiply-add contraction so the product is
rounded before the sum, as in the reference and the C++ kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._table import check_lists, chunk_coords, get_table, launch_heuristics, tensor_ptr, tl_dtype

__all__ = ["accumulate_"]


@triton.jit
def _accumulate_block(acc_ptr, g_ptr, offs, mask, alpha, OVERWRITE: tl.constexpr):
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * alpha
    if not OVERWRITE:  # an overwrite never reads the buffer: one stream less
        g = tl.load(acc_ptr + offs, mask=mask) + g
    tl.store(acc_ptr + offs, g, mask=mask)


@triton.jit(do_not_specialize=["n_tensors"])
def accumulate_kernel(table, n_tensors, alpha,
                      G_DTYPE: tl.constexpr, OVERWRITE: tl.constexpr, ALIGNED: tl.constexpr,
                      MAP_ROW: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
    t, start, n_here = chunk_coords(table, n_tensors, MAP_ROW, CHUNK)
    acc_ptr = tensor_ptr(table, n_tensors, 0, t, start, tl.float32, ALIGNED)
    g_ptr = tensor_ptr(table, n_tensors, 1, t, start, G_DTYPE, ALIGNED)
    n_full = n_here // BLOCK
    for i in range(0, n_full):  # unmasked full blocks: 128-bit accesses
        _accumulate_block(acc_ptr, g_ptr, i * BLOCK + tl.arange(0, BLOCK), None, alpha, OVERWRITE)
    offs = n_full * BLOCK + tl.arange(0, BLOCK)
    if n_full * BLOCK < n_here:
        _accumulate_block(acc_ptr, g_ptr, offs, offs < n_here, alpha, OVERWRITE)


@torch.no_grad()
def accumulate_(accs: list[Tensor], grads: list[Tensor], alpha: float, overwrite: bool) -> None:
    """fastopt.reference.accumulate_'s contract: ``accs`` fp32, ``grads`` any float dtype."""
    if not accs:
        if grads:
            raise ValueError(f"accs is empty but grads has {len(grads)} tensors")
        return
    device = accs[0].device
    numels = check_lists({"accs": accs, "grads": grads}, device)
    if accs[0].dtype != torch.float32:
        raise ValueError(f"accs must be float32, got {accs[0].dtype}")
    g_dtype = tl_dtype(grads[0].dtype, "grads")
    launch = launch_heuristics("accumulate", max(4, grads[0].dtype.itemsize))
    table = get_table([accs, grads], launch.chunk, device, numels=numels)
    if table.n_chunks == 0:
        return
    accumulate_kernel[(table.n_chunks,)](
        table.data, table.n_tensors, float(alpha),
        G_DTYPE=g_dtype, OVERWRITE=bool(overwrite), ALIGNED=table.aligned,
        MAP_ROW=table.map_row, BLOCK=launch.block, CHUNK=launch.chunk,
        num_warps=launch.num_warps, enable_fp_fusion=False,
    )  # fmt: skip
