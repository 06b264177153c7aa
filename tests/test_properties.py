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

Tolerances, written beside each check:
* fp32 (`_check_fp32`): a first-order rounding-error bound per element, derived operation by
  operation. Each step's outputs are bounded from both implementations' observed inputs,
  |fast - torch| <= |F(fast's inputs) - F(torch's inputs)| + rounding(fast) + rounding(torch)
  with F the exact step in float64, so the bound never accumulates slack over steps.
* bf16/fp16 (`_check_low`): per tensor and step, fastopt's L2 error against the exact (float64)
  step from its own state is at most twice torch's own error against the exact step from
  torch's state, plus one ulp of the storage type at the largest element (a single rounding
  flip). Per step, not over the run: a run's error in a small tensor is mostly its state's
  earlier roundings, which both implementations share, and a cancellation can make torch's
  extra roundings lucky (a nightly run found a 1-element bf16 exp_avg 2.3 ulps off over two
  steps, torch's 0.3 ulps, its bf16-rounded clipped gradient having cancelled the shared error).

Budget: the whole file in at most 3 minutes on a 2-core CPU (about 90 s measured on a shared
2-core machine at load average 3); the Triton cases run under the interpreter on smaller draws
and a fifth of the examples. tests/conftest.py registers the profiles: "ci" (the default,
derandomized, so every CI run tests the same examples) and "nightly", 20x the examples, fresh
each run: `pytest tests/test_properties.py --hypothesis-profile=nightly` (about 30 minutes).
"""

from __future__ import annotations

import copy
import io
import math
import struct
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from helpers import backend_params
from hypothesis import example, given, settings
from hypothesis import strategies as st

import fastopt

U = 2.0**-24  # fp32 unit roundoff: fl(x op y) = (x op y)(1 + d) with |d| <= U
E64 = 2.0**-53  # float64's
TINY = 2.0**-149  # fp32's smallest subnormal: the absolute error of a rounding near zero
# Every bound is first order in U; the neglected terms are at most (K U)^2 relative for the
# K <= 20 roundings of a step, below 2^-16 of the first-order bound.
SECOND_ORDER = 1 + 2.0**-16
CLIP_EPS32 = struct.unpack("f", struct.pack("f", 1e-6))[0]  # clip_grad_norm_'s 1e-6 in fp32
FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
INF, NAN = math.inf, math.nan

FULL = backend_params([("reference", "cpu"), ("cpu", "cpu"), ("cuda", "cuda")])
TRITON = backend_params([("triton", "cpu"), ("triton", "cuda")])
# The interpreter runs the kernels as numpy, which warns on the injected inf and NaN.
INTERPRETER_WARNS = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=FULL[2].marks)]

# Shapes: 0-dim, empty, primes, multi-dimensional. The interpreter gets the small ones.
SHAPES = [(), (0,), (1,), (2,), (5,), (7,), (13,), (31,), (97,), (257,), (0, 3), (4, 6), (3, 7, 2)]
SMALL = [(), (0,), (1,), (3,), (7,), (13,), (0, 3), (3, 5)]


def _examples(fraction: float) -> int:
    """A fraction of the active profile's example count (tests/conftest.py)."""
    return max(1, round(settings().max_examples * fraction))


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _lr32(group) -> float:
    """The lr both implementations compute with: a tensor lr is fp32."""
    return _f32(group.lr) if group.tensor_lr else group.lr


# -- configurations ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamSpec:
    shape: tuple
    dtype: torch.dtype
    layout: str  # "contiguous", "permuted" (dense, strides reversed) or "strided" (every 2nd)
    scale: float  # initial values: randn * scale
    kind: str  # gradients: "normal" (randn), "zeros" (randn, a quarter zeroed), "away" (|g| >= 0.5)


@dataclass(frozen=True)
class Group:
    lr: float
    tensor_lr: bool
    betas: tuple
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    params: tuple


@dataclass(frozen=True)
class Step:
    exponent: int  # gradients are 10**exponent times unit-size draws
    has_grad: tuple  # per param, in group order
    weights: tuple = (1.0,)  # micro-batch weights (GradAccumulator), else one entry
    bad: tuple | None = None  # (param, micro-batch, value): an injected inf or NaN


@dataclass(frozen=True)
class Config:
    groups: tuple
    steps: tuple
    seed: int
    max_grad_norm: float | None = None
    scaler: str | None = None  # "LossScaler", or "GradScaler" (torch's scaler driving fastopt)
    scaler_args: tuple = ()  # init_scale, growth_factor, backoff_factor, growth_interval
    accumulate: bool = False
    normalizer: float | None = None

    @property
    def specs(self) -> list[ParamSpec]:
        return [s for g in self.groups for s in g.params]


BETA = st.one_of(
    st.sampled_from([0.0, 1e-6, 0.3, 0.5, 0.5 + 2**-25, 0.9, 0.999, 0.9999]),
    st.floats(0.0, 1.0, exclude_max=True),
)


@st.composite
def param_specs(draw, shapes, dtypes, away: bool):
    shape = draw(st.sampled_from(shapes))
    dtype = draw(st.sampled_from(dtypes))
    layouts = ["contiguous"] + ["strided"] * (len(shape) >= 1) + ["permuted"] * (len(shape) >= 2)
    # eps = 0 divides by sqrt(v): gradients bounded away from zero keep v > 0 (a zero gradient
    # would make both sides 0/0). fp16 too: v = (1 - beta2) g^2 stays above fp16's normal
    # range's floor 6e-5 (else torch's own fp16 state underflows and its update divides by 0).
    kinds = ["away"] if away or dtype == FP16 else ["normal", "zeros", "away"]
    return ParamSpec(shape, dtype, draw(st.sampled_from(layouts)),
                     10.0 ** draw(st.integers(-2, 2)), draw(st.sampled_from(kinds)))  # fmt: skip


@st.composite
def groups(draw, shapes, max_params, fp16):
    lr = draw(st.one_of(st.just(1e-3), st.just(0.0), st.floats(1e-5, 0.1)))
    betas = (draw(BETA), draw(BETA))
    eps = draw(st.sampled_from([1e-8, 0.0, 1e-6, 1e-3]))
    wd = draw(st.sampled_from([1e-2, 0.0, 1e-4, 0.1, 1.0, 10.0, 100.0]))
    wd = min(wd, 1.0 / lr) if lr > 0 else wd  # lr * wd <= 1: the decay factor stays in [0, 1]
    dtypes = [FP32, FP32, BF16] + [FP16] * (fp16 and betas[1] <= 0.999)
    specs = draw(
        st.lists(param_specs(shapes, dtypes, away=eps == 0.0), min_size=1, max_size=max_params)
    )
    return Group(lr, draw(st.booleans()), betas, eps, wd, draw(st.booleans()), draw(st.booleans()),
                 tuple(specs))  # fmt: skip


@st.composite
def configs(draw, shapes=SHAPES, max_steps=6, max_groups=3, max_params=3, pipeline=False):
    features = draw(st.sets(st.sampled_from(["clip", "scaler", "accumulate"]), min_size=1)
                    if pipeline else st.just(set()))  # fmt: skip
    scaled = "scaler" in features
    # fp16 in plain AdamW only: torch's GradScaler refuses fp16 gradients, and torch's fp16
    # state leaves fp16's range under a clip (v < 6e-5: its update divides by 0, eps being 0 in
    # fp16) or an accumulator's normalizer (g^2 > 65504).
    gs = draw(st.lists(groups(shapes, max_params, not pipeline), min_size=1, max_size=max_groups))
    n_params = sum(len(g.params) for g in gs)
    n_micro = draw(st.integers(2, 3)) if "accumulate" in features else 1
    steps = []
    for _ in range(draw(st.integers(1, max_steps))):
        has = draw(st.lists(st.sampled_from([True, True, True, False]), min_size=n_params,
                            max_size=n_params))  # fmt: skip
        if scaled and not any(has):
            has[0] = True  # GradScaler.step raises when no param has a gradient
        weights = tuple(draw(st.sampled_from([1.0, 0.5, 3.0])) for _ in range(n_micro))
        weights = weights if n_micro > 1 else (1.0,)
        bad = None
        if scaled and draw(st.integers(0, 3)) == 0:
            bad = (draw(st.integers(0, n_params - 1)), draw(st.integers(0, n_micro - 1)),
                   draw(st.sampled_from([INF, -INF, NAN])))  # fmt: skip
        steps.append(Step(draw(st.integers(-6, 6)), tuple(has), weights, bad))
    cfg = dict(groups=tuple(gs), steps=tuple(steps), seed=draw(st.integers(0, 2**31)))
    if "clip" in features:
        cfg["max_grad_norm"] = 10.0 ** draw(st.integers(-3, 3))
    if scaled:
        kinds = ["LossScaler"] + ["GradScaler"] * ("accumulate" not in features)
        cfg["scaler"] = draw(st.sampled_from(kinds))
        cfg["scaler_args"] = (draw(st.sampled_from([2.0**8, 1.0, 3.0, 2.0**16])),
                              draw(st.sampled_from([2.0, 1.5])), draw(st.sampled_from([0.5, 0.25])),
                              draw(st.integers(1, 3)))  # fmt: skip
    if "accumulate" in features:
        cfg["accumulate"] = True
        cfg["normalizer"] = draw(st.sampled_from([None, 7.0, 0.3]))
    return Config(**cfg)


# The lerp bug fixed in csrc/adamw_math.h: exp_avg = m + (1 - beta1) (g - m) cancels when
# beta1 = 0 and |g| << |m| (2.4e-2 relative error); torch's lerp computes g - (g - m) beta1.
LERP_REPRO = Config(
    groups=(Group(1e-3, False, (0.0, 0.0), 1e-8, 0.0, False, False,
                  (ParamSpec((1000,), FP32, "contiguous", 1.0, "normal"),)),),
    steps=(Step(1, (True,)), Step(-2, (True,))),
    seed=0,
)  # fmt: skip


# -- data --------------------------------------------------------------------------------------
def _gen(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(keys) % 2**62)


def _grad(spec: ParamSpec, exponent: int, gen_sign, gen) -> torch.Tensor:
    """A float64 gradient; the sign of an "away" one comes from gen_sign, shared by all
    micro-batches of a step so that their weighted mean stays away from zero too."""
    if spec.dtype == FP16:  # |g| <= 150 keeps g^2 below fp16's max; |g| >= 0.5 see param_specs
        exponent = min(max(exponent, 0), 2)
    if spec.kind == "away":
        sign = torch.randint(0, 2, spec.shape, generator=gen_sign, dtype=torch.float64) * 2 - 1
        g = sign * (0.5 + torch.rand(spec.shape, generator=gen, dtype=torch.float64))
    else:
        g = torch.randn(spec.shape, generator=gen, dtype=torch.float64)
        if spec.kind == "zeros":
            g = g * (torch.rand(spec.shape, generator=gen, dtype=torch.float64) >= 0.25)
    return g * 10.0**exponent


def _make(spec: ParamSpec, values: torch.Tensor, device) -> torch.Tensor:
    """``values`` in spec's dtype and layout."""
    if spec.layout == "permuted":
        dims = list(reversed(range(values.dim())))
        return values.permute(dims).contiguous().to(device, spec.dtype).permute(dims)
    if spec.layout == "strided":
        base = torch.zeros(*spec.shape[:-1], 2 * spec.shape[-1], dtype=spec.dtype, device=device)
        return base[..., ::2].copy_(values)
    return values.to(device, spec.dtype)


def _through_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


def _snap(opt, params) -> list[dict]:
    """float64 CPU copies of each param and its state (zeros before its first step)."""
    out = []
    for p in params:
        zero = torch.zeros(p.shape, dtype=torch.float64)
        s = {"param": p.detach().cpu().double().clone(), "exp_avg": zero, "exp_avg_sq": zero,
             "max_exp_avg_sq": zero, "step": torch.zeros((), dtype=torch.float64)}  # fmt: skip
        s.update({k: v.detach().cpu().double().clone() for k, v in opt.state.get(p, {}).items()})
        out.append(s)
    return out


def _weighted(weights, micro, i, absolute=False) -> torch.Tensor:
    """sum_j w_j micro[j][i] (or of |micro[j][i]|) in float64."""
    return sum(w * (mb[i].cpu().double().abs() if absolute else mb[i].cpu().double())
               for w, mb in zip(weights, micro))  # fmt: skip


# -- the checks --------------------------------------------------------------------------------
def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same values, NaN where NaN (torch.equal calls NaN unequal to itself)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def _assert_within(name: str, fast, torch_, bound) -> None:
    diff = (fast - torch_).abs()
    bad = ~(diff <= bound * SECOND_ORDER)  # NaN fails too
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name}: |fast - torch| exceeds its derived bound at {int(bad.sum())} elements; "
            f"first at flat index {i}: fast {fast.flatten()[i].item()!r}, torch "
            f"{torch_.flatten()[i].item()!r}, bound {bound.flatten()[i].item()!r}"
        )


def _check_fp32(name, hp, lr, n, pt, pf, nt, nf, g, gb) -> None:
    """fp32 outputs of one AdamW step: pt/pf the inputs (torch's, fastopt's), nt/nf the outputs,
    g torch's gradient (sign of maximize applied), gb a bound on |fastopt's gradient - g|."""
    beta1, beta2 = hp.betas
    w = _f32(1.0 - beta1)  # lerp's weight: both pass 1 - beta1 to an fp32 lerp
    keep = 1.0 - w  # exact in float64
    b2, c2, eps = _f32(beta2), _f32(1.0 - beta2), _f32(hp.eps)
    bc1, bc2 = 1.0 - beta1**n, 1.0 - beta2**n
    s, r, d, lw = lr / bc1, 1.0 / math.sqrt(bc2), 1.0 - lr * hp.weight_decay, lr * hp.weight_decay

    # exp_avg = lerp(m, g, w), exactly keep*m + w*g. torch's lerp takes m + w(g - m) for w < 0.5
    # and g - (1 - w)(g - m) otherwise (1 - w exact), each 3 roundings: 2U min(w, 1-w)|g - m| +
    # U|result| (an FMA rounds less). A lerp always from m (the fixed bug) errs by U w |g - m|,
    # which exceeds this when beta1 is small and |g| << |m|.
    gm = (g - pt["exp_avg"]).abs() + (g - pf["exp_avg"]).abs() + gb
    bound = (keep * (pf["exp_avg"] - pt["exp_avg"]).abs() + w * gb + 2 * U * min(w, keep) * gm
             + U * (nt["exp_avg"].abs() + nf["exp_avg"].abs()) + 6 * TINY)  # fmt: skip
    _assert_within(f"{name} exp_avg", nf["exp_avg"], nt["exp_avg"], bound)

    # exp_avg_sq = b2 v + c2 g^2: positive terms, 4 roundings (v b2, g g, c2 (g g), +) of at most
    # U times the result each, first-order 3U |result| (U b2 v + 2U c2 g^2 + U v').
    bound = (b2 * (pf["exp_avg_sq"] - pt["exp_avg_sq"]).abs() + c2 * gb * (2 * g.abs() + gb)
             + 3 * U * (nt["exp_avg_sq"] + nf["exp_avg_sq"]) + 8 * TINY)  # fmt: skip
    _assert_within(f"{name} exp_avg_sq", nf["exp_avg_sq"], nt["exp_avg_sq"], bound)

    if hp.amsgrad:  # a maximum rounds nothing: exact, from fastopt's own inputs
        want = torch.maximum(pf["max_exp_avg_sq"], nf["exp_avg_sq"])
        assert torch.equal(nf["max_exp_avg_sq"], want), f"{name} max_exp_avg_sq is not the max"
    second = "max_exp_avg_sq" if hp.amsgrad else "exp_avg_sq"

    # param = d p - s m'/(sqrt(v') r + eps), F in float64 from each side's own inputs. Decay:
    # fp32(d) errs by U|d| (torch's tensor-lr 1 - lr*wd in fp32: + 2U lr wd), then p*d: U|p d|.
    # The update q: s to fp32 1U (tensor lr: bc1 to fp32, a division: 3U); denominator sqrt,
    # 1/sqrt(bc2) to fp32 (or a division by it, with the scalar's conversion), * or /, + eps:
    # 5U; m/denom and * s: 2U; so 8U (10U); then p - q: U|p'|. The float64 bias corrections
    # 1 - beta^n (pow, or exp2(n log2 beta)) err by 4 E64 beta^n / (1 - beta^n) relative.
    def exact(prev, new):
        q = s * new["exp_avg"] / (new[second].sqrt() * r + eps)
        return d * prev["param"] - q, q.abs()

    (p_t, q_t), (p_f, q_f) = exact(pt, nt), exact(pf, nf)
    decay = U * (2 * abs(d) + 2 * lw) if hp.weight_decay else 0.0  # torch skips the mul at 0
    kq = (10 if hp.tensor_lr else 8) * U + 4 * E64 * (beta1**n / bc1 + beta2**n / bc2)
    bound = ((p_f - p_t).abs() + decay * (pt["param"].abs() + pf["param"].abs()) + kq * (q_t + q_f)
             + U * (nt["param"].abs() + nf["param"].abs()) + 8 * TINY)  # fmt: skip
    _assert_within(f"{name} param", nf["param"], nt["param"], bound)


def _ulp(a: float, dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps if a < fi.tiny else 2.0 ** math.floor(math.log2(a)) * fi.eps


def _exact_step(hp, lr, n, prev, g) -> dict:
    """AdamW's step in float64 from ``prev`` (a _snap entry) with the exact gradient ``g``."""
    (beta1, beta2), wd = hp.betas, hp.weight_decay
    m = beta1 * prev["exp_avg"] + (1 - beta1) * g
    v = beta2 * prev["exp_avg_sq"] + (1 - beta2) * g * g
    vmax = torch.maximum(prev["max_exp_avg_sq"], v)
    denom = (vmax if hp.amsgrad else v).sqrt() / math.sqrt(1 - beta2**n) + hp.eps
    p = (1 - lr * wd) * prev["param"] - lr / (1 - beta1**n) * m / denom
    return {"param": p, "exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": vmax}


def _check_low(name: str, fast, torch_, exact_f, exact_t, dtype) -> None:
    """bf16/fp16: fastopt's error against the exact result from its inputs at most twice
    torch's own against the exact result from torch's, plus one ulp."""
    assert torch.isfinite(torch_).all() and torch.isfinite(exact_t).all(), (
        f"{name}: torch's own run left the finite range; the draws must keep it inside"
    )
    err, err_torch = float((fast - exact_f).norm()), float((torch_ - exact_t).norm())
    flip = _ulp(float(exact_f.abs().max()), dtype) if exact_f.numel() else 0.0
    assert err <= 2 * err_torch + flip, (
        f"{name}: error {err:.3g} against float64, torch's {err_torch:.3g} (one ulp {flip:.3g})"
    )


# -- the lockstep harness ------------------------------------------------------------------------
class Lockstep:
    """torch.optim.AdamW(foreach=False) (t) and fastopt.AdamW (f) stepped together on the same
    data; every step checked."""

    def __init__(self, cfg: Config, backend: str, device: str):
        self.cfg, self.backend, self.device, self.k = cfg, backend, device, 0
        self.skipped = set()  # params that had a gradient on a skipped step
        self.specs = cfg.specs
        self.hyper = [g for g in cfg.groups for _ in g.params]
        init = [_make(s, s.scale * torch.randn(s.shape, generator=_gen(cfg.seed, -1, i),
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
        params = [torch.nn.Parameter(_make(s, v.detach().double().cpu(), self.device))
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
            opt.load_state_dict(_through_bytes(state_from.state_dict()))
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
            snaps = zip(_snap(loaded.opt, loaded.params), _snap(source.opt, source.params))
            for snap_l, snap_s in snaps:
                for key in snap_s:
                    assert _same(snap_l[key], snap_s[key]), f"{key} changed in the round trip"
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
        micro = [[_grad(s, st_.exponent, _gen(cfg.seed, k, i), _gen(cfg.seed, k, i, j))
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
        fast_micro = [[None if g is None else _make(s, g * scale, dev)
                       for g, s in zip(mb, self.specs)] for mb in micro]  # fmt: skip
        total = cfg.normalizer or sum(st_.weights)
        mean = [None if micro[0][i] is None else _weighted(st_.weights, fast_micro, i) / total
                for i in range(len(self.specs))]  # fmt: skip
        stored = [None if g is None else _make(s, g, dev) for g, s in zip(mean, self.specs)]
        prev_t, prev_f = _snap(self.t.opt, self.t.params), _snap(self.f.opt, self.f.params)

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
        new_t, new_f = _snap(self.t.opt, self.t.params), _snap(self.f.opt, self.f.params)
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
            bufs[i] = _weighted(st_.weights, fast_micro, i) if acc else stored[i].cpu().double()
            absums[i] = _weighted(st_.weights, fast_micro, i, True) if acc else 0.0
        k_t, k_f = 1.0 / scale, factor / scale
        if clip and not skip and have:
            c, norm_f = _f32(cfg.max_grad_norm), float(self.f.opt.last_grad_norm)
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
            # initialised (step 0, zero moments: what _snap compares), as torch's fused AdamW
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
                for key in prev_f[i]:
                    assert _same(new_f[i][key], prev_f[i][key]), f"{name}: {key} changed"
                    assert _same(new_t[i][key], prev_t[i][key]), f"{name}: torch's {key}"
                continue
            hp = self.hyper[i]
            if spec.dtype != FP32:
                n, lr, g = float(new_t[i]["step"]), _lr32(hp), exact_g[i]
                x_f, x_t = (_exact_step(hp, lr, n, prev[i], g) for prev in (prev_f, prev_t))
                for key in x_f if hp.amsgrad else ("param", "exp_avg", "exp_avg_sq"):
                    _check_low(f"{name} {key}", new_f[i][key], new_t[i][key], x_f[key], x_t[key],
                               spec.dtype)  # fmt: skip
                continue
            T, B = stored[i].cpu().double(), bufs[i]
            gb = ((B * k_f - T * k_t).abs() + n_acc * U * absums[i] * k_f
                  + U * (n_f * B.abs() * k_f + n_t * T.abs() * k_t)
                  + (n_t + n_f + n_acc) * TINY)  # fmt: skip
            _check_fp32(name, hp, _lr32(hp), float(new_t[i]["step"]), prev_t[i], prev_f[i],
                        new_t[i], new_f[i], g_t[i], gb)  # fmt: skip


# -- the properties ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", FULL)
@settings(max_examples=_examples(1.0))
@given(cfg=configs())
@example(cfg=LERP_REPRO)
def test_adamw_lockstep(backend, device, cfg):
    Lockstep(cfg, backend, device).run()


@INTERPRETER_WARNS
@pytest.mark.parametrize("backend,device", TRITON)
@settings(max_examples=_examples(0.2))
@given(cfg=configs(SMALL, max_steps=3, max_groups=2, max_params=2))
@example(cfg=LERP_REPRO)
def test_adamw_lockstep_triton(backend, device, cfg):
    Lockstep(cfg, backend, device).run()


@pytest.mark.parametrize("backend,device", FULL)
@settings(max_examples=_examples(1.0))
@given(cfg=configs(pipeline=True))
def test_fused_pipeline_lockstep(backend, device, cfg):
    """max_grad_norm, LossScaler (or GradScaler) and GradAccumulator against torch's
    GradScaler + unscale_ + clip_grad_norm_ + AdamW on the one big batch."""
    Lockstep(cfg, backend, device).run()


@INTERPRETER_WARNS
@pytest.mark.parametrize("backend,device", TRITON)
@settings(max_examples=_examples(0.2))
@given(cfg=configs(SMALL, max_steps=3, max_groups=2, max_params=2, pipeline=True))
def test_fused_pipeline_lockstep_triton(backend, device, cfg):
    Lockstep(cfg, backend, device).run()


@pytest.mark.parametrize("backend,device", FULL)
@settings(max_examples=_examples(0.5))
@given(cfg=configs(max_steps=6), split=st.integers(1, 5))
def test_state_dict_round_trips_both_ways(backend, device, cfg, split):
    """A checkpoint of either implementation loads into the other and both continue in
    lockstep with their source's partner."""
    run = Lockstep(cfg, backend, device)
    split = min(split, len(cfg.steps))
    run.run(split)
    for crossed in run.crossed():
        crossed.run(len(cfg.steps) - split)


NORM_TYPES = st.one_of(st.sampled_from([2.0, 1.0, INF, -INF, 0.0, 3.0, 0.5]), st.floats(0.25, 8.0))


@st.composite
def clip_cases(draw):
    norm_type = draw(NORM_TYPES)
    # torch's inf-norms of an empty tensor raise (and fastopt's is a known difference, being
    # fixed): no empty gradients there. torch's fp16 norms are fp16: p < 1 overflows them.
    shapes = [s for s in SHAPES if not (math.isinf(norm_type) and 0 in s)]
    fp16 = norm_type >= 1 or norm_type == 0 or math.isinf(norm_type)
    specs = draw(st.lists(param_specs(shapes, [FP32, FP32, BF16] + [FP16] * fp16, False),
                          min_size=1, max_size=4))  # fmt: skip
    seed = draw(st.integers(0, 2**31))
    # torch's p-norms sum |x|^p in fp32: for p > 2, exponents e with the largest |x| <= 5 10^e
    # (randn's tail) keep 1028 |x|^p below fp32's max, and |x| >= 0.5 10^e keeps |x|^p above
    # 2^24 times fp32's smallest normal, at full precision.
    lo, hi = -6, 6
    if norm_type > 2 and math.isfinite(norm_type):
        lo, hi = (
            max(lo, math.ceil(0.3 - 30.7 / norm_type)),
            min(hi, math.floor(35.5 / norm_type - 0.7)),
        )
    # One magnitude per tensor (fp16's clamped by _grad); some params without a gradient.
    grads = [_grad(s, draw(st.integers(lo, hi)), _gen(seed, i), _gen(seed, i, 0))
             if draw(st.sampled_from([True, True, True, False])) else None
             for i, s in enumerate(specs)]  # fmt: skip
    bad = draw(st.one_of(st.none(), st.tuples(st.integers(0, len(specs) - 1),
                                              st.sampled_from([INF, -INF, NAN]))))  # fmt: skip
    if bad is not None and grads[bad[0]] is not None and grads[bad[0]].numel():
        grads[bad[0]].view(-1)[-1] = bad[1]
    else:
        bad = None
    return SimpleNamespace(specs=specs, grads=grads, norm_type=norm_type, bad=bad,
                           max_norm=10.0 ** draw(st.integers(-3, 3)),
                           error_if_nonfinite=draw(st.booleans()),
                           foreach=draw(st.sampled_from([None, False])))  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=_examples(1.0))
@given(case=clip_cases())
def test_clip_grad_norm_matches_torch(device, case):
    """fastopt.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_: the norm within twice
    torch's error against float64 (exact for 0 and +-inf), the clipped gradients within the
    rounding of the clip coefficient's product (fp32) or twice torch's error (bf16/fp16)."""
    p_type, c, specs, grads = case.norm_type, case.max_norm, case.specs, case.grads
    sides, norms = [], []
    kwargs = dict(error_if_nonfinite=case.error_if_nonfinite, foreach=case.foreach)
    for fn in (torch.nn.utils.clip_grad_norm_, fastopt.clip_grad_norm_):
        ps = [torch.nn.Parameter(_make(s, torch.zeros(s.shape), device)) for s in specs]
        for p, g, s in zip(ps, grads, specs):
            p.grad = None if g is None else _make(s, g, device)
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
        unchanged = (g is None or _same(a, g) and _same(b, g)
                     for a, b, g in zip(clipped_t, clipped_f, stored))  # fmt: skip
        assert all(unchanged), "a gradient changed"
        return
    present = [g for g in stored if g is not None]
    norms = [torch.linalg.vector_norm(g, p_type) for g in present]  # torch's definition
    exact = float(torch.linalg.vector_norm(torch.stack(norms), p_type)) if present else 0.0
    if not math.isfinite(exact):  # both divide by the same inf or NaN norm: the same bits
        assert _same(torch.tensor(norm_f), torch.tensor(norm_t)), (norm_f, norm_t)
        assert all(g is None or _same(a, b) for a, b, g in zip(clipped_t, clipped_f, stored))
        return
    assert case.bad is not None or math.isfinite(norm_t), "torch's norm overflowed: no test"
    if p_type == 0 or math.isinf(p_type):  # a count, a max or a min: no rounding at all
        assert norm_f == exact, (norm_f, exact)
    else:  # the root amplifies the sum's rounding by 1/p; 4 eps (8 U) as the norm test's floor
        allow = 2 * abs(norm_t - exact) + 8 * U * max(1.0, 1.0 / p_type) * exact
        assert abs(norm_f - exact) <= allow * SECOND_ORDER, (norm_f, norm_t, exact)
    k_t, k_f = (min(1.0, _f32(c) / (n + CLIP_EPS32)) for n in (norm_t, norm_f))
    k_x = min(1.0, c / (exact + 1e-6))
    torch_fp32 = any(s.dtype == FP32 for s, g in zip(specs, grads) if g is not None)
    for i, (g, spec, fast, ref) in enumerate(zip(stored, specs, clipped_f, clipped_t)):
        if g is None:
            continue
        ok = torch.isfinite(g)  # an inf or NaN times the coefficient: the same bits
        assert _same(fast[~ok], ref[~ok])
        name = f"grad {i} {tuple(spec.shape)} {spec.dtype}"
        if spec.dtype == FP32 and torch_fp32:
            # each side: fl32(max / fl32(norm + 1e-6)) 2U, the product U; k_f vs k_t exact.
            bound = g.abs() * (abs(k_f - k_t) + 3 * U * (k_f + k_t)) + 2 * TINY
            _assert_within(name, fast[ok], ref[ok], bound[ok])
        else:
            _check_low(name, fast[ok], ref[ok], (g * k_x)[ok], (g * k_x)[ok], spec.dtype)
