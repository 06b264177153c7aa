"""Drop-in behaviour: state_dict interchange with torch.optim.AdamW, schedulers, compiled
models, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import BACKENDS

import fastopt


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def train_steps(model, opt, steps, seed, scheduler=None, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen).to(device)
        y = torch.randn(8, 3, generator=gen).to(device)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()


def through_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


def test_defaults_and_signature_match_torch():
    import inspect

    ours = inspect.signature(fastopt.AdamW.__init__).parameters
    theirs = inspect.signature(torch.optim.AdamW.__init__).parameters
    for name, param in theirs.items():
        assert name in ours, name
        assert ours[name].default == param.default, name
        assert ours[name].kind == param.kind, name
    p = [torch.nn.Parameter(torch.zeros(1))]
    assert fastopt.AdamW(p).defaults == torch.optim.AdamW(p).defaults


@pytest.mark.parametrize("direction", ["fastopt->torch", "torch->fastopt"])
def test_state_dict_interchange_continues_identically(direction):
    src_cls, dst_cls = (
        (fastopt.AdamW, torch.optim.AdamW) if direction == "fastopt->torch"
        else (torch.optim.AdamW, fastopt.AdamW)
    )  # fmt: skip
    model = tiny_model()
    opt = src_cls(model.parameters(), lr=1e-2, amsgrad=True)
    train_steps(model, opt, 5, seed=1)
    saved = through_bytes({"model": model.state_dict(), "opt": opt.state_dict()})

    # Continue with the source class, and with the other class from the checkpoint.
    model_b = tiny_model(seed=99)
    model_b.load_state_dict(saved["model"])
    opt_b = dst_cls(model_b.parameters(), lr=1e-2, amsgrad=True)
    opt_b.load_state_dict(saved["opt"])
    train_steps(model, opt, 10, seed=2)
    train_steps(model_b, opt_b, 10, seed=2)
    for a, b in zip(model.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    keys_a = {k for s in opt.state.values() for k in s}
    keys_b = {k for s in opt_b.state.values() for k in s}
    assert keys_a == keys_b == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


def test_state_dict_format_matches_torch():
    m1, m2 = tiny_model(), tiny_model()
    ours, theirs = fastopt.AdamW(m1.parameters()), torch.optim.AdamW(m2.parameters())
    train_steps(m1, ours, 1, seed=0)
    train_steps(m2, theirs, 1, seed=0)
    sd_o, sd_t = ours.state_dict(), theirs.state_dict()
    assert sd_o["param_groups"] == sd_t["param_groups"]
    for k in sd_t["state"]:
        for key, value in sd_t["state"][k].items():
            assert sd_o["state"][k][key].dtype == value.dtype, key
            assert sd_o["state"][k][key].shape == value.shape, key


@pytest.mark.parametrize(
    "make_scheduler",
    [
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=12),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=12),
    ],
    ids=["StepLR", "OneCycleLR", "CosineAnnealingLR"],
)
def test_torch_schedulers_drive_fastopt_like_torch(make_scheduler):
    m1, m2 = tiny_model(), tiny_model()
    ours, theirs = fastopt.AdamW(m1.parameters()), torch.optim.AdamW(m2.parameters(), foreach=False)
    s1, s2 = make_scheduler(ours), make_scheduler(theirs)
    train_steps(m1, ours, 12, seed=3, scheduler=s1)
    train_steps(m2, theirs, 12, seed=3, scheduler=s2)
    assert s1.get_last_lr() == s2.get_last_lr()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_model_trains_like_eager():
    eager, compiled_src = tiny_model(), tiny_model()
    compiled = torch.compile(compiled_src, backend="aot_eager")
    o1, o2 = fastopt.AdamW(eager.parameters()), fastopt.AdamW(compiled.parameters())
    train_steps(eager, o1, 4, seed=4)
    train_steps(compiled, o2, 4, seed=4)
    for a, b in zip(eager.parameters(), compiled_src.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_add_param_group_and_zero_grad():
    model = tiny_model()
    opt = fastopt.AdamW(model[0].parameters())
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.1})
    assert opt.param_groups[1]["betas"] == (0.9, 0.999)
    train_steps(model, opt, 2, seed=5)
    assert all(float(opt.state[p]["step"]) == 2 for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("change", ["clear", "delete", "assign"])
def test_state_changed_by_the_user_is_what_the_next_step_uses(backend, device, change):
    """Clearing the state, deleting a param's entry or assigning new state tensors between
    steps takes effect at the next step, as with torch's AdamW."""
    ours, theirs = tiny_model().to(device), tiny_model().to(device)
    opt_o = fastopt.AdamW(ours.parameters(), lr=1e-2, backend=backend)
    opt_t = torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=False)
    for model, opt in ((ours, opt_o), (theirs, opt_t)):
        train_steps(model, opt, 3, seed=7, device=device)
        first = next(model.parameters())
        if change == "clear":
            opt.state.clear()
        elif change == "delete":
            del opt.state[first]
        else:
            opt.state[first]["exp_avg"] = torch.full_like(first, 0.5)
            opt.state[first]["step"] = torch.tensor(10.0, device=opt.state[first]["step"].device)
        train_steps(model, opt, 2, seed=8, device=device)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for p_o, p_t in zip(ours.parameters(), theirs.parameters()):
        for key, value in opt_t.state[p_t].items():
            mine = opt_o.state[p_o][key]
            torch.testing.assert_close(mine.cpu(), value.cpu().to(mine.dtype), rtol=1e-5, atol=1e-6)


def test_deepcopy_and_pickle():
    model = tiny_model()
    opt = fastopt.AdamW(model.parameters(), max_grad_norm=1.0)
    train_steps(model, opt, 1, seed=6)
    clone = copy.deepcopy(opt)
    assert clone.max_grad_norm == 1.0 and clone.backend == "auto"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "Invalid learning rate"),
        (dict(eps=-1e-8), "Invalid epsilon"),
        (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
        (dict(weight_decay=-0.1), "Invalid weight_decay"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), "1-element"),
        (dict(differentiable=True), "differentiable"),
        (dict(backend="gpu"), "Invalid backend"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
    ],
    ids=["lr", "eps", "beta1", "beta2", "weight_decay", "lr-shape", "differentiable", "backend",
         "max_grad_norm"],
)  # fmt: skip
def test_bad_arguments_raise_value_error_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastopt.AdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_sparse_gradients_are_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = fastopt.AdamW(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_mixed_devices_in_one_group_are_rejected():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2, device="meta"))
    a.grad, b.grad = torch.ones(2), torch.ones(2, device="meta")
    opt = fastopt.AdamW([a, b])
    with pytest.raises(ValueError, match="several devices"):
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(2))  # nothing was updated


def test_unavailable_backend_request_is_an_error_not_a_fallback():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    opt = fastopt.AdamW([p], backend="cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable on cpu"):
        opt.step()


def test_last_grad_norm_belongs_to_the_last_step():
    p = torch.nn.Parameter(torch.ones(3))
    opt = fastopt.AdamW([p], max_grad_norm=1.0)
    p.grad = torch.full((3,), 2.0)
    opt.step()
    torch.testing.assert_close(opt.last_grad_norm, torch.tensor(12.0).sqrt())
    p.grad = None
    opt.step()  # no gradients: nothing was measured
    assert opt.last_grad_norm is None and opt.last_found_inf is None


def test_torch_adamw_error_inputs_raise_torch_errors_before_params_are_read():
    """torch's own error cases for AdamW (its optimizer test battery's test_errors): the same
    exception type and message, or warning, from fastopt.AdamW. Several pass params=None, so
    the arguments must be checked before the params are iterated, as torch does."""
    common = pytest.importorskip("torch.testing._internal.common_optimizers")
    info = next(o for o in common.optim_db if o.optim_cls is torch.optim.AdamW)
    cases = info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
    assert len(cases) >= 10
    for case in cases:
        given = case.optimizer_error_input
        step = case.error_on == common.OptimizerErrorEnum.STEP_ERROR
        if issubclass(case.error_type, Warning):
            with pytest.warns(case.error_type, match=case.error_regex):
                opt = fastopt.AdamW(given.params, **given.kwargs)
                if step:
                    opt.step()
            continue
        with pytest.raises(case.error_type, match=case.error_regex):
            opt = fastopt.AdamW(given.params, **given.kwargs)
            if step:
                opt.step()
