"""Global norm, clip_grad_norm_, accumulation and the loss-scale update on every backend."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BACKENDS, randn

import fastopt
from fastopt import reference
from fastopt.backends import backend_ops

NORM_TYPES = [2.0, 1.0, math.inf, 3.0, 0.5]
SHAPES = [(), (0,), (1000,), (65537,), (13, 7)]


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])  # fmt: skip
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_multi_tensor_norm_matches_reference(backend, device, dtype, norm_type):
    gen = torch.Generator().manual_seed(0)
    tensors = [randn(s, dtype=dtype, device=device, gen=gen) for s in SHAPES]
    norm, found_inf = backend_ops(backend).multi_tensor_norm(tensors, norm_type)
    flat = torch.cat([t.cpu().float().flatten() for t in tensors])
    exact = float(torch.linalg.vector_norm(flat.double(), norm_type))
    torch_fp32 = float(torch.linalg.vector_norm(flat, norm_type))
    assert norm.dtype == torch.float32 and norm.shape == ()
    # At most twice torch's own fp32 error against float64, plus 4 ulps in case torch's
    # summation happens to land exactly.
    err, err_torch = abs(float(norm) - exact) / exact, abs(torch_fp32 - exact) / exact
    assert err <= 2 * err_torch + 4 * torch.finfo(torch.float32).eps, (err, err_torch)
    assert float(found_inf) == 0.0


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_norm_flags_nonfinite_anywhere(backend, device, bad, where):
    gen = torch.Generator().manual_seed(1)
    tensors = [randn(s, device=device, gen=gen) for s in [(5,), (65537,)]]
    target = tensors[0 if where == "first" else -1].view(-1)
    target[0 if where == "first" else -1] = bad
    for norm_type in (2.0, math.inf):
        norm, found_inf = backend_ops(backend).multi_tensor_norm(tensors, norm_type)
        assert float(found_inf) == 1.0
        assert not math.isfinite(float(norm))
        if math.isnan(bad):
            assert math.isnan(float(norm))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_norm_flags_huge_finite_values_as_finite(backend, device):
    """3e38 squared overflows fp32, but the gradient itself is finite: found_inf stays 0."""
    t = torch.full((4,), 3e38, device=device)
    _, found_inf = backend_ops(backend).multi_tensor_norm([t], 2.0)
    assert float(found_inf) == 0.0


def _clip_data(kind: str) -> list[torch.Tensor]:
    if kind == "real":
        gen = torch.Generator().manual_seed(2)
        return [torch.randn(s, generator=gen) * 3 for s in [(40,), (7, 3), ()]]
    # Complex gradients: torch's p-norms are over the magnitudes |z|, beside a real one.
    gen = torch.Generator().manual_seed(3)
    data = [torch.randn(s, generator=gen, dtype=torch.complex64) for s in [(12,), (3, 4)]]
    return data + [torch.randn(5, generator=gen)]


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0, 0.0, -math.inf],
                         ids=["2", "1", "inf", "3", "0", "-inf"])  # fmt: skip
@pytest.mark.parametrize("kind", ["real", "complex"])
def test_clip_grad_norm_matches_torch(kind, norm_type):
    data = _clip_data(kind)
    ps_t = [torch.nn.Parameter(torch.zeros_like(d)) for d in data]
    ps_o = [torch.nn.Parameter(torch.zeros_like(d)) for d in data]
    for p_t, p_o, d in zip(ps_t, ps_o, data):
        p_t.grad, p_o.grad = d.clone(), d.clone()
    n_t = torch.nn.utils.clip_grad_norm_(ps_t, 1.5, norm_type)
    n_o = fastopt.clip_grad_norm_(ps_o, 1.5, norm_type)
    torch.testing.assert_close(n_o, n_t, rtol=1e-6, atol=0)
    for p_t, p_o in zip(ps_t, ps_o):
        torch.testing.assert_close(p_o.grad, p_t.grad, rtol=1e-6, atol=1e-7)


def test_clip_grad_norm_errors_like_torch():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, math.inf, 0.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        fastopt.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    assert float(fastopt.clip_grad_norm_([], 1.0)) == 0.0
    q = torch.nn.Parameter(torch.ones(2))
    q.grad = torch.full((2,), 3.0)
    total = fastopt.clip_grad_norm_(q, 1.0)  # a single tensor, as torch accepts
    assert float(total) == pytest.approx(math.sqrt(18))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])  # fmt: skip
@pytest.mark.parametrize("backend,device", BACKENDS)
def test_accumulate_matches_reference(backend, device, dtype):
    gen = torch.Generator().manual_seed(3)
    shapes = [(), (0,), (1031,), (65537,)]
    grads = [[randn(s, dtype=dtype, device=device, gen=gen) for s in shapes] for _ in range(3)]
    ours = [torch.full(s, 7.0, device=device) for s in shapes]  # overwritten, never read
    ref = [torch.empty(s, device=device) for s in shapes]
    ops = backend_ops(backend)
    for i, (alpha, g) in enumerate(zip([1.0, 0.5, 2.0], grads)):
        ops.accumulate_(ours, g, alpha, overwrite=i == 0)
        reference.accumulate_(ref, g, alpha, overwrite=i == 0)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same fp32 operations, same order


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_update_scale_matches_torch(backend, device):
    ops = backend_ops(backend)
    scale = torch.full((), 2.0**120, device=device)
    tracker = torch.zeros((), dtype=torch.int32, device=device)
    t_scale, t_tracker = scale.clone(), tracker.clone()
    pattern = [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    for bad in pattern * 3:  # grows to the fp32 limit and stops there, backs off on infs
        found = torch.full((), float(bad), device=device)
        ops.update_scale_(scale, tracker, found, 2.0**4, 0.5, 3)
        torch._amp_update_scale_(t_scale, t_tracker, found, 2.0**4, 0.5, 3)
        assert float(scale) == float(t_scale) and int(tracker) == int(t_tracker)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_accumulated_micro_batches_equal_one_large_batch(backend, device):
    """N micro-batches through GradAccumulator give the large batch's update (fp32)."""
    torch.manual_seed(0)
    big = torch.nn.Linear(8, 4).to(device)
    small = torch.nn.Linear(8, 4).to(device)
    small.load_state_dict(big.state_dict())
    x, y = torch.randn(12, 8, device=device), torch.randn(12, 4, device=device)
    sizes = [5, 4, 3]  # uneven micro-batches: weights make the mean over samples exact

    opt_big = torch.optim.AdamW(big.parameters(), foreach=False)
    torch.nn.functional.mse_loss(big(x), y).backward()
    opt_big.step()

    opt = fastopt.AdamW(small.parameters(), backend=backend)
    acc = fastopt.GradAccumulator(opt, backend=backend)
    for xb, yb in zip(x.split(sizes), y.split(sizes)):
        torch.nn.functional.mse_loss(small(xb), yb).backward()
        acc.accumulate(weight=len(xb))
        assert all(p.grad is None for p in small.parameters())
    opt.step()
    assert not acc.pending
    for a, b in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_complex_params_accumulate_both_parts(backend, device):
    """Accumulated complex gradients, averaged, give torch's step on their mean."""
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(5, 3, generator=gen, dtype=torch.complex64).to(device)
    grads = [torch.randn(5, 3, generator=gen, dtype=torch.complex64).to(device) for _ in range(3)]
    ours, theirs = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt = fastopt.AdamW([ours], lr=1e-2, backend=backend)
    acc = fastopt.GradAccumulator(opt, backend=backend)
    for g in grads:
        ours.grad = g.clone()
        acc.accumulate()
    opt.step()
    theirs.grad = sum(grads) / len(grads)
    torch.optim.AdamW([theirs], lr=1e-2, foreach=False).step()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_accumulator_normalizer_for_summed_losses():
    """Losses summed over tokens, normalised by the token count at the step."""
    torch.manual_seed(1)
    big, small = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    small.load_state_dict(big.state_dict())
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    opt_big = torch.optim.AdamW(big.parameters(), foreach=False)
    (torch.nn.functional.mse_loss(big(x), y, reduction="sum") / y.numel()).backward()
    opt_big.step()
    opt = fastopt.AdamW(small.parameters())
    acc = fastopt.GradAccumulator(opt)
    for xb, yb in zip(x.split(4), y.split(4)):
        torch.nn.functional.mse_loss(small(xb), yb, reduction="sum").backward()
        acc.accumulate()
    acc.set_normalizer(y.numel())
    opt.step()
    for a, b in zip(small.parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_model_accumulates_in_fp32():
    torch.manual_seed(2)
    model = torch.nn.Linear(64, 64).to(torch.bfloat16)
    opt = fastopt.AdamW(model.parameters(), lr=1e-2)
    acc = fastopt.GradAccumulator(opt)
    grads = []
    for _ in range(8):
        model(torch.randn(4, 64, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        grads.append([p.grad.double() for p in model.parameters()])
        acc.accumulate()
    buffers = acc.gradients()
    for i, p in enumerate(model.parameters()):
        exact = sum(g[i] for g in grads)
        assert buffers[p].dtype == torch.float32
        torch.testing.assert_close(buffers[p].double(), exact, rtol=1e-6, atol=1e-6)


def test_accumulator_misuse_is_reported():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="fastopt optimizer"):
        fastopt.GradAccumulator(torch.optim.SGD([p], lr=0.1))
    opt = fastopt.AdamW([p])
    acc = fastopt.GradAccumulator(opt)
    p.grad = torch.ones(2)
    acc.accumulate()
    p.grad = torch.ones(2)  # a backward without accumulate(): its gradient would be lost
    with pytest.raises(RuntimeError, match="accumulate"):
        opt.step()
    with pytest.raises(ValueError, match="weight"):
        acc.accumulate(weight=0)


def test_torch_grad_scaler_with_accumulator_says_to_use_loss_scaler():
    """GradScaler looks for gradients in .grad, where a GradAccumulator leaves none."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = fastopt.AdamW([p])
    acc = fastopt.GradAccumulator(opt)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(2):
        scaler.scale((p * 2).sum()).backward()
        acc.accumulate()
    with pytest.raises(RuntimeError, match="use fastopt.LossScaler"):
        scaler.step(opt)
    assert torch.equal(p.detach(), torch.ones(3))


def test_zero_grad_discards_accumulated_gradients():
    """As torch's zero_grad discards gradients summed in .grad."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = fastopt.AdamW([p], max_grad_norm=1e9)
    acc = fastopt.GradAccumulator(opt)
    p.grad = torch.full((3,), 1e6)  # a bad micro-batch, thrown away
    acc.accumulate()
    opt.zero_grad()
    assert not acc.pending
    p.grad = torch.ones(3)
    acc.accumulate()
    opt.step()
    torch.testing.assert_close(opt.last_grad_norm, torch.tensor(3.0).sqrt())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_accumulate_params_of_several_dtypes_in_one_call(backend, device):
    # fp32 and bf16 params under one optimizer: their gradients go to the kernels in separate
    # launches (the Triton kernel takes one gradient dtype per launch).
    a = torch.nn.Parameter(torch.ones(3, device=device))
    b = torch.nn.Parameter(torch.ones(5, device=device, dtype=torch.bfloat16))
    opt = fastopt.AdamW([a, b], backend=backend)
    acc = fastopt.GradAccumulator(opt, backend=backend)
    for weight in (1.0, 3.0):
        a.grad = torch.full((3,), 2.0, device=device)
        b.grad = torch.full((5,), 0.5, device=device, dtype=torch.bfloat16)
        acc.accumulate(weight=weight)
    grads = acc.gradients()
    torch.testing.assert_close(grads[a], torch.full((3,), 8.0, device=device))
    torch.testing.assert_close(grads[b], torch.full((5,), 2.0, device=device))
