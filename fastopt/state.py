"""AdamW's state formats: what each param's state holds under each setting, how it is
allocated, and how many bytes it takes (fastopt.state_dict converts it to and from a
``state_dict``).

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
from typing import Any

import torch
from torch import Tensor

from .blocks import shard_blocks
from .quant import BLOCK
from .rounding import join_master
from .sharded import local, moved, shard_like

__all__ = [
    "LEAN_DEFAULTS",
    "MOMENTS",
    "STATE_KEYS",
    "STATE_KEY_NAMES",
    "check_lean",
    "check_lean_groups",
    "init_master",
    "init_state",
    "is_lean",
    "lean",
    "master_key",
    "master_param",
    "moment_dtype",
    "new_cut_scales",
    "new_scales",
    "offloaded",
    "quantizes",
    "rounds_stochastically",
    "state_device",
    "state_keys",
    "state_nbytes",
    "state_tensors",
]

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_STATE_DTYPES = (None, torch.float32, torch.bfloat16, "int8")

# The state tensors the kernels update, per param, by (amsgrad, master key or None, 8-bit):
# their keys, and a getter of them.
STATE_KEY_NAMES = {
    (amsgrad, master, quantized): (
        "step", "exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] if amsgrad else []),
        *([master] if master else []), *(["scales"] if quantized else []),
    )
    for amsgrad in (False, True)
    for master in (None, "master_remainder", "master")
    for quantized in (False, True)
}  # fmt: skip
STATE_KEYS = {setting: operator.itemgetter(*keys) for setting, keys in STATE_KEY_NAMES.items()}

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


def moment_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
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
    if device.type != "cuda":
        raise ValueError(
            f"fastopt.AdamW: offload=True copies params between a CUDA GPU and the host; the "
            f"host cannot copy from params on {device}"
        )
    return torch.device("cpu")


def offloaded(group: dict[str, Any], p: Tensor) -> bool:
    """Whether p's state is in host memory while p is not (then it is pinned, for copies)."""
    return state_device(group, p) != local(p).device


def _zeros(p: Tensor, dtype: torch.dtype, host: bool) -> Tensor:
    """Zeros of p's shape: laid out as p, or in pinned host memory (``host``; a sharded p's
    local shard there, as a DTensor of p's mesh)."""
    if host:
        return shard_like(p, torch.zeros(local(p).shape, dtype=dtype, pin_memory=True))
    return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)


def init_master(state: dict[str, Any], p: Tensor, host: bool = False) -> None:
    """The master of a param that has none yet: the param itself, exactly."""
    if p.dtype == torch.bfloat16:
        state["master_remainder"] = _zeros(p, torch.int16, host)
    elif p.dtype == torch.float16:
        master = p.detach().to(torch.float32, memory_format=torch.preserve_format)
        state["master"] = moved(master, torch.device("cpu"), pin=True) if host else master


def new_scales(p: Tensor, rows: int, device: torch.device) -> Tensor:
    """Zero block scales of p's moments: (rows, blocks of p's local tensor), int8; of a shard
    whose ends cut blocks of the whole param, its body's blocks (fastopt.blocks)."""
    layout = shard_blocks(p)
    blocks = layout.body_blocks if layout else -(-local(p).numel() // BLOCK)
    return torch.zeros((rows, blocks), dtype=torch.int8, device=device)


def new_cut_scales(p: Tensor, rows: int, device: torch.device) -> Tensor | None:
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
    state_dtype = moment_dtype(group, p)
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
        dtype = moment_dtype(group, p)
        device, host = state_device(group, p), offloaded(group, p)
        state["step"] = torch.zeros((), dtype=torch.float32, device=device)
        state["exp_avg"] = _zeros(p, dtype, host)
        state["exp_avg_sq"] = _zeros(p, dtype, host)
        if amsgrad:
            state["max_exp_avg_sq"] = _zeros(p, dtype, host)
        if quantizes(group, p):  # all-zero codes are 0 whatever the scales
            state["scales"] = new_scales(p, 3 if amsgrad else 2, device)
            cut = new_cut_scales(p, 3 if amsgrad else 2, device)
            if cut is not None:
                state["cut_scales"] = cut
        if lean(group, "master_weights"):
            init_master(state, p, host)
    elif amsgrad and "max_exp_avg_sq" not in state:
        raise RuntimeError(
            "fastopt.AdamW: amsgrad was turned on after the first step; the state has "
            "no max_exp_avg_sq"
        )
    elif lean(group, "master_weights") and master_key(state) is None:
        _check_lean_param(p, group)
        # loaded from a checkpoint without masters: from the param
        init_master(state, p, offloaded(group, p))


def state_keys(state: dict[str, Any]) -> operator.itemgetter:
    """A getter of the tensors of one entry that the kernels update, in their order."""
    return STATE_KEYS[_kernel_setting(state)]


def _kernel_setting(state: dict[str, Any]) -> tuple[bool, str | None, bool]:
    """The key of STATE_KEYS and STATE_KEY_NAMES for one entry."""
    return "max_exp_avg_sq" in state, master_key(state), "scales" in state


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
