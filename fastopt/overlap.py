"""Overlapped offload: the host's update of step t runs while the forward of step t + 1 starts.

    handle = opt.overlap(model)    # opt = fastopt.AdamW(..., offload=True)
    for batch in batches:
        loss = model(batch).mean()
        loss.backward()            # CUDA params: each gradient is copied to the host as it is ready
        opt.step()                 # returns once the update is queued
        opt.zero_grad()
    opt.synchronize()              # before reading params outside the model's forward
    handle.remove()

``step()`` takes what needs every gradient at once, the global norm and the non-finite flag,
from partial norms that the gradient hooks of params on a GPU measured there as backward
produced each gradient (fastopt.backward_norm: the same kernel and slots as without offload, so
the same bits; params on the host are measured at ``step()``), then hands the update to a
worker thread. The worker updates one param at a time in the order the forward uses them
(recorded by forward pre-hooks), with the CPU kernel, and copies each back as soon as it is
done; a module's forward pre-hook waits for its own params only. Each param's update is the
kernel's update of that tensor alone, so the result is the synchronous step's, bit for bit. A
gradient changed after its hook is seen by its version counter (in-place ops,
``torch.nn.utils.clip_grad_norm_``, ``GradScaler.unscale_``, another backward); a change
through ``.grad.data``, which torch does not count, is not: change ``.grad`` itself.

What the handle does per device:
- Params on the host (a machine without a GPU): the worker updates them in place. The
  operator releases Python's lock while it runs, so the forward proceeds beside it.
- Params on a GPU: pinned host buffers per param (made at the first step; nothing is
  allocated per step after it). A gradient hook copies each gradient, and its param, to them
  on a side stream as backward produces it; a gradient changed after its hook (unscaled or
  clipped in place, accumulated again) is seen by its version counter and copied again at
  ``step()``. ``with handle.no_sync():`` around the backward of every micro-batch but the
  last skips the copies that the next backward would make stale, as DDP's ``no_sync`` skips
  its all-reduce. With a :class:`fastopt.GradAccumulator`, or under DDP (whose all-reduce
  writes the gradients after their hooks ran), the hooks copy nothing: the gradients are
  copied at ``step()``. Updated params go up on another side stream, and the forward
  waits for each on the device, not on the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from .backward_norm import BackwardNorm
from .sharded import is_dtensor, real_view
from .step_args import Hyper

__all__ = ["Overlap"]

_SCALARS = ("lr", "grad_scale", "found_inf", "grad_norm")


class _Part:
    """One piece of the worker's job: params of one bucket updated by one kernel call."""

    __slots__ = ("bucket", "indices", "params", "grads", "hyper", "ready", "rank")

    def __init__(self, bucket, indices, params, grads, hyper, rank):
        self.bucket, self.indices, self.params, self.grads = bucket, indices, params, grads
        self.hyper, self.rank = hyper, rank
        self.ready: torch.cuda.Event | None = None  # host copies complete (CUDA)


class Overlap:
    """The hooks and worker of :meth:`fastopt.AdamW.overlap` for one model; ``remove()`` (or
    leaving a ``with`` block) waits for the last update and takes the hooks off."""

    # Whether gradient hooks measure the norm's partials of params on the host too. Not by
    # default: there backward and the norm share the cores, so it gains nothing, and an op call
    # per gradient made an iteration of 360 small params slower on 2 cores (medians 7% and 10%
    # in two interleaved runs; no difference at 8 blocks of width 1024). The tests turn it on
    # to run on the host what CUDA params do.
    _measure_on_host = False

    def __init__(self, optimizer, model: torch.nn.Module) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"overlap takes a torch.nn.Module, got {type(model).__name__}")
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            group = groups.get(id(p))
            if group is None:
                raise ValueError(f"overlap: the model's param {name!r} is not one of this "
                                 "optimizer's; pass the model whose params it updates")  # fmt: skip
            if not group.get("offload", False):
                raise ValueError(f"overlap: the model's param {name!r} is in a param group with "
                                 "offload=False; overlap runs offloaded updates only")  # fmt: skip
            if is_dtensor(p):
                raise ValueError(f"overlap: the model's param {name!r} is sharded (a DTensor); "
                                 "overlap takes unsharded params only, for now")  # fmt: skip
        self._optimizer = optimizer
        self._root = model
        self._loose: list[Tensor] = []  # this step's params without a place in the order
        self._rank: dict[int, int] = {}  # id(param) -> its place in the forward's order
        self._ready: dict[int, threading.Event] = {}  # set once the param's update is done
        self._uploaded: dict[int, torch.cuda.Event] = {}  # its copy up (CUDA)
        self._host: dict[int, tuple[Tensor, Tensor]] = {}  # pinned (param, grad) buffers
        self._streamed: dict[int, tuple[int, int, torch.cuda.Event]] = {}
        self._streams: dict[torch.device, tuple[Any, Any]] = {}  # (copies down, copies up)
        self._events: dict[int, list[torch.cuda.Event]] = {}
        self._scalars: dict[tuple[int, str], Tensor] = {}  # pinned: the step's device scalars
        self._stream_grads = True
        self._norms = BackwardNorm()
        self._norms_wanted = False  # whether the last step took a norm: the hooks measure then
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastopt-offload")
        self._job: Future | None = None
        self._error: BaseException | None = None
        self._hooks = []
        for module in model.modules():
            if any(True for _ in module.parameters(recurse=False)):
                self._hooks.append(module.register_forward_pre_hook(self._before_forward))
        # Under DDP (any process group) a gradient is final only once its bucket's all-reduce
        # has written it, after its hook ran, and in place: it is copied at step() instead.
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        for p in () if distributed else model.parameters():
            if p.requires_grad and (p.is_cuda or self._measure_on_host):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_ready))

    # ---- the user's side ----

    @contextlib.contextmanager
    def no_sync(self):
        """Backward inside does not copy gradients to the host (not the last micro-batch)."""
        previous, self._stream_grads = self._stream_grads, False
        try:
            yield
        finally:
            self._stream_grads = previous

    @property
    def order(self) -> list[int]:
        """Ids of the params in the order the forward first used them."""
        return sorted(self._rank, key=self._rank.__getitem__)

    def remove(self) -> None:
        """Waits for the last update, then removes the hooks (and the optimizer's link)."""
        try:
            self.wait()
        finally:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            self._executor.shutdown(wait=True)
            if self._optimizer._overlap is self:
                self._optimizer._overlap = None

    def __enter__(self) -> Overlap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def wait(self) -> None:
        """Blocks until the queued update has reached every param (its copies up included, on
        the current stream), and raises what the worker raised."""
        job, self._job = self._job, None
        if job is not None:
            job.result()
        for device, (_, up) in self._streams.items():
            torch.cuda.current_stream(device).wait_stream(up)
        self._uploaded.clear()
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"fastopt.AdamW: the overlapped update failed: {error}") from error

    # ---- hooks ----

    def _before_forward(self, module: torch.nn.Module, args) -> None:
        own = list(module.parameters(recurse=False))
        for p in own:
            self._rank.setdefault(id(p), len(self._rank))
        # Params no module's own hook has seen (read by a parent's forward, say) go first,
        # and the model's forward waits for them.
        for p in chain(self._loose, own) if module is self._root else own:
            key = id(p)
            ready = self._ready.get(key)
            if ready is not None and not ready.is_set():
                ready.wait()
            if self._error is not None:
                self.wait()  # raises it
            uploaded = self._uploaded.pop(key, None)
            if uploaded is not None:
                torch.cuda.current_stream(p.device).wait_event(uploaded)

    def _grad_ready(self, p: Tensor) -> None:
        grad = p.grad
        if not self._stream_grads or self._optimizer._accumulator is not None or grad is None:
            return
        if self._norms_wanted:
            self._norms.grad_ready(p, grad)
        if not p.is_cuda or not grad.is_contiguous():
            return
        down, _ = self._side_streams(p.device)
        host_param, host_grad = self._buffers(p, real_view(p), real_view(grad))
        down.wait_stream(torch.cuda.current_stream(p.device))
        with torch.cuda.stream(down):
            host_grad.copy_(real_view(grad), non_blocking=True)
            host_param.copy_(real_view(p), non_blocking=True)
            done = self._event(p, 0)
            done.record(down)
        grad.record_stream(down)
        self._streamed[id(p)] = (grad.data_ptr(), grad._version, done)

    # ---- the step ----

    def norm(self, grads: list[Tensor], backend: str) -> tuple[Tensor, Tensor] | None:
        """The step's global 2-norm and non-finite flag of ``grads`` (the params' ``.grad``, in
        the optimizer's order), from the partials the hooks measured; None where the gradients
        are not the params' own (a GradAccumulator's): the caller measures them."""
        self._norms_wanted = True
        params = [p for group in self._optimizer.param_groups
                  for p in {id(q): q for q in group["params"]}.values()
                  if p.grad is not None]  # fmt: skip
        if len(params) != len(grads) or any(p.grad is not g for p, g in zip(params, grads)):
            return None
        return self._norms.norm(params, grads, backend)

    def submit(self, work: list[tuple[Any, list[Tensor], Hyper]]) -> None:
        """Queues the update of ``work`` (bucket, its gradients, the group's scalars) for the
        worker, in forward order; returns at once."""
        parts: list[_Part] = []
        for bucket, grads, hyper in work:
            params = bucket.params
            if bucket.fast:
                for k, p in enumerate(params):
                    rank = self._rank.get(id(p), -1)
                    parts.append(_Part(bucket, [k], [p], [grads[k]], hyper, rank))
            else:  # copies of non-contiguous tensors: the whole bucket in one call
                rank = min(self._rank.get(id(p), -1) for p in params)
                parts.append(_Part(bucket, None, params, grads, hyper, rank))
        parts.sort(key=lambda part: part.rank)
        self._loose = [p for part in parts for p in part.params if id(p) not in self._rank]
        for p in chain.from_iterable(part.params for part in parts):
            self._ready.setdefault(id(p), threading.Event()).clear()
        try:
            hosts = self._copy_down(parts)
        except BaseException:  # nothing queued: no forward may wait for it
            for p in chain.from_iterable(part.params for part in parts):
                self._ready[id(p)].set()
            raise
        self._job = self._executor.submit(self._run, parts, hosts)

    def _copy_down(self, parts: list[_Part]) -> dict[int, Hyper]:
        """Queues the host copies of the CUDA parts' params and gradients not streamed (or
        stale), and of each group's device scalars; returns the scalars' host versions."""
        hosts: dict[int, Hyper] = {}
        cuda = [part for part in parts if part.indices is not None and part.params[0].is_cuda]
        for device in {part.params[0].device for part in cuda}:
            down, up = self._side_streams(device)
            down.wait_stream(torch.cuda.current_stream(device))  # the norm and flag are done
            down.wait_stream(up)  # the host buffers are no longer read by a copy up
        for part in cuda:
            p, g = part.params[0], part.grads[0]
            down, _ = self._side_streams(p.device)
            with torch.cuda.stream(down):
                if id(part.hyper) not in hosts:
                    scalars = {name: self._to_host(getattr(part.hyper, name), (len(hosts), name))
                               for name in _SCALARS}  # fmt: skip
                    hosts[id(part.hyper)] = dataclasses.replace(part.hyper, **scalars)
                host_param, host_grad = self._buffers(p, real_view(p), g)
                streamed = self._streamed.pop(id(p), None)
                if streamed is None or streamed[:2] != (g.data_ptr(), g._version):
                    host_grad.copy_(g, non_blocking=True)
                    host_param.copy_(real_view(p), non_blocking=True)
                part.ready = self._event(p, 1)
                part.ready.record(down)
        for device in {part.params[0].device for part in cuda}:
            # Later changes to the gradients (zero_grad, the next backward) follow the copies.
            torch.cuda.current_stream(device).wait_stream(self._side_streams(device)[0])
        return hosts

    def _run(self, parts: list[_Part], hosts: dict) -> None:
        try:
            for part in parts:
                self._update(part, hosts)
        except BaseException as error:  # reported by wait(), or the next forward
            self._error = error
        finally:
            for part in parts:
                for p in part.params:
                    self._ready[id(p)].set()

    def _update(self, part: _Part, hosts: dict) -> None:
        if part.indices is None:  # the whole bucket, through its own (synchronous) path
            part.bucket.update(part.grads, part.hyper)
        elif part.ready is None:  # params on the host: updated in place
            part.bucket.update_part(part.indices, part.params, part.grads, part.hyper)
        else:
            p = part.params[0]
            host_param, host_grad = self._host[id(p)]
            part.ready.synchronize()
            part.bucket.update_part(part.indices, [host_param], [host_grad], hosts[id(part.hyper)])
            _, up = self._side_streams(p.device)
            with torch.cuda.stream(up):
                real_view(p).copy_(host_param, non_blocking=True)
                done = self._event(p, 2)
                done.record(up)
            self._uploaded[id(p)] = done
        for p in part.params:
            self._ready[id(p)].set()

    # ---- buffers and streams ----

    def _buffers(self, p: Tensor, param: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
        """p's pinned host buffers for its (real) value and gradient, made once."""
        pair = self._host.get(id(p))
        if pair is None or pair[1].dtype != grad.dtype or pair[1].shape != grad.shape:
            pair = (torch.empty(param.shape, dtype=param.dtype, pin_memory=True),
                    torch.empty(grad.shape, dtype=grad.dtype, pin_memory=True))  # fmt: skip
            self._host[id(p)] = pair
        return pair

    def _event(self, p: Tensor, which: int) -> torch.cuda.Event:
        """p's event for its gradient's copy down in its hook (0), its copies down at step()
        (1) and its copy up (2): made once, recorded again at every step (each is waited for
        before it is recorded again)."""
        events = self._events.get(id(p))
        if events is None:
            events = self._events[id(p)] = [torch.cuda.Event() for _ in range(3)]
        return events[which]

    def _side_streams(self, device: torch.device):
        streams = self._streams.get(device)
        if streams is None:
            streams = (torch.cuda.Stream(device), torch.cuda.Stream(device))
            self._streams[device] = streams
        return streams

    def _to_host(self, value, key: tuple[int, str]):
        """A device scalar's copy (queued) into its pinned buffer (by group and name, made
        once), or the value itself."""
        if not isinstance(value, Tensor) or value.device.type == "cpu":
            return value
        host = self._scalars.get(key)
        if host is None or host.dtype != value.dtype or host.shape != value.shape:
            host = self._scalars[key] = torch.empty(value.shape, dtype=value.dtype,
                                                    pin_memory=True)  # fmt: skip
        return host.copy_(value, non_blocking=True)
