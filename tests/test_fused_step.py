"""The fused step (loss scaling, non-finite skip, global-norm clipping, accumulation) against
torch's unfused pipeline: GradScaler + unscale_ + clip_grad_norm_ + torch.optim.AdamW."""

from __future__ import annotations

import io
import math

import pytest
import torch
from helpers import BACKENDS, HAS_CUDA, randn
from lockstep import assert_same_state, optimizer_snapshot

import fastopt

SHAPES = [(17, 9), (), (129,), (4, 4, 4)]
MAX_NORM = 1.0
RTOL, ATOL = 1e-5, 1e-6  # fp32 against torch's pipeline, as tests/test_adamw.py


def make_params(device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(randn(s, device=device, gen=gen)) for s in SHAPES]


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def groups(ps):
    return [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0}]


def true_grads(step, device):
    """Gradients whose norm moves above and below MAX_NORM, with inf and NaN injected."""
    gen = torch.Generator().manual_seed(1000 + step)
    magnitude = [0.02, 3.0, 0.3, 40.0][step % 4]
    grads = [torch.randn(s, generator=gen) * magnitude for s in SHAPES]
    if step == 5:
        grads[0].view(-1)[-1] = math.inf  # the very last element of a tensor
    if step == 9:
        grads[2].view(-1)[0] = math.nan
    if step == 12:
        grads[3].view(-1)[-1] = -math.inf
    return [g.to(device) for g in grads]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_loss_scaler_clip_matches_torch_pipeline(backend, device):
    ps_t = make_params(device)
    ps_o = clone(ps_t)
    opt_t = torch.optim.AdamW(groups(ps_t), foreach=False)
    opt_o = fastopt.AdamW(groups(ps_o), backend=backend, max_grad_norm=MAX_NORM)
    scaler_t = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=3)
    scaler_o = fastopt.LossScaler(init_scale=2.0**10, growth_interval=3, backend=backend)
    one = torch.ones((), device=device)
    scales, skipped = [], 0
    for step in range(16):
        scale_t, scale_o = scaler_t.scale(one), scaler_o.scale(one)  # as scaled losses would be
        assert float(scale_t) == float(scale_o)
        scales.append(float(scale_o))
        for p_t, p_o, g in zip(ps_t, ps_o, true_grads(step, device)):
            p_t.grad, p_o.grad = g * scale_t, g * scale_o
        scaler_t.unscale_(opt_t)
        norm_t = torch.nn.utils.clip_grad_norm_(ps_t, MAX_NORM)
        scaler_t.step(opt_t)
        scaler_t.update()
        scaler_o.step(opt_o)
        scaler_o.update()
        skipped += int(float(scaler_o.last_found_inf) != 0)
        assert bool(scaler_o.last_found_inf) == (not math.isfinite(float(norm_t)))
        if math.isfinite(float(norm_t)):
            torch.testing.assert_close(opt_o.last_grad_norm.cpu(), norm_t.cpu(), rtol=1e-5, atol=0)
        assert scaler_o.get_scale() == scaler_t.get_scale()
        assert scaler_o.state_dict() == scaler_t.state_dict()
        assert_same_state(optimizer_snapshot(opt_o, ps_o), optimizer_snapshot(opt_t, ps_t),
                          rtol=RTOL, atol=ATOL)  # fmt: skip
    assert skipped == 3
    assert len(set(scales)) > 2  # the scale both grew and backed off


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_grad_scaler_drives_fastopt(backend, device):
    """torch.amp.GradScaler hands grad_scale/found_inf to fastopt.AdamW (no unscale pass)."""
    ps_t = make_params(device, seed=1)
    ps_o = clone(ps_t)
    opt_t = torch.optim.AdamW(ps_t, foreach=False)
    opt_o = fastopt.AdamW(ps_o, backend=backend)
    scaler_t = torch.amp.GradScaler(device, init_scale=2.0**8, growth_interval=2)
    scaler_o = torch.amp.GradScaler(device, init_scale=2.0**8, growth_interval=2)
    one = torch.ones((), device=device)
    for step in range(10):
        s_t, s_o = scaler_t.scale(one), scaler_o.scale(one)
        for p_t, p_o, g in zip(ps_t, ps_o, true_grads(step, device)):
            p_t.grad, p_o.grad = g * s_t, g * s_o
        for scaler, opt in ((scaler_t, opt_t), (scaler_o, opt_o)):
            scaler.step(opt)
            scaler.update()
        assert scaler_o.get_scale() == scaler_t.get_scale()
        assert_same_state(optimizer_snapshot(opt_o, ps_o), optimizer_snapshot(opt_t, ps_t),
                          rtol=RTOL, atol=ATOL)  # fmt: skip
    assert not hasattr(opt_o, "grad_scale")  # GradScaler's attributes never leak into a step


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_torch_grad_scaler_with_clipping_matches_torch_pipeline(backend, device):
    """GradScaler's own inf check and fastopt's norm pass both flag a bad step: it is skipped
    once and not counted (a sum of the two flags once decremented the step counts)."""
    ps_t = make_params(device, seed=7)
    ps_o = clone(ps_t)
    opt_t = torch.optim.AdamW(ps_t, foreach=False)
    opt_o = fastopt.AdamW(ps_o, backend=backend, max_grad_norm=MAX_NORM)
    scaler_t = torch.amp.GradScaler(device, init_scale=2.0**8, growth_interval=2)
    scaler_o = torch.amp.GradScaler(device, init_scale=2.0**8, growth_interval=2)
    one = torch.ones((), device=device)
    for step in range(14):  # steps 5, 9 and 12 hold inf or NaN
        s_t, s_o = scaler_t.scale(one), scaler_o.scale(one)
        for p_t, p_o, g in zip(ps_t, ps_o, true_grads(step, device)):
            p_t.grad, p_o.grad = g * s_t, g * s_o
        scaler_t.unscale_(opt_t)
        torch.nn.utils.clip_grad_norm_(ps_t, MAX_NORM)
        for scaler, opt in ((scaler_t, opt_t), (scaler_o, opt_o)):
            scaler.step(opt)
            scaler.update()
        assert scaler_o.get_scale() == scaler_t.get_scale()
        assert_same_state(optimizer_snapshot(opt_o, ps_o), optimizer_snapshot(opt_t, ps_t),
                          rtol=RTOL, atol=ATOL)  # fmt: skip
    assert float(opt_o.state[ps_o[0]]["step"]) == 11.0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_found_inf_above_one_skips_without_uncounting(backend, device):
    """GradScaler hands over the sum of its per-device flags, so found_inf can be 2."""
    ps = make_params(device, seed=8)
    opt = fastopt.AdamW(ps, backend=backend)
    for p, g in zip(ps, true_grads(0, device)):
        p.grad = g
    opt.step()
    before = [p.detach().clone() for p in ps]
    opt.grad_scale = torch.ones((), device=device)
    opt.found_inf = torch.full((), 2.0, device=device)
    try:
        opt.step()
    finally:
        del opt.grad_scale, opt.found_inf
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)
    assert all(float(opt.state[p]["step"]) == 1.0 for p in ps)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_clip_without_scaler_matches_torch(backend, device):
    ps_t = make_params(device, seed=2)
    ps_o = clone(ps_t)
    opt_t = torch.optim.AdamW(ps_t, foreach=False)
    opt_o = fastopt.AdamW(ps_o, backend=backend, max_grad_norm=MAX_NORM)
    for step in range(8):
        grads = true_grads(step if step not in (5,) else 6, device)  # finite grads only
        for p_t, p_o, g in zip(ps_t, ps_o, grads):
            p_t.grad, p_o.grad = g.clone(), g.clone()
        norm_t = torch.nn.utils.clip_grad_norm_(ps_t, MAX_NORM)
        opt_t.step()
        opt_o.step()
        torch.testing.assert_close(opt_o.last_grad_norm.cpu(), norm_t.cpu(), rtol=1e-5, atol=0)
        assert_same_state(optimizer_snapshot(opt_o, ps_o), optimizer_snapshot(opt_t, ps_t),
                          rtol=RTOL, atol=ATOL)  # fmt: skip
    # The fused step never writes the gradients back.
    torch.testing.assert_close(ps_o[0].grad, grads[0])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nonfinite_grads_skip_step_without_scaler(backend, device):
    ps = make_params(device, seed=4)
    opt = fastopt.AdamW(ps, backend=backend, max_grad_norm=MAX_NORM)
    for p, g in zip(ps, true_grads(0, device)):
        p.grad = g
    opt.step()
    before = [p.detach().clone() for p in ps]
    state_before = {k: v.clone() for k, v in opt.state[ps[0]].items()}
    for p, g in zip(ps, true_grads(5, device)):  # holds an inf
        p.grad = g
    opt.step()
    assert float(opt.last_found_inf) == 1.0
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)
    for key, value in state_before.items():
        assert torch.equal(opt.state[ps[0]][key], value)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_loss_scaler_with_torch_optimizer(backend, device):
    """With a non-fastopt optimizer the LossScaler behaves exactly like GradScaler."""
    ps_t = make_params(device, seed=5)
    ps_o = clone(ps_t)
    opt_t, opt_o = torch.optim.SGD(ps_t, lr=0.1), torch.optim.SGD(ps_o, lr=0.1)
    scaler_t = torch.amp.GradScaler(device, init_scale=4.0, growth_interval=2)
    scaler_o = fastopt.LossScaler(init_scale=4.0, growth_interval=2, backend=backend)
    one = torch.ones((), device=device)
    for step in range(8):
        s_t, s_o = scaler_t.scale(one), scaler_o.scale(one)
        for p_t, p_o, g in zip(ps_t, ps_o, true_grads(step, device)):
            p_t.grad, p_o.grad = g * s_t, g * s_o
        for scaler, opt in ((scaler_t, opt_t), (scaler_o, opt_o)):
            scaler.step(opt)
            scaler.update()
        assert scaler_o.get_scale() == scaler_t.get_scale()
        for p_t, p_o in zip(ps_t, ps_o):
            torch.testing.assert_close(p_o.detach(), p_t.detach())


def test_state_dicts_round_trip_mid_run():
    ps_a = make_params("cpu", seed=6)
    ps_b = clone(ps_a)
    opt_a = fastopt.AdamW(ps_a, max_grad_norm=MAX_NORM)
    scaler_a = fastopt.LossScaler(init_scale=2.0**6, growth_interval=2)
    one = torch.ones(())

    def run(opt, scaler, ps, steps):
        for step in steps:
            s = scaler.scale(one)
            for p, g in zip(ps, true_grads(step, "cpu")):
                p.grad = g * s
            scaler.step(opt)
            scaler.update()

    run(opt_a, scaler_a, ps_a, range(7))
    opt_b = fastopt.AdamW(ps_b, max_grad_norm=MAX_NORM)
    with torch.no_grad():
        for p_a, p_b in zip(ps_a, ps_b):
            p_b.copy_(p_a)
    saved = io.BytesIO()  # through bytes, as a checkpoint would: no tensor shared with run a
    torch.save({"opt": opt_a.state_dict(), "scaler": scaler_a.state_dict()}, saved)
    saved.seek(0)
    loaded = torch.load(saved)
    opt_b.load_state_dict(loaded["opt"])
    scaler_b = fastopt.LossScaler()
    scaler_b.load_state_dict(loaded["scaler"])
    run(opt_a, scaler_a, ps_a, range(7, 14))
    run(opt_b, scaler_b, ps_b, range(7, 14))
    assert scaler_a.state_dict() == scaler_b.state_dict()
    for p_a, p_b in zip(ps_a, ps_b):
        assert torch.equal(p_a, p_b)


def test_disabled_scaler_is_a_pass_through():
    ps = make_params("cpu")
    opt = fastopt.AdamW(ps)
    scaler = fastopt.LossScaler(enabled=False)
    loss = torch.tensor(3.0)
    assert scaler.scale(loss) is loss
    for p, g in zip(ps, true_grads(0, "cpu")):
        p.grad = g
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 1.0 and scaler.state_dict() == {}
    assert float(opt.state[ps[0]]["step"]) == 1.0


def test_loss_scaler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="growth_factor"):
        fastopt.LossScaler(growth_factor=0.5)
    with pytest.raises(ValueError, match="backoff_factor"):
        fastopt.LossScaler(backoff_factor=1.5)
    with pytest.raises(ValueError, match="growth_interval"):
        fastopt.LossScaler(growth_interval=0)
    scaler = fastopt.LossScaler()
    with pytest.raises(RuntimeError, match="scale"):
        scaler.update()


LEAN = dict(master_weights=True, state_dtype=torch.bfloat16, stochastic_rounding=True, seed=3)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize(
    "dtype,lean",
    [
        (torch.float32, {}),
        # bf16 params with exact masters, bf16 moments rounded stochastically: the noise keys
        # come from the step counts on the device too.
        (torch.bfloat16, LEAN),
    ],
    ids=["fp32", "bf16-lean"],
)
def test_full_step_has_no_host_sync(backend, dtype, lean):
    ps = [torch.nn.Parameter(p.detach().to(dtype)) for p in make_params("cuda", seed=7)]
    opt = fastopt.AdamW(ps, backend=backend, max_grad_norm=MAX_NORM, **lean)
    scaler = fastopt.LossScaler(init_scale=2.0**4, growth_interval=2, backend=backend)
    acc = fastopt.GradAccumulator(opt, backend=backend)
    one = torch.ones((), device="cuda")
    for step in range(3):  # warm-up: state allocation, kernel compilation, tables
        s = scaler.scale(one)
        for p, g in zip(ps, true_grads(step, "cuda")):
            p.grad = (g * s).to(dtype)
        acc.accumulate()
        scaler.step(opt)
        scaler.update()
    grads = {step: true_grads(step, "cuda") for step in range(3, 7)}  # host copies done here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(3, 7):  # step 5 holds an inf: the skip is decided on the device
            s = scaler.scale(one)
            for p, g in zip(ps, grads[step]):
                p.grad = (g * s).to(dtype)
            acc.accumulate()
            scaler.step(opt)
            scaler.update()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(opt.state[ps[0]]["step"]) == 6.0  # 7 steps, one skipped


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_norm_overflow_under_a_huge_scale_backs_off_instead_of_freezing(backend, device):
    """Finite scaled gradients whose squared norm passes the fp32 range: clipping by that inf
    norm would zero every update while the scale never shrank. The step is skipped instead
    and the scale backs off until the norm fits; then the params move as unscaled ones."""
    w = torch.linspace(-1, 1, 8, device=device)
    ours = torch.nn.Parameter(w.clone())
    opt = fastopt.AdamW([ours], lr=0.1, weight_decay=0.0, max_grad_norm=1.0, backend=backend)
    scaler = fastopt.LossScaler(init_scale=2.0**70, backend=backend)
    flags = []
    for _ in range(14):
        ours.grad = None
        scaler.scale((ours * 2).sum()).backward()  # 2 * 2**70 per element: finite in fp32
        scaler.step(opt)
        scaler.update()
        flags.append(float(scaler.last_found_inf) != 0)
    # The squares' sum fits fp32 once 8 * (2 * scale)**2 < 3.4e38: by 2**62 or 2**61 (a
    # kernel may accumulate more cleverly at the boundary), then every step applies.
    skipped = flags.index(False)
    assert skipped in (8, 9) and not any(flags[skipped:])
    assert scaler.get_scale() == 2.0 ** (70 - skipped)
    applied = len(flags) - skipped
    assert float(opt.state[ours]["step"]) == applied
    # Clipped steps of a constant gradient: Adam moves each element by lr per step.
    torch.testing.assert_close(ours.detach(), w - 0.1 * applied, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("unscale", [False, True], ids=["fused", "unscale_-first"])
def test_loss_scaler_with_complex_params(unscale):
    """torch's unscale kernel refuses complex tensors; LossScaler unscales their real view."""
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(6, generator=gen, dtype=torch.complex64)
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt_o = fastopt.AdamW([ours], lr=0.1, max_grad_norm=0.5)
    opt_t = torch.optim.AdamW([theirs], lr=0.1, foreach=False)
    scaler = fastopt.LossScaler(init_scale=8.0)
    scaler.scale(torch.ones(()))
    for _ in range(3):
        g = torch.randn(6, generator=gen, dtype=torch.complex64)
        ours.grad, theirs.grad = g * 8.0, g.clone()
        if unscale:
            scaler.unscale_(opt_o)
        scaler.step(opt_o)
        scaler.update()
        torch.nn.utils.clip_grad_norm_([theirs], 0.5)
        opt_t.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
