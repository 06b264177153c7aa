"""fastopt.AdamW against torch.optim.AdamW(foreach=False), stepped in lockstep."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKENDS, FAST_BACKENDS, randn
from lockstep import assert_same_state, optimizer_snapshot

import fastopt

# A mix with the awkward cases every backend must handle: 0-dim, empty, prime lengths.
SHAPES = [(), (0,), (7,), (31, 17), (257,), (3, 5, 7)]
STEPS = 25
# fastopt against torch's for-loop AdamW in fp32: their arithmetic differs by an ulp here and
# there (a reciprocal multiply where torch divides, IEEE square roots, no fused lerp).
RTOL, ATOL = 1e-5, 1e-6

CONFIGS = {
    "default": dict(),
    "amsgrad": dict(amsgrad=True),
    "maximize": dict(maximize=True),
    "no-weight-decay": dict(weight_decay=0.0),
    "tensor-lr": dict(lr=torch.tensor(3e-3)),
    "betas-eps": dict(betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
}


def make_params(shapes, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(randn(s, dtype=dtype, device=device, gen=gen)) for s in shapes]


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(param_lists, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    for ps in zip(*param_lists):
        g = torch.randn(ps[0].shape, generator=gen) * scale
        for p in ps:
            p.grad = g.to(device=p.device, dtype=p.dtype)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_lockstep_fp32(backend, device, config):
    hyper = CONFIGS[config]
    theirs_p = make_params(SHAPES, device)
    ours_p = clone(theirs_p)
    theirs = torch.optim.AdamW(theirs_p, foreach=False, **hyper)
    ours = fastopt.AdamW(ours_p, backend=backend, **hyper)
    for step in range(STEPS):
        set_grads([theirs_p, ours_p], seed=step)
        theirs.step()
        ours.step()
    assert_same_state(optimizer_snapshot(ours, ours_p), optimizer_snapshot(theirs, theirs_p),
                      rtol=RTOL, atol=ATOL)  # fmt: skip


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_several_param_groups(backend, device):
    def groups(ps):
        return [{"params": ps[:3], "lr": 1e-2, "weight_decay": 0.0},
                {"params": ps[3:], "lr": 2e-3, "amsgrad": True}]  # fmt: skip

    theirs_p = make_params(SHAPES, device)
    ours_p = clone(theirs_p)
    theirs = torch.optim.AdamW(groups(theirs_p), foreach=False)
    ours = fastopt.AdamW(groups(ours_p), backend=backend)
    for step in range(10):
        set_grads([theirs_p, ours_p], seed=step)
        theirs.step()
        ours.step()
    assert_same_state(optimizer_snapshot(ours, ours_p), optimizer_snapshot(theirs, theirs_p),
                      rtol=RTOL, atol=ATOL)  # fmt: skip


def _error(params, ref):
    num = sum(float((p.detach().double() - r).norm() ** 2) for p, r in zip(params, ref))
    den = sum(float(r.norm() ** 2) for r in ref)
    return (num / den) ** 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_low_precision_error_within_twice_torch(backend, device, dtype):
    """bf16/fp16 params: our error against a float64 AdamW at most twice torch's own."""
    shapes = [(33, 65), (101,), ()]
    base = make_params(shapes, device, dtype=dtype, seed=3)
    exact_p = [torch.nn.Parameter(p.detach().double()) for p in base]
    torch_p, ours_p = clone(base), clone(base)
    exact = torch.optim.AdamW(exact_p, lr=1e-2, foreach=False)
    theirs = torch.optim.AdamW(torch_p, lr=1e-2, foreach=False)
    ours = fastopt.AdamW(ours_p, lr=1e-2, backend=backend)
    for step in range(20):
        set_grads([exact_p, torch_p, ours_p], seed=100 + step)
        for opt in (exact, theirs, ours):
            opt.step()
    ref = [p.detach() for p in exact_p]
    err_ours, err_torch = _error(ours_p, ref), _error(torch_p, ref)
    assert err_torch > 0
    assert err_ours <= 2 * err_torch, (err_ours, err_torch)
    assert all(ours.state[p]["exp_avg"].dtype == dtype for p in ours_p)  # torch's state layout


# beta1 <= 0.5 is where torch's lerp(m, g, 1 - beta1) switches to g - (g - m) * beta1: the
# other form, m + (1 - beta1) * (g - m), cancels when |g| << |m|. A large first gradient then
# a small one is that case (the small gradient's m rounded at the large one's ulp).
SMALL_BETA1 = {"0": (0.0, 0.0), "0.3": (0.3, 0.5), "0.5": (0.5, 0.9), "0.6": (0.6, 0.999)}


@pytest.mark.parametrize("extra", ["plain", "clip", "accumulate"])
@pytest.mark.parametrize("betas", list(SMALL_BETA1))
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_small_beta1_follows_torchs_lerp(backend, device, betas, extra):
    betas = SMALL_BETA1[betas]
    gen = torch.Generator().manual_seed(7)
    start = randn(1000, device=device, gen=gen)
    theirs_p, ours_p = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    theirs = torch.optim.AdamW([theirs_p], betas=betas, foreach=False)
    ours = fastopt.AdamW(
        [ours_p], betas=betas, backend=backend, max_grad_norm=1e9 if extra == "clip" else None
    )
    acc = fastopt.GradAccumulator(ours) if extra == "accumulate" else None
    for scale in (10.0, 0.01, 1e-4):
        g = scale * randn(1000, device=device, gen=gen)
        theirs_p.grad = g.clone()
        ours_p.grad = g.clone()
        if acc is not None:
            acc.accumulate()
        m_prev = theirs.state[theirs_p]["exp_avg"].clone() if theirs.state else torch.zeros_like(g)
        theirs.step()
        ours.step()
        # Both forms share the rounding of g - m; after it, ours rounds the product by
        # beta1 and the sum (torch's CPU lerp fuses the two into one FMA): at most half an ulp
        # of beta1 * |g - m| and of |m| each, for both, so eps * (beta1 * |g - m| + |m|) with
        # a factor 2 of margin. The cancelling form errs by half an ulp of the old |m|, 1e3x
        # the new one's after a 1000x smaller gradient: caught at beta1 = 0.
        m_t, m_o = theirs.state[theirs_p]["exp_avg"], ours.state[ours_p]["exp_avg"]
        eps32 = torch.finfo(torch.float32).eps
        bound = 2 * eps32 * (betas[0] * (g - m_prev).abs() + m_t.abs())
        assert ((m_o - m_t).abs() <= bound).all(), ((m_o - m_t).abs() / bound).max()
        torch.testing.assert_close(
            ours.state[ours_p]["exp_avg_sq"], theirs.state[theirs_p]["exp_avg_sq"]
        )
        torch.testing.assert_close(ours_p.detach(), theirs_p.detach(), rtol=1e-5, atol=1e-7)


HOSTILE = {
    "0-dim": [()],
    "empty": [(0,), (0, 4)],
    "prime": [(65521,), (7919,)],
    "chunk-1": [(65535,)],
    "chunk": [(65536,)],
    "chunk+1": [(65537,)],
    "tiny-beside-large": [(1,), (2,), (3,)] * 100 + [(70001,)],
}


@pytest.mark.parametrize("sizes", list(HOSTILE))
@pytest.mark.parametrize("backend,device", FAST_BACKENDS)
def test_hostile_sizes(backend, device, sizes):
    shapes = HOSTILE[sizes]
    theirs_p = make_params(shapes, device, seed=5)
    ours_p = clone(theirs_p)
    theirs = torch.optim.AdamW(theirs_p, foreach=False, amsgrad=True)
    ours = fastopt.AdamW(ours_p, backend=backend, amsgrad=True)
    for step in range(3):
        set_grads([theirs_p, ours_p], seed=step)
        theirs.step()
        ours.step()
    assert_same_state(optimizer_snapshot(ours, ours_p), optimizer_snapshot(theirs, theirs_p),
                      rtol=RTOL, atol=ATOL)  # fmt: skip


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_non_contiguous_params(backend, device):
    gen = torch.Generator().manual_seed(9)

    def layouts():
        base = randn((12, 20), device=device, gen=gen)
        return [base.t(), base[:, ::3], randn((4, 6, 2), device=device, gen=gen).permute(2, 0, 1)]

    data = layouts()
    theirs_p = [torch.nn.Parameter(t.clone()) for t in data]  # clone keeps the strides
    ours_p = [torch.nn.Parameter(t.clone()) for t in data]
    assert not all(p.is_contiguous() for p in ours_p)
    theirs = torch.optim.AdamW(theirs_p, foreach=False)
    ours = fastopt.AdamW(ours_p, backend=backend)
    for step in range(5):
        set_grads([theirs_p, ours_p], seed=step)
        theirs.step()
        ours.step()
    assert_same_state(optimizer_snapshot(ours, ours_p), optimizer_snapshot(theirs, theirs_p),
                      rtol=RTOL, atol=ATOL)  # fmt: skip


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_params_without_grads_are_untouched(backend, device):
    params = make_params([(5,), (6,)], device)
    before = params[1].detach().clone()
    opt = fastopt.AdamW(params, backend=backend)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert torch.equal(params[1].detach(), before)
    assert params[1] not in opt.state
    assert float(opt.state[params[0]]["step"]) == 1.0


def test_complex_params_match_torch():
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(8, dtype=torch.complex64, generator=gen)
    theirs_p, ours_p = [torch.nn.Parameter(data.clone())], [torch.nn.Parameter(data.clone())]
    theirs, ours = torch.optim.AdamW(theirs_p, foreach=False), fastopt.AdamW(ours_p)
    for _ in range(5):
        g = torch.randn(8, dtype=torch.complex64, generator=gen)
        theirs_p[0].grad, ours_p[0].grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
    torch.testing.assert_close(ours_p[0].detach(), theirs_p[0].detach(), rtol=1e-5, atol=1e-6)


# float64 math agrees with torch's to about 1e-16 relative per step; fp32 math would miss by
# 1e-7. 1e-12 over 25 steps separates the two by four orders of magnitude either way.
FP64_RTOL, FP64_ATOL = 1e-12, 1e-14


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=["fp64", "complex128"])
@pytest.mark.parametrize("config", ["default", "amsgrad", "maximize", "tensor-lr"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=BACKENDS[3].marks)])
@pytest.mark.parametrize("with_fp32", [False, True], ids=["alone", "beside-fp32"])
def test_float64_runs_in_float64_like_torch(with_fp32, device, config, dtype):
    """float64 params are torch's too: 'auto' runs them on the reference backend in float64,
    clipping included. Beside fp32 params in one group, the fp32 params run on the kernels
    and the shared global norm has fp32 precision (torch's too): fp32 tolerances there."""
    hyper = dict(CONFIGS[config])
    if config == "tensor-lr":  # torch's math with an fp32 lr tensor is fp32 math
        hyper["lr"] = torch.tensor(3e-3, dtype=torch.float64)
    theirs_p = make_params([(7,), (31, 17), ()], device, dtype=torch.float64)
    if dtype == torch.complex128:
        theirs_p = [torch.nn.Parameter(torch.complex(p.detach(), p.detach().flip(0)))
                    for p in theirs_p]  # fmt: skip
    if with_fp32:
        theirs_p += make_params([(9,), (5, 3)], device, seed=1)
    ours_p = clone(theirs_p)
    theirs = torch.optim.AdamW(theirs_p, foreach=False, **hyper)
    ours = fastopt.AdamW(ours_p, max_grad_norm=2.0, **hyper)
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step)
        for p_t, p_o in zip(theirs_p, ours_p):
            g = torch.randn(p_t.shape, generator=gen, dtype=p_t.dtype).to(device)
            p_t.grad, p_o.grad = g.clone(), g.clone()
        norm = torch.nn.utils.clip_grad_norm_(theirs_p, 2.0)
        theirs.step()
        ours.step()
        assert ours.last_grad_norm.dtype == torch.float64
        rtol = 1e-6 if with_fp32 else FP64_RTOL
        torch.testing.assert_close(ours.last_grad_norm, norm, rtol=rtol, atol=0)
    assert ours.state[ours_p[0]]["exp_avg"].dtype == dtype
    if with_fp32:
        assert_same_state(optimizer_snapshot(ours, ours_p), optimizer_snapshot(theirs, theirs_p),
                          rtol=RTOL, atol=ATOL)  # fmt: skip
    else:
        assert_same_state(optimizer_snapshot(ours, ours_p), optimizer_snapshot(theirs, theirs_p),
                          rtol=FP64_RTOL, atol=FP64_ATOL)  # fmt: skip


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_float64_on_a_kernel_backend_is_refused_by_name(backend):
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    p.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=f"backend '{backend}' does not support torch.float64"):
        fastopt.AdamW([p], backend=backend).step()
    assert torch.equal(p.detach(), torch.ones(3, dtype=torch.float64))


def test_float64_accumulates_and_clips_in_float64():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = fastopt.AdamW([ours], lr=1e-2)
    acc = fastopt.GradAccumulator(opt)
    for g in grads:
        ours.grad = g.clone()
        acc.accumulate()
    assert acc.gradients()[ours].dtype == torch.float64
    opt.step()
    theirs.grad = sum(grads) / 3
    torch.optim.AdamW([theirs], lr=1e-2, foreach=False).step()
    torch.testing.assert_close(ours, theirs, rtol=FP64_RTOL, atol=FP64_ATOL)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    a.grad, b.grad = grads[0].clone(), grads[0].clone()
    n_o, n_t = fastopt.clip_grad_norm_([a], 0.1), torch.nn.utils.clip_grad_norm_([b], 0.1)
    assert n_o.dtype == torch.float64
    torch.testing.assert_close(n_o, n_t, rtol=FP64_RTOL, atol=0)
    torch.testing.assert_close(a.grad, b.grad, rtol=FP64_RTOL, atol=FP64_ATOL)


def test_closure_is_called_with_grad_enabled():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = fastopt.AdamW([p])

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == 5.0
    assert float(opt.state[p]["step"]) == 1.0
