"""Which tensors an AdamW step updates, and how they reach the kernels: the params of each
group that have gradients, bucketed by (param dtype, grad dtype, state dtype, master), with
DTensor locals and each shard's first index, the backend chosen per bucket, and a cache of all
of it from step to step.

A plan is built once and then checked, not rebuilt, at every step: the checks are C loops
over the group's lists (the params listed, their ``.grad``, the state entries and their
tensors; csrc/plan_checks.h) and run no Python per param. A plan holds no gradient from one
step to the next: after ``zero_grad()`` they are freed, as with torch's optimizers. Where
the compiled kernels take every bucket of a group, they hold its tensors between steps (a
kernel plan, csrc/adamw_plan.h): a step is then one op call with the group's gradients, and
the kernels check the params' and gradients' dtypes and layout themselves, declining a step
they no longer fit. Anything a check does not cover (DTensor params, a param listed twice,
accumulated gradients, complex or non-contiguous tensors) takes the general path, which
collects every step and rebuilds the plan when the set of params with gradients or their
state changes.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ._ext import has_kernel, plan_checks
from .backends import backend_ops, select_backend
from .blocks import CutBlocks, shard_blocks
from .offload import HostCopies
from .sharded import (
    dtensor_type,
    first_index,
    is_dtensor,
    is_fsdp1_flat,
    like_param,
    local,
    real_view,
)
from .state import init_state, is_lean, lean, master_key, state_tensors
from .step_args import PLAIN, Hyper, Lean

__all__ = ["Bucket", "GroupStep", "Planner"]

_DTYPE = attrgetter("dtype")


class Bucket:
    """The params of one group with one (param dtype, grad dtype, state dtype, master), their
    state as the kernels take it (contiguous and real), the backend's ops and the lean
    settings. Params or state that are not contiguous are updated through contiguous copies
    written back after the kernel, so any layout updates correctly; the common case keeps the
    lists from step to step and copies nothing."""

    def __init__(self, state, params: list[Tensor], indices: list[int], group: dict[str, Any],
                 positions: dict[int, int], backend: str):  # fmt: skip
        self.indices = indices
        states = [state[params[i]] for i in indices]
        self.steps = [s["step"] for s in states]
        master = master_key(states[0])  # one kind per bucket (its key says)
        self._tensors = [
            [params[i] for i in indices],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [],
            [s[master] for s in states] if master else [],
            [s["scales"] for s in states] if "scales" in states[0] else [],
        ]
        self.positions = [positions[id(params[i])] for i in indices]
        self.first_indices = [first_index(params[i]) for i in indices]  # non-zero for shards
        # DTensor params (FSDP2) and their state update shard by shard: the kernels get each
        # rank's local tensors, looked up at every step.
        self._sharded = any(map(is_dtensor, self._tensors[0]))  # plain params may join them
        self.fsdp1 = any(is_fsdp1_flat(p) for p in self._tensors[0])
        self.direct = all(
            not t.is_complex() and t.is_contiguous() for ts in self._locals() for t in ts
        )
        # Grads share their param's dtype when it is complex, so one check covers the bucket.
        self._complex = self._tensors[0][0].is_complex()
        self._whole = indices == list(range(len(params)))  # the group's only bucket
        self._lean = is_lean(group)
        self._rounding = (lean(group, "stochastic_rounding"), lean(group, "seed") or 0)
        first = real_view(local(self._tensors[0][0]))  # as the kernels see it (complex: real pairs)
        # Offloaded params on another device update through host copies (fastopt.offload).
        self.host = HostCopies() if states[0]["step"].device != first.device else None
        device = first.device if self.host is None else torch.device("cpu")
        chosen = select_backend(backend, device, first.dtype)
        self.ops: ModuleType = backend_ops(chosen)
        # Built once where the kernels take the state tensors themselves.
        self.lean = self._lean_of(self._tensors[4], self._tensors[5]) if self.fast else None
        self.amsgrad = bool(group["amsgrad"])
        # Whether the compiled kernels can take this bucket's tensors once, in its group's
        # plan (fastopt._ops.AdamWPlan).
        self.plannable = (
            self.fast and chosen in ("cpu", "cuda")
            and has_kernel("adamw_planned_", chosen.upper())
        )  # fmt: skip
        # 8-bit shards whose ends cut blocks of the whole param (fastopt.blocks).
        self.cuts = None
        if self._sharded and self._tensors[5]:
            layouts = [shard_blocks(params[i]) for i in indices]
            if any(layouts):
                self.cuts = CutBlocks(layouts)
                self._cut_scales = [s.get("cut_scales") for s in states]

    def update(self, grads: list[Tensor], hyper: Hyper) -> None:
        """The step of this bucket's params, whose ``grads`` readable_grads gave."""
        params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lean, copies = self.views()
        steps = self.steps
        if self.host is not None:
            params, grads, hyper = self.host.down(params, grads, hyper)
        if self.cuts is not None:
            lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lean.masters]
            (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs), steps, lean = (
                self.cuts.split(lists, steps, self._cut_scales, hyper, lean))  # fmt: skip
        self.ops.adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyper,
                            lean)  # fmt: skip
        if self.host is not None:
            self.host.up()
        for original, copy in copies:
            original.copy_(copy)

    def update_part(self, part: list[int], params: list[Tensor], grads: list[Tensor],
                    hyper: Hyper) -> None:  # fmt: skip
        """The step of the bucket's params at ``part`` (indices into the bucket), given those
        params and gradients as the kernels take them (host copies of offloaded ones): the
        same bits as in a call over the whole bucket, as every kernel updates each tensor on
        its own. For a bucket that is :attr:`fast`."""

        def pick(items):
            return [items[k] for k in part] if items else items

        lean = self.lean
        if lean is not PLAIN:
            lean = dataclasses.replace(
                lean, masters=pick(lean.masters), positions=pick(lean.positions),
                first_indices=pick(lean.first_indices), scales=pick(lean.scales),
            )  # fmt: skip
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs = map(pick, self._tensors[1:4])
        self.ops.adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                            pick(self.steps), hyper, lean)  # fmt: skip

    def plan_part(self, grads: list[Tensor]) -> tuple:
        """This bucket's part of its group's kernel plan, with the group's ``grads``."""
        return (*self._tensors[:4], self.steps, self.amsgrad, self.lean, self.indices,
                grads[self.indices[0]].dtype)  # fmt: skip

    @property
    def params(self) -> list[Tensor]:
        """The bucket's params, in its order."""
        return self._tensors[0]

    @property
    def fast(self) -> bool:
        """Whether the kernels take this bucket's own lists, step after step."""
        return self.direct and not self._sharded

    def _lean_of(self, masters: list[Tensor], scales: list[Tensor]) -> Lean:
        if not self._lean:
            return PLAIN
        return Lean(masters=masters, stochastic_rounding=self._rounding[0],
                    seed=self._rounding[1], positions=self.positions,
                    first_indices=self.first_indices, scales=scales)  # fmt: skip

    def _locals(self) -> list[list[Tensor]]:
        if not self._sharded:
            return self._tensors
        return [[local(t) for t in ts] for ts in self._tensors]

    def own_grads(self, grads: list[Tensor]) -> list[Tensor]:
        """This bucket's share of its group's gradients (in its params' order)."""
        return grads if self._whole else list(map(grads.__getitem__, self.indices))

    def readable_grads(self, grads: list[Tensor]) -> list[Tensor]:
        """This bucket's gradients, contiguous and real (copied only when not contiguous)."""
        own = self.own_grads(grads)
        if self._sharded:
            own = [local(g) for g in own]
        if self._complex:
            own = [torch.view_as_real(g) for g in own]
        return [g if g.is_contiguous() else g.contiguous() for g in own]

    def views(self):
        """(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, lean settings, copies to write
        back after the kernel)."""
        if self.lean is not None:
            return (*self._tensors[:4], self.lean, ())
        tensors = self._locals()
        if self.direct:
            return (*tensors[:4], self._lean_of(tensors[4], tensors[5]), ())
        copies: list[tuple[Tensor, Tensor]] = []
        lists = []
        for ts in tensors:
            out = []
            for t in ts:
                real = real_view(t)
                if real.is_contiguous():
                    out.append(real)
                else:
                    copy = real.contiguous()
                    copies.append((real, copy))
                    out.append(copy)
            lists.append(out)
        return (*lists[:4], self._lean_of(lists[4], lists[5]), copies)


class GroupStep:
    """One group's work this step: ``grads`` (each param's once, for the global norm),
    ``passes``, the (bucket, its gradients as the kernels take them) to update in order (a
    param the group lists k times is in k passes), and ``kernel``, the group's kernel plan
    (fastopt._ops.AdamWPlan) where the compiled kernels take every bucket's tensors once: then
    a step is one call with ``grads``, which returns False when the plan no longer holds (a
    param's or gradient's dtype or contiguity changed) and the passes of a new plan run."""

    __slots__ = ("grads", "passes", "kernel")

    def __init__(self, grads: list[Tensor], passes: list[tuple[Bucket, list[Tensor]]],
                 kernel=None):  # fmt: skip
        self.grads, self.passes, self.kernel = grads, passes, kernel


class _Plan:
    """A group's buckets and what a step compares to know that they still hold."""

    __slots__ = ("group", "listed", "settings", "key", "tensors", "state_checks", "buckets",
                 "missing", "present", "grad_dtypes", "param_dtypes", "fast",
                 "kernel")  # fmt: skip


class Planner:
    """The plans of an optimizer's groups, by group index (and repeat pass)."""

    def __init__(self) -> None:
        self._plans: dict[Any, _Plan] = {}
        self._entries: list = []  # the state's entries when the plans were last checked

    def clear(self) -> None:
        """Forget every plan (the state or the groups were replaced)."""
        self._plans.clear()
        self._entries = []

    def steps(self, optimizer, acc_grads: dict | None, backend: str,
              reads_grads: bool = True) -> list[GroupStep | None]:  # fmt: skip
        """Each group's work this step (None for a group without gradients). ``reads_grads``:
        whether the step reads the gradients before the kernels (the global norm does)."""
        same_objects = plan_checks()[0]
        entries = list(optimizer.state.values())
        # An entry added, deleted or replaced (state.clear(), del state[p], a load) may change
        # any group's state: every plan is checked in full then.
        same_entries = same_objects(entries, self._entries)
        out = []
        for index, group in enumerate(optimizer.param_groups):
            plan = self._plans.get(index)
            step = None
            if acc_grads is None and same_entries and plan is not None and plan.fast:
                step = self._reuse(plan, group, backend, reads_grads)
            out.append(step if step is not None else
                       self._general(optimizer, index, group, acc_grads, backend))  # fmt: skip
        self._entries = list(optimizer.state.values())
        return out

    def _reuse(self, plan: _Plan, group: dict[str, Any], backend: str,
               reads_grads: bool) -> GroupStep | None:  # fmt: skip
        """The cached work of a group whose params, settings, state tensors and gradients'
        kinds are as when it was planned; None when any differs."""
        same_objects, entries_are, grads_of = plan_checks()  # C loops: a pointer per tensor
        listed = group["params"]
        if (
            group is not plan.group
            or not same_objects(listed, plan.listed)
            or (group["amsgrad"], lean(group, "stochastic_rounding"), lean(group, "seed"),
                backend) != plan.settings
        ):  # fmt: skip
            return None
        # A param's .data may have been replaced since (same Parameter, another tensor): the
        # kernels take it as it now is if it keeps its dtype and stays contiguous. A kernel
        # plan checks that itself, at a tenth of the cost (dtypes are singletons: `is`
        # compares them).
        kernel = plan.kernel
        if kernel is None and (
            not all(map(is_, map(_DTYPE, listed), plan.param_dtypes))
            or not all(map(Tensor.is_contiguous, listed))
        ):
            return None
        # One walk of each entry's items per bucket (a key added, removed or replaced fails it).
        if not all(entries_are(entries, keys, values)
                   for entries, keys, values in plan.state_checks):  # fmt: skip
            return None
        # The gradients, new tensors at every step after zero_grad(): the plan keeps none of
        # them (it would hold a whole set of gradients through the next forward and backward).
        grads, missing = grads_of(listed)
        got = grads
        if missing != plan.missing:
            return None
        if missing:
            present = list(map(is_not, grads, repeat(None)))
            if present != plan.present:
                return None
            got = list(compress(grads, present))
        # Their layout: one that is not contiguous takes the general path, which copies it,
        # or, sparse (COO: a dense param takes no other), refuses it by name. A kernel plan
        # declines both itself (fastopt._ops.AdamWPlan.step), so this pass (50 ns a tensor)
        # runs only where there is none, or where the global norm reads the gradients first.
        if (kernel is None or reads_grads) and not all(map(Tensor.is_contiguous, got)):
            return None
        if kernel is None and not all(map(is_, map(_DTYPE, got), plan.grad_dtypes)):
            return None
        return GroupStep(got, [(b, b.own_grads(got)) for b in plan.buckets], kernel)

    def replan(self, optimizer, index: int, group: dict[str, Any], backend: str) -> GroupStep:
        """The group's work by the general path, after its kernel plan declined a step."""
        step = self._general(optimizer, index, group, None, backend)
        assert step is not None  # the declined step had gradients
        return step

    def _general(self, optimizer, index: int, group: dict[str, Any], acc_grads: dict | None,
                 backend: str) -> GroupStep | None:  # fmt: skip
        params, grads, repeats = collect(group, acc_grads)
        if not params:
            return None
        plan = self._plan(optimizer, index, group, params, grads, backend)
        passes = [(b, b.readable_grads(grads)) for b in plan.buckets]
        for k, idx in enumerate(repeats, start=1):
            again_params, again_grads = [params[i] for i in idx], [grads[i] for i in idx]
            again = self._plan(optimizer, (index, k), group, again_params, again_grads, backend)
            passes += [(b, b.readable_grads(again_grads)) for b in again.buckets]
        plan.fast = (
            not repeats and acc_grads is None and plan.state_checks is not None
            and all(b.fast for b in plan.buckets)
            and all(type(g) is Tensor or isinstance(g, torch.nn.Parameter) for g in grads)
        )  # fmt: skip
        if plan.fast:
            listed = group["params"]
            plan.group, plan.listed = group, list(listed)
            listed_grads, plan.missing = plan_checks()[2](listed)
            plan.present = list(map(is_not, listed_grads, repeat(None)))
            plan.grad_dtypes = list(map(_DTYPE, grads))
            plan.param_dtypes = list(map(_DTYPE, listed))
            if plan.kernel is None:
                plan.kernel = _kernel_plan(plan.buckets, grads)
        # A non-contiguous gradient would only make the kernel plan decline (and this path
        # run twice): the passes take its contiguous copy.
        planned = plan.fast and all(map(Tensor.is_contiguous, grads))
        return GroupStep(grads, passes, plan.kernel if planned else None)

    def _plan(self, optimizer, index, group: dict[str, Any], params: list[Tensor],
              grads: list[Tensor], backend: str) -> _Plan:  # fmt: skip
        """The buckets of these params, rebuilt only when the set of params with gradients,
        their dtypes or contiguity, the gradient dtypes, the settings or the state tensors
        changed."""
        state = optimizer.state
        settings = (group["amsgrad"], lean(group, "stochastic_rounding"), lean(group, "seed"),
                    backend)  # fmt: skip
        key = (
            tuple(map(id, params)),
            tuple(map(_DTYPE, params)),
            tuple(map(_DTYPE, grads)),
            all(map(Tensor.is_contiguous, params)),
        )  # a .data replaced: Bucket.direct
        cached = self._plans.get(index)
        if cached is not None and cached.key == key and cached.settings == settings:
            try:
                mine = list(chain.from_iterable(state_tensors(state[p]) for p in params))
            except KeyError:  # an entry cleared or deleted: rebuilt (and re-initialised)
                mine = None
            if (
                mine is not None
                and len(mine) == len(cached.tensors)
                and all(map(is_, mine, cached.tensors))
            ):
                return cached
        if len({p.device for p in params}) > 1:
            devices = sorted({str(p.device) for p in params})
            raise ValueError(
                f"fastopt.AdamW: param group {index} has params on several devices "
                f"({', '.join(devices)}); put each group's params on one device"
            )
        for p in params:
            init_state(state[p], p, group)
        entries = [state[p] for p in params]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, (entry, p, g) in enumerate(zip(entries, params, grads)):
            groups[(p.dtype, g.dtype, entry["exp_avg"].dtype, master_key(entry))].append(i)
        positions = _positions(optimizer.param_groups)
        plan = _Plan()
        plan.key, plan.settings = key, settings
        plan.buckets = [Bucket(state, params, idx, group, positions, backend)
                        for idx in groups.values()]  # fmt: skip
        plan.tensors = list(chain.from_iterable(map(state_tensors, entries)))
        # Each bucket's entries as a step checks them (Planner._reuse): all of their keys, in
        # order, and the objects under them. Entries whose keys differ in name or order (not
        # made so by fastopt) leave the group on the general path (state_checks None).
        plan.state_checks = []
        for idx in groups.values():
            bucket_entries = [entries[i] for i in idx]
            keys = tuple(bucket_entries[0])
            if any(tuple(entry) != keys for entry in bucket_entries):
                plan.state_checks = None
                break
            values = list(chain.from_iterable(entry.values() for entry in bucket_entries))
            plan.state_checks.append((bucket_entries, keys, values))
        plan.fast = False
        plan.kernel = None
        self._plans[index] = plan
        return plan


def _kernel_plan(buckets: list[Bucket], grads: list[Tensor]):
    """The kernel plan of a group's buckets (fast ones), or None where a bucket's backend
    takes lists only or the buckets' backends differ."""
    if not all(b.plannable for b in buckets) or len({b.ops for b in buckets}) != 1:
        return None
    return buckets[0].ops.AdamWPlan([b.plan_part(grads) for b in buckets])


def _positions(param_groups: list[dict[str, Any]]) -> dict[int, int]:
    """id(param) -> its position in the optimizer (all groups' params in order): the key of
    its stochastic-rounding noise, the same as long as the param groups are."""
    listed = (p for group in param_groups for p in group["params"])
    return {id(p): i for i, p in reversed(list(enumerate(listed)))}


def collect(group: dict[str, Any], acc_grads: dict | None):
    """The group's params that have gradients, and those gradients (a DTensor gradient laid
    out as its param, so that the two have the same local shards); then the repeat passes:
    lists of indices into those params, for params the group lists more than once."""
    params, grads = [], []
    dtensor = dtensor_type()  # None unless DTensors are in use: then nothing to check
    listed = group["params"]
    if len(set(map(id, listed))) != len(listed):  # torch warned in add_param_group
        return _collect_repeated(listed, acc_grads)
    for p in listed:
        grad = p.grad
        if acc_grads is not None:
            if grad is not None:
                raise RuntimeError(
                    "fastopt.AdamW: a parameter has a .grad while a GradAccumulator holds "
                    "accumulated gradients; call accumulate() after every backward()"
                )
            grad = acc_grads.get(p)
        if grad is None:
            continue
        if grad.is_sparse:
            raise RuntimeError("AdamW does not support sparse gradients")
        if dtensor is not None and (isinstance(p, dtensor) or isinstance(grad, dtensor)):
            grad = like_param(p, grad)
        params.append(p)
        grads.append(grad)
    return params, grads, []


def _collect_repeated(listed: list[Tensor], acc_grads: dict | None):
    """collect for a group that lists a param k > 1 times. torch's for-loop AdamW updates such
    a param k times per step, each time with the same gradient and a step count one higher;
    so do we: once with the other params, then in k - 1 repeat passes over the params listed
    that often (one kernel must never see a tensor twice)."""
    unique = list({id(p): p for p in listed}.values())
    params, grads, _ = collect({"params": unique}, acc_grads)
    position = {id(p): i for i, p in enumerate(params)}
    times: dict[int, int] = defaultdict(int)
    repeats: list[list[int]] = []
    for p in listed:
        if id(p) not in position:
            continue  # no gradient this step
        times[id(p)] += 1
        if times[id(p)] > 1:
            if len(repeats) < times[id(p)] - 1:
                repeats.append([])
            repeats[times[id(p)] - 2].append(position[id(p)])
    return params, grads, repeats
