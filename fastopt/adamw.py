"""fastopt.AdamW: a drop-in for torch.optim.AdamW whose step is one fused kernel per param
group and dtype, with optional global-norm clipping and loss-scale handling folded in.

A step with clipping or loss scaling reads the gradients twice in total: once for the global
norm and non-finite check (:func:`multi_tensor_norm`), once in the update, which applies the
unscale and clip factors in registers and never writes gradients back. Decisions (skip the
step, clip or not) stay on the device as tensors, so a CUDA step never waits for the host.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .backends import BACKENDS, backend_ops, select_backend
from .norm import global_norm
from .quant import BLOCK, QuantizedMoment, quantize_m, quantize_v
from .rounding import join_master
from .sharded import dtensor_type, first_index, is_dtensor, is_fsdp1_flat, like_param, local

__all__ = ["AdamW"]

# The state tensors the kernels update, per param, by (amsgrad, master key or None).
_STATE_KEYS = {
    (amsgrad, master, quantized): operator.itemgetter(
        "step", "exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] if amsgrad else []),
        *([master] if master else []), *(["scales"] if quantized else []),
    )
    for amsgrad in (False, True)
    for master in (None, "master_remainder", "master")
    for quantized in (False, True)
}  # fmt: skip
_STATE_DTYPES = (None, torch.float32, torch.bfloat16, "int8")
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


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
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        betas = tuple(float(b) if isinstance(b, Tensor) else b for b in betas)
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if differentiable:
            raise ValueError(
                "fastopt.AdamW does not support differentiable=True; use torch.optim.AdamW"
            )
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"Invalid backend {backend!r}; expected 'auto' or one of {BACKENDS}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm} (must be positive or None)")
        _check_lean(master_weights, state_dtype, stochastic_rounding, min_8bit_size)
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
                    min_8bit_size=min_8bit_size)  # fmt: skip
        defaults.update((k, v) for k, v in lean.items() if v != _LEAN_DEFAULTS[k])
        super().__init__(params, defaults)
        for group in self.param_groups:  # per-group overrides, checked as the defaults are
            _check_lean(*(_lean(group, key) for key in _LEAN_CHECKED))
        # Drawn here, once, and only for stochastic rounding (8-bit codes always round so): an
        # optimizer that does not round stochastically leaves torch's generator as
        # torch.optim.AdamW does.
        if seed is None and any(_rounds_stochastically(g) for g in self.param_groups):
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            for group in self.param_groups:
                group.setdefault("seed", seed)
            self.defaults["seed"] = seed
        self.backend = backend
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm: Tensor | None = None
        self.last_found_inf: Tensor | None = None
        self._accumulator = None  # set by fastopt.GradAccumulator
        self._loading: dict | None = None  # the saved state while load_state_dict runs
        self._plans: dict[int, tuple] = {}  # group index -> (key, buckets, state); see _plan

    def master_param(self, p: Tensor) -> Tensor:
        """``p``'s fp32 master as a new tensor: the exact value its updates start from (a bf16
        param and its remainder, a fp16 param's fp32 copy), or ``p.float()`` without one."""
        state = self.state.get(p, {})
        key = _master_key(state)
        if key == "master_remainder":
            return join_master(local(p).detach(), local(state[key])).reshape(local(p).shape)
        if key == "master":
            return local(state[key]).detach().clone()
        return local(p).detach().to(torch.float32, copy=True)

    def state_nbytes(self) -> int:
        """Bytes held by the optimizer's state tensors (moments or their 8-bit codes and block
        scales, masters, remainders, step counts) on this process: a sharded param's local
        shard."""
        total = 0
        for state in self.state.values():
            for value in state.values() if isinstance(state, dict) else ():
                if isinstance(value, Tensor):
                    t = local(value)
                    total += t.numel() * t.element_size()
        return total

    def state_dict(self) -> dict[str, Any]:
        """torch's, with 8-bit moments as :class:`fastopt.quant.QuantizedMoment` tensors (the
        ``scales`` entry folded into them): each loads into torch.optim.AdamW as the fp32
        moment of the param's shape it stands for, back into fastopt exactly (codes and
        scales, so a resume is bit-exact), and saves at about one byte per element."""
        packed = super().state_dict()
        for key, entry in packed["state"].items():
            if isinstance(entry, dict) and isinstance(entry.get("scales"), Tensor):
                entry = dict(entry)  # torch's packed state shares the entries with self.state
                scales = entry.pop("scales")
                for row, name in enumerate(_MOMENTS[: scales.shape[0]]):
                    entry[name] = QuantizedMoment(entry[name], scales[row], "v" if row else "m")
                packed["state"][key] = entry
        return packed

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Resets the gradients, as torch's, and discards any a GradAccumulator holds."""
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
        saved = state_dict.get("state", {}) if isinstance(state_dict, dict) else {}
        pairs = zip(state_dict.get("param_groups", ()) if isinstance(state_dict, dict) else (),
                    self.param_groups)  # fmt: skip
        id_map = {k: p for old, new in pairs for k, p in zip(old["params"], new["params"])}
        self._loading = {id(id_map[k]): v for k, v in saved.items() if k in id_map}
        try:
            super().load_state_dict(state_dict)
        finally:
            self._loading = None

    def _restore_dtypes(self, originals: dict[int, dict]) -> None:
        """After torch's load: each group's state dtype for the moments, fp32 for masters."""
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        for param, entry in self.state.items():
            saved = originals.get(id(param)) if isinstance(param, Tensor) else None
            if not isinstance(saved, dict) or not isinstance(entry, dict):
                continue
            group = group_of.get(id(param), self.defaults)
            if _quantizes(group, param):
                _load_quantized(entry, saved, param)
            else:
                entry.pop("scales", None)
                for key in _MOMENTS:
                    value = saved.get(key)
                    if isinstance(value, QuantizedMoment):
                        value = value.dequantize()
                    if isinstance(value, Tensor) and value.is_floating_point() and key in entry:
                        dtype = _moment_dtype(group, param)
                        entry[key] = value.to(dtype=dtype, device=param.device)
            # A master saved by fastopt comes back exact. One that went through torch's
            # load_state_dict was cast to the param's dtype (the int16 remainder converted as
            # a number) and is stale besides, since torch then stepped the param without it:
            # the param is the master then, as when a checkpoint has none.
            for key, dtype in (("master_remainder", torch.int16), ("master", torch.float32)):
                value = saved.get(key)
                if key not in entry:
                    continue
                if isinstance(value, Tensor) and value.dtype == dtype:
                    entry[key] = value.to(device=param.device)
                else:
                    del entry[key]
                    if _lean(group, "master_weights"):
                        _init_master(entry, param)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Called by unpickling (all keys present) and by Optimizer.load_state_dict (only state
        # and param_groups): keep this instance's settings when the state does not carry them.
        self.backend = state.pop("backend", getattr(self, "backend", "auto"))
        self.max_grad_norm = state.pop("max_grad_norm", getattr(self, "max_grad_norm", None))
        for attr in ("last_grad_norm", "last_found_inf", "_accumulator", "_loading"):
            setattr(self, attr, getattr(self, attr, None))
        self._plans = {}  # the buckets hold state tensors, which this replaces
        super().__setstate__(state)
        for group in self.param_groups:  # groups saved by torch.optim.Adam or older versions
            for key, value in self.defaults.items():
                group.setdefault(key, value)
        # torch's non-fused AdamW keeps step counts on the CPU; ours live with the params so a
        # CUDA step can skip and count without a host sync. Done here, not after
        # load_state_dict, so that its post-hooks, which run last, see the state as it will be
        # used. Entries not keyed by a param (a hook may store a flag there) are left alone.
        for param, entry in self.state.items():
            if isinstance(param, Tensor) and isinstance(entry, dict) and "step" in entry:
                entry["step"] = torch.as_tensor(entry["step"], dtype=torch.float32).to(param.device)
        originals = getattr(self, "_loading", None)
        if originals:
            self._restore_dtypes(originals)

    # ------------------------------------------------------------------------------------
    def _collect(self, group: dict[str, Any], acc_grads: dict | None):
        """The group's params that have gradients, and those gradients (a DTensor gradient laid
        out as its param, so that the two have the same local shards); then the repeat passes:
        lists of indices into those params, for params the group lists more than once."""
        params, grads = [], []
        dtensor = dtensor_type()  # None unless DTensors are in use: then nothing to check
        listed = group["params"]
        if len(set(map(id, listed))) != len(listed):  # torch warned in add_param_group
            return self._collect_repeated(listed, acc_grads)
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

    def _collect_repeated(self, listed: list[Tensor], acc_grads: dict | None):
        """_collect for a group that lists a param k > 1 times. torch's for-loop AdamW updates
        such a param k times per step, each time with the same gradient and a step count one
        higher; so do we: once with the other params, then in k - 1 repeat passes over the
        params listed that often (one kernel must never see a tensor twice)."""
        unique = list({id(p): p for p in listed}.values())
        params, grads, _ = self._collect({"params": unique}, acc_grads)
        position = {id(p): i for i, p in enumerate(params)}
        times = defaultdict(int)
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

    def _plan(self, index, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]):
        """The group's kernel buckets, rebuilt only when the set of params with gradients, the
        gradient dtypes or the state change: per-tensor Python work costs milliseconds per
        step for models with hundreds of tensors, time the GPU would spend idle."""
        amsgrad = group["amsgrad"]
        key = (tuple(map(id, params)), tuple(p.dtype for p in params),
               tuple(g.dtype for g in grads), amsgrad)  # fmt: skip
        cached = self._plans.get(index)
        if cached is not None and cached[0] == key and self._state_is(params, cached[2]):
            return cached[1]
        if len({p.device for p in params}) > 1:
            devices = sorted({str(p.device) for p in params})
            raise ValueError(
                f"fastopt.AdamW: param group {index} has params on several devices "
                f"({', '.join(devices)}); put each group's params on one device"
            )
        for p in params:
            self._init_state(p, group)
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i, (p, g) in enumerate(zip(params, grads)):
            state = self.state[p]
            buckets[(p.dtype, g.dtype, state["exp_avg"].dtype, _master_key(state))].append(i)
        positions = self._positions()
        plan = [_Bucket(self.state, params, idx, amsgrad, positions) for idx in buckets.values()]
        self._plans[index] = (key, plan, list(self._state_tensors(params)))
        return plan

    def _positions(self) -> dict[int, int]:
        """id(param) -> its position in the optimizer (all groups' params in order): the key
        of its stochastic-rounding noise, the same as long as the param groups are."""
        listed = (p for group in self.param_groups for p in group["params"])
        return {id(p): i for i, p in reversed(list(enumerate(listed)))}

    def _state_tensors(self, params: list[Tensor]):
        """The state tensors the kernels update, param by param (KeyError if one is missing)."""

        def keys(state):
            return _STATE_KEYS["max_exp_avg_sq" in state, _master_key(state), "scales" in state](
                state
            )

        return chain.from_iterable(map(keys, map(self.state.__getitem__, params)))

    def _state_is(self, params: list[Tensor], tensors: list[Tensor]) -> bool:
        """Whether params' state still holds exactly these tensors: a user may clear the state,
        delete a param's entry or assign new tensors to it, and the next step must use what
        the state holds then, as torch's does (about 40 us per step for 300 params)."""
        try:
            mine = list(self._state_tensors(params))
        except KeyError:  # an entry cleared or deleted: rebuilt (and re-initialised) below
            return False
        return len(mine) == len(tensors) and all(map(operator.is_, mine, tensors))

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        amsgrad = group["amsgrad"]
        if len(state) == 0:
            if _is_lean(group):
                _check_lean_param(p, group)
            quantized = _quantizes(group, p)
            dtype = _moment_dtype(group, p)
            zeros = dict(dtype=dtype, memory_format=torch.preserve_format)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, **zeros)
            state["exp_avg_sq"] = torch.zeros_like(p, **zeros)
            if amsgrad:
                state["max_exp_avg_sq"] = torch.zeros_like(p, **zeros)
            if quantized:  # all-zero codes are 0 whatever the scales
                state["scales"] = _new_scales(p, 3 if amsgrad else 2)
            if _lean(group, "master_weights"):
                _init_master(state, p)
        elif amsgrad and "max_exp_avg_sq" not in state:
            raise RuntimeError(
                "fastopt.AdamW: amsgrad was turned on after the first step; the state has "
                "no max_exp_avg_sq"
            )
        elif _lean(group, "master_weights") and _master_key(state) is None:
            _check_lean_param(p, group)
            _init_master(state, p)  # loaded from a checkpoint without masters: from the param

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

        collected = [self._collect(g, acc_grads) for g in self.param_groups]
        # Each param counts once in the norm, however often its group lists it.
        all_grads = [g for _, grads, _ in collected for g in grads]
        plans = [self._plan(index, group, params, grads) if params else []
                 for index, (group, (params, grads, _))
                 in enumerate(zip(self.param_groups, collected))]  # fmt: skip

        # One read of every gradient gives the global norm and the non-finite flag together.
        # It runs only when needed: for clipping, or for the inf check a loss scaler did not
        # already do. Plain AdamW stays a single pass over memory.
        grad_norm = None
        self.last_grad_norm = None
        needs_check = grad_scale is not None and found_inf is None
        if all_grads and (self.max_grad_norm is not None or needs_check):
            if any(bucket.fsdp1 for plan in plans for bucket in plan):
                raise RuntimeError(
                    "fastopt.AdamW: these params are FSDP1 (FullyShardedDataParallel) shards, "
                    "so a norm or inf check inside the step would see this rank's shard only; "
                    "use FSDP2 (torch.distributed.fsdp.fully_shard), whose DTensor params "
                    "fastopt combines across ranks, or leave max_grad_norm=None and clip with "
                    "the model's clip_grad_norm_() and ShardedGradScaler"
                )
            grad_norm, nonfinite = global_norm(all_grads, 2.0, backend=self.backend)
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

        for index, (group, plan, (params, grads, repeats)) in enumerate(
            zip(self.param_groups, plans, collected)
        ):
            if plan:
                self._update_group(
                    group, plan, grads, grad_scale, found_inf, grad_norm, grad_factor
                )
            for k, idx in enumerate(repeats, start=1):
                again_params, again_grads = [params[i] for i in idx], [grads[i] for i in idx]
                again = self._plan((index, k), group, again_params, again_grads)
                self._update_group(
                    group, again, again_grads, grad_scale, found_inf, grad_norm, grad_factor
                )
        if acc_grads is not None:
            acc.reset()
        return loss

    def _update_group(self, group, plan, grads, grad_scale, found_inf, grad_norm, grad_factor):
        device = plan[0].steps[0].device
        beta1, beta2 = group["betas"]
        if found_inf is not None:  # a skipped step is not counted, decided on the device
            # found_inf is "non-zero", not 0/1: GradScaler sums the flags of several devices.
            increment = (found_inf.to(device, non_blocking=True) == 0).to(torch.float32)
        lean = _is_lean(group)
        extra = {}
        for bucket in plan:
            params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, scales, copies = bucket.views()
            ops = backend_ops(select_backend(self.backend, device, params[0].dtype))
            if lean:
                extra = dict(
                    masters=masters, stochastic_rounding=_lean(group, "stochastic_rounding"),
                    seed=_lean(group, "seed") or 0, positions=bucket.positions,
                    first_indices=bucket.first_indices, **({"scales": scales} if scales else {}),
                )  # fmt: skip
            bucket_grads = bucket.readable_grads(grads)
            if found_inf is None:
                torch._foreach_add_(bucket.steps, 1.0)
            else:  # the list form: the one-tensor form cannot be captured in a CUDA graph
                torch._foreach_add_(bucket.steps, [increment] * len(bucket.steps))
            ops.adamw_step(
                params, bucket_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, bucket.steps,
                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                eps=group["eps"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                grad_scale=grad_scale, found_inf=found_inf, grad_norm=grad_norm,
                max_grad_norm=self.max_grad_norm or 0.0, grad_factor=grad_factor, **extra,
            )  # fmt: skip
            for original, copy in copies:
                original.copy_(copy)


def _real(t: Tensor) -> Tensor:
    """Complex tensors update as pairs of reals, as torch's AdamW does."""
    return torch.view_as_real(t) if t.is_complex() else t


class _Bucket:
    """The params of one group with one (param dtype, grad dtype), and their state, as the
    kernels take them: contiguous and real. Params or state that are not contiguous are
    updated through contiguous copies written back after the kernel, so any layout updates
    correctly; the common case keeps the lists from step to step and copies nothing."""

    def __init__(self, state, params: list[Tensor], indices: list[int], amsgrad: bool,
                 positions: dict[int, int]):  # fmt: skip
        self.indices = indices
        states = [state[params[i]] for i in indices]
        self.steps = [s["step"] for s in states]
        master = _master_key(states[0])  # one kind per bucket (its key says)
        self._tensors = [
            [params[i] for i in indices],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["max_exp_avg_sq"] for s in states] if amsgrad else [],
            [s[master] for s in states] if master else [],
            [s["scales"] for s in states] if "scales" in states[0] else [],
        ]
        self.positions = [positions[id(params[i])] for i in indices]
        self.first_indices = [first_index(params[i]) for i in indices]  # non-zero for shards
        self.state_dtype = states[0]["exp_avg"].dtype
        # DTensor params (FSDP2) and their state update shard by shard: the kernels get each
        # rank's local tensors, looked up at every step.
        self._sharded = any(map(is_dtensor, self._tensors[0]))  # plain params may join them
        self.fsdp1 = any(is_fsdp1_flat(p) for p in self._tensors[0])
        self._direct = all(
            not t.is_complex() and t.is_contiguous() for ts in self._locals() for t in ts
        )
        # Grads share their param's dtype when it is complex, so one check covers the bucket.
        self._complex = self._tensors[0][0].is_complex()
        self._whole = indices == list(range(len(params)))  # the group's only bucket

    def _locals(self) -> list[list[Tensor]]:
        if not self._sharded:
            return self._tensors
        return [[local(t) for t in ts] for ts in self._tensors]

    def readable_grads(self, grads: list[Tensor]) -> list[Tensor]:
        """This bucket's gradients, contiguous and real (copied only when not contiguous)."""
        own = grads if self._whole else [grads[i] for i in self.indices]
        if self._sharded:
            own = [local(g) for g in own]
        if self._complex:
            own = [torch.view_as_real(g) for g in own]
        return [g if g.is_contiguous() else g.contiguous() for g in own]

    def views(self):
        """(params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, scales, copies to write
        back)."""
        tensors = self._locals()
        if self._direct:
            return (*tensors, [])
        copies: list[tuple[Tensor, Tensor]] = []
        lists = []
        for ts in tensors:
            out = []
            for t in ts:
                real = _real(t)
                if real.is_contiguous():
                    out.append(real)
                else:
                    copy = real.contiguous()
                    copies.append((real, copy))
                    out.append(copy)
            lists.append(out)
        return (*lists, copies)


# The settings _check_lean takes, in its order.
_LEAN_CHECKED = ("master_weights", "state_dtype", "stochastic_rounding", "min_8bit_size")
_LEAN_DEFAULTS = dict(master_weights=False, state_dtype=None, stochastic_rounding=False, seed=None,
                      min_8bit_size=4096)  # fmt: skip


def _lean(group: dict[str, Any], key: str):
    """A group's lean-precision setting (absent from groups that use the default)."""
    return group.get(key, _LEAN_DEFAULTS[key])


def _check_lean(master_weights, state_dtype, stochastic_rounding, min_8bit_size) -> None:
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


def _is_lean(group: dict[str, Any]) -> bool:
    """Whether a group uses any lean-precision setting (else it runs exactly as before)."""
    return bool(
        _lean(group, "master_weights") or _lean(group, "state_dtype") is not None
        or _lean(group, "stochastic_rounding")
    )  # fmt: skip


def _rounds_stochastically(group: dict[str, Any]) -> bool:
    """Whether a group's step draws rounding noise: for stochastic_rounding, or 8-bit codes."""
    return bool(_lean(group, "stochastic_rounding") or _lean(group, "state_dtype") == "int8")


def _quantizes(group: dict[str, Any], p: Tensor) -> bool:
    """Whether p's moments are 8-bit codes: an int8 group's params of min_8bit_size elements or
    more (counted over the whole param, so sharding does not change the choice)."""
    return _lean(group, "state_dtype") == "int8" and p.numel() >= _lean(group, "min_8bit_size")


def _moment_dtype(group: dict[str, Any], p: Tensor) -> torch.dtype:
    """The storage of p's moments: uint8 codes, fp32 for an int8 group's small params, else
    the group's state_dtype or p's dtype."""
    state_dtype = _lean(group, "state_dtype")
    if state_dtype == "int8":
        return torch.uint8 if _quantizes(group, p) else torch.float32
    return state_dtype or p.dtype


def _new_scales(p: Tensor, rows: int) -> Tensor:
    """Zero block scales of p's moments: (rows, blocks of p's local tensor), int8."""
    t = local(p)
    return torch.zeros((rows, -(-t.numel() // BLOCK)), dtype=torch.int8, device=t.device)


def _load_quantized(entry: dict[str, Any], saved: dict[str, Any], p: Tensor) -> None:
    """An 8-bit state entry from a saved one: codes and scales exactly from fastopt's state
    dict, or float moments (torch's, a non-8-bit fastopt's) quantized to nearest."""
    names = [name for name in _MOMENTS if name in entry]
    scales = _new_scales(p, len(names))
    for row, name in enumerate(names):
        value = saved.get(name)
        if isinstance(value, QuantizedMoment) and value.codes.numel() == p.numel():
            codes, scale = value.codes, value.scales
        elif isinstance(value, Tensor) and value.is_floating_point() and value.numel() == p.numel():
            x = value.detach().to(device=local(p).device, dtype=torch.float32)
            codes, scale = quantize_m(x) if row == 0 else quantize_v(x.clamp_min(0).sqrt())
        else:
            raise ValueError(
                f"fastopt.AdamW: cannot load {name} of a param of {p.numel()} elements from "
                f"{type(value).__name__} {getattr(value, 'shape', '')}"
            )
        entry[name] = codes.to(device=local(p).device).reshape(local(p).shape).clone()
        scales[row].copy_(scale)
    entry["scales"] = scales


def _master_key(state: dict[str, Any]) -> str | None:
    """The state key of the param's fp32 master ("master_remainder", "master"), or None."""
    if "master_remainder" in state:
        return "master_remainder"
    return "master" if "master" in state else None


def _init_master(state: dict[str, Any], p: Tensor) -> None:
    """The master of a param that has none yet: the param itself, exactly."""
    if p.dtype == torch.bfloat16:
        state["master_remainder"] = torch.zeros_like(
            p, dtype=torch.int16, memory_format=torch.preserve_format
        )
    elif p.dtype == torch.float16:
        state["master"] = p.detach().to(torch.float32, memory_format=torch.preserve_format)


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
        p.dtype == torch.float16 and not _lean(group, "master_weights")
    )
    if _lean(group, "stochastic_rounding") and fp16_store:
        raise ValueError(
            "fastopt.AdamW: stochastic_rounding rounds bfloat16 stores only; for float16 "
            "params use master_weights=True with state_dtype=torch.float32 or torch.bfloat16"
        )
