"""fastopt.AdamW: a drop-in for torch.optim.AdamW whose step is one fused kernel per param
group and dtype, with optional global-norm clipping and loss-scale handling folded in.

A step with clipping or loss scaling reads the gradients twice in total: once for the global
norm and non-finite check (:func:`multi_tensor_norm`), once in the update, which applies the
unscale and clip factors in registers and never writes gradients back. Decisions (skip the
step, clip or not) stay on the device as tensors, so a CUDA step never waits for the host.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import state as formats
from . import state_dict as saved
from ._plan import Planner
from ._torch_args import check_torch_args
from .backends import BACKENDS
from .norm import global_norm
from .overlap import Overlap
from .step_args import Hyper

__all__ = ["AdamW"]


class AdamW(Optimizer):
    """AdamW with decoupled weight decay; same signature, defaults, state and ``state_dict``
    as :class:`torch.optim.AdamW`.

    Keyword-only extras:
        backend: ``"auto"`` (default), ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``;
            see :mod:`fastopt.backends`.
        max_grad_norm: clip the global L2 norm of all gradients to this value inside the step
            (gradients themselves are not modified). A step whose gradients hold inf or NaN is
            then skipped on the device: params, moments and step counts stay as they were.

    After each step, ``last_grad_norm`` holds the pre-clip, unscaled global gradient norm
    (a 0-dim tensor, read without a sync) when it was computed, and ``last_found_inf`` a
    0-dim tensor that is non-zero if the step was skipped (None when nothing was checked).

    Memory-lean precision (keyword-only, per param group; the defaults are torch's behaviour):
        master_weights: bf16 params keep an exact fp32 master as the param plus an int16
            remainder (state ``master_remainder``: 2 bytes per parameter), fp16 params a full
            fp32 copy (state ``master``); the param is always the master rounded to nearest.
            fp32 params ignore it. :meth:`master_param` returns the master.
        state_dtype: storage of ``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq``: None (the
            param's dtype, as torch), ``torch.float32``, ``torch.bfloat16`` or ``"int8"``:
            8-bit codes with a power-of-two scale per block of 32 elements (fastopt.quant),
            about 1.03 bytes per moment element, rounded stochastically. Math is fp32.
        min_8bit_size: with ``"int8"``, params of fewer elements keep fp32 moments (default
            4096, as bitsandbytes: their state is small and blocks would not pay).
        stochastic_rounding: every other store into bf16 (params without a master, bf16
            moments) rounds stochastically, so updates below half an ulp survive on average.
        seed: the rounding noise is a function of (seed, the param's position in the
            optimizer, the element, the step), the same on every backend and after a resume.
            None draws one from torch's default generator, only when stochastic_rounding is on.
    :meth:`state_nbytes` gives the bytes the state holds.

    Offload (keyword-only, per param group): ``offload=True`` keeps every state tensor of
    params on a GPU in pinned host memory and runs their update on the host's CPU kernel: each
    step copies the gradients and params to the host, updates there and copies the params
    back, with the global norm and skip flag computed on the device first. The result is the
    non-offloaded step's, bit for bit (the CPU and device kernels agree). Params on the CPU
    are unaffected. The step is synchronous (it returns with the update done) unless
    :meth:`overlap` hooks a model, so that the update runs while the next forward starts.

    ``foreach`` and ``fused`` are accepted for compatibility and change nothing: every
    backend fuses. ``capturable`` is accepted: on CUDA the step is always capturable (step
    counts live on the device). ``differentiable=True`` is not supported.
    """

    # GradScaler (and fastopt.LossScaler) hand this optimizer grad_scale/found_inf instead of
    # unscaling and checking the gradients in separate passes.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        max_grad_norm: float | None = None,
        master_weights: bool = False,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
        seed: int | None = None,
        min_8bit_size: int = 4096,
        offload: bool = False,
    ) -> None:
        check_torch_args(lr, betas, eps, weight_decay, foreach, capturable, fused,
                         differentiable)  # fmt: skip
        betas = tuple(float(b) if isinstance(b, Tensor) else b for b in betas)
        if differentiable:
            raise ValueError(
                "fastopt.AdamW does not support differentiable=True; use torch.optim.AdamW"
            )
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"Invalid backend {backend!r}; expected 'auto' or one of {BACKENDS}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (must be positive or None)")
        formats.check_lean(master_weights, state_dtype, stochastic_rounding, min_8bit_size)
        if not isinstance(offload, bool):
            raise ValueError(f"Invalid offload: {offload!r} (True or False)")
        if offload and backend not in ("auto", "cpu"):
            raise ValueError(
                f"fastopt.AdamW: offload=True runs the update on the host's CPU kernel, which "
                f"backend={backend!r} is not; use backend='auto' or 'cpu'"
            )
        if seed is not None and not (isinstance(seed, int) and 0 <= seed < 2**63):
            raise ValueError(f"Invalid seed: {seed!r} (an int from 0 to 2**63 - 1, or None)")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
        )  # fmt: skip
        # The lean settings join the defaults (and so every group and the state_dict) only
        # when set: with none, defaults and state_dict are torch.optim.AdamW's exactly.
        lean = dict(master_weights=master_weights, state_dtype=state_dtype,
                    stochastic_rounding=stochastic_rounding, seed=seed,
                    min_8bit_size=min_8bit_size, offload=offload)  # fmt: skip
        defaults.update((k, v) for k, v in lean.items() if v != formats.LEAN_DEFAULTS[k])
        super().__init__(params, defaults)
        formats.check_lean_groups(self.param_groups)
        # Drawn here, once, and only for stochastic rounding (8-bit codes always round so): an
        # optimizer that does not round stochastically leaves torch's generator as
        # torch.optim.AdamW does.
        if seed is None and any(formats.rounds_stochastically(g) for g in self.param_groups):
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            for group in self.param_groups:
                group.setdefault("seed", seed)
            self.defaults["seed"] = seed
        self.backend = backend
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: Tensor | None = None
        self.last_found_inf: Tensor | None = None
        self._accumulator = None  # set by fastopt.GradAccumulator
        self._planner = Planner()  # the buckets of each group, from step to step
        self._overlap: Overlap | None = None  # set by overlap()

    def master_param(self, p: Tensor) -> Tensor:
        """``p``'s fp32 master as a new tensor: the exact value its updates start from (a bf16
        param and its remainder, a fp16 param's fp32 copy), or ``p.float()`` without one."""
        return formats.master_param(self.state.get(p, {}), p)

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer's state tensors (moments or their 8-bit codes and block
        scales, masters, remainders, step counts) on this process: a sharded param's local
        shard."""
        return formats.state_nbytes(self.state.values())

    def state_dict(self) -> dict[str, Any]:
        """torch's, with 8-bit moments as :class:`fastopt.quant.QuantizedMoment` tensors (the
        ``scales`` entry folded into them): each loads into torch.optim.AdamW as the fp32
        moment of the param's shape it stands for, back into fastopt exactly (codes and
        scales, so a resume is bit-exact), and saves at about one byte per element."""
        self.synchronize()
        return self._packed(portable=False)

    def portable_state_dict(self) -> dict[str, Any]:
        """The state dict every torch.optim.AdamW loads, on any number of ranks: state_dict()
        without the ``scales`` entries, and a sharded param's 8-bit moments as fp32 DTensors
        (fastopt loads them back quantized to nearest, not bit-exact)."""
        self.synchronize()
        return self._packed(portable=True)

    def _packed(self, portable: bool) -> dict[str, Any]:
        # The packed ids, as torch numbers them: params in group order, each once.
        params = list({id(p): p for group in self.param_groups for p in group["params"]}.values())
        return saved.pack_state_dict(super().state_dict(), params, portable)

    def overlap(self, model: torch.nn.Module) -> Overlap:
        """Overlaps the offloaded update with the next forward (:mod:`fastopt.overlap`):
        ``step()`` then returns once the update is queued, the update runs param by param in
        the order ``model``'s forward uses them, and each module's forward waits for its own
        params. The result is the synchronous step's, bit for bit. Every trainable param of
        ``model`` must be one of this optimizer's, in a group with ``offload=True``. Returns
        the handle; ``handle.remove()`` ends it."""
        if self._overlap is not None:
            raise RuntimeError("fastopt.AdamW: overlap() is already on; remove() its handle first")
        self._overlap = Overlap(self, model)
        return self._overlap

    def synchronize(self) -> None:
        """Waits until the last step's update has reached the params: needed under
        :meth:`overlap` before reading params outside the model's forward (state_dict() and
        load_state_dict() wait by themselves); immediate otherwise."""
        if self._overlap is not None:
            self._overlap.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Resets the gradients, as torch's, and discards any a GradAccumulator holds."""
        if not set_to_none:  # zeroed in place: an overlapped update may still read them
            self.synchronize()
        super().zero_grad(set_to_none)
        if self._accumulator is not None and self._accumulator.pending:
            self._accumulator.reset()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(backend=self.backend, max_grad_norm=self.max_grad_norm)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, keeping what its cast to the param's dtype would lose: moments stay in the
        group's ``state_dtype`` and fp32 masters in fp32, converted from the saved tensors (so
        torch's own state_dict loads too: moments converted, masters taken from the params)."""
        self.synchronize()
        # Last of the pre-hooks, so that the user's see the state_dict as given: the saved
        # entries then travel through torch's load wrapped, and __setstate__ converts them.
        handle = self.register_load_state_dict_pre_hook(saved.wrap_saved_state)
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by unpickling (all keys present) and by Optimizer.load_state_dict (only state
        # and param_groups): keep this instance's settings when the state does not carry them.
        self.backend = state.pop("backend", getattr(self, "backend", "auto"))
        self.max_grad_norm = state.pop("max_grad_norm", getattr(self, "max_grad_norm", None))
        for attr in ("last_grad_norm", "last_found_inf", "_accumulator", "_overlap"):
            setattr(self, attr, getattr(self, attr, None))
        self._planner = Planner()  # the buckets hold state tensors, which this replaces
        super().__setstate__(state)
        for group in self.param_groups:  # groups saved by torch.optim.Adam or older versions
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        # A load's entries, converted (saved.wrap_saved_state) before the load's post-hooks,
        # which run last, see the state.
        saved.unwrap_loaded_state(self.state, self.param_groups, self.defaults)
        # torch's non-fused AdamW keeps step counts on the CPU; ours live with the params so a
        # CUDA step can skip and count without a host sync. Entries not keyed by a param (a
        # hook may store a flag there) are left alone.
        for param, entry in self.state.items():
            if isinstance(param, Tensor) and isinstance(entry, dict) and "step" in entry:
                entry["step"] = torch.as_tensor(entry["step"], dtype=torch.float32).to(param.device)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs a single optimization step."""
        try:
            return self._step(closure)
        except BaseException:
            # A loss scaler hands grad_scale and found_inf over as attributes and deletes them
            # once step() returns; a step that raised leaves them behind (torch's GradScaler
            # has no finally), and they must not leak into later steps.
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise

    def _step(self, closure):
        self.synchronize()  # the last step's update, when overlapped, is done before this one
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        acc = self._accumulator
        acc_grads = acc.gradients() if acc is not None and acc.pending else None
        if found_inf is not None and not isinstance(found_inf, Tensor):
            # torch's GradScaler hands over sum([]), the int 0, when no param has a .grad: it
            # saw none of the gradients, as when a GradAccumulator holds them (and its update()
            # then fails for want of an inf check).
            if acc_grads is not None:
                raise RuntimeError(
                    "fastopt.AdamW: torch.amp.GradScaler cannot see the gradients a "
                    "GradAccumulator holds (they are not in .grad); use fastopt.LossScaler, "
                    "which has GradScaler's interface and handles accumulated gradients"
                )
            found_inf = None
        grad_factor = acc.factor() if acc_grads is not None else 1.0

        # One read of every gradient gives the global norm and the non-finite flag together.
        # It runs only when needed: for clipping, or for the inf check a loss scaler did not
        # already do. Plain AdamW stays a single pass over memory.
        needs_check = grad_scale is not None and found_inf is None
        needs_norm = self.max_grad_norm is not None or needs_check
        steps = self._planner.steps(self, acc_grads, self.backend, reads_grads=needs_norm)
        grad_norm = None
        self.last_grad_norm = None
        # Each param counts once in the norm, however often its group lists it.
        all_grads = ([g for step in steps if step is not None for g in step.grads]
                     if needs_norm else [])  # fmt: skip
        if all_grads:
            if any(b.fsdp1 for step in steps if step is not None for b, _ in step.passes):
                raise RuntimeError(
                    "fastopt.AdamW: these params are FSDP1 (FullyShardedDataParallel) shards, "
                    "so a norm or inf check inside the step would see this rank's shard only; "
                    "use FSDP2 (torch.distributed.fsdp.fully_shard), whose DTensor params "
                    "fastopt combines across ranks, or leave max_grad_norm=None and clip with "
                    "the model's clip_grad_norm_() and ShardedGradScaler"
                )
            # The norm runs where the gradients are: backend="cpu" names the update's kernel,
            # which for offloaded params on a GPU is the host's while their gradients are not.
            backend = "auto" if self.backend == "cpu" else self.backend
            # Overlapped, the gradient hooks measured the norm's partials during backward.
            overlap = self._overlap
            norm = overlap.norm(all_grads, backend) if overlap is not None else None
            grad_norm, nonfinite = norm or global_norm(all_grads, 2.0, backend=backend)
            # A norm that overflowed fp32 (finite gradients whose squares sum past 3.4e38, as
            # when a loss scale has grown huge) would clip the update to nothing: skip the step
            # instead, so a loss scaler backs off as it does for inf gradients.
            nonfinite = torch.maximum(nonfinite, grad_norm.isinf().to(nonfinite))
            if found_inf is not None:  # a scaler's flag and ours: skip if either is set
                nonfinite = torch.maximum(nonfinite, found_inf.to(nonfinite))
            found_inf = nonfinite
            coef = grad_factor / grad_scale.to(grad_norm) if grad_scale is not None else grad_factor
            self.last_grad_norm = grad_norm * coef
        self.last_found_inf = found_inf

        overlapped = []  # (bucket, grads, hyper) for the overlap's worker
        eager = not torch.compiler.is_compiling()  # a traced step cannot take a kernel plan
        for index, (group, step) in enumerate(zip(self.param_groups, steps)):
            if step is None:
                continue
            beta1, beta2 = group["betas"]
            # The kernels count the step (or, found_inf set, do not) and skip on the device.
            hyper = Hyper(
                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                eps=group["eps"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm,
                max_grad_norm=self.max_grad_norm or 0.0, grad_factor=grad_factor,
            )  # fmt: skip
            overlap = self._overlap is not None and group.get("offload")
            # One call for the group where the kernels hold its tensors (fastopt/_plan.py);
            # if the plan no longer holds, nothing was written and a new plan's passes run.
            if (
                step.kernel is not None and eager and not overlap
                and all(b.host is None for b, _ in step.passes)
            ):  # fmt: skip
                if step.kernel.step(step.grads, hyper):
                    continue
                step = self._planner.replan(self, index, group, self.backend)
            # A param the group lists twice updates twice, in order: not overlapped.
            if overlap and _distinct(step.passes):
                overlapped += [(bucket, grads, hyper) for bucket, grads in step.passes]
                continue
            for bucket, grads in step.passes:
                bucket.update(grads, hyper)
        if overlapped:
            self._overlap.submit(overlapped)
        if acc_grads is not None:
            acc.reset()
        return loss


def _distinct(passes) -> bool:
    ids = [id(p) for bucket, _ in passes for p in bucket.params]
    return len(set(ids)) == len(ids)
