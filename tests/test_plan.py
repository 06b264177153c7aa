"""The step's plan (fastopt/_plan.py): reused while it holds, rebuilt when anything it depends
on changes between steps, so every step matches torch's AdamW whatever the user changed."""

from __future__ import annotations

import gc
import weakref
from types import MappingProxyType

import pytest
import torch

import fastopt
from fastopt import _plan

BACKENDS = ["cpu", "reference"]


def _models(seed=0):
    torch.manual_seed(seed)
    a = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    b = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    b.load_state_dict(a.state_dict())
    return a, b


def _backward(model, k):
    gen = torch.Generator().manual_seed(100 + k)
    x, y = torch.randn(6, 4, generator=gen), torch.randn(6, 2, generator=gen)
    torch.nn.functional.mse_loss(model(x), y).backward()


def _same(a, b, opt_a, opt_b):
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        if q in opt_b.state:
            assert float(opt_a.state[p]["step"]) == float(opt_b.state[q]["step"])


def _change(name, model, opt, k):
    """A change a user may make between steps k and k + 1, applied to either optimizer."""
    params = list(model.parameters())
    if name == "grad-none":  # one param without a gradient this step
        params[0].grad = None
    elif name == "new-grads":  # zero_grad(set_to_none) and a fresh backward: new objects
        opt.zero_grad()
        _backward(model, 1000 + k)
    elif name == "non-contiguous-grad":
        params[2].grad = params[2].grad.t().contiguous().t()
    elif name == "lr":
        for group in opt.param_groups:
            group["lr"] = 0.05 / (k + 1)
    elif name == "add-param-group" and k == 1:
        extra = torch.nn.Parameter(torch.ones(3))
        extra.grad = torch.full((3,), 0.5)
        model.register_parameter("extra", extra)
        opt.add_param_group({"params": [extra], "lr": 0.02})
    elif name == "load-state-dict" and k == 1:
        opt.load_state_dict(opt.state_dict())
    elif name == "param-replaced-in-group" and k == 1:
        group = opt.param_groups[0]
        group["params"] = group["params"][::-1]
    elif name == "non-contiguous-param-data" and k == 1:  # the same Parameter, other memory
        with torch.no_grad():
            params[2].data = params[2].data.t().contiguous().t()
    elif name == "state-tensor-replaced" and k == 1:  # another tensor under a planned key
        entry = opt.state[params[1]]
        entry["exp_avg"] = entry["exp_avg"] * 0.5
    elif name == "state-entry-cleared" and k == 1:  # initialised afresh at the next step
        opt.state[params[3]].clear()
    elif name == "state-key-added" and k == 1:  # kept, and the step goes on as before
        opt.state[params[0]]["note"] = torch.zeros(1)


CHANGES = ["grad-none", "new-grads", "non-contiguous-grad", "lr", "add-param-group",
           "load-state-dict", "param-replaced-in-group", "non-contiguous-param-data",
           "state-tensor-replaced", "state-entry-cleared", "state-key-added"]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", CHANGES)
def test_a_change_between_steps_takes_effect_as_in_torch(backend, change):
    ours, theirs = _models()
    opt_o = fastopt.AdamW(ours.parameters(), lr=1e-2, backend=backend)
    opt_t = torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=False)
    for k in range(4):
        for model, opt in ((ours, opt_o), (theirs, opt_t)):
            if k == 0 or change == "new-grads":
                opt.zero_grad()
                _backward(model, k)
            if k:
                _change(change, model, opt, k)
            opt.step()
        _same(ours, theirs, opt_o, opt_t)


def test_a_planned_step_collects_nothing(monkeypatch):
    """Once planned, steps with the same gradients or new gradient tensors of the same kind
    reuse the plan: nothing is collected param by param."""
    model, _ = _models()
    opt = fastopt.AdamW(model.parameters(), backend="cpu")
    _backward(model, 0)
    opt.step()
    calls = []
    original = _plan.collect
    monkeypatch.setattr(_plan, "collect", lambda *a: calls.append(1) or original(*a))
    opt.step()  # the same gradient tensors
    opt.zero_grad()
    _backward(model, 1)
    opt.step()  # new gradient tensors, same dtypes and layout
    assert calls == []
    next(model.parameters()).grad = None
    opt.step()  # a param without a gradient: planned again
    assert calls == [1]


def test_a_skipped_step_counts_nothing_on_any_backend():
    """found_inf set: params, moments and step counts unchanged (the ops count the steps)."""
    for backend in BACKENDS:
        model, _ = _models()
        opt = fastopt.AdamW(model.parameters(), backend=backend)
        _backward(model, 0)
        opt.step()
        before = {(i, k): v.clone() for i, p in enumerate(model.parameters())
                  for k, v in opt.state[p].items()}  # fmt: skip
        params = [p.detach().clone() for p in model.parameters()]
        opt.found_inf = torch.tensor(1.0)
        opt.grad_scale = torch.tensor(1.0)
        opt.step()
        del opt.found_inf, opt.grad_scale
        for p, q in zip(model.parameters(), params):
            assert torch.equal(p, q)
        after = {(i, k): v for i, p in enumerate(model.parameters())
                 for k, v in opt.state[p].items()}  # fmt: skip
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert all(float(opt.state[p]["step"]) == 1 for p in model.parameters())


@pytest.mark.parametrize("max_grad_norm", [None, 1.0], ids=["unclipped", "clipped"])
def test_a_sparse_gradient_after_planned_steps_is_refused_by_name(max_grad_norm):
    """A planned step checks its gradients without a layout pass where nothing reads them
    before the kernels (fastopt/_plan.py): a sparse one (COO: a dense param takes no other)
    must still reach the general path's refusal, before the global norm would read it too,
    with nothing written."""
    p = torch.nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.ones(4, 3)
    opt = fastopt.AdamW([p], backend="cpu", max_grad_norm=max_grad_norm)
    opt.step()
    opt.step()
    before = p.detach().clone()
    p.grad = torch.ones(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="^AdamW does not support sparse gradients$"):
        opt.step()
    assert torch.equal(p, before)
    assert float(opt.state[p]["step"]) == 2


def _checks():
    from fastopt import _ext

    c = pytest.param(_ext.plan_checks(), id="C")
    if _ext.plan_checks() is _ext._python_checks:
        c = pytest.param(None, id="C", marks=pytest.mark.skip(reason="fastopt._C is not built"))
    return [c, pytest.param(_ext._python_checks, id="python")]


@pytest.mark.parametrize("checks", _checks())
def test_the_plan_checks_compare_objects_keys_and_grads(checks):
    """What a step checks to reuse a plan: fastopt._C's loops (csrc/plan_checks.h) and the
    Python passes it stands in for give the same answers."""
    same_objects, entries_are, grads_of = checks
    a, b, c = torch.zeros(1), torch.zeros(1), torch.zeros(1)
    assert same_objects([a, b], [a, b]) and same_objects((a, b), [a, b]) and same_objects([], [])
    assert not same_objects([a, b], [a, c]) and not same_objects([a], [a, b])
    assert not same_objects([a, b], [b, a])  # equal values, other objects
    entries = [{"step": b, "exp_avg": a}, {"step": c, "exp_avg": b}]
    keys = ("step", "exp_avg")
    assert entries_are(entries, keys, [b, a, c, b]) and entries_are([], keys, [])
    step = "".join(["ste", "p"])  # made at run time: equal to the key, not the same object
    assert step is not keys[0] and step == keys[0]
    assert entries_are(entries, (step, "exp_avg"), [b, a, c, b])
    assert not entries_are(entries, keys, [b, a, c, c])  # another object under a key
    assert not entries_are(entries, keys, [b, a, c])
    assert not entries_are(entries, ("exp_avg", "step"), [a, b, b, c])  # the keys' order
    assert not entries_are(entries, ("step", "exp_avg_sq"), [b, a, c, b])
    assert not entries_are([entries[0], {**entries[1], "x": a}], keys, [b, a, c, b])  # one more
    assert not entries_are([entries[0], {"step": c}], keys, [b, a, c, b])  # one missing
    assert not entries_are([entries[0], MappingProxyType(entries[1])], keys, [b, a, c, b])
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((2,), 3.0)
    got, missing = grads_of([p, q])
    assert type(got) is list and len(got) == 2 and got[0] is p.grad and got[1] is None
    assert missing == 1 and grads_of((p, p)) == ([p.grad, p.grad], 0) and grads_of([]) == ([], 0)


def test_the_c_plan_checks_refuse_what_is_not_a_list():
    from fastopt import _ext

    if _ext.plan_checks() is _ext._python_checks:
        pytest.skip("fastopt._C is not built")
    same_objects, entries_are, grads_of = _ext.plan_checks()
    with pytest.raises(TypeError, match="a must be a list or tuple"):
        same_objects({1}, [1])
    with pytest.raises(TypeError, match="entries must be a list or tuple"):
        entries_are(iter([]), (), [])
    with pytest.raises(TypeError, match="keys must be a list or tuple"):
        entries_are([], None, [])
    with pytest.raises(TypeError, match="params must be a list or tuple"):
        grads_of(None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "settings",
    [
        {},
        dict(max_grad_norm=1.0),
        dict(master_weights=True, state_dtype=torch.bfloat16, stochastic_rounding=True),
        dict(state_dtype="int8"),
    ],
    ids=["plain", "clipped", "lean", "int8"],
)
@pytest.mark.parametrize("layout", ["contiguous", "non-contiguous"])
def test_a_step_keeps_no_gradient_after_it_returns(backend, settings, layout):
    """After step() and zero_grad(), the gradients are freed, as with torch's AdamW: nothing
    of the plan (nor a contiguous copy it made) holds them through the next forward."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if settings.get("master_weights") else torch.float32
    params = [torch.nn.Parameter(torch.randn(4, 6, dtype=dtype)) for _ in range(3)]
    opt = fastopt.AdamW(params, backend=backend, **settings)
    for k in range(3):
        for p in params:
            g = torch.randn(6, 4, dtype=dtype)
            p.grad = g.t() if layout == "non-contiguous" else g.t().contiguous()
        refs = [weakref.ref(p.grad) for p in params]
        opt.step()
        opt.zero_grad()
        gc.collect()
        assert [r() for r in refs] == [None] * 3, f"step {k} kept gradients alive"
