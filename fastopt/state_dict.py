"""AdamW's state to and from a ``state_dict``: torch's packed form with 8-bit moments as
:class:`fastopt.quant.QuantizedMoment` tensors (or, portable, as fp32 values), and loading,
which keeps each group's storage (fastopt.state) whatever form was saved.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .blocks import (
    BlockScales,
    dequantize_shard,
    join_scales,
    quantize_shard,
    shard_blocks,
    split_scales,
    touched_blocks,
)
from .quant import BLOCK, QuantizedMoment
from .sharded import first_index, is_dtensor, local, moved, shard_like
from .state import (
    MOMENTS,
    init_master,
    lean,
    moment_dtype,
    new_cut_scales,
    new_scales,
    offloaded,
    quantizes,
    state_device,
)

__all__ = ["pack_state_dict", "unwrap_loaded_state", "wrap_saved_state"]


def pack_state_dict(packed: dict[str, Any], params: list[Tensor],
                    portable: bool = False) -> dict[str, Any]:  # fmt: skip
    """torch's packed state_dict with each 8-bit entry's moments in a form that saves at
    about a byte per element and loads back exactly (in place; entries are copied, as
    torch's share them with the optimizer's state). ``params``: the optimizer's, in the packed
    ids' order.

    A param's moments become :class:`QuantizedMoment` tensors (torch.optim.AdamW loads them
    as the fp32 moments they stand for) and ``scales`` its block scales block-major, (blocks,
    moments), which torch.distributed.checkpoint saves beside the codes. A sharded (DTensor)
    param's moments stay uint8 code DTensors and its ``scales`` a :class:`BlockScales`
    (fastopt.blocks), so that a checkpoint reshards to any number of ranks. ``portable``:
    the form torch.optim.AdamW loads everywhere instead: no ``scales`` entry, and a sharded
    param's moments as fp32 DTensors (loaded back quantized to nearest)."""
    for key, entry in packed["state"].items():
        if isinstance(entry, dict) and isinstance(entry.get("scales"), Tensor):
            entry = dict(entry)
            scales = entry.pop("scales")
            cut_scales = entry.pop("cut_scales", None)
            param = params[key] if isinstance(key, int) and key < len(params) else None
            names = MOMENTS[: scales.shape[0]]
            sharded = any(is_dtensor(entry[name]) for name in names)
            layout = shard_blocks(param if param is not None else entry[names[0]])
            for row, name in enumerate(names):
                if sharded and portable:
                    entry[name] = _portable_shard(entry[name], scales, cut_scales, layout, row)
                elif not sharded:
                    entry[name] = QuantizedMoment(entry[name], scales[row], "v" if row else "m")
            if not portable:
                touched = join_scales(scales, cut_scales, layout)  # unsharded: a view
                if sharded:
                    first, _, owned = touched_blocks(entry[names[0]])
                    blocks = -(-entry[names[0]].numel() // BLOCK)
                    touched = BlockScales(touched.contiguous(), first, owned, blocks)
                entry["scales"] = touched
            packed["state"][key] = entry
    return packed


def _portable_shard(codes: Tensor, scales: Tensor, cut_scales, layout, row: int) -> Tensor:
    """A sharded 8-bit moment as the fp32 DTensor of its values, sharded as its codes."""
    from torch.distributed.tensor import DTensor

    values = dequantize_shard(codes.to_local(), scales, cut_scales, layout, row)
    return DTensor.from_local(values, codes.device_mesh, codes.placements, shape=codes.shape,
                              stride=codes.stride())  # fmt: skip


class _Saved:
    """A saved state entry carried through torch's load_state_dict untouched (its cast to the
    param's dtype would lose fp32 moments, masters and 8-bit codes): neither a tensor, a dict
    nor an iterable, so torch passes it on as it is, and unwrap_loaded_state converts it."""

    __slots__ = ("entry", "param_id", "saved_groups")

    def __init__(self, entry: dict, param_id, saved_groups: list[dict]):
        self.entry, self.param_id, self.saved_groups = entry, param_id, saved_groups


def wrap_saved_state(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A load_state_dict pre-hook, run after every other: each saved entry wrapped (_Saved)."""
    groups = state_dict.get("param_groups", [])
    wrapped = {k: _Saved(v, k, groups) if isinstance(v, dict) else v
               for k, v in state_dict.get("state", {}).items()}  # fmt: skip
    return dict(state_dict, state=wrapped)


def _torch_cast(param: Tensor, value, param_id, groups: list[dict], key=None):
    """What torch's load_state_dict does to a saved value (its nested _cast)."""
    if isinstance(value, BlockScales):
        return value  # for fastopt alone (its int8 rows are not a moment to cast)
    if isinstance(value, Tensor):
        policy = Optimizer._process_value_according_to_param_policy
        return policy(param, value, param_id, groups, key)
    if isinstance(value, dict):
        return {k: _torch_cast(param, v, param_id, groups, k) for k, v in value.items()}
    if isinstance(value, Iterable):
        return type(value)(_torch_cast(param, v, param_id, groups) for v in value)
    return value


def unwrap_loaded_state(state: dict, param_groups: list[dict], defaults: dict) -> None:
    """The entries wrap_saved_state wrapped, in place: torch's cast, then (for params) each
    group's state dtype for the moments and fp32 for masters, converted from the saved
    tensors; entries not keyed by a param come back as they were saved."""
    group_of = {id(p): g for g in param_groups for p in g["params"]}
    for key, entry in list(state.items()):
        if not isinstance(entry, _Saved):
            continue
        if not isinstance(key, Tensor):
            state[key] = entry.entry
            continue
        saved = entry.entry
        group = group_of.get(id(key), defaults)
        loaded = _torch_cast(key, saved, entry.param_id, entry.saved_groups)
        device = state_device(group, key)
        if "step" in loaded:
            loaded["step"] = torch.as_tensor(loaded["step"], dtype=torch.float32).to(device)
        _restore_dtypes(loaded, saved, key, group, device)
        if offloaded(group, key):  # in host memory, pinned for the copies to and from key
            loaded = {k: moved(v, device, pin=True) if isinstance(v, Tensor) and v.dim() else v
                      for k, v in loaded.items()}  # fmt: skip
        state[key] = loaded


def _restore_dtypes(entry: dict, saved: dict, param: Tensor, group: dict,
                    device: torch.device) -> None:  # fmt: skip
    """After torch's cast: the group's state dtype for the moments, fp32 for masters, all on
    ``device`` (the state's)."""
    if quantizes(group, param):
        _load_quantized(entry, saved, param, device)
    else:
        entry.pop("scales", None)
        for key in MOMENTS:
            value = saved.get(key)
            if isinstance(value, QuantizedMoment):
                value = value.dequantize()
            if isinstance(value, Tensor) and value.dtype == torch.uint8 and key in entry:
                raise ValueError(
                    f"fastopt.AdamW: the saved {key} holds 8-bit codes of a sharded param, and "
                    "this param's group is not state_dtype='int8'; save with "
                    "portable_state_dict() to change the state's format"
                )
            if isinstance(value, Tensor) and value.is_floating_point() and key in entry:
                entry[key] = moved(value.to(dtype=moment_dtype(group, param)), device)
    # A master saved by fastopt comes back exact. One that went through torch's
    # load_state_dict was cast to the param's dtype (the int16 remainder converted as a number)
    # and is stale besides, since torch then stepped the param without it: the param is the
    # master then, as when a checkpoint has none.
    for key, dtype in (("master_remainder", torch.int16), ("master", torch.float32)):
        value = saved.get(key)
        if key not in entry:
            continue
        if isinstance(value, Tensor) and value.dtype == dtype:
            entry[key] = moved(value, device)
        else:
            del entry[key]
            if lean(group, "master_weights"):
                init_master(entry, moved(param, device) if param.device != device else param)


def _load_quantized(entry: dict[str, Any], saved: dict[str, Any], p: Tensor,
                    device: torch.device) -> None:  # fmt: skip
    """An 8-bit state entry from a saved one: codes and scales exactly from fastopt's state
    dict, or float moments (torch's, a non-8-bit fastopt's, a sharded param's portable form)
    quantized to nearest, a sharded param's in the whole param's blocks (collective)."""
    names = [name for name in MOMENTS if name in entry]
    shard = local(p)
    layout = shard_blocks(p)
    scales = new_scales(p, len(names), device)
    cut_scales = new_cut_scales(p, len(names), device)
    exact = _saved_scales(saved, p, layout, len(names))
    for row, name in enumerate(names):
        value = saved.get(name)
        codes = _saved_codes(value, p)
        whole = isinstance(value, QuantizedMoment) and not is_dtensor(p)
        if codes is not None and (exact is not None or whole):
            if exact is not None:
                scale, cut = exact[0][row], None if exact[1] is None else exact[1][row : row + 1]
            else:  # a state dict without the scales entry: the moment's own (a whole param's)
                scale, cut = value.scales, None
        elif isinstance(value, Tensor) and value.is_floating_point() and value.numel() == p.numel():
            x = _local_values(value, p)
            codes, scale, cut = quantize_shard(x if row == 0 else x.clamp_min(0).sqrt(), layout,
                                               row)  # fmt: skip
        else:
            raise ValueError(
                f"fastopt.AdamW: cannot load {name} of a param of {p.numel()} elements from "
                f"{type(value).__name__} {getattr(value, 'shape', '')}"
            )
        codes = codes.to(device=device).reshape(shard.shape).clone()
        entry[name] = shard_like(p, codes)
        scales[row].copy_(scale)
        if cut is not None:
            cut_scales[row].copy_(cut.reshape(-1))
    entry["scales"] = scales
    if cut_scales is not None:
        entry["cut_scales"] = cut_scales


def _saved_codes(value, p: Tensor) -> Tensor | None:
    """This rank's part of saved 8-bit codes (a QuantizedMoment's, a uint8 tensor or DTensor),
    flat; None for anything else."""
    if isinstance(value, QuantizedMoment):
        value = value.codes
    if not isinstance(value, Tensor) or value.dtype != torch.uint8 or value.numel() != p.numel():
        return None
    if is_dtensor(value):
        return value.to_local().reshape(-1)
    flat = value.reshape(-1)
    first = first_index(p)
    return flat[first : first + local(p).numel()]


def _saved_scales(saved: dict, p: Tensor, layout, rows: int):
    """(body scales, cut blocks' scales or None) of this rank's part of p from a saved entry's
    ``scales`` (block-major: a whole param's tensor, or a BlockScales of the same layout), or
    None where the entry has none."""
    value = saved.get("scales")
    first, end, _ = touched_blocks(p)
    if isinstance(value, BlockScales):
        if value.first != first or value.touched.shape[0] != end - first:
            raise ValueError(
                f"fastopt.AdamW: saved block scales cover blocks {value!r}, this rank's part of "
                f"the param blocks {first}..{end}; load sharded checkpoints through "
                "torch.distributed.checkpoint, which reads each rank's blocks"
            )
        touched = value.touched
    elif isinstance(value, Tensor) and value.dim() == 2 and value.shape[1] == rows:
        touched = value[first:end]
    else:
        return None
    return split_scales(touched.to(device=local(p).device, dtype=torch.int8), layout)


def _local_values(value: Tensor, p: Tensor) -> Tensor:
    """This rank's part of a saved moment, fp32 and flat: a DTensor's local shard, or the
    part of a whole tensor that a sharded param's shard holds."""
    if isinstance(value, QuantizedMoment):
        value = value.dequantize()
    if is_dtensor(value):
        x = value.to_local()
    else:
        x = value.reshape(-1)
        if is_dtensor(p):
            first = first_index(p)
            x = x[first : first + local(p).numel()]
    return x.detach().to(device=local(p).device, dtype=torch.float32).reshape(-1)
