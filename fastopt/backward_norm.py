"""The global gradient norm of an overlapped step, measured while backward runs.

The norm kernel (``multi_tensor_norm`` on the CPU and on CUDA) cuts every tensor into chunks
of ``NORM_CHUNK`` elements, writes each chunk's partial (and a non-finite flag) into a slot of
its own and combines the slots in a fixed order. A chunk's partial depends on its elements
alone, so a gradient measured by itself, in its hook, into the slots the whole list's launch
would have given it, leaves the same bits in them; ``step()`` then runs only the combine, and
measures only the gradients no hook measured or that changed after their hook (unscaled in
place, accumulated again). The norm and the flag, so the clip factor and the skip, are the
synchronous step's, bit for bit; on a GPU the host waits for one small kernel after backward,
not for a pass over every gradient.

The slots' layout (which param's gradient goes where) is that of the last step's gradients;
the first step, and any step whose gradients differ from the last's in params, dtypes or sizes,
measures everything itself and lays the slots out anew for the next backward.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from . import _ops
from .backends import select_backend
from .sharded import is_dtensor, real_view

__all__ = ["BackwardNorm", "combine_buckets"]

_P = 2.0  # the order of the norm AdamW clips by


class _Slots:
    """One (device, dtype) bucket: the chunk partials of its gradients, in step order."""

    __slots__ = ("device", "dtype", "partials", "members")

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.partials: Tensor | None = None
        self.members: list[tuple[int, int]] = []  # (index in the step's list, first chunk)


class BackwardNorm:
    """Partial norms of gradients as their hooks see them, and the step's norm from them."""

    def __init__(self) -> None:
        self._key: tuple | None = None  # the laid-out step: (id(param), device, dtype, numel)
        self._slots: list[_Slots] = []
        # id(param) -> (its bucket's slots, first chunk, device, dtype, numel)
        self._where: dict[int, tuple[_Slots, int, torch.device, torch.dtype, int]] = {}
        # id(param) -> (its gradient, the gradient's version) whose partials are in the slots
        self._measured: dict[int, tuple[weakref.ref, int]] = {}
        self.measured_in_backward = 0  # of the last norm()'s gradients, how many hooks measured

    def grad_ready(self, p: Tensor, grad: Tensor) -> None:
        """Measures ``grad``, ``p``'s gradient as backward left it, into its slots."""
        where = self._where.get(id(p))
        if where is None:
            return
        slots, first, device, dtype, numel = where
        view = real_view(grad)
        if (view.device != device or view.dtype != dtype or view.numel() != numel
                or not view.is_contiguous()):  # fmt: skip
            return
        _ops.norm_partials_(slots.partials, [view], first, _P)
        self._measured[id(p)] = (weakref.ref(grad), grad._version)

    def norm(self, params: list[Tensor], grads: list[Tensor],
             backend: str) -> tuple[Tensor, Tensor] | None:  # fmt: skip
        """The 2-norm and non-finite flag of ``grads`` (``params``' gradients, in the order
        global_norm takes them), as ``fastopt.norm.global_norm`` gives them; None where the
        gradients are not ones this way measures (the caller runs global_norm)."""
        views = [real_view(g) for g in grads]
        key = tuple((id(p), v.device, v.dtype, v.numel()) for p, v in zip(params, views))
        if key != self._key and not self._lay_out(key, grads, views, backend):
            self._key, self._slots, self._where = None, [], {}
            self._measured.clear()
            return None
        measured = self._measured
        self.measured_in_backward = 0
        for slots in self._slots:
            run: list[Tensor] = []  # gradients with consecutive slots, measured in one call
            run_first = 0
            for index, first in slots.members:
                grad = grads[index]
                done = measured.get(id(params[index]))
                if done is not None and done[0]() is grad and done[1] == grad._version:
                    self.measured_in_backward += 1
                    self._flush(slots, run, run_first)
                    run = []
                    continue
                if not run:
                    run_first = first
                run.append(views[index].contiguous())
            self._flush(slots, run, run_first)
        measured.clear()  # a later step's gradients are measured again (by hook or here)
        norms, flags = zip(*(_ops.norm_combine(slots.partials, _P) for slots in self._slots))
        return combine_buckets(list(norms), list(flags), grads[0].device, _P)

    @staticmethod
    def _flush(slots: _Slots, run: list[Tensor], first: int) -> None:
        if run:
            _ops.norm_partials_(slots.partials, run, first, _P)

    def _lay_out(self, key: tuple, grads: list[Tensor], views: list[Tensor],
                 backend: str) -> bool:  # fmt: skip
        """Slots for these gradients, bucketed as global_norm buckets them; False if any is
        not measured by the compiled norm kernels (a DTensor, another backend, float64)."""
        if any(map(is_dtensor, grads)):
            return False
        buckets: dict[tuple[torch.device, torch.dtype], _Slots] = {}
        ends: dict[int, int] = {}  # id(slots) -> the chunk after its members' last
        for index, view in enumerate(views):
            slots = buckets.get((view.device, view.dtype))
            if slots is None:
                try:
                    chosen = select_backend(backend, view.device, view.dtype)
                except (RuntimeError, ValueError):
                    return False
                if chosen not in ("cpu", "cuda"):
                    return False
                slots = buckets[(view.device, view.dtype)] = _Slots(view.device, view.dtype)
            first = ends.get(id(slots), 0)
            slots.members.append((index, first))
            ends[id(slots)] = first - (-view.numel() // _ops.NORM_CHUNK)  # ceil
        where = {}
        for slots in buckets.values():
            total = ends[id(slots)]
            slots.partials = torch.zeros((2, total), dtype=_ops.norm_partials_dtype(slots.device),
                                         device=slots.device)  # fmt: skip
            for index, first in slots.members:
                view = views[index]
                where[key[index][0]] = (slots, first, view.device, view.dtype, view.numel())
        self._key, self._slots, self._where = key, list(buckets.values()), where
        self._measured.clear()
        return True


def combine_buckets(norms: list[Tensor], flags: list[Tensor], first: torch.device,
                    norm_type: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The norm and flag of several (device, dtype) buckets' norms and flags, on ``first``:
    global_norm's last step, and this module's."""
    norms = [norm.to(first, non_blocking=True) for norm in norms]
    flags = [flag.to(first, non_blocking=True) for flag in flags]
    if len(norms) == 1:
        return norms[0], flags[0]
    total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    return total, torch.stack(flags).amax()
