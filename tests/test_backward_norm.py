"""The global norm of an overlapped step, measured during backward (fastopt.backward_norm).

The norm kernel's chunk partials, written tensor by tensor in any order into the slots the
whole list's launch would use and then combined, are multi_tensor_norm's result bit for bit;
an overlapped step with clipping or a loss scaler takes its norm and skip flag from the
partials its gradient hooks measured, measures again what changed after its hook, and equals
the step without offload. The CUDA cases run in the GPU suite."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from helpers import HAS_CUDA

import fastopt
from fastopt import _ops
from fastopt.overlap import Overlap

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]),
]  # fmt: skip
SIZES = (1, 17, _ops.NORM_CHUNK, _ops.NORM_CHUNK + 1, 0, 3 * _ops.NORM_CHUNK + 5, 3)


def _bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().numpy().tobytes()  # NaN equals NaN here, as the kernels promise


def _partials_of(tensors, norm_type, device, order):
    firsts, total = [], 0
    for t in tensors:
        firsts.append(total)
        total += math.ceil(t.numel() / _ops.NORM_CHUNK)
    dtype = _ops.norm_partials_dtype(torch.device(device))
    partials = torch.full((2, total), float("nan"), dtype=dtype, device=device)
    for i in order:
        _ops.norm_partials_(partials, [tensors[i]], firsts[i], norm_type)
    return _ops.norm_combine(partials, norm_type)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("special", [None, "nan", "inf", "huge"])
def test_partials_measured_one_by_one_combine_to_the_lists_norm(device, dtype, norm_type,
                                                                 special):  # fmt: skip
    gen = torch.Generator().manual_seed(len(str(special)) + int(norm_type if norm_type < 9 else 9))
    tensors = [torch.randn(n, generator=gen).to(device, dtype) for n in SIZES]
    if special is not None:
        tensors[5][_ops.NORM_CHUNK + 7] = {"nan": math.nan, "inf": math.inf, "huge": 6e4}[special]
    norm, flag = _ops.multi_tensor_norm(tensors, norm_type)
    backward = list(reversed(range(len(tensors))))  # hooks run in the reverse of the forward
    for order in (backward, [2, 5, 0, 6, 1, 4, 3]):
        got_norm, got_flag = _partials_of(tensors, norm_type, device, order)
        assert _bits(got_norm) == _bits(norm) and _bits(got_flag) == _bits(flag)
    assert flag.item() == (special in ("nan", "inf"))


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda x, s: _ops.norm_partials_(s.float(), [x], 0, 2.0), "partials must be Double"),
        (lambda x, s: _ops.norm_partials_(s, [x, x], 0, 2.0),
         "chunks 0 to 4 do not fit in partials for 2 chunks"),
        (lambda x, s: _ops.norm_partials_(s, [x], -1, 2.0), "chunks -1 to 1 do not fit"),
        (lambda x, s: _ops.norm_partials_(s, [x.int()], 0, 2.0),
         r"tensors\[0\] must be float32, bfloat16 or float16"),
        (lambda x, s: _ops.norm_combine(s[:, :1].t(), 2.0), "partials must be contiguous"),
        (lambda x, s: _ops.norm_combine(s, 0.0), "norm_type must be positive or inf, got 0"),
    ],
)  # fmt: skip
def test_bad_partials_are_one_line_errors(call, message):
    x = torch.randn(_ops.NORM_CHUNK + 1)
    slots = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=message) as error:
        call(x, slots)
    assert "\n" not in str(error.value).strip()


class _Mixed(torch.nn.Module):
    """fp32 and bf16 params (two buckets of slots), one gradient of several chunks."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Linear(20, 48)
        self.wide = torch.nn.Parameter(torch.randn(48, 1400) * 0.02)  # 67,200: two chunks
        self.body = torch.nn.Linear(1400, 48).bfloat16()
        self.head = torch.nn.Linear(48, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x)) @ self.wide
        h = self.body(h.bfloat16()).float()
        return self.head(torch.tanh(h))


@pytest.fixture(autouse=True)
def _hooks_on_host_params(monkeypatch):
    """Params on the host are measured at step() by default; here their hooks measure them
    as CUDA params' hooks do, so that the mechanism runs without a GPU."""
    monkeypatch.setattr(Overlap, "_measure_on_host", True)


def _run(device, overlapped, settings, change=None, steps=4, micro=1, scaler=False):
    torch.manual_seed(0)
    model = _Mixed().to(device)
    opt = fastopt.AdamW(model.parameters(), lr=1e-2, seed=3, offload=overlapped, **settings)
    handle = opt.overlap(model) if overlapped else None
    loss_scaler = fastopt.LossScaler(init_scale=2.0**8) if scaler else None
    gen = torch.Generator().manual_seed(1)
    measured, norms = [], []
    for step in range(steps):
        for m in range(micro):
            x = torch.randn(16, 20, generator=gen).to(device)
            loss = model(x).pow(2).mean()
            early = handle is not None and m < micro - 1
            with handle.no_sync() if early else contextlib.nullcontext():
                (loss_scaler.scale(loss) if scaler else loss).backward()
        if change is not None:
            change(model, step)
        if scaler:
            loss_scaler.step(opt)
            loss_scaler.update()
        else:
            opt.step()
        norms.append(_bits(opt.last_grad_norm) + _bits(opt.last_found_inf))
        if handle is not None:
            measured.append(handle._norms.measured_in_backward)
        opt.zero_grad()
    opt.synchronize()
    if handle is not None:
        handle.remove()
    return model, opt, norms, measured


def _assert_same(a, b):
    model_a, opt_a, norms_a, _ = a
    model_b, opt_b, norms_b, _ = b
    assert norms_a == norms_b
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(p.cpu(), q.cpu()), name
        for key, value in opt_a.state[p].items():
            assert torch.equal(value.cpu(), opt_b.state[q][key].cpu()), (name, key)


SETTINGS = {
    "clip": dict(max_grad_norm=0.05),
    "clip-int8-master": dict(max_grad_norm=0.05, master_weights=True, state_dtype="int8",
                             min_8bit_size=0),
}  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("setting", SETTINGS)
def test_the_overlapped_norm_comes_from_backward_and_equals_the_synchronous_one(device, setting):
    sync = _run(device, False, SETTINGS[setting])
    overlapped = _run(device, True, SETTINGS[setting])
    _assert_same(sync, overlapped)
    n = len(list(overlapped[0].parameters()))
    # The first step lays the slots out; from the second on every gradient's partials come
    # from its hook.
    assert overlapped[3] == [0, n, n, n]


@pytest.mark.parametrize("device", DEVICES)
def test_a_loss_scalers_skip_flag_comes_from_backward(device):
    def overflow(model, step):
        if step == 2:  # one step's gradient goes inf after its hook: measured again at step()
            model.body.weight.grad[0, 0] = math.inf

    sync = _run(device, False, {}, overflow, scaler=True)
    overlapped = _run(device, True, {}, overflow, scaler=True)
    _assert_same(sync, overlapped)
    n = len(list(overlapped[0].parameters()))
    assert overlapped[3] == [0, n, n - 1, n]
    assert [flags[-4:] != bytes(4) for flags in overlapped[2]] == [False, False, True, False]


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_changed_after_their_hook_are_measured_again(device):
    def halve(model, step):
        model.wide.grad.mul_(0.5)  # in place: its version counter tells
        if step == 3:
            model.head.bias.grad = None  # another set of gradients: laid out anew

    for micro in (1, 2):  # two micro-batches, the first under no_sync: measured after the last
        sync = _run(device, False, SETTINGS["clip"], halve, micro=micro)
        overlapped = _run(device, True, SETTINGS["clip"], halve, micro=micro)
        _assert_same(sync, overlapped)
        n = len(list(overlapped[0].parameters()))
        assert overlapped[3] == [0, n - 1, n - 1, 0]


@pytest.mark.parametrize("device", DEVICES)
def test_accumulated_gradients_are_measured_at_step(device):
    """A GradAccumulator's gradients are not the params' .grad: step() measures them."""

    def run(overlapped):
        torch.manual_seed(0)
        model = _Mixed().to(device)
        opt = fastopt.AdamW(model.parameters(), lr=1e-2, offload=overlapped, max_grad_norm=0.05)
        handle = opt.overlap(model) if overlapped else None
        acc = fastopt.GradAccumulator(opt)
        for _ in range(3):
            for _ in range(2):
                model(torch.randn(8, 20, device=device)).pow(2).mean().backward()
                acc.accumulate()
            opt.step()
        opt.synchronize()
        if handle is not None:
            assert handle._norms.measured_in_backward == 0
            handle.remove()
        return model, opt, [], []

    _assert_same(run(False), run(True))


def test_host_params_are_measured_at_step_by_default(monkeypatch):
    monkeypatch.setattr(Overlap, "_measure_on_host", False)
    sync = _run("cpu", False, SETTINGS["clip"])
    overlapped = _run("cpu", True, SETTINGS["clip"])
    _assert_same(sync, overlapped)
    assert overlapped[3] == [0, 0, 0, 0]
