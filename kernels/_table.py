"""The multi-tensor device table: one int64 tensor that lets ONE launch cover many tensors.

Layout, for ``T`` non-empty tensors described by ``L`` pointer lists and split into ``C``
chunks of ``chunk`` elements (row ``r`` starts at ``r * T``; rows are runtime-indexed, so the
kernels never recompile for a new tensor count or shape):

    row 0            numel of each tensor
    row 1            index of each tensor's first chunk (cumulative chunk counts)
    rows 2 .. 2+L-1  data pointer of each tensor, one row per list (params, grads, ...)
    from (2+L) * T   C entries: the tensor each chunk belongs to

Program ``pid`` handles chunk ``pid``: tensor ``t = map[pid]``, elements
``[(pid - first[t]) * chunk, min(numel[t], (pid - first[t] + 1) * chunk))`` of it. Empty tensors
get no chunks and no column at all, so they cost nothing.

Building the table is Python work proportional to the tensor count plus one small host-to-device
copy, so tables are cached while the tensors' data pointers and sizes stay the same, which in
training is every step after the first. The table is a pure function of the key, so a tensor
freed and another allocated at the same address with the same size reuses it correctly.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastopt.quant import BLOCK as _QUANT_BLOCK

__all__ = [
    "Launch",
    "QUANT_BLOCK",
    "Table",
    "check_lists",
    "chunk_coords",
    "get_table",
    "launch_heuristics",
    "on_device",
    "tensor_ptr",
    "tl_dtype",
    "to_storage",
]

# Row indices of the fixed part of the layout (see the module docstring).
# (tl.constexpr: the only kind of global a Triton kernel may read).
ROW_NUMEL = tl.constexpr(0)
ROW_FIRST_CHUNK = tl.constexpr(1)
ROW_FIRST_POINTER = tl.constexpr(2)

# Elements sharing one scale in 8-bit moments (fastopt.quant.BLOCK). Blocks and chunks are
# whole multiples of it, so no quantization block straddles two programs or two iterations.
QUANT_BLOCK = tl.constexpr(_QUANT_BLOCK)

# Distinct (lists, device) combinations kept: one per optimizer param-group/dtype bucket, plus
# the norm and accumulation lists; a training loop cycles through a handful.
_CACHE_SIZE = 32

# Every pointer 16-byte aligned lets the kernels promise the compiler 16-byte alignment and get
# 128-bit loads; PyTorch allocations are 512-byte aligned, views into a flat buffer may not be.
_VECTOR_BYTES = 16

# Triton's interpreter (3.8) rounds fp32 -> bf16 toward zero (its cast ignores the rounding
# mode; its explicit "rtne" path rounds half away and drops the exponent carry). The GPU and
# torch round to nearest even, so under the interpreter the kernels round by hand.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
EMULATE_BF16_RTNE = tl.constexpr(INTERPRET)

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


@dataclass(frozen=True)
class Launch:
    """How one multi-tensor kernel is launched."""

    block: int  # elements one loop iteration of a program handles (a power of two)
    chunk: int  # elements one program handles at most: block * iterations
    num_warps: int


def launch_heuristics(op: str, elem_bytes: int) -> Launch:
    """The one place block and chunk sizes are chosen, for ``op`` on ``elem_bytes`` storage.

    AdamW and accumulation: 8 elements per thread per iteration, two 128-bit loads of each fp32
    stream or one of each half stream. sm_90 register counts (ptxas, AdamW with amsgrad):
    8 per thread: 64 (fp32) and 67 (bf16 params, fp32 grads); 16 per thread: 64 and 241, the
    latter allowing only two 4-warp programs per SM. The norm streams one tensor into one
    accumulator, so it takes 16 per thread (8 for float64). Four warps keep many small
    programs resident per SM. A chunk is 16 iterations: the per-program prologue (table reads,
    the float64 bias corrections) is noise beside 16K elements, and a 1M-element tensor still
    spreads over 64 programs.
    """
    if op in ("adamw", "accumulate"):
        per_thread = 8
    elif op == "norm":
        per_thread = 16 if elem_bytes <= 4 else 8
    else:
        raise ValueError(f"no launch heuristics for op {op!r}")
    num_warps = 4
    block = num_warps * 32 * per_thread  # 1024: 32 quantization blocks (QUANT_BLOCK)
    if block % _QUANT_BLOCK:
        raise RuntimeError(f"a {block}-element block would split 8-bit moments' scale blocks")
    return Launch(block=block, chunk=block * 16, num_warps=num_warps)


def tl_dtype(dtype: torch.dtype, name: str) -> tl.dtype:
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"{name} must be float32, float16, bfloat16 or float64, got {dtype}"
        ) from None


def check_lists(lists: dict[str, list[Tensor]], device: torch.device) -> tuple[int, ...]:
    """Same lengths, sizes and device everywhere, contiguous, uniform dtype per list.

    Returns the sizes. Raises ValueError naming the offending argument and index. This runs
    on every call, so the common case is C-level ``map`` passes over each list (~10x faster
    than a Python loop over a thousand tensors); only a failure walks the tensors one by one.
    """
    first = next(iter(lists.values()))
    numels = tuple(map(Tensor.numel, first))
    for lst in lists.values():
        ok = (
            len(lst) == len(first)
            and all(map(Tensor.is_contiguous, lst))
            and on_device(lst, device)
            and len(set(map(_dtype, lst))) <= 1
            and tuple(map(Tensor.numel, lst)) == numels
        )
        if not ok:
            _explain(lists, device)
    return numels


_device = attrgetter("device")
_dtype = attrgetter("dtype")


def on_device(tensors: list[Tensor], device: torch.device) -> bool:
    """Whether every tensor is on ``device``. For CUDA, the integer device index (a CPU or
    meta tensor gives -1) is half the cost of building a torch.device per tensor."""
    if device.type == "cuda" and device.index is not None:
        return set(map(Tensor.get_device, tensors)) <= {device.index}
    return set(map(_device, tensors)) <= {device}


def _explain(lists: dict[str, list[Tensor]], device: torch.device) -> None:
    """Raise the ValueError for the first bad tensor (check_lists found one)."""
    names = list(lists)
    n = len(lists[names[0]])
    for name in names:
        lst = lists[name]
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors, expected {n} (as {names[0]})")
        for i, t in enumerate(lst):
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device}, expected {device}")
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}] must be contiguous")
            if t.dtype != lst[0].dtype:
                raise ValueError(f"{name}[{i}] is {t.dtype}, but {name}[0] is {lst[0].dtype}")
            ref = lists[names[0]][i]
            if t.numel() != ref.numel():
                raise ValueError(
                    f"{name}[{i}] has {t.numel()} elements, {names[0]}[{i}] has {ref.numel()}"
                )
    raise AssertionError("check_lists found a bad tensor that _explain did not")


@dataclass(frozen=True)
class Table:
    data: Tensor  # the int64 device table described in the module docstring
    n_tensors: int  # T: non-empty tensors
    n_chunks: int  # C: the grid size
    map_row: int  # row where the chunk -> tensor map starts: 2 + L
    aligned: bool  # every data pointer is 16-byte aligned


_cache: OrderedDict[tuple, Table] = OrderedDict()


def get_table(
    lists: list[list[Tensor]],
    chunk: int,
    device: torch.device,
    scalar_lists: tuple[list[Tensor], ...] = (),
    numels: tuple[int, ...] | None = None,
    value_rows: tuple[tuple[int, ...], ...] = (),
) -> Table:
    """The table for ``lists`` (parallel lists of same-size tensors), built or from the cache.

    ``scalar_lists`` (state_steps) add pointer rows after ``lists`` but are read once per
    program, not streamed, so their alignment does not matter: they may be views into one
    buffer without costing the streamed data its 128-bit loads. ``numels``: the sizes, when
    the caller has them (check_lists returns them). ``value_rows``: rows of one int per
    tensor (the params' positions), after the pointer rows.
    """
    if INTERPRET and device.type != "cpu":
        # The interpreter copies kernel arguments to the host, but not what the table's raw
        # pointers point to.
        raise ValueError(f"under TRITON_INTERPRET=1 the kernels take CPU tensors, not {device}")
    if numels is None:
        numels = tuple(map(Tensor.numel, lists[0]))
    ptrs = tuple(chain.from_iterable(map(Tensor.data_ptr, lst) for lst in (*lists, *scalar_lists)))
    key = (device, chunk, len(lists), len(scalar_lists), numels, ptrs, value_rows)
    table = _cache.get(key)
    if table is not None:
        _cache.move_to_end(key)
        return table
    table = _build(lists, scalar_lists, numels, chunk, device, value_rows)
    _cache[key] = table
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return table


def _build(lists, scalar_lists, numels: tuple, chunk: int, device: torch.device,
           value_rows: tuple = ()) -> Table:  # fmt: skip
    keep = [i for i, n in enumerate(numels) if n > 0]
    counts = [triton.cdiv(numels[i], chunk) for i in keep]
    first, total = [], 0
    for c in counts:
        first.append(total)
        total += c
    rows = [[numels[i] for i in keep], first]
    streamed = [[lst[i].data_ptr() for i in keep] for lst in lists]
    rows += streamed + [[lst[i].data_ptr() for i in keep] for lst in scalar_lists]
    rows += [[values[i] for i in keep] for values in value_rows]
    chunk_map = [j for j, c in enumerate(counts) for _ in range(c)]
    flat = [x for row in rows for x in row] + chunk_map
    aligned = all(p % _VECTOR_BYTES == 0 for row in streamed for p in row)
    data = torch.tensor(flat, dtype=torch.int64)
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            # A graph would replay the copy from a host buffer recycled since: refuse.
            raise RuntimeError(
                "fastopt.kernels: these tensors have no multi-tensor table yet, and one cannot "
                "be built during CUDA graph capture; run one step before capturing"
            )
        # Pinned, so the copy is queued on the stream without waiting for the device (a
        # pageable copy synchronises); torch keeps the pinned block until the copy is done.
        data = data.pin_memory().to(device, non_blocking=True)
    else:
        data = data.to(device)
    return Table(data=data, n_tensors=len(keep), n_chunks=total, map_row=len(rows), aligned=aligned)


@triton.jit
def chunk_coords(table, n_tensors, MAP_ROW: tl.constexpr, CHUNK: tl.constexpr):
    """(tensor index, first element, element count) of this program's chunk, all int64."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(table + MAP_ROW * n_tensors + pid)
    numel = tl.load(table + ROW_NUMEL * n_tensors + t)
    first_chunk = tl.load(table + ROW_FIRST_CHUNK * n_tensors + t)
    start = (pid - first_chunk) * CHUNK
    return t, start, tl.minimum(numel - start, CHUNK)


@triton.jit
def tensor_ptr(table, n_tensors, row, t, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t``'s pointer from list ``row`` (0-based after the fixed rows), at ``start``.

    The compiler cannot see the alignment of a pointer read from memory; when the launcher
    checked every pointer, say so, or the loads stay 32-bit.
    """
    addr = tl.load(table + (ROW_FIRST_POINTER + row) * n_tensors + t)
    ptr = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr + start


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """fp32 ``x`` rounded to the storage dtype, to nearest even (see EMULATE_BF16_RTNE)."""
    if EMULATE_BF16_RTNE and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        # Add just under half a bf16 ulp, plus one when the kept part is odd: ties go to even.
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, tl.full(x.shape, 0x7FC00000, tl.uint32), rounded)  # NaN
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif DTYPE == tl.bfloat16:
        # The GPU's cvt.rn.bf16.f32 writes a NaN as 0x7FFF; every backend writes 0x7FC0.
        nan = tl.full(x.shape, 0x7FC0, tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, nan, x.to(DTYPE))
    else:
        return x.to(DTYPE)
