"""AdamW.overlap(model): the offloaded update runs param by param, in forward order, while the
next forward starts; the result is the synchronous step's bit for bit. On the host (no GPU)
the worker updates the params in place beside the forward; the CUDA cases (gradients streamed
to pinned buffers during backward, params copied up on a side stream) are in the GPU suite."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from helpers import HAS_CUDA, OFFLOAD_BF16, OFFLOAD_SETTINGS

import fastopt
from fastopt._plan import Bucket

SETTINGS, BF16 = OFFLOAD_SETTINGS, OFFLOAD_BF16
GPU = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


class Net(torch.nn.Module):
    """Uses its layers in the reverse of their registration, and reads a param of its own
    and one of a child whose forward it never calls (no hook of theirs runs)."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(48, 3)
        self.body = torch.nn.Linear(48, 48)
        self.stem = torch.nn.Linear(20, 48)
        self.unused_call = torch.nn.Linear(48, 48)
        self.gain = torch.nn.Parameter(torch.ones(48))

    def forward(self, x):
        h = torch.tanh(self.stem(x)) * self.gain
        h = torch.tanh(self.body(h)) + h @ self.unused_call.weight.t()
        return self.head(h)


def _model(setting, device):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if setting in BF16 else torch.float32
    return Net().to(device=device, dtype=dtype)


def _train(model, opt, mode, steps=5, inf_at=2, micro=2):
    """Steps with a plain backward, a LossScaler (an inf at step inf_at), or a GradAccumulator
    of `micro` micro-batches."""
    gen = torch.Generator().manual_seed(1)
    p0 = next(model.parameters())
    scaler = fastopt.LossScaler(init_scale=2.0**8) if mode == "scaler" else None
    acc = fastopt.GradAccumulator(opt) if mode == "accumulate" else None
    for step in range(steps):
        for _ in range(micro if acc else 1):
            x = torch.randn(16, 20, generator=gen).to(p0.device, p0.dtype)
            loss = model(x).float().pow(2).mean()
            (scaler.scale(loss) if scaler else loss).backward()
            if acc is not None:
                acc.accumulate()
        if scaler is not None:
            if step == inf_at:
                model.body.weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()


def _same(a, b, opt_a, opt_b):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.cpu(), q.cpu()), name
        sa, sb = opt_a.state[p], opt_b.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key].cpu(), sb[key].cpu()), (name, key)


def _pair(setting, device, mode, offload_plain=True):
    runs = []
    for overlapped in (False, True):
        model = _model(setting, device)
        opt = fastopt.AdamW(model.parameters(), lr=1e-2, seed=3,
                            offload=overlapped or offload_plain, **SETTINGS[setting])  # fmt: skip
        handle = opt.overlap(model) if overlapped else None
        _train(model, opt, mode)
        opt.synchronize()
        runs.append((model, opt, handle))
    return runs


@pytest.mark.parametrize("mode", ["plain", "scaler", "accumulate"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_overlapped_steps_equal_synchronous_ones(setting, mode):
    (a, opt_a, _), (b, opt_b, handle) = _pair(setting, "cpu", mode)
    _same(a, b, opt_a, opt_b)
    handle.remove()


def test_the_order_is_the_forwards():
    (_, _, _), (b, _, handle) = _pair("plain", "cpu", "plain")
    names = {id(p): n for n, p in b.named_parameters()}
    assert [names[k] for k in handle.order] == [
        "gain",
        "stem.weight",
        "stem.bias",
        "body.weight",
        "body.bias",
        "head.weight",
        "head.bias",
    ]  # the model's own param first (its forward runs first); unused_call never gets a place
    handle.remove()


def test_step_returns_before_the_update_and_the_forward_waits_for_it(monkeypatch):
    """The first param's update is held until the test lets it go, after step() returned; a
    synchronous step would never return (the hold times out and the test fails)."""
    go, held = threading.Event(), []
    original = Bucket.update_part

    def held_update(self, part, params, grads, hyper):
        if not held:
            held.append(go.wait(timeout=30))
        return original(self, part, params, grads, hyper)

    monkeypatch.setattr(Bucket, "update_part", held_update)
    model = _model("plain", "cpu")
    twin = copy.deepcopy(model)
    opt = fastopt.AdamW(model.parameters(), lr=1e-2, offload=True)
    ref = fastopt.AdamW(twin.parameters(), lr=1e-2, offload=True)
    handle = opt.overlap(model)
    x = torch.randn(4, 20)
    for m, o in ((model, opt), (twin, ref)):
        m(x).sum().backward()
        o.step()
    go.set()  # only now: a synchronous step() would have waited for this in vain
    out, expected = model(x), twin(x)  # the forward waits for every param it reads
    assert held == [True]
    assert torch.equal(out, expected)
    handle.remove()


def test_state_dict_waits_for_the_update():
    (a, opt_a, _), (b, opt_b, handle) = _pair("int8-master", "cpu", "plain")
    x = torch.randn(4, 20).bfloat16()
    for m, o in ((a, opt_a), (b, opt_b)):
        m(x).float().sum().backward()
        o.step()
    saved = copy.deepcopy(opt_b.state_dict())  # no synchronize() first
    for key, entry in copy.deepcopy(opt_a.state_dict())["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, saved["state"][key][name]), name
    handle.remove()


def test_remove_ends_the_overlap():
    model = _model("plain", "cpu")
    opt = fastopt.AdamW(model.parameters(), lr=1e-2, offload=True)
    with opt.overlap(model) as handle:
        model(torch.randn(2, 20)).sum().backward()
        opt.step()
    assert opt._overlap is None and not handle._hooks
    opt.overlap(model).remove()  # a new one may start


def test_a_failed_update_is_raised_where_the_params_are_next_needed(monkeypatch):
    def broken(self, *args):
        raise OSError("disk on fire")

    model = _model("plain", "cpu")
    opt = fastopt.AdamW(model.parameters(), lr=1e-2, offload=True)
    handle = opt.overlap(model)
    monkeypatch.setattr(Bucket, "update_part", broken)
    model(torch.randn(2, 20)).sum().backward()
    opt.step()
    with pytest.raises(RuntimeError, match="the overlapped update failed: disk on fire"):
        model(torch.randn(2, 20))
    monkeypatch.undo()
    handle.remove()


def test_a_step_that_fails_to_queue_leaves_no_forward_waiting(monkeypatch):
    def broken(self, parts):
        raise RuntimeError("copy failed")

    model = _model("plain", "cpu")
    opt = fastopt.AdamW(model.parameters(), lr=1e-2, offload=True)
    handle = opt.overlap(model)
    monkeypatch.setattr(type(handle), "_copy_down", broken)
    model(torch.randn(2, 20)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="copy failed"):
        opt.step()
    forward = threading.Thread(target=model, args=(torch.randn(2, 20),), daemon=True)
    forward.start()
    forward.join(timeout=30)
    assert not forward.is_alive()  # it returned: no param is left waiting
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    handle.remove()


@pytest.mark.parametrize(
    "case,error,message",
    [
        ("other-model", ValueError, "param 'weight' is not one of this optimizer's"),
        ("no-offload", ValueError, "param 'weight' is in a param group with offload=False"),
        ("not-a-module", TypeError, "overlap takes a torch.nn.Module, got list"),
        ("twice", RuntimeError, "overlap\\(\\) is already on"),
    ],
)
def test_bad_overlaps_are_one_line_errors(case, error, message):
    layer = torch.nn.Linear(3, 3)
    opt = fastopt.AdamW(layer.parameters(), offload=case != "no-offload")
    target = {"other-model": torch.nn.Linear(3, 3), "not-a-module": [layer.weight]}.get(case, layer)
    if case == "twice":
        opt.overlap(layer)
    with pytest.raises(error, match=message):
        opt.overlap(target)


@GPU
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["plain", "scaler", "accumulate"])
@pytest.mark.parametrize("setting", SETTINGS)
def test_overlapped_cuda_steps_equal_steps_without_offload(setting, mode):
    (a, opt_a, _), (b, opt_b, handle) = _pair(setting, "cuda", mode, offload_plain=False)
    _same(a, b, opt_a, opt_b)
    assert all(p.is_cuda for p in b.parameters())
    assert handle._host and all(h[0].is_pinned() for h in handle._host.values())
    handle.remove()


@GPU
@pytest.mark.gpu
def test_gradients_changed_after_their_hook_are_copied_again():
    """GradScaler.unscale_ and clip_grad_norm_ rewrite .grad after backward; the copies the
    hooks made are stale, and the step must see the new values; no_sync skips copies."""
    runs = []
    for overlapped in (False, True):
        model = _model("plain", "cuda")
        opt = fastopt.AdamW(model.parameters(), lr=1e-2, offload=overlapped)
        handle = opt.overlap(model) if overlapped else None
        torch.manual_seed(5)
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**4)
        for _ in range(3):
            for micro in range(2):
                with handle.no_sync() if handle and micro == 0 else torch.enable_grad():
                    scaler.scale(model(torch.randn(8, 20, device="cuda")).sum()).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        opt.synchronize()
        runs.append((model, opt))
    _same(runs[0][0], runs[1][0], runs[0][1], runs[1][1])
