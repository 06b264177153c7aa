"""Behaviours torch's own optimizer tests check (torch/testing/_internal/common_optim.py and
test/test_optim.py), where a drop-in must do exactly what torch.optim.AdamW does."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BACKENDS

import fastopt


def _params(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5, generator=gen)) for _ in range(n)]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)


def test_load_state_dict_keeps_entries_not_keyed_by_a_param():
    # torch's tests register a post-hook that stores a flag in the state; loading (and
    # stepping after) must treat such an entry as torch does: carry it, ignore it.
    (p,) = _params(1)
    opt = fastopt.AdamW([p])
    _grads([p], 0)
    opt.step()

    def set_flag(optimizer):
        optimizer.state["flag"] = True

    opt.register_load_state_dict_post_hook(set_flag)
    opt.load_state_dict(opt.state_dict())
    assert opt.state["flag"] is True
    opt.load_state_dict(opt.state_dict())  # the flag is in the state dict now
    assert opt.state["flag"] is True
    _grads([p], 1)
    opt.step()
    assert float(opt.state[p]["step"]) == 2


def test_load_state_dict_post_hooks_see_the_state_as_it_will_be_used():
    # Old checkpoints hold step counts as Python numbers. fastopt makes them float32 tensors
    # on the param's device; a user's post-hook must run after that, as torch runs them last.
    (p,) = _params(1)
    opt = fastopt.AdamW([p])
    _grads([p], 0)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["step"] = 1.0
    seen = []
    opt.register_load_state_dict_post_hook(lambda o: seen.append(o.state[p]["step"]))
    opt.load_state_dict(sd)
    assert isinstance(seen[0], torch.Tensor) and seen[0].dtype == torch.float32
    assert seen[0].device == p.device and float(seen[0]) == 1.0


@pytest.mark.parametrize("clip", [False, True], ids=["plain", "clip"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_a_param_listed_twice_warns_like_torch_and_updates_like_its_for_loop(backend, device, clip):
    # torch warns and its for-loop AdamW updates such a param once per listing, each time
    # with the same gradient and a step count one higher. The global norm counts each param
    # once: it is the model's norm, as clip_grad_norm_(model.parameters()) measures it.
    base = _params(3)
    theirs_p = [q.detach().clone().to(device).requires_grad_() for q in base]
    ours_p = [q.detach().clone().to(device).requires_grad_() for q in base]

    def listing(ps):
        a, b, c = ps
        return [a, b, a, c, a]

    with pytest.warns(UserWarning, match="duplicate parameters"):
        theirs = torch.optim.AdamW(listing(theirs_p), lr=1e-2, amsgrad=True, foreach=False)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ours = fastopt.AdamW(
            listing(ours_p), lr=1e-2, amsgrad=True, backend=backend,
            max_grad_norm=0.5 if clip else None,
        )  # fmt: skip
    for step in range(6):
        for ps in (theirs_p, ours_p):
            _grads(ps, step)
            if step == 2:
                ps[2].grad = None  # the twice-listed param's neighbour goes without
        if clip:
            torch.nn.utils.clip_grad_norm_(theirs_p, 0.5)
        theirs.step()
        ours.step()
    for po, pt in zip(ours_p, theirs_p):
        torch.testing.assert_close(po, pt, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            torch.testing.assert_close(ours.state[po][key], theirs.state[pt][key])
        assert float(ours.state[po]["step"]) == float(theirs.state[pt]["step"])
    assert float(ours.state[ours_p[0]]["step"]) == 18  # three listings, six steps


def test_a_param_listed_twice_skips_every_update_on_a_skipped_step():
    a, b = _params(2)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = fastopt.AdamW([a, b, a], max_grad_norm=1.0)
    before = a.detach().clone()
    _grads([a, b], 0)
    a.grad[0] = math.inf
    opt.step()
    assert torch.equal(a, before) and float(opt.state[a]["step"]) == 0


@pytest.mark.parametrize("norm_type", [math.inf, -math.inf, -2.0, 2.0, 1.0, 0.5, 0.0])
def test_clip_grad_norm_with_an_empty_gradient_matches_torch(norm_type):
    def run(fn):
        ps = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.empty(0))]
        for p in ps:
            p.grad = torch.full_like(p, 3.0)
        try:
            return fn(ps, 1.0, norm_type), [p.grad for p in ps]
        except RuntimeError as e:
            return e, None

    ours, ours_grads = run(fastopt.clip_grad_norm_)
    theirs, theirs_grads = run(torch.nn.utils.clip_grad_norm_)
    if isinstance(theirs, RuntimeError):
        assert isinstance(ours, RuntimeError), f"torch raised {theirs}, fastopt returned {ours}"
        assert "cannot compute" in str(ours) and "empty tensor" in str(ours)
    else:
        torch.testing.assert_close(ours, theirs)
        for a, b in zip(ours_grads, theirs_grads):
            torch.testing.assert_close(a, b)


def test_a_refused_grad_scaler_leaves_nothing_behind_for_a_later_scaler():
    # torch's GradScaler hands grad_scale and found_inf over as attributes and deletes them
    # after step() returns; when our step refuses it (a GradAccumulator holds the gradients),
    # nothing may linger into the next step with another scaler.
    (p,) = _params(1)
    opt = fastopt.AdamW([p])
    acc = fastopt.GradAccumulator(opt)
    loss_of = lambda: (p * torch.arange(5.0)).sum()  # noqa: E731

    grad_scaler = torch.amp.GradScaler("cpu")
    grad_scaler.scale(loss_of()).backward()
    acc.accumulate()
    with pytest.raises(RuntimeError, match="use fastopt.LossScaler"):
        grad_scaler.step(opt)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    opt.zero_grad()

    scaler = fastopt.LossScaler(init_scale=4.0)
    scaler.scale(loss_of()).backward()
    acc.accumulate()
    scaler.step(opt)
    scaler.update()
    assert float(opt.state[p]["step"]) == 1
    reference = torch.nn.Parameter(_params(1)[0].detach().clone())
    ref_opt = torch.optim.AdamW([reference], foreach=False)
    reference.grad = torch.arange(5.0)
    ref_opt.step()
    torch.testing.assert_close(p, reference)


@pytest.mark.parametrize("value", [-3.3424e-6, 1.55e5, 0.75])
@pytest.mark.parametrize("norm_type", [8.0, 3.0, 0.5])
def test_clip_grad_norm_p_norm_of_one_element_is_exact_like_torchs(norm_type, value):
    # |x|^p leaves fp32's range for large p (3.3e-6 ** 8 is subnormal, 1.55e5 ** 8 overflows);
    # torch's per-tensor norm of one element is |x| exactly, and so must ours be.
    ours, theirs = torch.nn.Parameter(torch.tensor(value)), torch.nn.Parameter(torch.tensor(value))
    ours.grad, theirs.grad = torch.tensor(value), torch.tensor(value)
    norm = fastopt.clip_grad_norm_([ours], 1e9, norm_type)
    assert norm.item() == torch.nn.utils.clip_grad_norm_([theirs], 1e9, norm_type).item()


@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("make", [fastopt.AdamW, torch.optim.AdamW], ids=["fastopt", "torch"])
def test_loss_scaler_step_without_gradients_raises_like_grad_scaler(make, unscale_first):
    """torch's GradScaler refuses a step with nothing to check (an AssertionError naming it);
    so does LossScaler, for fastopt's optimizer and any other, unscaled first or not."""
    param = torch.nn.Parameter(torch.ones(3))
    for scaler in (torch.amp.GradScaler("cpu", init_scale=4.0),
                   fastopt.LossScaler(init_scale=4.0)):  # fmt: skip
        opt = make([param], lr=0.1)
        scaler.scale(param.sum())  # initialises the scale; no backward, so no gradient
        if unscale_first:
            scaler.unscale_(opt)
        with pytest.raises(AssertionError, match="No inf checks were recorded"):
            scaler.step(opt)
            scaler.update()  # torch's GradScaler raises here for optimizers that unscale
        assert torch.equal(param.detach(), torch.ones(3))
