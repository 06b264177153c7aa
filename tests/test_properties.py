"""Property-based lockstep suite: hypothesis draws whole configurations and steps fastopt in
lockstep with torch.optim.AdamW(foreach=False), comparing params and all state after every step.

Drawn: lr (float or tensor, 0 included), betas anywhere in [0, 1) (0, the lerp switch at 0.5 and
values near 1 weighted), eps (0 included), weight decay (0 up to lr * wd = 1), amsgrad, maximize,
one to three param groups; params 0-dim, empty, prime-sized, permuted and strided, fp32, bf16
and fp16; params without a gradient on some steps; gradient magnitudes that change by up to
10^12 from one step to the next (the regime of lerp's cancellation). The fused pipeline adds
max_grad_norm, LossScaler against GradScaler (inf and NaN injected on random steps) and
GradAccumulator against one big batch; clip_grad_norm_ is drawn with every norm type, and
state_dict round trips both ways.

The tolerances are derived in tests/properties.py, written beside each check.

Budget: the whole file in at most 3 minutes on a 2-core CPU (about 90 s measured on a shared
2-core machine at load average 3); the Triton cases run under the interpreter on smaller draws
and a fifth of the examples. tests/conftest.py registers the profiles: "ci" (the default,
derandomized, so every CI run tests the same examples) and "nightly", 20x the examples, fresh
each run: `pytest tests/test_properties.py --hypothesis-profile=nightly` (about 30 minutes).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import backend_params
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lockstep import assert_same_state
from properties import (
    CLIP_EPS32,
    FP32,
    LERP_REPRO,
    SECOND_ORDER,
    SMALL,
    TINY,
    Config,
    U,
    assert_within,
    check_fp32,
    check_low,
    clip_cases,
    configs,
    exact_step,
    examples,
    f32,
    generator,
    gradient,
    lr32,
    make_tensor,
    same_values,  # fmt: skip
    snap64,
    through_bytes,
    weighted,
)

import fastopt

FULL = backend_params([("reference", "cpu"), ("cpu", "cpu"), ("cuda", "cuda")])
TRITON = backend_params([("triton", "cpu"), ("triton", "cuda")])
# The interpreter runs the kernels as numpy, which warns on the injected inf and NaN.
INTERPRETER_WARNS = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=FULL[2].marks)]


# -- the lockstep harness ------------------------------------------------------------------------
class Lockstep:
    """torch.optim.AdamW(foreach=False) (t) and fastopt.AdamW (f) stepped together on the same
    data; every step checked."""

    def __init__(self, cfg: Config, backend: str, device: str):
        self.cfg, self.backend, self.device, self.k = cfg, backend, device, 0
        self.skipped = set()  # params that had a gradient on a skipped step
        self.specs = cfg.specs
        self.hyper = [g for g in cfg.groups for _ in g.params]
        init = [make_tensor(s, s.scale * torch.randn(s.shape, generator=generator(cfg.seed, -1, i),
                                               dtype=torch.float64), device)
                for i, s in enumerate(self.specs)]  # fmt: skip
        self.t = self._side("torch", init)
        self.f = self._side("fast", init)
        if cfg.scaler:
            init_scale, growth, backoff, interval = cfg.scaler_args
            args = dict(init_scale=init_scale, growth_factor=growth, backoff_factor=backoff,
                        growth_interval=interval)  # fmt: skip
            self.t.scaler = torch.amp.GradScaler(device, **args)
            self.f.scaler = (fastopt.LossScaler(**args, backend=backend)
                             if cfg.scaler == "LossScaler"
                             else torch.amp.GradScaler(device, **args))  # fmt: skip
        self.acc = fastopt.GradAccumulator(self.f.opt, backend=backend) if cfg.accumulate else None

    def _side(self, kind: str, values: list, state_from=None) -> SimpleNamespace:
        params = [torch.nn.Parameter(make_tensor(s, v.detach().double().cpu(), self.device))
                  for s, v in zip(self.specs, values)]  # fmt: skip
        groups, i = [], 0
        for g in self.cfg.groups:
            lr = torch.tensor(g.lr) if g.tensor_lr else g.lr
            groups.append(dict(params=params[i : i + len(g.params)], lr=lr, betas=g.betas,
                               eps=g.eps, weight_decay=g.weight_decay, amsgrad=g.amsgrad,
                               maximize=g.maximize))  # fmt: skip
            i += len(g.params)
        if kind == "fast":
            opt = fastopt.AdamW(groups, backend=self.backend, max_grad_norm=self.cfg.max_grad_norm)
        else:
            opt = torch.optim.AdamW(groups, foreach=False)
        if state_from is not None:  # a checkpoint of the other implementation, through bytes
            opt.load_state_dict(through_bytes(state_from.state_dict()))
            if kind == "torch":  # fastopt's groups say foreach=None
                for group in opt.param_groups:
                    group["foreach"] = False
        return SimpleNamespace(params=params, opt=opt, scaler=None)

    def crossed(self) -> tuple[Lockstep, Lockstep]:
        """(torch's run beside a fastopt.AdamW loaded from its state_dict, fastopt's run beside
        a torch AdamW loaded from its state_dict); each checked equal to its source."""
        a, b = copy.copy(self), copy.copy(self)
        a.f = self._side("fast", self.t.params, state_from=self.t.opt)
        b.t = self._side("torch", self.f.params, state_from=self.f.opt)
        for loaded, source in ((a.f, self.t), (b.t, self.f)):
            snaps = zip(snap64(loaded.opt, loaded.params), snap64(source.opt, source.params))
            for k, (snap_l, snap_s) in enumerate(snaps):
                assert_same_state([(key, snap_l[key]) for key in snap_s], list(snap_s.items()),
                                 f"param {k} changed in the round trip")  # fmt: skip
            for p_l, p_s in zip(loaded.params, source.params):
                assert set(loaded.opt.state.get(p_l, {})) == set(source.opt.state.get(p_s, {}))
                for key, value in source.opt.state.get(p_s, {}).items():
                    assert loaded.opt.state[p_l][key].dtype == value.dtype, key
        return a, b

    def run(self, steps=None) -> None:
        for _ in range(len(self.cfg.steps) if steps is None else steps):
            self.step()

    def step(self) -> None:
        cfg, k, dev = self.cfg, self.k, self.device
        st_ = cfg.steps[k]
        self.k += 1
        micro = [[gradient(s, st_.exponent, generator(cfg.seed, k, i), generator(cfg.seed, k, i, j))
                  if st_.has_grad[i] else None for i, s in enumerate(self.specs)]
                 for j in range(len(st_.weights))]  # fmt: skip
        if st_.bad is not None and micro[st_.bad[1]][st_.bad[0]] is not None:
            g = micro[st_.bad[1]][st_.bad[0]]
            if g.numel():
                g.view(-1)[-1] = st_.bad[2]  # the last element, where a kernel's tail is
        scale = 1.0
        if cfg.scaler:
            one = torch.ones((), device=dev)
            s_t, s_f = self.t.scaler.scale(one), self.f.scaler.scale(one)
            assert float(s_t) == float(s_f), "the scalers' scales differ"
            scale = float(s_t)
        # fastopt's micro-batches, scaled and stored; torch's big batch is their exact mean
        # rounded once to the param's dtype (as a backward in that dtype would give); the exact
        # step's gradient is that mean, unscaled and clipped in float64. Gradients in their
        # params' layouts.
        fast_micro = [[None if g is None else make_tensor(s, g * scale, dev)
                       for g, s in zip(mb, self.specs)] for mb in micro]  # fmt: skip
        total = cfg.normalizer or sum(st_.weights)
        mean = [None if micro[0][i] is None else weighted(st_.weights, fast_micro, i) / total
                for i in range(len(self.specs))]  # fmt: skip
        stored = [None if g is None else make_tensor(s, g, dev) for g, s in zip(mean, self.specs)]
        prev_t, prev_f = snap64(self.t.opt, self.t.params), snap64(self.f.opt, self.f.params)

        # torch's pipeline: unscale_, clip_grad_norm_, step (skipped on inf/NaN), update.
        for p, g in zip(self.t.params, stored):
            p.grad = None if g is None else g.clone()  # unscale_ and clip work in place
        if cfg.scaler:
            self.t.scaler.unscale_(self.t.opt)
        norm_t = None
        if cfg.max_grad_norm is not None:
            norm_t = float(torch.nn.utils.clip_grad_norm_(self.t.params, cfg.max_grad_norm))
        sign = [-1.0 if h.maximize else 1.0 for h in self.hyper]
        g_t = [None if p.grad is None else p.grad.detach().cpu().double() * sg
               for p, sg in zip(self.t.params, sign)]  # fmt: skip
        finite = all(torch.isfinite(g).all() for g in stored if g is not None)
        skip = cfg.scaler is not None and not finite
        self.skipped |= {i for i, g in enumerate(stored) if skip and g is not None}
        if cfg.scaler:
            self.t.scaler.step(self.t.opt)
            self.t.scaler.update()
        else:
            self.t.opt.step()

        # fastopt's: the same stored gradients, or the micro-batches through the accumulator.
        if self.acc is not None:
            for w, mb in zip(st_.weights, fast_micro):
                for p, g in zip(self.f.params, mb):
                    p.grad = g
                self.acc.accumulate(weight=w)
            if cfg.normalizer is not None:
                self.acc.set_normalizer(cfg.normalizer)
        else:
            for p, g in zip(self.f.params, stored):
                p.grad = None if g is None else g.clone()
        if cfg.scaler:
            self.f.scaler.step(self.f.opt)
            self.f.scaler.update()
            assert self.f.scaler.get_scale() == self.t.scaler.get_scale()
            assert self.f.scaler.state_dict() == self.t.scaler.state_dict()
        else:
            self.f.opt.step()
        found = self.f.opt.last_found_inf
        assert (found is not None and float(found) != 0) == skip, "the skip decisions differ"

        exact_g = [None if g is None else g / scale for g in mean]
        if cfg.max_grad_norm is not None and any(g is not None for g in exact_g):
            norm = float(torch.cat([g.flatten() for g in exact_g if g is not None]).norm())
            exact_g = [None if g is None else g * min(1.0, cfg.max_grad_norm / (norm + 1e-6))
                       for g in exact_g]  # fmt: skip
        exact_g = [None if g is None else g * sg for g, sg in zip(exact_g, sign)]
        fast_micro = fast_micro if self.acc else None
        self._check(prev_t, prev_f, stored, fast_micro, g_t, exact_g, norm_t, scale, skip)

    def _check(self, prev_t, prev_f, stored, fast_micro, g_t, exact_g, norm_t, scale, skip):
        cfg, st_ = self.cfg, self.cfg.steps[self.k - 1]
        new_t, new_f = snap64(self.t.opt, self.t.params), snap64(self.f.opt, self.f.params)
        clip, acc = cfg.max_grad_norm is not None, self.acc is not None
        # The gradient fastopt's kernel sees, fl(B k_f) with B the stored gradient or the
        # accumulated buffer, against torch's fl(fl(T / S) clip_t), k = unscale * clip factors
        # from each side's observed norm (validated below). Roundings besides B's: torch's
        # unscale 2 (1/S, *), clip 3 (+1e-6, /, *); fastopt's 1/N 1, /S 1, clip 3 (+1e-6, /,
        # coef*clip), the product 1. The buffer: K products, K - 1 sums of w_j G_j: 2K U sum|w G|.
        n_t = 2 * bool(cfg.scaler) + 3 * clip
        n_f = acc + bool(cfg.scaler) + 3 * clip + (acc or bool(cfg.scaler) or clip)
        factor = 1.0 / (cfg.normalizer or sum(st_.weights)) if acc else 1.0
        n_acc = 2 * len(st_.weights) * acc
        have = [i for i, g in enumerate(stored) if g is not None]
        bufs, absums = {}, {}  # the exact sums the buffers hold, and of the terms' magnitudes
        for i in have:
            bufs[i] = weighted(st_.weights, fast_micro, i) if acc else stored[i].cpu().double()
            absums[i] = weighted(st_.weights, fast_micro, i, True) if acc else 0.0
        k_t, k_f = 1.0 / scale, factor / scale
        if clip and not skip and have:
            c, norm_f = f32(cfg.max_grad_norm), float(self.f.opt.last_grad_norm)
            k_t *= min(1.0, c / (norm_t + CLIP_EPS32))
            k_f *= min(1.0, c / (norm_f + CLIP_EPS32))
            # fastopt's norm against float64: at most twice the error of torch's fp32 norm of
            # the same gradients + 4 fp32 eps (tests/test_norm_accumulate.py's rule), + the
            # unscale (fl32(1/N), / S, *) and the buffers' rounding. (torch's clip_grad_norm_
            # takes bf16 norms of bf16 gradients: too coarse a yardstick for fp32 ones.)
            flat = torch.cat([stored[i].cpu().flatten() for i in have])
            exact_t = float(flat.double().norm())
            rel_t = abs(float(flat.float().norm()) - exact_t) / exact_t if exact_t else 0.0
            exact_f = float(torch.cat([bufs[i].flatten() for i in have]).norm()) * factor / scale
            n_unscale = acc + bool(cfg.scaler) + (acc or bool(cfg.scaler))
            allow = (2 * rel_t + (8 + n_unscale) * U) * exact_f
            if acc:  # |buffer - its exact sum| <= n_acc U sum_j |w_j G_j|, element by element
                absum = torch.cat([absums[i].flatten() for i in have]).norm()
                allow += n_acc * U * float(absum) * factor / scale
            assert abs(norm_f - exact_f) <= allow * SECOND_ORDER, (
                f"step {self.k}: grad norm {norm_f!r}, float64 {exact_f!r}, torch's {rel_t:.3g}"
            )
        for i, spec in enumerate(self.specs):
            name = f"param {i} {tuple(spec.shape)} {spec.dtype} {spec.layout}, step {self.k}"
            p_t, p_f = self.t.params[i], self.f.params[i]
            # A step skipped for inf/NaN before a param's first update leaves fastopt's state
            # initialised (step 0, zero moments: what snap64 compares), as torch's fused AdamW
            # does; torch's for-loop AdamW is never called then.
            assert p_t not in self.t.opt.state or p_f in self.f.opt.state, f"{name}: no state"
            assert p_f not in self.f.opt.state or p_t in self.t.opt.state or i in self.skipped, (
                f"{name}: state for a param never stepped"
            )
            if p_t in self.t.opt.state:
                s_t, s_f = self.t.opt.state[p_t], self.f.opt.state[p_f]
                assert set(s_t) == set(s_f), f"{name}: state keys {set(s_f)} != {set(s_t)}"
                for key, v in s_t.items():
                    assert (s_f[key].dtype, s_f[key].shape) == (v.dtype, v.shape), f"{name} {key}"
                assert float(s_f["step"]) == float(s_t["step"]), f"{name}: step counts differ"
            if stored[i] is None or skip:  # untouched, to the bit, on both sides
                keys = list(prev_f[i])
                for side, new, prev in (("", new_f, prev_f), ("torch's ", new_t, prev_t)):
                    assert_same_state([(k, new[i][k]) for k in keys],
                                     [(k, prev[i][k]) for k in keys],
                                     f"{name}: {side}state changed")  # fmt: skip
                continue
            hp = self.hyper[i]
            if spec.dtype != FP32:
                n, lr, g = float(new_t[i]["step"]), lr32(hp), exact_g[i]
                x_f, x_t = (exact_step(hp, lr, n, prev[i], g) for prev in (prev_f, prev_t))
                for key in x_f if hp.amsgrad else ("param", "exp_avg", "exp_avg_sq"):
                    check_low(f"{name} {key}", new_f[i][key], new_t[i][key], x_f[key], x_t[key],
                               spec.dtype)  # fmt: skip
                continue
            T, B = stored[i].cpu().double(), bufs[i]
            gb = ((B * k_f - T * k_t).abs() + n_acc * U * absums[i] * k_f
                  + U * (n_f * B.abs() * k_f + n_t * T.abs() * k_t)
                  + (n_t + n_f + n_acc) * TINY)  # fmt: skip
            check_fp32(name, hp, lr32(hp), float(new_t[i]["step"]), prev_t[i], prev_f[i],
                        new_t[i], new_f[i], g_t[i], gb)  # fmt: skip


# -- the properties ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", FULL)
@settings(max_examples=examples(1.0))
@given(cfg=configs())
@example(cfg=LERP_REPRO)
def test_adamw_lockstep(backend, device, cfg):
    Lockstep(cfg, backend, device).run()


@INTERPRETER_WARNS
@pytest.mark.parametrize("backend,device", TRITON)
@settings(max_examples=examples(0.2))
@given(cfg=configs(SMALL, max_steps=3, max_groups=2, max_params=2))
@example(cfg=LERP_REPRO)
def test_adamw_lockstep_triton(backend, device, cfg):
    Lockstep(cfg, backend, device).run()


@pytest.mark.parametrize("backend,device", FULL)
@settings(max_examples=examples(1.0))
@given(cfg=configs(pipeline=True))
def test_fused_pipeline_lockstep(backend, device, cfg):
    """max_grad_norm, LossScaler (or GradScaler) and GradAccumulator against torch's
    GradScaler + unscale_ + clip_grad_norm_ + AdamW on the one big batch."""
    Lockstep(cfg, backend, device).run()


@INTERPRETER_WARNS
@pytest.mark.parametrize("backend,device", TRITON)
@settings(max_examples=examples(0.2))
@given(cfg=configs(SMALL, max_steps=3, max_groups=2, max_params=2, pipeline=True))
def test_fused_pipeline_lockstep_triton(backend, device, cfg):
    Lockstep(cfg, backend, device).run()


@pytest.mark.parametrize("backend,device", FULL)
@settings(max_examples=examples(0.5))
@given(cfg=configs(max_steps=6), split=st.integers(1, 5))
def test_state_dict_round_trips_both_ways(backend, device, cfg, split):
    """A checkpoint of either implementation loads into the other and both continue in
    lockstep with their source's partner."""
    run = Lockstep(cfg, backend, device)
    split = min(split, len(cfg.steps))
    run.run(split)
    for crossed in run.crossed():
        crossed.run(len(cfg.steps) - split)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=examples(1.0))
@given(case=clip_cases())
def test_clip_grad_norm_matches_torch(device, case):
    """fastopt.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_: the norm within twice
    torch's error against float64 (exact for 0 and +-inf), the clipped gradients within the
    rounding of the clip coefficient's product (fp32) or twice torch's error (bf16/fp16)."""
    p_type, c, specs, grads = case.norm_type, case.max_norm, case.specs, case.grads
    sides, norms = [], []
    kwargs = dict(error_if_nonfinite=case.error_if_nonfinite, foreach=case.foreach)
    for fn in (torch.nn.utils.clip_grad_norm_, fastopt.clip_grad_norm_):
        ps = [torch.nn.Parameter(make_tensor(s, torch.zeros(s.shape), device)) for s in specs]
        for p, g, s in zip(ps, grads, specs):
            p.grad = None if g is None else make_tensor(s, g, device)
        try:
            norms.append(float(fn(ps, c, p_type, **kwargs)))
        except RuntimeError as exc:
            assert "non-finite" in str(exc)
            norms.append(None)
        sides.append([None if p.grad is None else p.grad.detach().cpu().double() for p in ps])
    (norm_t, norm_f), (clipped_t, clipped_f) = norms, sides
    stored = [None if g is None else g.to(s.dtype).double() for g, s in zip(grads, specs)]
    if norm_t is None or norm_f is None:  # raised: both, and neither touched a gradient
        assert norm_t is None and norm_f is None, "only one of the two raised"
        unchanged = (g is None or same_values(a, g) and same_values(b, g)
                     for a, b, g in zip(clipped_t, clipped_f, stored))  # fmt: skip
        assert all(unchanged), "a gradient changed"
        return
    present = [g for g in stored if g is not None]
    norms = [torch.linalg.vector_norm(g, p_type) for g in present]  # torch's definition
    exact = float(torch.linalg.vector_norm(torch.stack(norms), p_type)) if present else 0.0
    if not math.isfinite(exact):  # both divide by the same inf or NaN norm: the same bits
        assert same_values(torch.tensor(norm_f), torch.tensor(norm_t)), (norm_f, norm_t)
        assert all(g is None or same_values(a, b) for a, b, g in zip(clipped_t, clipped_f, stored))
        return
    assert case.bad is not None or math.isfinite(norm_t), "torch's norm overflowed: no test"
    if p_type == 0 or math.isinf(p_type):  # a count, a max or a min: no rounding at all
        assert norm_f == exact, (norm_f, exact)
    else:  # the root amplifies the sum's rounding by 1/p; 4 eps (8 U) as the norm test's floor
        allow = 2 * abs(norm_t - exact) + 8 * U * max(1.0, 1.0 / p_type) * exact
        assert abs(norm_f - exact) <= allow * SECOND_ORDER, (norm_f, norm_t, exact)
    k_t, k_f = (min(1.0, f32(c) / (n + CLIP_EPS32)) for n in (norm_t, norm_f))
    k_x = min(1.0, c / (exact + 1e-6))
    torch_fp32 = any(s.dtype == FP32 for s, g in zip(specs, grads) if g is not None)
    for i, (g, spec, fast, ref) in enumerate(zip(stored, specs, clipped_f, clipped_t)):
        if g is None:
            continue
        ok = torch.isfinite(g)  # an inf or NaN times the coefficient: the same bits
        assert same_values(fast[~ok], ref[~ok])
        name = f"grad {i} {tuple(spec.shape)} {spec.dtype}"
        if spec.dtype == FP32 and torch_fp32:
            # each side: fl32(max / fl32(norm + 1e-6)) 2U, the product U; k_f vs k_t exact.
            bound = g.abs() * (abs(k_f - k_t) + 3 * U * (k_f + k_t)) + 2 * TINY
            assert_within(name, fast[ok], ref[ok], bound[ok])
        else:
            check_low(name, fast[ok], ref[ok], (g * k_x)[ok], (g * k_x)[ok], spec.dtype)
