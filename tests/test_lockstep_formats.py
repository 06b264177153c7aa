"""Every dispatch variant of every state format, bit for bit against fastopt.reference
(tests/lockstep.py): 8-bit moments (uint8 codes, int8 block scales) on the C++ CPU kernel,
the Triton kernel (compiled on a GPU, else under the interpreter on CPU tensors) and, through
fastopt.AdamW, the CUDA kernel.

The interpreter runs each program in Python (a few tenths of a second per small tensor), so the
Triton cases use small shapes; the CPU and CUDA cases run the hostile sizes. test_quant.py
holds the format's own error bounds; test_lean_accuracy.py the training accuracy.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from helpers import TRITON_DEVICE, backend_cases, backend_params, replay_in_cuda_graph
from lockstep import (
    CUDA_SIZES,
    INT8_VARIANTS,
    assert_same_state,
    int8_optimizer_lockstep,
    op_lockstep,
    optimizer_lockstep,  # fmt: skip
    optimizer_snapshot,
)

import fastopt
from fastopt import quant

# A block's awkward sizes, the small-tensor threshold's neighbours, a chunk boundary (64 Ki),
# and many small tensors in one call.
CPU_SIZES = [(n,) for n in [1, 31, 32, 33, 97, 4095, 4096, 4097, 65_536 + 33] + [5] * 40]
# Every awkward size of a block: 0-dim, empty, 1, block - 1, block, block + 1, primes, 2-d.
SMALL = [(), (0,), (1,), (31,), (32,), (33,), (97,), (3, 11)]


@pytest.fixture
def gen(request) -> torch.Generator:
    """Fresh random data per test, reproducible from the test's id."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


# The CPU cases: the hostile sizes, 3 steps, gradients changing by decades, seed 0's data.
CPU_CASE = dict(shapes=CPU_SIZES, data_seed=0, steps=3, decades=True, weight_decay=1e-2,
                seed=987654321)  # fmt: skip
TRITON_VARIANTS = {
    "fp32": dict(),
    "fp32-amsgrad-decay": dict(amsgrad=True, weight_decay=0.1),
    "fp32-maximize-tensor-lr": dict(maximize=True, tensor_lr=True, weight_decay=0.05),
    "fp32-scaled-clipped": dict(grad_scale=1024.0, grad_factor=0.25, max_grad_norm=0.5),
    "fp32-scaled-not-clipped": dict(grad_scale=1024.0, max_grad_norm=1e6, amsgrad=True),
    "found-inf-skips": dict(grad_scale=64.0, skip_every=2, amsgrad=True, steps=4),
    "fp32-tiny-grads": dict(grad_magnitude=1e-30, amsgrad=True),  # scales at their floor
    # g * g is inf, so is v: its codes become NaN codes. One step: the next would make the
    # params NaN, whose bits differ between devices (a GPU's NaN is 0x7FFFFFFF).
    "fp32-huge-grads": dict(grad_magnitude=1e30, weight_decay=0.1, steps=1),
    "bf16": dict(p_dtype=torch.bfloat16),
    "bf16-fp32grads-sr": dict(p_dtype=torch.bfloat16, grad_dtype=torch.float32, sr=True),
    "bf16-sr-amsgrad-maximize": dict(p_dtype=torch.bfloat16, sr=True, amsgrad=True, maximize=True),
    "bf16-master-remainder": dict(p_dtype=torch.bfloat16, master=True, weight_decay=0.1),
    "bf16-master-sr-amsgrad": dict(p_dtype=torch.bfloat16, master=True, sr=True, amsgrad=True),
    "fp16": dict(p_dtype=torch.float16, amsgrad=True),
    "fp16-fp32grads-master": dict(p_dtype=torch.float16, grad_dtype=torch.float32, master=True),
}
INT8_OP_CASES = backend_cases("cpu", "cpu", {k: {**CPU_CASE, **v} for k, v in
                                             INT8_VARIANTS.items()}) + backend_cases(
    "triton", TRITON_DEVICE, {k: dict(shapes=SMALL, **v) for k, v in TRITON_VARIANTS.items()}
)  # fmt: skip


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("backend,device,case", INT8_OP_CASES)
def test_int8_variants_match_the_reference_bit_for_bit(backend, device, case, gen):
    """8-bit moments through a backend's op, every byte (params, masters, codes, scales) the
    reference's after every step; a case's data from its seed, or from the test's id."""
    case = dict(case)
    if "data_seed" in case:
        gen = torch.Generator().manual_seed(case.pop("data_seed"))
    mine, _ = op_lockstep(backend, device, case.pop("shapes"), gen, **case)
    codes = torch.cat([c.cpu().reshape(-1) for c in mine["exp_avgs"] + mine["exp_avg_sqs"]])
    assert codes.numel() and (codes != 0).any(), "no code was written: the check proves nothing"


@pytest.mark.parametrize("amsgrad", [False, True])
def test_maximize_clipping_and_loss_scale_match_the_reference(amsgrad):
    case = {k: v for k, v in CPU_CASE.items() if k not in ("shapes", "data_seed")}
    op_lockstep("cpu", "cpu", [(33,), (4097,)], torch.Generator().manual_seed(0), maximize=True,
                max_grad_norm=1.0, grad_scale=1024.0, found_inf=True, amsgrad=amsgrad,
                **case)  # fmt: skip


def test_the_state_really_is_what_the_configurations_claim(gen):
    """The huge-gradient case does reach inf (NaN codes) and the tiny one the floor scale,
    so those configurations test what their names say."""
    huge, _ = op_lockstep("triton", TRITON_DEVICE, [(33,)], gen, steps=1, grad_magnitude=1e30)
    assert (huge["exp_avg_sqs"][0].cpu() == 0xFF).all()  # v = inf: E4M4's NaN code
    tiny, _ = op_lockstep("triton", TRITON_DEVICE, [(33,)], gen, steps=4, grad_magnitude=1e-30,
                          beta1=0.0)  # fmt: skip
    assert (tiny["scales"][0][0].cpu() == quant.SCALE_MIN).all()


def test_codes_round_stochastically_without_stochastic_rounding():
    """The codes draw noise whatever stochastic_rounding says: another seed, other codes
    (each matching the reference); the fp32 params, rounded to nearest, stay the same."""
    runs = [op_lockstep("triton", TRITON_DEVICE, [(257,)], torch.Generator().manual_seed(5),
                        steps=1, seed=s) for s in (1, 2)]  # fmt: skip
    (a, _), (b, _) = runs
    assert torch.equal(a["params"][0], b["params"][0])
    assert not torch.equal(a["exp_avgs"][0], b["exp_avgs"][0])
    assert not torch.equal(a["exp_avg_sqs"][0], b["exp_avg_sqs"][0])


# ---------------------------------------------------------------------- through fastopt.AdamW


def _cuda_variants() -> dict:
    """Every CUDA dispatch variant with 8-bit moments: params, master, stochastic rounding
    (bf16 stores only), fp32 grads."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        for master in [False] if dtype == torch.float32 else [False, True]:
            for sr in [False, True] if dtype == torch.bfloat16 and not master else [False]:
                for fp32_grads in [False] if dtype == torch.float32 else [False, True]:
                    ident = f"{name}{'-master' if master else ''}{'-sr' if sr else ''}"
                    ident += "-fp32grads" if fp32_grads else ""
                    out[ident] = (dtype, master, sr, fp32_grads)
    return out


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("backend,device,variant", backend_cases("cuda", "cuda", _cuda_variants()))
def test_int8_optimizer_variants_match_the_reference_bit_for_bit(backend, device, variant,
                                                                 amsgrad):  # fmt: skip
    int8_optimizer_lockstep(backend, device, CUDA_SIZES, *variant, amsgrad, maximize=False)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adamw", "amsgrad"])
@pytest.mark.parametrize("backend,device", backend_params([("cuda", "cuda")]))
def test_int8_maximize_and_clipping_match_the_reference(backend, device, amsgrad):
    int8_optimizer_lockstep(backend, device, CUDA_SIZES, torch.float32, False, False, False,
                            amsgrad, maximize=True, clip=1.0)  # fmt: skip


@pytest.mark.parametrize("backend,device", backend_params([("triton", TRITON_DEVICE)]))
def test_int8_optimizer_matches_the_reference_backend(backend, device):
    """Through the optimizer: fastopt.AdamW(state_dtype="int8") gives the same bytes on the
    Triton backend as on the reference one, small params (fp32 moments) included."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(n, generator=gen) for n in (300, 33, 5)]
    runs = optimizer_lockstep(
        backend, device, init, lambda step: [torch.randn(x.shape, generator=gen) for x in init],
        steps=2, dtype=torch.float32, lr=1e-2, amsgrad=True, state_dtype="int8",
        min_8bit_size=32, seed=3,
    )  # fmt: skip
    ps, opt = runs[1]
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.uint8
    assert opt.state[ps[2]]["exp_avg"].dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
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

    replay_in_cuda_graph(scaler_g, opt_g, load)
    assert_same_state(optimizer_snapshot(opt_g, ps_g), optimizer_snapshot(opt_e, ps_e),
                     "graph vs eager")  # fmt: skip
    assert opt_g.state[ps_g[0]]["exp_avg"].dtype == torch.uint8
    assert scaler_g.get_scale() == scaler_e.get_scale()
