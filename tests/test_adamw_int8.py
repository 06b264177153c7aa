"""fastopt.AdamW with 8-bit moments (``state_dtype="int8"``): the state's layout and size,
argument checks, state dicts both ways with torch, bit-exact resume, skips, accumulation and
loss scaling, and QuantizedMoment.

The kernels' lockstep with the reference over every variant is in tests/test_lockstep_*.py;
test_quant.py holds the format's own error bounds; test_lean_accuracy.py the training
accuracy.
"""

from __future__ import annotations

import copy
import io
import math
import zlib

import pytest
import torch
from lockstep import assert_same_state, optimizer_snapshot

import fastopt
from fastopt import quant
from fastopt.quant import BLOCK, QuantizedMoment


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(96, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    ).to(dtype)


def _train(model, opt, steps, seed=1, scaler=None, acc=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 96, generator=gen).to(next(model.parameters()).dtype)
        micro = 2 if acc is not None else 1
        for half in x.chunk(micro):
            loss = model(half).float().square().mean()
            (scaler.scale(loss) if scaler else loss).backward()
            if acc is not None:
                acc.accumulate()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()


def test_state_layout_threshold_and_nbytes():
    """Params of min_8bit_size elements or more hold uint8 codes of their shape and (2, blocks)
    int8 scales; smaller ones fp32 moments. state_nbytes counts codes and scales."""
    params = [torch.nn.Parameter(torch.randn(n)) for n in (99, 100, 101)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = fastopt.AdamW(params, state_dtype="int8", min_8bit_size=100, amsgrad=True)
    opt.step()
    small, at, above = (opt.state[p] for p in params)
    assert small["exp_avg"].dtype == torch.float32 and "scales" not in small
    for entry, n in ((at, 100), (above, 101)):
        assert entry["exp_avg"].dtype == entry["exp_avg_sq"].dtype == torch.uint8
        assert entry["max_exp_avg_sq"].shape == (n,)
        assert entry["scales"].shape == (3, -(-n // BLOCK)) and entry["scales"].dtype == torch.int8
    expected = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values())
    assert opt.state_nbytes() == expected
    assert opt.state_nbytes() == 99 * 4 * 3 + 4 * 3 + (100 + 101) * 3 + 3 * (4 + 4)


@pytest.mark.parametrize(
    "kwargs",
    [dict(state_dtype="int4"), dict(state_dtype=torch.int8), dict(min_8bit_size=-1),
     dict(min_8bit_size=True), dict(min_8bit_size=2.5)],
    ids=["int4", "torch-int8", "negative", "bool", "float"],
)  # fmt: skip
def test_bad_settings_raise_one_line_errors(kwargs):
    with pytest.raises(ValueError) as info:
        fastopt.AdamW([torch.nn.Parameter(torch.zeros(3))], **kwargs)
    assert "\n" not in str(info.value)
    assert next(iter(kwargs)) in str(info.value)


def test_complex_params_are_refused_in_one_line():
    p = torch.nn.Parameter(torch.zeros(8000, dtype=torch.complex64))
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="float32, bfloat16 and float16 params"):
        fastopt.AdamW([p], state_dtype="int8").step()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_training_reduces_the_loss_and_backends_agree(backend):
    models = {b: _model() for b in ("reference", backend)}
    snapshots = []
    for b, model in models.items():
        opt = fastopt.AdamW(model.parameters(), lr=1e-2, state_dtype="int8", backend=b,
                            min_8bit_size=0, seed=3)  # fmt: skip
        _train(model, opt, 8)
        snapshots.append(optimizer_snapshot(opt, list(model.parameters())))
    assert_same_state(snapshots[-1], snapshots[0], backend)


def _saved(opt) -> dict:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_loads_into_torch_adamw_as_dequantized_moments():
    """torch.optim.AdamW takes the moments as fp32 tensors of the param's shape, equal to the
    dequantized codes, and its own steps then update them (they are plain tensors)."""
    model = _model()
    opt = fastopt.AdamW(model.parameters(), lr=1e-2, state_dtype="int8", min_8bit_size=0)
    _train(model, opt, 3)
    packed = opt.state_dict()
    # Beside the moments, the block scales block-major, for torch.distributed.checkpoint;
    # torch.optim.AdamW keeps that entry as it keeps any other and never reads it.
    for p, entry in zip(model.parameters(), packed["state"].values()):
        assert torch.equal(entry["scales"], opt.state[p]["scales"].t())
    assert all("scales" not in entry for entry in opt.portable_state_dict()["state"].values())
    twin = _model()
    twin.load_state_dict(model.state_dict())
    torch_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    torch_opt.load_state_dict(_saved(opt))
    for p, q in zip(model.parameters(), twin.parameters()):
        entry = torch_opt.state[q]
        for key, kind in (("exp_avg", quant.dequantize_m), ("exp_avg_sq", quant.dequantize_v)):
            row = 0 if key == "exp_avg" else 1
            assert type(entry[key]) is torch.Tensor and entry[key].shape == p.shape
            assert torch.equal(entry[key], kind(opt.state[p][key], opt.state[p]["scales"][row]))
    before = torch_opt.state[next(twin.parameters())]["exp_avg"].clone()
    _train(twin, torch_opt, 1)
    assert not torch.equal(torch_opt.state[next(twin.parameters())]["exp_avg"], before)


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True)])
def test_resume_from_a_saved_state_dict_is_bit_exact(dtype, master):
    """Codes and scales come back exactly (through torch.save and weights_only loading), so a
    resumed run equals the uninterrupted one bit for bit."""
    kw = dict(lr=1e-2, state_dtype="int8", min_8bit_size=0, master_weights=master, seed=11)
    model = _model(dtype=dtype)
    opt = fastopt.AdamW(model.parameters(), **kw)
    _train(model, opt, 3)
    saved, weights = _saved(opt), copy.deepcopy(model.state_dict())
    _train(model, opt, 3, seed=2)
    resumed = _model(dtype=dtype)
    resumed.load_state_dict(weights)
    opt2 = fastopt.AdamW(resumed.parameters(), **kw)
    opt2.load_state_dict(saved)
    _train(resumed, opt2, 3, seed=2)
    assert_same_state(optimizer_snapshot(opt2, list(resumed.parameters())),
                     optimizer_snapshot(opt, list(model.parameters())), "resumed")  # fmt: skip


def test_torch_state_dict_loads_into_int8_quantized_on_load():
    model = _model()
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    _train(model, torch_opt, 3)
    opt = fastopt.AdamW(model.parameters(), lr=1e-2, amsgrad=True, state_dtype="int8",
                        min_8bit_size=0)  # fmt: skip
    opt.load_state_dict(torch_opt.state_dict())
    for p in model.parameters():
        ours, theirs = opt.state[p], torch_opt.state[p]
        assert ours["exp_avg"].dtype == torch.uint8
        codes, scales = quant.quantize_m(theirs["exp_avg"])
        assert torch.equal(ours["exp_avg"], codes) and torch.equal(ours["scales"][0], scales)
        codes, scales = quant.quantize_v(theirs["max_exp_avg_sq"].sqrt())
        assert torch.equal(ours["max_exp_avg_sq"], codes)
        assert torch.equal(ours["scales"][2], scales)
    _train(model, opt, 2)  # and it steps on


def test_a_saved_int8_optimizer_is_about_a_quarter_of_fp32():
    params = [torch.nn.Parameter(torch.randn(256, 256)) for _ in range(4)]
    sizes = {}
    for name, kw in (("fp32", {}), ("int8", dict(state_dtype="int8"))):
        opt = fastopt.AdamW(params, **kw)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        sizes[name] = len(buf.getvalue())
    # codes 2 bytes and scales 2/32 per param against 8 bytes of fp32 moments
    assert sizes["int8"] / sizes["fp32"] == pytest.approx((2 + 2 / 32) / 8, rel=0.02)


def test_a_skipped_step_leaves_codes_and_scales_unchanged():
    model = _model()
    opt = fastopt.AdamW(model.parameters(), state_dtype="int8", min_8bit_size=0,
                        max_grad_norm=1.0)  # fmt: skip
    _train(model, opt, 2)
    params = list(model.parameters())
    before = [(name, t.clone()) for name, t in optimizer_snapshot(opt, params)]
    for p in params:
        p.grad = torch.ones_like(p)
    params[0].grad.view(-1)[-1] = math.inf
    opt.step()
    assert opt.last_found_inf.item() != 0
    assert_same_state(optimizer_snapshot(opt, params), before, "skipped step")


def test_accumulation_and_loss_scaling_match_the_reference_backend():
    """GradAccumulator's fp32 sums and LossScaler's unscale and skip reach the kernel as they do
    for 16-bit states: the CPU kernel equals the reference backend bit for bit."""
    finals = []
    for backend in ("reference", "cpu"):
        model = _model(dtype=torch.bfloat16)
        opt = fastopt.AdamW(model.parameters(), lr=1e-2, state_dtype="int8", backend=backend,
                            master_weights=True, min_8bit_size=0, seed=5,
                            max_grad_norm=1.0)  # fmt: skip
        acc = fastopt.GradAccumulator(opt, backend=backend)
        scaler = fastopt.LossScaler(init_scale=2.0**20, growth_interval=2, backend=backend)
        _train(model, opt, 5, scaler=scaler, acc=acc)
        finals.append(optimizer_snapshot(opt, list(model.parameters())))
    assert_same_state(finals[1], finals[0], "cpu")


def test_quantized_moment_behaves_as_its_fp32_values():
    gen = torch.Generator().manual_seed(zlib.crc32(b"qm"))
    x = torch.randn(70, generator=gen)
    q = QuantizedMoment(*quant.quantize_m(x), "m")
    plain = q.dequantize()
    assert q.shape == x.shape and q.dtype == torch.float32
    assert type(q + 1) is torch.Tensor and torch.equal(q + 1, plain + 1)
    assert type(q.to(torch.float32)) is torch.Tensor  # a no-op .to still dequantizes
    assert torch.equal(copy.deepcopy(q).codes, q.codes)
    with pytest.raises(ValueError, match="scales"):
        QuantizedMoment(q.codes, q.scales[:1], "m")
