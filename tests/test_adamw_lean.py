"""fastopt.AdamW's memory-lean precision: exact fp32 masters of bf16/fp16 params, moments in
another dtype, and stochastic rounding, against torch.optim.AdamW on fp32 copies; the same bits
on every backend and after a resume; state sizes, state dicts and argument checks. The kernels'
lockstep with the reference is in tests/test_lockstep_*.py.

The tolerances: a master tracks torch's fp32 param as fastopt's fp32 step always has (the
kernels' arithmetic differs from torch's by an ulp here and there: a reciprocal multiply where
torch divides, IEEE square roots where torch's CPU sqrt is 1 ulp off, no fused lerp), so the
bounds are test_fused_step's. The bf16 param is the master rounded to nearest, bit for bit, so
it equals torch's fp32 param rounded to nearest wherever that value is farther from a rounding
midpoint than the two fp32 values are from each other.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from helpers import BACKENDS, HAS_CUDA
from lockstep import assert_same_state, bits_differ, optimizer_snapshot

import fastopt
from fastopt.rounding import join_master

RTOL, ATOL = 1e-5, 1e-6
# Every backend takes the lean settings; on CPU tensors reference, cpu and Triton (interpreted).
LEAN = BACKENDS
CPU_BACKENDS = ("reference", "cpu", "triton")
SHAPES = [(17, 9), (), (129,), (3, 5, 7)]


def _params(dtype, seed=0, scale=1.0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter((torch.randn(s, generator=gen) * scale).to(device=device, dtype=dtype))
        for s in SHAPES
    ]


def _grads(step, magnitude=None, device="cpu"):
    """Gradients whose norm moves around 1.0; without a magnitude given, with inf and NaN at
    steps 5 and 9."""
    return [g.to(device) for g in _cpu_grads(step, magnitude)]


def _cpu_grads(step, magnitude):
    gen = torch.Generator().manual_seed(1000 + step)
    bad = magnitude is None
    magnitude = magnitude or [0.02, 3.0, 0.3, 40.0][step % 4]
    grads = [torch.randn(s, generator=gen) * magnitude for s in SHAPES]
    if not bad:
        return grads
    if step == 5:
        grads[0].view(-1)[-1] = math.inf
    if step == 9:
        grads[2].view(-1)[0] = math.nan
    return grads


def _bits16(t):
    return t.detach().contiguous().view(torch.int16)


def assert_rounds_torch(param, torch_fp32):
    """param (bf16 or fp16) is torch's fp32 value rounded to nearest, bit for bit, except where
    that value lies within the fp32 tolerance of a rounding midpoint."""
    param, torch_fp32 = param.detach().cpu(), torch_fp32.detach().cpu()
    nearest = torch_fp32.detach().to(param.dtype)
    differ = _bits16(param) != _bits16(nearest)
    if not differ.any():
        return
    x = torch_fp32.detach()[differ]
    lo = nearest[differ].float()
    # The other neighbour of x in param's dtype, and the midpoint between the two.
    other = torch.nextafter(lo.to(param.dtype), torch.where(x > lo, math.inf, -math.inf).to(
        param.dtype)).float()  # fmt: skip
    midpoint = (lo + other) / 2
    near = (x - midpoint).abs() <= RTOL * x.abs() + ATOL
    assert near.all(), (x[~near][:5], param.detach()[differ][~near][:5])


@pytest.mark.parametrize("backend,device", LEAN)
@pytest.mark.parametrize("pipeline", ["plain", "clip", "scaler", "accumulate"])
def test_bf16_master_weights_track_torch_fp32(backend, device, pipeline):
    """bf16 params with master_weights, fed the gradients torch's fp32 copies get: each step
    the bf16 param is torch's fp32 param rounded to nearest and master_param() is torch's fp32
    param, with clipping, loss scaling (inf/NaN skipped) and accumulation."""
    ps_o = _params(torch.bfloat16, device=device)
    ps_t = [torch.nn.Parameter(p.detach().float()) for p in ps_o]
    clip = 1.0 if pipeline in ("clip", "scaler") else None
    opt_o = fastopt.AdamW(ps_o, lr=1e-3, backend=backend, max_grad_norm=clip,
                          master_weights=True, state_dtype=torch.float32)  # fmt: skip
    opt_t = torch.optim.AdamW(ps_t, lr=1e-3, foreach=False)
    scaler_o = fastopt.LossScaler(init_scale=2.0**10, growth_interval=3, backend=backend)
    scaler_t = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=3)
    acc = fastopt.GradAccumulator(opt_o, backend=backend) if pipeline == "accumulate" else None
    one = torch.ones((), device=device)
    moved = 0
    for step in range(24):
        grads = (
            _grads(step, device=device)
            if pipeline == "scaler"
            else _grads(step, magnitude=[0.5, 2.0][step % 2], device=device)
        )
        if pipeline == "scaler":
            s_o, s_t = scaler_o.scale(one), scaler_t.scale(one)
            for p_o, p_t, g in zip(ps_o, ps_t, grads):
                p_o.grad, p_t.grad = (
                    (g * s_o).to(torch.bfloat16),
                    (g * s_t).to(torch.bfloat16).float(),
                )
            scaler_t.unscale_(opt_t)
            torch.nn.utils.clip_grad_norm_(ps_t, clip)
            scaler_o.step(opt_o)
            scaler_o.update()
            scaler_t.step(opt_t)
            scaler_t.update()
        elif pipeline == "accumulate":  # two micro-batches, the mean of their gradients
            halves = [(g.to(torch.bfloat16), (g / 3).to(torch.bfloat16)) for g in grads]
            for k in range(2):
                for p_o, pair in zip(ps_o, halves):
                    p_o.grad = pair[k]
                acc.accumulate()
            for p_t, (a, b) in zip(ps_t, halves):
                p_t.grad = (a.float() + b.float()) * 0.5
            opt_o.step()
            opt_t.step()
        else:
            for p_o, p_t, g in zip(ps_o, ps_t, grads):
                p_o.grad = g.to(torch.bfloat16)
                p_t.grad = p_o.grad.float()
            if clip:
                torch.nn.utils.clip_grad_norm_(ps_t, clip)
            opt_o.step()
            opt_t.step()
        for p_o, p_t in zip(ps_o, ps_t):
            master = opt_o.master_param(p_o)
            # The param is its master rounded to nearest, exactly.
            assert torch.equal(_bits16(p_o), _bits16(master.to(torch.bfloat16)))
            torch.testing.assert_close(master, p_t.detach(), rtol=RTOL, atol=ATOL)
            assert_rounds_torch(p_o, p_t)
            moved += int((opt_o.state[p_o]["master_remainder"] != 0).sum())
    assert moved > 0  # the remainders carried updates below half a bf16 ulp


@pytest.mark.parametrize("backend,device", LEAN)
def test_fp16_master_weights_are_a_full_fp32_copy(backend, device):
    ps_o = _params(torch.float16, device=device)
    ps_t = [torch.nn.Parameter(p.detach().float()) for p in ps_o]
    opt_o = fastopt.AdamW(ps_o, lr=1e-3, backend=backend, master_weights=True,
                          state_dtype=torch.bfloat16, amsgrad=True)  # fmt: skip
    opt_t = torch.optim.AdamW(ps_t, lr=1e-3, foreach=False, amsgrad=True)
    for step in range(12):
        for p_o, p_t, g in zip(ps_o, ps_t, _grads(step, magnitude=1.0, device=device)):
            p_o.grad = g.to(torch.float16)
            p_t.grad = p_o.grad.float()
        opt_o.step()
        opt_t.step()
    for p_o, p_t in zip(ps_o, ps_t):
        state = opt_o.state[p_o]
        assert state["master"].dtype == torch.float32 and state["exp_avg"].dtype == torch.bfloat16
        assert torch.equal(_bits16(p_o), _bits16(state["master"].to(torch.float16)))
        # bf16 moments: the master follows torch's fp32 trajectory to bf16's precision.
        torch.testing.assert_close(opt_o.master_param(p_o), p_t.detach(), rtol=2e-2, atol=1e-4)


def _ulp_steps(backend, device, stochastic, steps, n=100_000, seed=3):
    """bf16 params at 1.0 stepped `steps` times by a tenth of their ulp (2**-7 just above 1.0):
    the mean displacement in ulps, and the params."""
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16, device=device))
    lr = 0.1 * 2.0**-7  # Adam's first steps move by lr: m_hat / sqrt(v_hat) is 1 for g constant
    opt = fastopt.AdamW([p], lr=lr, weight_decay=0.0, eps=1e-12, backend=backend, seed=seed,
                        stochastic_rounding=stochastic, state_dtype=torch.float32)  # fmt: skip
    for _ in range(steps):
        p.grad = torch.full_like(p, -1.0)  # descending -1: the param grows
        opt.step()
    return float(((p.detach().float() - 1.0) / 2.0**-7).mean()), p


@pytest.mark.parametrize("backend,device", LEAN)
@pytest.mark.parametrize("steps", [1, 10])
def test_stochastic_rounding_is_unbiased_where_nearest_stalls(backend, device, steps):
    """Each step moves every param by 0.1 ulp in fp32. Rounded stochastically each element ends
    up k ulps above 1.0 with k ~ Binomial-like of mean 0.1 * steps: over 10**5 elements the mean
    is within 5 standard deviations (sqrt(0.1 * 0.9 * steps / n), an upper bound: the steps'
    roundings are independent) of the fp32 displacement. Rounded to nearest (torch's bf16
    AdamW) nothing moves at all."""
    expected = 0.1 * steps
    mean, p = _ulp_steps(backend, device, True, steps)
    sigma = math.sqrt(0.1 * 0.9 * steps / p.numel())
    assert abs(mean - expected) < 5 * sigma, (mean, expected, sigma)
    nearest, _ = _ulp_steps(backend, device, False, steps)
    assert nearest == 0.0
    t = torch.nn.Parameter(torch.ones(1000, dtype=torch.bfloat16))
    opt_t = torch.optim.AdamW([t], lr=0.1 * 2.0**-7, weight_decay=0.0, eps=0.0)
    for _ in range(steps):
        t.grad = torch.full_like(t, -1.0)
        opt_t.step()
    assert torch.equal(t.detach(), torch.ones_like(t))  # torch's bf16 AdamW stalls too


def _train(backend, seed, steps, state=None, model_seed=0, device="cpu"):
    ps = _params(torch.bfloat16, seed=model_seed, device=device)
    opt = fastopt.AdamW(ps, lr=1e-3, backend=backend, stochastic_rounding=True,
                        state_dtype=torch.bfloat16, seed=seed, amsgrad=True)  # fmt: skip
    start = 0
    if state is not None:
        for p, saved in zip(ps, state["params"]):
            p.data.copy_(saved)
        opt.load_state_dict(state["opt"])
        start = state["steps"]
    for step in range(start, start + steps):
        for p, g in zip(ps, _grads(step, magnitude=1.0, device=device)):
            p.grad = g.to(torch.bfloat16)
        opt.step()
    return ps, opt


def _bits_of(ps, opt):
    return [(name, t.detach().cpu().clone()) for name, t in optimizer_snapshot(opt, ps)]


def test_stochastic_rounding_is_the_same_on_every_backend_and_after_a_resume():
    pairs = [(b, "cpu") for b in CPU_BACKENDS if not (b == "triton" and HAS_CUDA)]
    if HAS_CUDA:  # on a machine with a CUDA GPU, its kernels too
        pairs += [("cuda", "cuda"), ("triton", "cuda")]
    runs = {pair: _bits_of(*_train(pair[0], seed=11, steps=6, device=pair[1])) for pair in pairs}
    first = runs[pairs[0]]
    for name, bits in runs.items():
        assert_same_state(bits, first, str(name))
    assert bits_differ(_bits_of(*_train("reference", seed=12, steps=6)), first)  # seed matters
    # Three steps, a checkpoint through bytes, three more in a new process's objects.
    ps, opt = _train(*pairs[-1][:1], seed=11, steps=3, device=pairs[-1][1])
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in ps], "opt": opt.state_dict(), "steps": 3}, buf)
    buf.seek(0)
    state = torch.load(buf)
    resumed = _train(pairs[-1][0], seed=999, steps=3, state=state, model_seed=5,
                     device=pairs[-1][1])  # fmt: skip
    assert resumed[1].param_groups[0]["seed"] == 11  # the saved seed, not the constructor's
    assert_same_state(_bits_of(*resumed), first, "resumed")


def test_state_nbytes_and_checkpoint_size():
    n = sum(math.prod(s) for s in SHAPES)
    plain = fastopt.AdamW(_params(torch.float32))
    lean_ps = _params(torch.bfloat16)
    lean = fastopt.AdamW(lean_ps, master_weights=True, state_dtype=torch.bfloat16)
    for opt in (plain, lean):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.ones_like(p)
        opt.step()
    steps = 4 * len(SHAPES)  # one fp32 step count per param
    assert plain.state_nbytes() == 8 * n + steps  # two fp32 moments
    assert lean.state_nbytes() == 6 * n + steps  # two bf16 moments and an int16 remainder
    # On disk, for a param big enough that the archive's per-tensor records do not dominate:
    # smaller by about the memory ratio, 6/8.
    sizes = []
    for dtype, kwargs in (
        (torch.float32, {}),
        (torch.bfloat16, dict(master_weights=True, state_dtype=torch.bfloat16)),
    ):
        big = torch.nn.Parameter(torch.randn(100_000).to(dtype))
        opt = fastopt.AdamW([big], **kwargs)
        big.grad = torch.ones_like(big)
        opt.step()
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        sizes.append(buf.tell())
    assert 0.74 < sizes[1] / sizes[0] < 0.77, sizes


def test_state_dicts_both_ways_with_torch():
    ps = _params(torch.bfloat16)
    lean = fastopt.AdamW(ps, master_weights=True, state_dtype=torch.float32, lr=1e-3)
    for step in range(3):
        for p, g in zip(ps, _grads(step, magnitude=1.0)):
            p.grad = g.to(torch.bfloat16)
        lean.step()
    saved = lean.state_dict()
    masters = [lean.master_param(p) for p in ps]

    # Into a lean optimizer: fp32 moments and int16 remainders as they were.
    again = fastopt.AdamW(ps, master_weights=True, state_dtype=torch.float32, lr=1e-3)
    again.load_state_dict(saved)
    for p, master in zip(ps, masters):
        state = again.state[p]
        assert state["exp_avg"].dtype == torch.float32
        assert state["master_remainder"].dtype == torch.int16
        assert torch.equal(again.master_param(p), master)

    # Into torch, which trains on in its own precision (the remainder is ignored)...
    theirs = torch.optim.AdamW(ps, lr=1e-3)
    theirs.load_state_dict(saved)
    for p, g in zip(ps, _grads(3, magnitude=1.0)):
        p.grad = g.to(torch.bfloat16)
    theirs.step()
    assert all(theirs.state[p]["exp_avg"].dtype == torch.bfloat16 for p in ps)
    # ...and back: moments converted to the state dtype, the master taken from the param (the
    # remainder torch cast to bf16, and stale, is not used).
    back = fastopt.AdamW(ps, master_weights=True, state_dtype=torch.float32, lr=1e-3)
    back.load_state_dict(theirs.state_dict())
    for p in ps:
        state = back.state[p]
        assert state["exp_avg"].dtype == torch.float32
        torch.testing.assert_close(state["exp_avg"], theirs.state[p]["exp_avg"].float())
        assert torch.equal(back.master_param(p), p.detach().float())
        assert not state["master_remainder"].any()
    for p, g in zip(ps, _grads(4, magnitude=1.0)):
        p.grad = g.to(torch.bfloat16)
    back.step()  # and steps on


def test_master_param_of_a_param_without_one_is_a_new_fp32_tensor():
    p = torch.nn.Parameter(torch.randn(4))
    opt = fastopt.AdamW([p], master_weights=True)  # fp32 params ignore it
    p.grad = torch.ones_like(p)
    opt.step()
    master = opt.master_param(p)
    assert master.dtype == torch.float32 and torch.equal(master, p.detach())
    assert master.data_ptr() != p.data_ptr()
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}


def test_defaults_leave_torch_behaviour_and_its_generator_alone():
    p = [torch.nn.Parameter(torch.zeros(3))]
    before = torch.random.get_rng_state()
    opt = fastopt.AdamW(p)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert opt.defaults == torch.optim.AdamW(p).defaults
    drawn = fastopt.AdamW(p, stochastic_rounding=True)  # a seed drawn from torch's generator
    assert not torch.equal(torch.random.get_rng_state(), before)
    assert isinstance(drawn.param_groups[0]["seed"], int)


def test_a_skipped_step_changes_no_param_master_or_moment():
    ps = _params(torch.bfloat16)
    opt = fastopt.AdamW(ps, master_weights=True, state_dtype=torch.bfloat16,
                        stochastic_rounding=True, seed=1, max_grad_norm=1.0)  # fmt: skip
    for p, g in zip(ps, _grads(0, magnitude=1.0)):
        p.grad = g.to(torch.bfloat16)
    opt.step()
    before = _bits_of(ps, opt)
    for p, g in zip(ps, _grads(5)):  # holds an inf
        p.grad = g.to(torch.bfloat16)
    opt.step()
    assert float(opt.last_found_inf) != 0
    assert_same_state(_bits_of(ps, opt), before, "skipped step")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(state_dtype=torch.float16), "Invalid state_dtype: torch.float16"),
        (dict(state_dtype="int4"), "Invalid state_dtype: 'int4'"),
        (dict(master_weights="yes"), "Invalid master_weights: 'yes'"),
        (dict(stochastic_rounding=1), "Invalid stochastic_rounding: 1"),
        (dict(seed=-1), "Invalid seed: -1"),
        (dict(seed=1.5), "Invalid seed: 1.5"),
    ],
)
def test_bad_lean_settings_get_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as info:
        fastopt.AdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "dtype,kwargs,message",
    [
        (torch.float16, dict(stochastic_rounding=True), "rounds bfloat16 stores only"),
        (torch.float64, dict(master_weights=True), "not torch.float64"),
        (torch.complex64, dict(state_dtype=torch.bfloat16), "not torch.complex64"),
    ],
)
def test_lean_settings_refuse_params_they_cannot_serve(dtype, kwargs, message):
    p = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
    opt = fastopt.AdamW([p], **kwargs)
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=message) as info:
        opt.step()
    assert "\n" not in str(info.value)
    assert torch.equal(p.detach(), torch.zeros_like(p))  # untouched


def test_remainder_holds_the_exact_master_across_ties():
    """Every fp32 value whose low half is 0x8000 (an exact tie): the stored param is the value
    rounded to nearest even, and the master one ulp from it."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=gen)
    ties = ((x.view(torch.int32) & ~0xFFFF) | 0x8000).view(torch.float32)
    p = torch.nn.Parameter(ties.to(torch.bfloat16))
    assert torch.equal(_bits16(p), _bits16(ties.to(torch.bfloat16)))
    from fastopt.rounding import split_master

    param, remainder = split_master(ties)
    assert torch.equal(_bits16(param), _bits16(ties.to(torch.bfloat16)))
    back = join_master(param, remainder)
    assert ((back.view(torch.int32).long() - ties.view(torch.int32).long()).abs() == 1).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("settings", [{}, {"master_weights": True}, {"stochastic_rounding": True},
                                      {"state_dtype": "int8"}],
                         ids=["nearest", "master", "sr", "int8"])  # fmt: skip
def test_a_nan_is_stored_as_the_one_bf16_nan(backend, device, settings):
    """A NaN param or bf16 moment is 0x7FC0 on every backend, at any size: torch's own fp32 to
    bf16 conversion writes 0x7FC0 in its scalar code and 0xFFFF in its AVX-512 code, and the
    reference once inherited both."""
    p = torch.nn.Parameter(torch.ones(100, dtype=torch.bfloat16, device=device))
    opt = fastopt.AdamW([p], lr=0.1, backend=backend, seed=3, min_8bit_size=0, **settings)
    p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert (_bits16(p) == 0x7FC0).all(), _bits16(p).unique()
    for value in opt.state[p].values():
        if value.dtype == torch.bfloat16:
            assert (_bits16(value) == 0x7FC0).all(), _bits16(value).unique()
