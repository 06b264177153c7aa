"""The property suite's configurations (hypothesis strategies), data and derived tolerances:
fastopt against torch.optim.AdamW(foreach=False) (tests/test_properties.py steps the two).

Tolerances, written beside each check:
* fp32 (`check_fp32`): a first-order rounding-error bound per element, derived operation by
  operation. Each step's outputs are bounded from both implementations' observed inputs,
  |fast - torch| <= |F(fast's inputs) - F(torch's inputs)| + rounding(fast) + rounding(torch)
  with F the exact step in float64, so the bound never accumulates slack over steps.
* bf16/fp16 (`check_low`): per tensor and step, fastopt's L2 error against the exact (float64)
  step from its own state is at most twice torch's own error against the exact step from
  torch's state, plus one ulp of the storage type at the largest element (a single rounding
  flip). Per step, not over the run: a run's error in a small tensor is mostly its state's
  earlier roundings, which both implementations share, and a cancellation can make torch's
  extra roundings lucky (a nightly run found a 1-element bf16 exp_avg 2.3 ulps off over two
  steps, torch's 0.3 ulps, its bf16-rounded clipped gradient having cancelled the shared error).
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from hypothesis import settings
from hypothesis import strategies as st

__all__ = [
    "BETA",
    "BF16",
    "CLIP_EPS32",
    "Config",
    "E64",
    "FP16",
    "FP32",
    "Group",
    "INF",
    "LERP_REPRO",
    "NAN",
    "NORM_TYPES",
    "ParamSpec",
    "SECOND_ORDER",
    "SHAPES",
    "SMALL",
    "Step",
    "TINY",
    "U",
    "assert_within",
    "check_fp32",
    "check_low",
    "clip_cases",
    "configs",
    "exact_step",
    "examples",
    "f32",
    "generator",
    "gradient",
    "groups",
    "lr32",
    "make_tensor",
    "param_specs",
    "same_values",
    "snap64",
    "through_bytes",
    "ulp",
    "weighted",
]

U = 2.0**-24  # fp32 unit roundoff: fl(x op y) = (x op y)(1 + d) with |d| <= U
E64 = 2.0**-53  # float64's
TINY = 2.0**-149  # fp32's smallest subnormal: the absolute error of a rounding near zero
# Every bound is first order in U; the neglected terms are at most (K U)^2 relative for the
# K <= 20 roundings of a step, below 2^-16 of the first-order bound.
SECOND_ORDER = 1 + 2.0**-16
CLIP_EPS32 = struct.unpack("f", struct.pack("f", 1e-6))[0]  # clip_grad_norm_'s 1e-6 in fp32
FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
INF, NAN = math.inf, math.nan


# Shapes: 0-dim, empty, primes, multi-dimensional. The interpreter gets the small ones.
SHAPES = [(), (0,), (1,), (2,), (5,), (7,), (13,), (31,), (97,), (257,), (0, 3), (4, 6), (3, 7, 2)]
SMALL = [(), (0,), (1,), (3,), (7,), (13,), (0, 3), (3, 5)]


def examples(fraction: float) -> int:
    """A fraction of the active profile's example count (tests/conftest.py)."""
    return max(1, round(settings().max_examples * fraction))


def f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def lr32(group) -> float:
    """The lr both implementations compute with: a tensor lr is fp32."""
    return f32(group.lr) if group.tensor_lr else group.lr


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
def generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(hash(keys) % 2**62)


def gradient(spec: ParamSpec, exponent: int, gen_sign, gen) -> torch.Tensor:
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


def make_tensor(spec: ParamSpec, values: torch.Tensor, device) -> torch.Tensor:
    """``values`` in spec's dtype and layout."""
    if spec.layout == "permuted":
        dims = list(reversed(range(values.dim())))
        return values.permute(dims).contiguous().to(device, spec.dtype).permute(dims)
    if spec.layout == "strided":
        base = torch.zeros(*spec.shape[:-1], 2 * spec.shape[-1], dtype=spec.dtype, device=device)
        return base[..., ::2].copy_(values)
    return values.to(device, spec.dtype)


def through_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


def snap64(opt, params) -> list[dict]:
    """float64 CPU copies of each param and its state (zeros before its first step)."""
    out = []
    for p in params:
        zero = torch.zeros(p.shape, dtype=torch.float64)
        s = {"param": p.detach().cpu().double().clone(), "exp_avg": zero, "exp_avg_sq": zero,
             "max_exp_avg_sq": zero, "step": torch.zeros((), dtype=torch.float64)}  # fmt: skip
        s.update({k: v.detach().cpu().double().clone() for k, v in opt.state.get(p, {}).items()})
        out.append(s)
    return out


def weighted(weights, micro, i, absolute=False) -> torch.Tensor:
    """sum_j w_j micro[j][i] (or of |micro[j][i]|) in float64."""
    return sum(w * (mb[i].cpu().double().abs() if absolute else mb[i].cpu().double())
               for w, mb in zip(weights, micro))  # fmt: skip


# -- the checks --------------------------------------------------------------------------------
def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same values, NaN where NaN (torch.equal calls NaN unequal to itself): gradients and
    norms of the two implementations. States are compared by lockstep.assert_same_state."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def assert_within(name: str, fast, torch_, bound) -> None:
    diff = (fast - torch_).abs()
    bad = ~(diff <= bound * SECOND_ORDER)  # NaN fails too
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{name}: |fast - torch| exceeds its derived bound at {int(bad.sum())} elements; "
            f"first at flat index {i}: fast {fast.flatten()[i].item()!r}, torch "
            f"{torch_.flatten()[i].item()!r}, bound {bound.flatten()[i].item()!r}"
        )


def check_fp32(name, hp, lr, n, pt, pf, nt, nf, g, gb) -> None:
    """fp32 outputs of one AdamW step: pt/pf the inputs (torch's, fastopt's), nt/nf the outputs,
    g torch's gradient (sign of maximize applied), gb a bound on |fastopt's gradient - g|."""
    beta1, beta2 = hp.betas
    w = f32(1.0 - beta1)  # lerp's weight: both pass 1 - beta1 to an fp32 lerp
    keep = 1.0 - w  # exact in float64
    b2, c2, eps = f32(beta2), f32(1.0 - beta2), f32(hp.eps)
    bc1, bc2 = 1.0 - beta1**n, 1.0 - beta2**n
    s, r, d, lw = lr / bc1, 1.0 / math.sqrt(bc2), 1.0 - lr * hp.weight_decay, lr * hp.weight_decay

    # exp_avg = lerp(m, g, w), exactly keep*m + w*g. torch's lerp takes m + w(g - m) for w < 0.5
    # and g - (1 - w)(g - m) otherwise (1 - w exact), each 3 roundings: 2U min(w, 1-w)|g - m| +
    # U|result| (an FMA rounds less). A lerp always from m (the fixed bug) errs by U w |g - m|,
    # which exceeds this when beta1 is small and |g| << |m|.
    gm = (g - pt["exp_avg"]).abs() + (g - pf["exp_avg"]).abs() + gb
    bound = (keep * (pf["exp_avg"] - pt["exp_avg"]).abs() + w * gb + 2 * U * min(w, keep) * gm
             + U * (nt["exp_avg"].abs() + nf["exp_avg"].abs()) + 6 * TINY)  # fmt: skip
    assert_within(f"{name} exp_avg", nf["exp_avg"], nt["exp_avg"], bound)

    # exp_avg_sq = b2 v + c2 g^2: positive terms, 4 roundings (v b2, g g, c2 (g g), +) of at most
    # U times the result each, first-order 3U |result| (U b2 v + 2U c2 g^2 + U v').
    bound = (b2 * (pf["exp_avg_sq"] - pt["exp_avg_sq"]).abs() + c2 * gb * (2 * g.abs() + gb)
             + 3 * U * (nt["exp_avg_sq"] + nf["exp_avg_sq"]) + 8 * TINY)  # fmt: skip
    assert_within(f"{name} exp_avg_sq", nf["exp_avg_sq"], nt["exp_avg_sq"], bound)

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
    assert_within(f"{name} param", nf["param"], nt["param"], bound)


def ulp(a: float, dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps if a < fi.tiny else 2.0 ** math.floor(math.log2(a)) * fi.eps


def exact_step(hp, lr, n, prev, g) -> dict:
    """AdamW's step in float64 from ``prev`` (a snap64 entry) with the exact gradient ``g``."""
    (beta1, beta2), wd = hp.betas, hp.weight_decay
    m = beta1 * prev["exp_avg"] + (1 - beta1) * g
    v = beta2 * prev["exp_avg_sq"] + (1 - beta2) * g * g
    vmax = torch.maximum(prev["max_exp_avg_sq"], v)
    denom = (vmax if hp.amsgrad else v).sqrt() / math.sqrt(1 - beta2**n) + hp.eps
    p = (1 - lr * wd) * prev["param"] - lr / (1 - beta1**n) * m / denom
    return {"param": p, "exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": vmax}


def check_low(name: str, fast, torch_, exact_f, exact_t, dtype) -> None:
    """bf16/fp16: fastopt's error against the exact result from its inputs at most twice
    torch's own against the exact result from torch's, plus one ulp."""
    assert torch.isfinite(torch_).all() and torch.isfinite(exact_t).all(), (
        f"{name}: torch's own run left the finite range; the draws must keep it inside"
    )
    err, err_torch = float((fast - exact_f).norm()), float((torch_ - exact_t).norm())
    flip = ulp(float(exact_f.abs().max()), dtype) if exact_f.numel() else 0.0
    assert err <= 2 * err_torch + flip, (
        f"{name}: error {err:.3g} against float64, torch's {err_torch:.3g} (one ulp {flip:.3g})"
    )


# -- clip_grad_norm_ cases ----------------------------------------------------------------------
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
    # One magnitude per tensor (fp16's clamped by gradient); some params without a gradient.
    grads = [gradient(s, draw(st.integers(lo, hi)), generator(seed, i), generator(seed, i, 0))
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
