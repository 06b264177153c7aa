"""8-bit moments on the CUDA kernel: every step bit for bit the reference's (fastopt.reference
on the CPU), codes, block scales, params and masters, over sizes that put a block's 32
elements, the kernel's 16-element vectors and its 64 Ki-element chunks in every relation to a
tensor's end; a skipped step; the 2**32 fold of the noise's index; a CUDA graph. Skipped
without a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

import fastopt
from fastopt.quant import BLOCK

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# One block, a block +-1, a vector (16) and a lane pair (32) +-1, primes, a tile (4096) +-1, a
# chunk (65536) +-1, and a chunk plus a partial block.
HOSTILE = [1, 15, 16, 17, 31, 32, 33, 47, 97, 1021, 4095, 4096, 4097, 65535, 65536, 65537,
           2 * 65536 + 33]  # fmt: skip
# More tensors than one launch's table holds (353 to 427 of them with 8-bit moments).
MANY = [1 + (7 * k) % 97 for k in range(600)]

_P = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _variants():
    """Every dispatch variant with 8-bit moments, as (id, settings): params, master, stochastic
    rounding (allowed only where the param's store is bf16), fp32 grads."""
    out = []
    for name, dtype in _P.items():
        for master in [False] if dtype == torch.float32 else [False, True]:
            for sr in [False, True] if dtype == torch.bfloat16 and not master else [False]:
                for fp32_grads in [False] if dtype == torch.float32 else [False, True]:
                    ident = f"{name}{'-master' if master else ''}{'-sr' if sr else ''}"
                    ident += "-fp32grads" if fp32_grads else ""
                    out.append(pytest.param(dtype, master, sr, fp32_grads, id=ident))
    return out


def _state_bits(opt, params):
    """Every state tensor of every param (codes, scales, masters, step), as integer bits on
    the CPU, and the params' bits."""
    out = []
    for p in params:
        out.append(_bits(p.detach()))
        for key in sorted(opt.state[p]):
            value = opt.state[p][key]
            if isinstance(value, torch.Tensor):
                out.append((key, _bits(value)))
    return out


def _bits(t):
    t = t.detach().contiguous().cpu()
    if t.is_floating_point():
        return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def _assert_same(got, want, where):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        if isinstance(a, tuple):
            assert a[0] == b[0]
            a, b = a[1], b[1]
        assert torch.equal(a, b), where


def _lockstep(sizes, dtype, master, sr, fp32_grads, amsgrad, maximize, steps=4, clip=None,
              bad_step=None, offset=0):  # fmt: skip
    """Steps fastopt.AdamW with 8-bit moments on the reference (CPU) and the CUDA kernel
    (GPU) side by side, comparing every bit after each step. offset: elements the params
    start into a larger buffer (so the kernel takes its element-by-element path)."""
    gen = torch.Generator().manual_seed(len(sizes) + sum(sizes))
    init = [torch.randn(n, generator=gen) for n in sizes]
    runs = []
    for backend, device in (("reference", "cpu"), ("cuda", "cuda")):
        ps = []
        for x in init:
            buf = torch.zeros(x.numel() + offset, device=device, dtype=dtype)
            buf[offset:] = x.to(dtype)
            ps.append(torch.nn.Parameter(buf[offset:]))
        opt = fastopt.AdamW(ps, lr=3e-2, betas=(0.8, 0.95), weight_decay=0.05, amsgrad=amsgrad,
                            maximize=maximize, backend=backend, master_weights=master,
                            state_dtype="int8", min_8bit_size=0, stochastic_rounding=sr,
                            seed=1234, max_grad_norm=clip)  # fmt: skip
        acc = fastopt.GradAccumulator(opt, backend=backend) if fp32_grads else None
        runs.append((ps, opt, acc, device))
    gen = torch.Generator().manual_seed(99)
    for step in range(steps):
        # Gradients whose magnitude changes by decades between steps, so block scales move.
        grads = [torch.randn(n, generator=gen) * 10.0 ** (step % 3 - 1) for n in sizes]
        if step == bad_step:
            grads[-1][-1] = float("inf")
        before = None
        for ps, opt, acc, device in runs:
            if step == bad_step and device == "cuda":
                before = _state_bits(opt, ps)
            for p, g in zip(ps, grads):
                p.grad = g.to(device=device, dtype=dtype)
            if acc is not None:
                acc.accumulate()
            opt.step()
        _assert_same(_state_bits(runs[1][1], runs[1][0]), _state_bits(runs[0][1], runs[0][0]),
                     f"step {step}")  # fmt: skip
        if before is not None:  # a skipped step: not a bit moved, step counts restored
            _assert_same(_state_bits(runs[1][1], runs[1][0]), before, f"skipped step {step}")


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("dtype,master,sr,fp32_grads", _variants())
def test_every_variant_matches_the_reference_bit_for_bit(dtype, master, sr, fp32_grads, amsgrad):
    _lockstep(HOSTILE, dtype, master, sr, fp32_grads, amsgrad, maximize=False)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_maximize_and_clipping_match_the_reference(amsgrad):
    _lockstep(HOSTILE, torch.float32, False, False, False, amsgrad, maximize=True, clip=1.0)


@pytest.mark.parametrize("offset", [1, 3], ids=["offset1", "offset3"])
def test_unaligned_params_match_the_reference(offset):
    """Params 4 or 12 bytes into their buffer: the kernel's element-by-element path, the same
    element-to-lane map and so the same block maxima."""
    _lockstep(HOSTILE, torch.float32, False, False, False, True, maximize=False, offset=offset)
    _lockstep(HOSTILE, torch.bfloat16, False, True, False, False, maximize=False, offset=offset)


def test_more_tensors_than_one_launch_holds():
    _lockstep(MANY, torch.bfloat16, True, False, True, True, maximize=False, steps=2)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_a_skipped_step_moves_no_code_and_no_scale(amsgrad):
    """An inf in the last element of the last tensor: found_inf (from the clipping norm) skips
    the step on the device, and codes, scales, params and masters keep every bit."""
    _lockstep(HOSTILE, torch.bfloat16, True, False, False, amsgrad, maximize=False, clip=1.0,
              bad_step=2)  # fmt: skip


def _op_step(backend, device, sizes, firsts, amsgrad):
    """Two steps of fp32 params with 8-bit moments straight through a backend's op, the
    tensors' elements counted from `firsts` (shards of a larger param): all bits."""
    gen = torch.Generator().manual_seed(5)
    ps = [torch.randn(n, generator=gen).to(device) for n in sizes]
    moments = 3 if amsgrad else 2
    ms = [torch.zeros(n, dtype=torch.uint8, device=device) for n in sizes]
    vs = [torch.zeros(n, dtype=torch.uint8, device=device) for n in sizes]
    vmaxs = [torch.zeros(n, dtype=torch.uint8, device=device) for n in sizes] if amsgrad else []
    scales = [torch.zeros(moments, -(-n // BLOCK), dtype=torch.int8, device=device)
              for n in sizes]  # fmt: skip
    counts = [torch.zeros((), device=device) for _ in sizes]
    ops = fastopt.backends.backend_ops(backend)
    for _ in range(2):
        grads = [torch.randn(n, generator=gen).to(device) for n in sizes]
        for c in counts:
            c.add_(1)
        ops.adamw_step(ps, grads, ms, vs, vmaxs, counts, lr=1e-2, beta1=0.9, beta2=0.99,
                       weight_decay=0.01, eps=1e-8, amsgrad=amsgrad, maximize=False,
                       stochastic_rounding=False, seed=77, positions=list(range(len(sizes))),
                       first_indices=list(firsts), scales=scales)  # fmt: skip
    return [_bits(t) for t in ps + ms + vs + vmaxs + scales]


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
def test_noise_index_folds_at_two_to_the_32_as_the_reference(amsgrad):
    """Shards starting just below a multiple of 2**32 elements (the noise's high index word
    changes inside a chunk, inside a vector and inside a block) and above one; the codes
    round stochastically even without stochastic_rounding, so the noise is drawn anyway."""
    firsts = [2**32 - 5, 2**32 - 70_000, 3 * 2**32 + 7, 2**32 - 1]
    sizes = [1_000, 140_001, 33, 2]
    got = _op_step("cuda", "cuda", sizes, firsts, amsgrad)
    want = _op_step("reference", "cpu", sizes, firsts, amsgrad)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    other = _op_step("cuda", "cuda", sizes, [0] * len(sizes), amsgrad)
    assert not all(torch.equal(a, b) for a, b in zip(got, other))


def test_cuda_graph_captures_an_int8_step():
    """Norm, skip decision, clipped update with 8-bit moments and the scale update, replayed
    from one graph: the bits of the same steps run eagerly (the noise keys come from the step
    counts on the device)."""
    shapes = [(300, 17), (5,), (65537,), (33,)]
    torch.manual_seed(0)
    init = [torch.randn(s).bfloat16() for s in shapes]
    settings = dict(master_weights=True, state_dtype="int8", min_8bit_size=0, seed=9,
                    max_grad_norm=1.0)  # fmt: skip

    def make():
        ps = [torch.nn.Parameter(t.clone().cuda()) for t in init]
        opt = fastopt.AdamW(ps, lr=1e-2, backend="cuda", **settings)
        scaler = fastopt.LossScaler(init_scale=2.0**8, growth_interval=2, backend="cuda")
        return ps, opt, scaler

    def grads(step):
        gen = torch.Generator().manual_seed(step)
        out = [torch.randn(s, generator=gen) for s in shapes]
        if step == 4:
            out[1].view(-1)[-1] = float("inf")
        return [g.cuda() for g in out]

    one = torch.ones((), device="cuda")
    ps_e, opt_e, scaler_e = make()
    for step in range(8):
        s = scaler_e.scale(one)
        for p, g in zip(ps_e, grads(step)):
            p.grad = (g * s).bfloat16()
        scaler_e.step(opt_e)
        scaler_e.update()

    ps_g, opt_g, scaler_g = make()
    static = [torch.zeros(s, device="cuda", dtype=torch.bfloat16) for s in shapes]
    for p, g in zip(ps_g, static):
        p.grad = g
    scaler_g.scale(one)

    def load(step):
        for buf, g in zip(static, grads(step)):
            buf.copy_(g * scaler_g._scale)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # eager warm-up: state, tables
        for step in range(2):
            load(step)
            scaler_g.step(opt_g)
            scaler_g.update()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        scaler_g.step(opt_g)
        scaler_g.update()
    for step in range(2, 8):
        load(step)
        graph.replay()
    torch.cuda.synchronize()
    _assert_same(_state_bits(opt_g, ps_g), _state_bits(opt_e, ps_e), "graph vs eager")
    assert opt_g.state[ps_g[0]]["exp_avg"].dtype == torch.uint8
    assert scaler_g.get_scale() == scaler_e.get_scale()
