"""8-bit moments of sharded params, in the whole param's blocks: the same codes and scales on
any number of ranks.

Block k of a param's 8-bit moments covers elements 32k to 32k + 31 of the whole (flattened)
param, whatever its sharding. A rank's shard of a param sharded along dim 0 (FSDP2) is one
contiguous range of the whole; where a shard boundary falls inside a block, that block is
*cut*: its elements live on two or more ranks, and its scale (from its largest magnitude) must
still be the whole block's. Each rank's shard is therefore updated in up to three parts:

* the **body**, the whole blocks inside the shard (the param's last, short block included),
  by the backend's kernel, with blocks counted from the body's first element, which is a
  block's first: exactly the unsharded kernel's work there;
* a **head** and a **tail** piece, the shard's part of the cut blocks at its two ends (at most
  31 elements each), by the reference update (bit for bit the kernels' arithmetic), which
  stores their codes only once the pieces' own scales have been combined, by a maximum over
  the ranks (one all-reduce of a few values per cut block per step, on the device), into the
  whole blocks' scales. A scale is floor(log2(block max)) - 7, clamped, so the maximum of the
  parts' scales is the whole block's.

The body's scales are the state's ``scales`` (rows of the body's blocks, as the kernels take
them) and the pieces' the state's ``cut_scales`` (one column per piece, head first).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .quant import (
    BLOCK,
    SCALE_MIN,
    dcp_chunks,
    dcp_write_items,
    dequantize_m,
    dequantize_v,
    quantize_m,
    quantize_v,
)
from .reference import adamw_step_exchanging
from .sharded import first_index, is_dtensor, local
from .step_args import Hyper, Lean

__all__ = [
    "BlockScales",
    "CutBlocks",
    "ShardBlocks",
    "dequantize_shard",
    "join_scales",
    "quantize_shard",
    "shard_blocks",
    "split_scales",
    "touched_blocks",
]


class ShardBlocks:
    """Where the whole param's blocks fall in this rank's shard of one param: ``body`` (local
    start, end), ``pieces`` [(local start, end, slot)], ``slots`` the number of cut blocks of
    the whole param (the same on every rank: each rank's part of a cut block is combined in
    its slot), ``group`` the process group of the ranks that share its blocks, ``device``
    where its collectives run (the param's: an offloaded state's pieces are on the host, and
    NCCL reduces device tensors only)."""

    __slots__ = ("body", "device", "first", "group", "head", "pieces", "slots", "tail")

    def __init__(self, first: int, n: int, numel: int, boundaries: list[int], group,
                 device: torch.device | None = None) -> None:  # fmt: skip
        cut = sorted({b // BLOCK for b in boundaries if 0 < b < numel and b % BLOCK})
        self.first, self.group, self.slots = first, group, len(cut)
        self.device = device or torch.device("cpu")
        end = first + n
        start, stop, self.pieces = 0, n, []
        # head: the shard starts inside a block; tail: it ends inside another one (a shard
        # inside one block is its head alone)
        self.head = bool(n and first % BLOCK)
        if self.head:
            start = min(n, BLOCK - first % BLOCK)
            self.pieces.append((0, start, cut.index(first // BLOCK)))
        self.tail = bool(n and end % BLOCK and end < numel and not (self.head and start == n))
        if self.tail:
            stop = max(start, n - end % BLOCK)
            self.pieces.append((stop, n, cut.index(end // BLOCK)))
        self.body = (start, stop)

    @property
    def body_blocks(self) -> int:
        return -(-(self.body[1] - self.body[0]) // BLOCK)


def _shard_dim(p: Tensor) -> int | None:
    """The mesh dimension a DTensor is sharded over along its dim 0, or None when it is
    replicated; a ValueError when it is sharded otherwise (its shards are not ranges of the
    whole, so they cannot keep the whole param's blocks)."""
    dims = [d for d, placement in enumerate(p.placements) if not placement.is_replicate()]
    if not dims:
        return None
    placement = p.placements[dims[0]]
    if len(dims) > 1 or not (placement.is_shard() and placement.dim == 0) or p.dim() == 0:
        raise ValueError(
            f"fastopt.AdamW: state_dtype='int8' keeps the whole param's blocks for params "
            f"sharded along dim 0 only (FSDP2's fully_shard); a param of shape {tuple(p.shape)} "
            f"is placed {tuple(p.placements)}: put it in a group with state_dtype="
            "torch.bfloat16, or raise min_8bit_size above its size"
        )
    return dims[0]


def shard_blocks(p: Tensor) -> ShardBlocks | None:
    """The block layout of this rank's shard of an 8-bit param, or None when nothing is cut
    (a plain tensor, a replicated DTensor, or shard boundaries on whole blocks)."""
    if not is_dtensor(p):
        return None
    mesh_dim = _shard_dim(p)
    if mesh_dim is None:
        return None
    from torch.distributed.tensor import Shard

    ranks = p.device_mesh.size(mesh_dim)
    row = p.numel() // p.shape[0] if p.shape[0] else 0
    offsets = [Shard.local_shard_size_and_offset(p.shape[0], ranks, r)[1] for r in range(ranks)]
    layout = ShardBlocks(first_index(p), local(p).numel(), p.numel(), [o * row for o in offsets],
                         p.device_mesh.get_group(mesh_dim), local(p).device)  # fmt: skip
    return layout if layout.slots else None


def _flat(t: Tensor, start: int, end: int) -> Tensor:
    return t.view(-1)[start:end]


class CutBlocks:
    """A bucket's 8-bit sharded params with cut blocks: ``split`` updates their pieces and
    returns the lists the kernel then takes for the bodies."""

    def __init__(self, layouts: list[ShardBlocks | None]) -> None:
        self.layouts = layouts
        self._slot0 = []  # each layout's first slot in the exchanged buffer
        total = 0
        for layout in layouts:
            self._slot0.append(total)
            total += layout.slots if layout else 0
        self._total = total
        groups = {id(layout.group): layout.group for layout in layouts if layout}
        if len(groups) > 1:
            raise ValueError(
                "fastopt.AdamW: the 8-bit params of one param group are sharded over different "
                "process groups; put them in separate param groups"
            )
        self._group = next(iter(groups.values()))
        self._device = next(layout.device for layout in layouts if layout)

    def split(self, lists: list[list[Tensor]], steps: list[Tensor], cut_scales: list[Tensor],
              hyper: Hyper, lean: Lean):  # fmt: skip
        """``lists``: params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters (local,
        contiguous) of the bucket. Updates the pieces, then returns (those lists, steps,
        lean) for the kernel: bodies only."""
        pieces: list[list[Any]] = [[] for _ in range(6)]
        piece_steps, piece_firsts, piece_positions, piece_scales, slots = [], [], [], [], []
        body: list[list[Any]] = [[] for _ in range(6)]
        body_steps, body_firsts, body_positions, body_scales = [], [], [], []
        firsts = lean.first_indices or [0] * len(steps)
        for i, layout in enumerate(self.layouts):
            if layout is None:
                start, stop, own = 0, None, ()
            else:
                (start, stop), own = layout.body, layout.pieces
            for column, (a, b, slot) in enumerate(own):
                for out, ts in zip(pieces, lists):
                    if ts:
                        out.append(_flat(ts[i], a, b))
                piece_steps.append(steps[i].clone())  # the kernel advances the real count
                piece_firsts.append(firsts[i] + a)
                piece_positions.append(lean.positions[i])
                piece_scales.append(cut_scales[i][:, column : column + 1])
                slots.append(self._slot0[i] + slot)
            if stop is not None and stop == start:  # no body: the count advances here
                skipped = hyper.found_inf if hyper.found_inf is not None else 0.0
                steps[i].add_(torch.where(torch.as_tensor(skipped) != 0, 0.0, 1.0))
                continue
            for out, ts in zip(body, lists):
                if ts:
                    out.append(ts[i] if stop is None else _flat(ts[i], start, stop))
            body_steps.append(steps[i])
            body_firsts.append(firsts[i] + start)
            body_positions.append(lean.positions[i])
            body_scales.append(lean.scales[i])

        def exchange(own: list[list[Tensor]]) -> list[list[Tensor]]:
            rows = 3 if hyper.amsgrad else 2  # the same on every rank, pieces or none
            device = self._device
            buffer = torch.full((self._total, rows), float(SCALE_MIN - 1), device=device)
            if own:
                values = torch.stack([torch.cat(s).float() for s in own])
                buffer[torch.tensor(slots, device=device)] = values.to(device)
            dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=self._group)
            here = lists[0][0].device  # the pieces' (the host's, offloaded)
            return [list(buffer[slot].to(here, torch.int8).split(1)) for slot in slots]

        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters = pieces
        piece_lean = Lean(masters=masters, stochastic_rounding=lean.stochastic_rounding,
                          seed=lean.seed, positions=piece_positions, first_indices=piece_firsts,
                          scales=piece_scales)  # fmt: skip
        # Every rank takes part in the exchange, with or without pieces of its own.
        adamw_step_exchanging(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, piece_steps,
                              hyper, piece_lean, exchange)  # fmt: skip
        if not params and (hyper.found_inf is None or not bool(hyper.found_inf.item())):
            exchange([])
        body_lean = Lean(masters=body[5], stochastic_rounding=lean.stochastic_rounding,
                         seed=lean.seed, positions=body_positions, first_indices=body_firsts,
                         scales=body_scales)  # fmt: skip
        return body[:5], body_steps, body_lean


def dequantize_shard(codes: Tensor, scales: Tensor, cut_scales: Tensor | None,
                     layout: ShardBlocks | None, row: int) -> Tensor:  # fmt: skip
    """The fp32 values of row ``row``'s moment (0: exp_avg; else a square-root moment) of a
    rank's shard, from its local codes, body scales and cut blocks' scales."""
    decode = dequantize_m if row == 0 else dequantize_v
    if layout is None:
        return decode(codes, scales[row])
    flat = codes.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    start, stop = layout.body
    out[start:stop] = decode(flat[start:stop], scales[row])
    for column, (a, b, _) in enumerate(layout.pieces):
        out[a:b] = decode(flat[a:b], cut_scales[row, column : column + 1])
    return out.view(codes.shape)


def quantize_shard(x: Tensor, layout: ShardBlocks | None, row: int):
    """A rank's shard of one moment (fp32 values, flattened; for rows other than 0 the square
    roots), rounded to nearest in the whole param's blocks: (codes, body scales, cut blocks'
    scales or None). Collective where blocks are cut: every rank of the group calls it."""
    encode = quantize_m if row == 0 else quantize_v
    if layout is None:
        codes, scales = encode(x)
        return codes, scales, None
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    start, stop = layout.body
    codes[start:stop], body = encode(x[start:stop])
    buffer = torch.full((layout.slots,), float(SCALE_MIN - 1), device=layout.device)
    for a, b, slot in layout.pieces:
        buffer[slot] = encode(x[a:b])[1][0].float()
    dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=layout.group)
    buffer = buffer.to(x.device)
    cut = []
    for a, b, slot in layout.pieces:
        codes[a:b], scale = encode(x[a:b], scale=buffer[slot : slot + 1])
        cut.append(scale)
    return codes, body, torch.stack(cut, dim=1) if cut else None


# -------------------------------------------------------------- the scales in checkpoints
def touched_blocks(p: Tensor) -> tuple[int, int, int]:
    """(first, end, owned first) block numbers of the whole param for this rank's part of p:
    blocks [first, end) hold its elements, and [owned first, end) start in it (each block is
    saved by the rank holding its first element)."""
    start = first_index(p)
    stop = start + local(p).numel()
    if stop == start:
        return 0, 0, 0
    return start // BLOCK, -(-stop // BLOCK), -(-start // BLOCK)


def join_scales(scales: Tensor, cut_scales: Tensor | None, layout: ShardBlocks | None) -> Tensor:
    """The scales of the blocks a shard touches, block-major (blocks, moments): its head's cut
    block, its body's, its tail's cut block."""
    if layout is None or cut_scales is None:
        return scales.t()
    columns = [cut_scales[:, :1]] if layout.head else []
    columns.append(scales)
    if layout.tail:
        columns.append(cut_scales[:, -1:])
    return torch.cat(columns, dim=1).t()


def split_scales(touched: Tensor, layout: ShardBlocks | None) -> tuple[Tensor, Tensor | None]:
    """join_scales' inverse: (body scales (moments, blocks), cut blocks' scales or None)."""
    rows = touched.t()
    if layout is None or not layout.pieces:
        return rows.contiguous(), None
    cut = [rows[:, :1]] if layout.head else []
    if layout.tail:
        cut.append(rows[:, -1:])
    body = rows[:, int(layout.head) : rows.shape[1] - int(layout.tail)]
    return body.contiguous(), torch.cat(cut, dim=1)


class BlockScales(Tensor):
    """A sharded 8-bit param's block scales in a state dict: to torch.distributed.checkpoint
    an int8 tensor of (blocks of the whole param, moments), block-major; here ``touched``
    holds the rows of the blocks this rank's shard touches (from ``first``). Each rank saves
    the rows of the blocks that start in its shard (from ``owned``), so every block is
    written once, and loads every row it touches, on any number of ranks. No torch operation
    applies to it (portable_state_dict() gives tensors torch.optim.AdamW loads)."""

    touched: Tensor
    first: int
    owned: int

    @staticmethod
    def __new__(cls, touched: Tensor, first: int, owned: int, blocks: int):
        self = Tensor._make_wrapper_subclass(cls, (blocks, touched.shape[1]), dtype=torch.int8,
                                             device=touched.device)  # fmt: skip
        self.touched, self.first, self.owned = touched, first, owned
        return self

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Copies (a checkpoint loader clones its template) stay scales of the same blocks.
        if func in (torch.ops.aten.clone.default, torch.ops.aten.detach.default):
            source = args[0]
            touched = source.touched.clone() if "clone" in str(func) else source.touched
            return BlockScales(touched, source.first, source.owned, source.shape[0])
        raise TypeError(
            f"fastopt BlockScales (a sharded param's 8-bit block scales in a state dict, for "
            f"torch.distributed.checkpoint and fastopt.AdamW.load_state_dict): {func} does not "
            "apply; use AdamW.portable_state_dict() for plain tensors"
        )

    def __create_write_items__(self, fqn: str, obj) -> list:
        return dcp_write_items(fqn, self._owned(), (self.owned, 0), self.shape)

    def __create_chunk_list__(self) -> list:
        return dcp_chunks(self.touched, (self.first, 0))

    def __get_tensor_shard__(self, index) -> Tensor:
        # Saving asks for the owned rows, loading for the touched ones; they differ in the
        # head's cut block alone, owned by the rank before.
        return self._owned() if index.offset[0] == self.owned else self.touched

    def _owned(self) -> Tensor:
        return self.touched[self.owned - self.first :]

    def __reduce_ex__(self, protocol):
        return _rebuild_block_scales, (self.touched, self.first, self.owned, self.shape[0])

    def __repr__(self) -> str:
        return (f"BlockScales(blocks {self.first}..{self.first + self.touched.shape[0]} of "
                f"{self.shape[0]}, {self.shape[1]} moments)")  # fmt: skip


def _rebuild_block_scales(touched: Tensor, first: int, owned: int, blocks: int) -> BlockScales:
    return BlockScales(touched, first, owned, blocks)


# State dicts of sharded 8-bit states load with torch.load(weights_only=True).
torch.serialization.add_safe_globals([_rebuild_block_scales])
