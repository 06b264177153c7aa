"""GPU-only checks: CUDA-graph capture of a whole step, tensors past 2**31 elements, and the
CUDA and Triton backends being really there on a GPU machine. Skipped without a CUDA GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import replay_in_cuda_graph

import fastopt
from fastopt import reference
from fastopt.backends import availability
from fastopt.step_args import Hyper

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_backend_available_on_gpu(backend):
    ok, why = availability(backend, "cuda")
    assert ok, why


def _grads(step, shapes):
    gen = torch.Generator().manual_seed(step)
    grads = [torch.randn(s, generator=gen) for s in shapes]
    if step == 4:
        grads[1].view(-1)[-1] = float("inf")
    return [g.cuda() for g in grads]


_LEAN = dict(master_weights=True, state_dtype=torch.bfloat16, stochastic_rounding=True, seed=9)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize(
    "dtype,lean", [(torch.float32, {}), (torch.bfloat16, _LEAN)], ids=["fp32", "bf16-lean"]
)
def test_cuda_graph_captures_a_whole_step(backend, dtype, lean):
    """Norm, skip decision, clipped update and scale update, replayed from one graph, match
    the same steps run eagerly (bit for bit with the lean settings, whose noise keys the
    kernels derive from the step counts on the device)."""
    shapes = [(300, 17), (5,), (), (65537,)]
    torch.manual_seed(0)
    init = [torch.randn(s).to(dtype) for s in shapes]

    def make():
        ps = [torch.nn.Parameter(t.clone().cuda()) for t in init]
        opt = fastopt.AdamW(ps, lr=1e-2, backend=backend, max_grad_norm=1.0, **lean)
        scaler = fastopt.LossScaler(init_scale=2.0**8, growth_interval=2, backend=backend)
        return ps, opt, scaler

    one = torch.ones((), device="cuda")
    ps_e, opt_e, scaler_e = make()
    for step in range(8):
        s = scaler_e.scale(one)
        for p, g in zip(ps_e, _grads(step, shapes)):
            p.grad = (g * s).to(dtype)
        scaler_e.step(opt_e)
        scaler_e.update()

    ps_g, opt_g, scaler_g = make()
    static = [torch.zeros(s, device="cuda", dtype=dtype) for s in shapes]
    for p, g in zip(ps_g, static):
        p.grad = g
    scaler_g.scale(one)  # creates the scale tensor, which the graph reads and updates in place

    def load(step):  # as a scaled backward would, at the scale of the moment
        for buf, g in zip(static, _grads(step, shapes)):
            buf.copy_(g * scaler_g._scale)

    replay_in_cuda_graph(scaler_g, opt_g, load)
    for a, b in zip(ps_g, ps_e):
        if lean:
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))
            assert torch.equal(opt_g.master_param(a), opt_e.master_param(b))
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(opt_g.state[ps_g[0]]["step"]) == float(opt_e.state[ps_e[0]]["step"]) == 7.0
    assert scaler_g.get_scale() == scaler_e.get_scale()


@pytest.mark.slow
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_tensor_past_two_to_the_31_elements_updates_everywhere(backend):
    n = 2**31 + 1029
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * n * 4 + (2 << 30):
        pytest.skip(f"needs {5 * n * 4 / 2**30:.0f} GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n, device="cuda", generator=gen))
    p.grad = torch.randn(n, device="cuda", generator=gen)
    # The elements around 2**31 and the very end, where 32-bit offsets would wrap.
    windows = [slice(0, 1024), slice(2**31 - 512, 2**31 + 512), slice(n - 1024, n)]
    before = [(p.detach()[w].clone(), p.grad[w].clone()) for w in windows]
    opt = fastopt.AdamW([p], lr=1e-2, backend=backend)
    opt.step()
    for w, (p0, g0) in zip(windows, before):
        ref_p, m, v = [p0.clone()], [torch.zeros_like(p0)], [torch.zeros_like(p0)]
        hyper = Hyper(lr=1e-2, beta1=0.9, beta2=0.999, weight_decay=1e-2, eps=1e-8)
        reference.adamw_step(ref_p, [g0], m, v, [], [torch.tensor(0.0)], hyper)
        torch.testing.assert_close(p.detach()[w], ref_p[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[p]["exp_avg"][w], m[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("blocks_per_sm", [1, 3, 1024])
def test_grid_size_changes_no_bits(blocks_per_sm):
    """Blocks walk chunks with a grid-stride loop: any grid (the sweep in bench/sweep_grid.py
    tunes it) gives the bits of the default persistent grid, for the update and the norm."""
    from fastopt import _C

    shapes = [(1 << 16, 70), (1 << 16,), (65537,), (3,), (5000, 13)]  # full, +1, tiny chunks
    gen = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    grads = [torch.randn(s, device="cuda", generator=gen) for s in shapes]

    def run(setting):
        previous = _C._set_grid_blocks_per_sm(setting)
        try:
            ps = [torch.nn.Parameter(t.clone()) for t in init]
            for p, g in zip(ps, grads):
                p.grad = g
            opt = fastopt.AdamW(ps, lr=1e-2, backend="cuda", max_grad_norm=1.0)
            for _ in range(3):
                opt.step()
            return [p.detach().clone() for p in ps], opt.last_grad_norm.clone()
        finally:
            _C._set_grid_blocks_per_sm(previous)

    base_ps, base_norm = run(0)
    ps, norm = run(blocks_per_sm)
    assert torch.equal(norm, base_norm)
    for a, b in zip(ps, base_ps):
        assert torch.equal(a, b)
