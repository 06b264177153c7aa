"""AdamW's state formats: what each param's state holds under each setting, how it is
allocated, how it converts to and from a ``state_dict``, and how many bytes it takes.

Per param, as torch.optim.AdamW: ``step`` (a 0-dim fp32 tensor on the param's device, so a
CUDA step counts without a host sync), ``exp_avg``, ``exp_avg_sq`` and with amsgrad
``max_exp_avg_sq``. The memory-lean settings (per param group) change the storage only:

* ``state_dtype``: the moments in fp32 or bf16, or ``"int8"``: uint8 codes plus ``scales``,
  one int8 row of block scales per moment (fastopt.quant), for params of ``min_8bit_size``
  elements or more;
* ``master_weights``: the fp32 master of a bf16 param as the param and an int16
  ``master_remainder``, of a fp16 param as an fp32 copy ``master`` (fastopt.rounding).

The optimizer keeps no other bookkeeping here; the kernels take these tensors as they are.
"""

from __future__ import annotations

import operator
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
from .rounding import join_master
from .sharded import first_index, is_dtensor, local

__all__ = [
    "LEAN_DEFAULTS",
    "MOMENTS",
    "STATE_KEYS",
    "check_lean",
    "check_lean_groups",
    "init_state",
    "is_lean",
    "lean",
    "master_key",
    "master_param",
    "pack_state_dict",
    "quantizes",
    "rounds_stochastically",
    "state_keys",
    "state_nbytes",
    "state_tensors",
    "wrap_saved_state",
    "unwrap_loaded_state",
]

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_STATE_DTYPES = (None, torch.float32, torch.bfloat16, "int8")

# The state tensors the kernels update, per param, by (amsgrad, master key or None, 8-bit).
STATE_KEYS = {
    (amsgrad, master, quantized): operator.itemgetter(
        "step", "exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] if amsgrad else []),
        *([master] if master else []), *(["scales"] if quantized else []),
    )
    for amsgrad in (False, True)
    for master in (None, "master_remainder", "master")
    for quantized in (False, True)
}  # fmt: skip

# The lean settings a group may carry (absent: these defaults), and those check_lean takes,
# in its order.
LEAN_DEFAULTS = dict(master_weights=False, state_dtype=None, stochastic_rounding=False, seed=None,
                     min_8bit_size=4096, offload=False)  # fmt: skip
_LEAN_CHECKED = ("master_weights", "state_dtype", "stochastic_rounding", "min_8bit_size")


def lean(group: dict[str, Any], key: str):
    """A group's lean-precision setting (absent from groups that use the default)."""
    return group.get(key, LEAN_DEFAULTS[key])


def check_lean(master_weights, state_dtype, stochastic_rounding, min_8bit_size) -> None:
    """The lean-precision settings of a group, or a one-line ValueError naming what is wrong."""
    if not isinstance(master_weights, bool):
        raise ValueError(f"Invalid master_weights: {master_weights!r} (True or False)")
    if not isinstance(stochastic_rounding, bool):
        raise ValueError(f"Invalid stochastic_rounding: {stochastic_rounding!r} (True or False)")
    if state_dtype not in _STATE_DTYPES:
        raise ValueError(
            f"Invalid state_dtype: {state_dtype!r} (None for the param's dtype, torch.float32, "
            "torch.bfloat16 or 'int8')"
        )
    if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
        raise ValueError(f"Invalid min_8bit_size: {min_8bit_size!r} (a non-negative int)")


def check_lean_groups(groups: list[dict[str, Any]]) -> None:
    """Every group's lean settings (per-group overrides), checked as the defaults are."""
    for group in groups:
        check_lean(*(lean(group, key) for key in _LEAN_CHECKED))


def is_lean(group: dict[str, Any]) -> bool:
    """Whether a group uses any lean-precision setting (else it runs exactly as before)."""
    return bool(
        lean(group, "master_weights") or lean(group, "state_dtype") is not None
        or lean(group, "stochastic_rounding")
    )  # fmt: skip


def rounds_stochastically(group: dict[str, Any]) -> bool:
    """Whether a group's step draws rounding noise: for stochastic_rounding, or 8-bit codes."""
    return bool(lean(group, "stochastic_rounding") or lean(group, "state_dtype") == "int8")


def quantizes(group: dict[str, Any], p: Tensor) -> bool:
    """Whether p's moments are 8-bit codes: an int8 group's params of min_8bit_size elements or
    more (counted over the whole param, so sharding does not change the choice)."""
    return lean(group, "state_dtype") == "int8" and p.numel() >= lean(group, "min_8bit_size")


def _moment_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
    """The storage of p's moments: uint8 codes, fp32 for an int8 group's small params, else
    the group's state_dtype or p's dtype."""
    state_dtype = lean(group, "state_dtype")
    if state_dtype == "int8":
        return torch.uint8 if quantizes(group, p) else torch.float32
    return state_dtype or p.dtype


def master_key(state: dict[str, Any]) -> str | None:
    """The state key of the param's fp32 master ("master_remainder", "master"), or None."""
    if "master_remainder" in state:
        return "master_remainder"
    return "master" if "master" in state else None


def state_device(group: dict[str, Any], p: Tensor) -> torch.device:
    """Where p's state lives: with p (its local shard), or in host memory for a group that
    offloads a param on another device."""
    device = local(p).device
    if not lean(group, "offload") or device.type == "cpu":
        return device
    if is_dtensor(p):
        raise ValueError(
            f"fastopt.AdamW: offload=True does not take sharded (DTensor) params on {device} "
            "yet; offload plain params, or shard without offload"
        )
    return torch.device("cpu")


def _offloaded(group: dict[str, Any], p: Tensor) -> bool:
    """Whether p's state is in host memory while p is not (then it is pinned, for copies)."""
    return state_device(group, p) != local(p).device


def _zeros(p: Tensor, dtype: torch.dtype, host: bool) -> Tensor:
    """Zeros of p's shape: laid out as p, or in pinned host memory (``host``)."""
    if host:
        return torch.zeros(p.shape, dtype=dtype, pin_memory=True)
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


def _init_master(state: dict[str, Any], p: Tensor, host: bool = False) -> None:
    """The master of a param that has none yet: the param itself, exactly."""
    if p.dtype == torch.bfloat16:
        state["master_remainder"] = _zeros(p, torch.int16, host)
    elif p.dtype == torch.float16:
        master = p.detach().to(torch.float32, memory_format=torch.preserve_format)
        state["master"] = master.cpu().pin_memory() if host else master


def _new_scales(p: Tensor, rows: int, device: torch.device) -> Tensor:
    """Zero block scales of p's moments: (rows, blocks of p's local tensor), int8; of a shard
    whose ends cut blocks of the whole param, its body's blocks (fastopt.blocks)."""
    layout = shard_blocks(p)
    blocks = layout.body_blocks if layout else -(-local(p).numel() // BLOCK)
    return torch.zeros((rows, blocks), dtype=torch.int8, device=device)


def _new_cut_scales(p: Tensor, rows: int, device: torch.device) -> Tensor | None:
    """Zero scales of the cut blocks a shard of p ends in (rows, 1 or 2), or None."""
    layout = shard_blocks(p)
    if layout is None or not layout.pieces:
        return None
    return torch.zeros((rows, len(layout.pieces)), dtype=torch.int8, device=device)


def _check_lean_param(p: Tensor, group: dict[str, Any]) -> None:
    """The lean settings apply to real fp32/bf16/fp16 params; one line says what does not."""
    if p.is_complex() or p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"fastopt.AdamW: master_weights, state_dtype and stochastic_rounding apply to "
            f"float32, bfloat16 and float16 params, not {p.dtype}; put this param in a group "
            "without them"
        )
    state_dtype = _moment_dtype(group, p)
    fp16_store = state_dtype == torch.float16 or (
        p.dtype == torch.float16 and not lean(group, "master_weights")
    )
    if lean(group, "stochastic_rounding") and fp16_store:
        raise ValueError(
            "fastopt.AdamW: stochastic_rounding rounds bfloat16 stores only; for float16 "
            "params use master_weights=True with state_dtype=torch.float32 or torch.bfloat16"
        )


def init_state(state: dict[str, Any], p: Tensor, group: dict[str, Any]) -> None:
    """p's state entry, allocated when empty (zero moments, step 0, the master from p);
    completed or refused when a loaded entry lacks what the group's settings need."""
    amsgrad = group["amsgrad"]
    if len(state) == 0:
        if is_lean(group):
            _check_lean_param(p, group)
        dtype = _moment_dtype(group, p)
        device, host = state_device(group, p), _offloaded(group, p)
        state["step"] = torch.zeros((), dtype=torch.float32, device=device)
        state["exp_avg"] = _zeros(p, dtype, host)
        state["exp_avg_sq"] = _zeros(p, dtype, host)
        if amsgrad:
            state["max_exp_avg_sq"] = _zeros(p, dtype, host)
        if quantizes(group, p):  # all-zero codes are 0 whatever the scales
            state["scales"] = _new_scales(p, 3 if amsgrad else 2, device)
            cut = _new_cut_scales(p, 3 if amsgrad else 2, device)
            if cut is not None:
                state["cut_scales"] = cut
        if lean(group, "master_weights"):
            _init_master(state, p, host)
    elif amsgrad and "max_exp_avg_sq" not in state:
        raise RuntimeError(
            "fastopt.AdamW: amsgrad was turned on after the first step; the state has "
            "no max_exp_avg_sq"
        )
    elif lean(group, "master_weights") and master_key(state) is None:
        _check_lean_param(p, group)
        # loaded from a checkpoint without masters: from the param
        _init_master(state, p, _offloaded(group, p))


def state_keys(state: dict[str, Any]) -> operator.itemgetter:
    """A getter of the tensors of one entry that the kernels update, in their order."""
    return STATE_KEYS["max_exp_avg_sq" in state, master_key(state), "scales" in state]


def state_tensors(state: dict[str, Any]) -> tuple[Tensor, ...]:
    """The tensors of one entry that the kernels update (KeyError if one is missing)."""
    return state_keys(state)(state)


def master_param(state: dict[str, Any], p: Tensor) -> Tensor:
    """``p``'s fp32 master as a new tensor (see AdamW.master_param)."""
    key = master_key(state)
    if key == "master_remainder":
        return join_master(local(p).detach(), local(state[key])).reshape(local(p).shape)
    if key == "master":
        return local(state[key]).detach().clone()
    return local(p).detach().to(torch.float32, copy=True)


def state_nbytes(entries) -> int:
    """Bytes held by the state tensors of ``entries`` (a state's values) on this process: a
    sharded param's local shard."""
    total = 0
    for state in entries:
        for value in state.values() if isinstance(state, dict) else ():
            if isinstance(value, Tensor):
                t = local(value)
                total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------ state_dict
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
        if _offloaded(group, key):  # in host memory, pinned for the copies to and from key
            loaded = {k: v.to(device).pin_memory() if isinstance(v, Tensor) and v.dim() else v
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
                entry[key] = value.to(dtype=_moment_dtype(group, param), device=device)
    # A master saved by fastopt comes back exact. One that went through torch's
    # load_state_dict was cast to the param's dtype (the int16 remainder converted as a number)
    # and is stale besides, since torch then stepped the param without it: the param is the
    # master then, as when a checkpoint has none.
    for key, dtype in (("master_remainder", torch.int16), ("master", torch.float32)):
        value = saved.get(key)
        if key not in entry:
            continue
        if isinstance(value, Tensor) and value.dtype == dtype:
            entry[key] = value.to(device=device)
        else:
            del entry[key]
            if lean(group, "master_weights"):
                _init_master(entry, param.to(device) if param.device != device else param)


def _load_quantized(entry: dict[str, Any], saved: dict[str, Any], p: Tensor,
                    device: torch.device) -> None:  # fmt: skip
    """An 8-bit state entry from a saved one: codes and scales exactly from fastopt's state
    dict, or float moments (torch's, a non-8-bit fastopt's, a sharded param's portable form)
    quantized to nearest, a sharded param's in the whole param's blocks (collective)."""
    names = [name for name in MOMENTS if name in entry]
    shard = local(p)
    layout = shard_blocks(p)
    scales = _new_scales(p, len(names), device)
    cut_scales = _new_cut_scales(p, len(names), device)
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
        entry[name] = _like(p, codes)
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


def _like(p: Tensor, shard: Tensor) -> Tensor:
    """``shard`` as the DTensor it is of a sharded param (the local tensor of a plain one)."""
    if not is_dtensor(p):
        return shard
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(shard, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
