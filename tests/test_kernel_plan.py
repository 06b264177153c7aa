"""Kernel plans (csrc/adamw_plan.h, fastopt._ops.AdamWPlan): a param group's tensors handed to
the compiled kernels once. A planned step must give the bits of a step that passes every list,
see a param's replaced data, decline (writing nothing) when a param or gradient changed dtype
or layout, and release its tensors with its optimizer."""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import HAS_CUDA

import fastopt
from fastopt import _ext, _ops, _plan

pytestmark = pytest.mark.skipif(not _ext.load(), reason="fastopt._C is not loaded")

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")])]  # fmt: skip
SETTINGS = {
    "plain": dict(dtype=torch.float32),
    "amsgrad": dict(dtype=torch.float32, amsgrad=True, maximize=True),
    "bf16 masters, bf16 moments, rounding": dict(
        dtype=torch.bfloat16, master_weights=True, state_dtype=torch.bfloat16,
        stochastic_rounding=True, seed=3),
    "bf16 masters, 8-bit moments": dict(dtype=torch.bfloat16, master_weights=True,
                                        state_dtype="int8", seed=1),
    "fp32, 8-bit moments, clipped": dict(dtype=torch.float32, state_dtype="int8",
                                         max_grad_norm=0.5),
}  # fmt: skip
SHAPES = [(33,), (4, 300), (1,), (257,)]


def _run(device, settings, steps=4, seed=0):
    """Params and state after ``steps`` steps on fresh gradients, with a loss scale."""
    settings = dict(settings)
    dtype = settings.pop("dtype")
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in SHAPES]
    opt = fastopt.AdamW(params, lr=1e-2, weight_decay=0.1, **settings)
    for k in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen) * 64).to(device, dtype)
        opt.grad_scale = torch.tensor(64.0, device=device)
        opt.found_inf = torch.tensor(float(k == 2), device=device)  # step 3 is skipped
        opt.step()
        del opt.grad_scale, opt.found_inf
    return params, opt


def _kernels(opt):
    return [plan.kernel for plan in opt._planner._plans.values() if plan.kernel is not None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", SETTINGS)
def test_a_planned_step_gives_the_bits_of_a_step_passing_every_list(device, name, monkeypatch):
    planned, opt = _run(device, SETTINGS[name])
    assert _kernels(opt), "the compiled backend should have planned this group"
    with monkeypatch.context() as m:
        m.setattr(_plan, "has_kernel", lambda *args: False)
        listed, opt_l = _run(device, SETTINGS[name])
    assert not _kernels(opt_l)
    for p, q in zip(planned, listed):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt_l.state[q][key]), key


def test_planned_steps_pass_the_gradients_alone(monkeypatch):
    params, opt = _run("cpu", SETTINGS["plain"], steps=1)
    calls = []
    monkeypatch.setattr(_ops, "adamw_step", lambda *a, **k: calls.append("lists"))
    original = _ops.AdamWPlan.step
    monkeypatch.setattr(_ops.AdamWPlan, "step",
                        lambda *a: calls.append("planned") or original(*a))  # fmt: skip
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert calls == ["planned"]
    assert float(opt.state[params[0]]["step"]) == 2


def _mixed_group(seed=0):
    """A group of two buckets (bf16 and fp32 params), as a mixed-precision model has."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype))
            for s, dtype in (((7,), torch.bfloat16), ((5, 3), torch.float32),
                             ((40,), torch.bfloat16), ((2,), torch.float32))]  # fmt: skip


def _float32_grad(params):
    params[0].grad_dtype = None  # torch >= 2.10 holds a gradient to its param's dtype
    params[0].grad = params[0].grad.float()


# change -> whether the kernel plan sees it and declines, without and with clipping (a
# non-contiguous gradient, Python's check sends to the general path first where the global
# norm reads the gradients before the kernels).
CHANGES = {
    "a gradient in float32": (_float32_grad, True, True),
    "a non-contiguous gradient": (
        lambda ps: setattr(ps[1], "grad", ps[1].grad.t().contiguous().t()), True, False),
    "a param's data in bfloat16": (
        lambda ps: setattr(ps[3], "data", ps[3].data.bfloat16()), True, True),
    "a non-contiguous param": (
        lambda ps: setattr(ps[1], "data", ps[1].data.t().contiguous().t()), True, True),
}  # fmt: skip


@pytest.mark.parametrize("clipped", [False, True], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("change", CHANGES)
def test_a_plan_that_no_longer_holds_declines_and_the_step_matches_the_lists(
    change, clipped, monkeypatch
):
    """Each change is one a step must follow (torch's AdamW does): the plan declines before
    writing anything, the group is planned again, and the bits are those of steps that pass
    every list, every bucket's included."""
    runs, replans = [], []
    original = _plan.Planner.replan
    for planned in (True, False):
        with monkeypatch.context() as m:
            if planned:
                m.setattr(_plan.Planner, "replan", lambda *a: replans.append(1) or original(*a))
            else:
                m.setattr(_plan, "has_kernel", lambda *args: False)
            params = _mixed_group()
            opt = fastopt.AdamW(params, lr=1e-2, master_weights=True, seed=2,
                                max_grad_norm=0.5 if clipped else None)  # fmt: skip
            for k in range(4):
                gen = torch.Generator().manual_seed(10 + k)
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
                if k == 2:
                    planned_before = bool(_kernels(opt))
                    CHANGES[change][0](params)
                opt.step()
            runs.append((params, opt, planned_before))
    (ours, opt_o, planned), (theirs, opt_t, listed) = runs
    assert planned and not listed
    assert bool(replans) == CHANGES[change][2 if clipped else 1]  # the plan declined
    for p, q in zip(ours, theirs):
        assert p.dtype == q.dtype and torch.equal(p, q)
        for key, value in opt_o.state[p].items():
            assert torch.equal(value, opt_t.state[q][key]), key


@pytest.mark.parametrize("change", ["dtype", "non-contiguous gradient", "non-contiguous param"])
def test_a_declined_step_writes_nothing(change):
    """The op's own checks, called directly: each change declines with nothing written."""
    from fastopt.step_args import Hyper

    params = _mixed_group()
    opt = fastopt.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    (kernel,) = _kernels(opt)
    grads = [p.grad for p in params]
    if change == "dtype":
        grads[3] = grads[3].double()  # a bucket's gradient of another dtype
    elif change == "non-contiguous gradient":
        grads[1] = grads[1].t().contiguous().t()
    else:
        params[1].data = params[1].data.t().contiguous().t()
    before = [p.detach().clone() for p in params]
    counts = [float(opt.state[p]["step"]) for p in params]
    hyper = Hyper(lr=1.0, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8)
    assert kernel.step(grads, hyper) is False
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert counts == [float(opt.state[p]["step"]) for p in params]


def test_a_planned_step_updates_a_params_replaced_data():
    """p.data = t keeps the Parameter (and its TensorImpl): the plan holds, and the kernels
    read and write the new data, as torch's AdamW does."""
    ours = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_o = fastopt.AdamW(ours, lr=0.1)
    opt_t = torch.optim.AdamW(theirs, lr=0.1, foreach=False)
    for k in range(3):
        for p, q in zip(ours, theirs):
            p.grad, q.grad = torch.full((5,), k + 1.0), torch.full((5,), k + 1.0)
        if k == 1:
            new = torch.arange(5.0)
            ours[0].data, theirs[0].data = new.clone(), new.clone()
        opt_o.step()
        opt_t.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert _kernels(opt_o)


def test_a_plan_is_released_with_its_optimizer_and_when_rebuilt():
    params, opt = _run("cpu", SETTINGS["plain"], steps=1)
    first = _kernels(opt)[0].id
    opt.load_state_dict(opt.state_dict())  # new state tensors: a new plan at the next step
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    second = _kernels(opt)[0].id
    assert second != first
    gc.collect()
    import fastopt._C as C

    assert not C._drop_adamw_plan(first)  # released when its group's plan went
    del opt
    gc.collect()
    assert not C._drop_adamw_plan(second)


def test_an_unknown_plan_is_a_one_line_error():
    with pytest.raises(RuntimeError, match=r"^fastopt.adamw_planned_: no plan -7 \(") as info:
        torch.ops.fastopt.adamw_planned_(-7, [torch.zeros(3)], 1e-3, None, 0.9, 0.999, 0.0,
                                         1e-8, False, None, None, None, 0.0, 1.0)  # fmt: skip
    assert "\n" not in str(info.value)


def test_the_plan_and_the_planned_step_split_the_steps_arguments():
    """adamw_plan's arguments (less the plan it adds to and where its gradients are) and
    adamw_planned_'s (less the plan) are adamw_'s, each in adamw_'s order, and the planned
    step writes nothing it is passed."""

    def names(op):
        return [a.name for a in op.default._schema.arguments]

    whole = names(torch.ops.fastopt.adamw_)
    held = names(torch.ops.fastopt.adamw_plan)
    per_step = names(torch.ops.fastopt.adamw_planned_)
    assert held[0] == per_step[0] == "plan"
    assert held[-2:] == ["grad_indices", "grad_dtype"]
    held = held[1:-2]
    assert sorted(held + per_step[1:]) == sorted(whole)
    assert held == [n for n in whole if n in held]
    assert per_step[1:] == [n for n in whole if n in per_step]
    arguments = torch.ops.fastopt.adamw_planned_.default._schema.arguments
    assert not any(a.alias_info is not None and a.alias_info.is_write for a in arguments)


def test_a_copied_optimizer_plans_its_own_tensors():
    """copy.deepcopy(optimizer) (as a checkpoint of model and optimizer together makes) must
    not step the original's tensors through the original's plan."""
    import copy

    params = [torch.nn.Parameter(torch.randn(6)) for _ in range(2)]
    opt = fastopt.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.ones(6)
    opt.step()
    twin_params, twin = copy.deepcopy((params, opt))
    before = [p.detach().clone() for p in params]
    for p in twin_params:
        p.grad = torch.ones(6)
    twin.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not any(torch.equal(p, b) for p, b in zip(twin_params, before))
    assert _kernels(twin) and _kernels(twin)[0].id != _kernels(opt)[0].id
